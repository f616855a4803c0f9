#!/bin/sh
# Runs once in VM db as user postgres (the `creates` marker at the end makes `up` skip it
# later): a cluster that listens on its unix socket only, `peer` authentication with the
# shop's OS user mapped to role shop, and the catalogue (made in single-user mode, so that
# no server has to run yet).
set -eu
bin=/usr/lib/postgresql/15/bin
data=/srv/pgdata
"$bin/initdb" -D "$data" -U postgres --locale=C -E UTF8 --no-sync -A peer >/dev/null
cat >> "$data/postgresql.conf" <<'CONF'
listen_addresses = ''
unix_socket_directories = '/run/postgresql'
CONF
echo 'local all all peer map=vms' > "$data/pg_hba.conf"
printf 'vms postgres postgres\nvms www-data shop\n' > "$data/pg_ident.conf"
printf '%s\n' "CREATE ROLE shop LOGIN;" "CREATE DATABASE shop OWNER shop;" |
  "$bin/postgres" --single -D "$data" postgres >/dev/null
printf '%s\n' "CREATE TABLE products (name text, price numeric);" \
  "ALTER TABLE products OWNER TO shop;" \
  "INSERT INTO products VALUES ('teapot', 24.50), ('kettle', 39.00), ('cup', 4.20);" |
  "$bin/postgres" --single -D "$data" shop >/dev/null
touch "$data/shop-ready"
echo "database initialised"
