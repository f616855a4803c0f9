#!/usr/bin/env bash
# The main job: builds Shuttle and runs a small real system split into OS-level VMs whose
# members cooperate through Shuttle, and only as the policy says.
#
#   VM db        PostgreSQL 15 with its own data directory, on its own loopback and socket
#   VM shop      a web shop (Python's HTTP server) that reads its catalogue from db with psql,
#                through a `connect` rule on db's unix socket; PostgreSQL's `peer`
#                authentication sees the shop's own OS user (www-data) through the channel
#   VM intruder  on the same host, with no rule: it reaches neither db nor the shop
#
# Every claim is checked (the script exits non-zero if one does not hold), every cross-VM
# decision shows in the audit, and the script cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/demo.sh needs root (VMs use namespaces, mounts and cgroups): run it with sudo" >&2
  exit 1
fi
scripts/install-deps.sh
echo "building shuttle (release)..." >&2
cargo build --release --locked --quiet -p shuttle -p shuttle-bench

export SHUTTLE_ROOT
SHUTTLE_ROOT=$(mktemp -d /tmp/shuttle-demo.XXXXXX)
shuttle=target/release/shuttle
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
cleanup() {
  for vm in db shop intruder; do "$shuttle" vm rm --force "$vm" >/dev/null 2>&1 || true; done
  "$shuttle" daemon --stop >/dev/null 2>&1 || true
  rm -rf "$SHUTTLE_ROOT"
}
trap cleanup EXIT
[[ -n "${DEMO_KEEP:-}" ]] && trap - EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
check() { # check DESCRIPTION COMMAND...: the command must succeed
  local what=$1; shift
  if "$@"; then printf '  \033[32mok\033[0m   %s\n' "$what"; else printf '  \033[31mFAIL\033[0m %s\n' "$what"; exit 1; fi
}
refuse() { # refuse DESCRIPTION COMMAND...: the command must fail
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then printf '  \033[31mFAIL\033[0m %s\n' "$what"; exit 1; else printf '  \033[32mok\033[0m   %s\n' "$what"; fi
}
wait_for() { # wait_for COMMAND...: up to 10 s
  for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@"
}

step "three VMs: copy-on-write views of this host's root, each with its own namespaces"
"$shuttle" vm create db --memory 512M --pids 256 --tag data
"$shuttle" vm create shop --memory 256M --pids 256 --tag web
"$shuttle" vm create intruder
"$shuttle" vm ls

step "VM db: PostgreSQL with its own data directory, started inside the VM"
"$shuttle" run db -- sh -c 'install -d -o postgres -g postgres -m 0700 /srv/pgdata &&
  install -d -o postgres -g postgres -m 2775 /run/postgresql &&
  rm -f /run/postgresql/.s.PGSQL.5432 /run/postgresql/.s.PGSQL.5432.lock'
"$shuttle" run db -u postgres -- "$pgbin/initdb" -D /srv/pgdata -U postgres --locale=C -E UTF8 \
  --no-sync -A peer >/dev/null
# Unix socket only; `peer` authentication, with OS user www-data (the shop's) mapped to role shop.
"$shuttle" run db -u postgres -- sh -c "cat >> /srv/pgdata/postgresql.conf <<'CONF'
listen_addresses = ''
unix_socket_directories = '/run/postgresql'
CONF
echo 'local all all peer map=vms' > /srv/pgdata/pg_hba.conf
printf 'vms postgres postgres\nvms www-data shop\n' > /srv/pgdata/pg_ident.conf"
"$shuttle" run db -u postgres -- "$pgbin/pg_ctl" -D /srv/pgdata -l /srv/pgdata/server.log -w start >/dev/null
"$shuttle" run db -u postgres -- "$pgbin/psql" -h /run/postgresql -q -v ON_ERROR_STOP=1 \
  -c "CREATE ROLE shop LOGIN" -c "CREATE DATABASE shop OWNER shop" >/dev/null
"$shuttle" run db -u postgres -- "$pgbin/psql" -h /run/postgresql -d shop -q -v ON_ERROR_STOP=1 -c "
  CREATE TABLE products (name text, price numeric); ALTER TABLE products OWNER TO shop;
  INSERT INTO products VALUES ('teapot', 24.50), ('kettle', 39.00), ('cup', 4.20);" >/dev/null
check "PostgreSQL runs in VM db: $("$shuttle" run db -u postgres -- "$pgbin/psql" -h /run/postgresql -Atc 'select version()' | cut -d' ' -f1-2)" \
  "$shuttle" run db -u postgres -- "$pgbin/psql" -h /run/postgresql -Atc 'select 1'

step "VM shop: a web shop whose catalogue comes from db"
cat > "$SHUTTLE_ROOT/shop.py" <<'PY'
import http.server, subprocess, sys
PSQL = sys.argv[1]
class Shop(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        q = subprocess.run([PSQL, "-h", "/run/postgresql", "-U", "shop", "-d", "shop", "-Atc",
                            "select current_user, name, price from products order by name"],
                           capture_output=True, text=True)
        body = (q.stdout or q.stderr).encode()
        self.send_response(200 if q.returncode == 0 else 502)
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", 8080), Shop).serve_forever()
PY
"$shuttle" run shop -- sh -c 'mkdir -p /srv/shop'
"$shuttle" run shop -- sh -c 'cat > /srv/shop/shop.py' < "$SHUTTLE_ROOT/shop.py"
"$shuttle" run shop -u www-data -- sh -c "setsid python3 /srv/shop/shop.py $pgbin/psql </dev/null >/dev/null 2>&1 &"
fetch='import sys, urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8080/", timeout=5).read().decode().strip())'
wait_for "$shuttle" run shop -- python3 -c 'import socket; socket.create_connection(("127.0.0.1", 8080), 1)'
refuse "without a rule the shop cannot reach db (its own /run/postgresql is empty)" \
  "$shuttle" run shop -- python3 -c "$fetch"

step "the policy: the shop may connect to db's PostgreSQL socket, nothing else crosses"
cat > "$SHUTTLE_ROOT/policy.toml" <<'TOML'
[[rule]]
name = "shop-reads-catalogue"
op = "connect"
from = "shop"
to = "db"
object = "unix:/run/postgresql/.s.PGSQL.5432"
action = "allow"
TOML
"$shuttle" policy check "$SHUTTLE_ROOT/policy.toml"
"$shuttle" policy load "$SHUTTLE_ROOT/policy.toml"
"$shuttle" policy explain --op connect --from intruder --to db --object unix:/run/postgresql/.s.PGSQL.5432 || true
echo "  the shop's page, served in VM shop with data from VM db (role: the shop's OS user):"
"$shuttle" run shop -- python3 -c "$fetch" | sed 's/^/    /'
check "the catalogue crossed from db to shop as role shop (peer authentication through Shuttle)" \
  sh -c "'$shuttle' run shop -- python3 -c '$fetch' | grep -q '^shop|teapot|24.50'"

step "VM intruder, on the same host, with no rule"
refuse "intruder cannot reach db's PostgreSQL (the address stays in its own VM)" \
  "$shuttle" run intruder -- "$pgbin/psql" -h /run/postgresql -U shop -d shop -c 'select 1'
refuse "intruder cannot reach the shop's port (own network namespace)" \
  "$shuttle" run intruder -- python3 -c "$fetch"
refuse "intruder cannot see the other VMs' processes (own PID namespace)" \
  sh -c "'$shuttle' run intruder -- ps ax | grep -q 'postgres\|shop.py'"
refuse "intruder cannot read db's data directory (own copy-on-write root)" \
  "$shuttle" run intruder -- ls /srv/pgdata
refuse "intruder cannot see Shuttle's state (every VM's upper layer) through the host root" \
  sh -c "'$shuttle' run intruder -- ls '$SHUTTLE_ROOT/state' | grep -q ."
refuse "the host's own root is untouched by the VMs' writes" test -e /srv/pgdata

step "the audit: every cross-VM decision, allowed or denied"
wait_for sh -c "'$shuttle' audit --json | grep -q '\"from\":\"intruder\"'"
"$shuttle" audit | tail -n 5
check "the intruder's attempt is audited as a denial" \
  sh -c "'$shuttle' audit --denied --json | grep -q '\"from\":\"intruder\"'"

step "hardening and limits: root inside a VM is not root over the host"
refuse "mount is refused inside a VM" "$shuttle" run shop -- mount -t tmpfs none /mnt
refuse "new namespaces are refused inside a VM" "$shuttle" run shop -- unshare -n true
refuse "kernel settings are read-only inside a VM" "$shuttle" run shop -- sh -c 'echo 1 > /proc/sys/kernel/sysrq'
set +e
"$shuttle" run shop -- python3 -c "b = b'x' * (1 << 30)" 2>/dev/null
status=$?
set -e
check "a memory hog in the shop got exit status $status (128 + SIGKILL) from the VM's 256M limit" test "$status" -eq 137
check "the shop still serves its catalogue" sh -c "'$shuttle' run shop -- python3 -c '$fetch' >/dev/null"

step "stop: every process of every VM, nothing left behind; data kept for the next start"
"$shuttle" vm stop shop
"$shuttle" vm stop db
"$shuttle" vm stop intruder 2>/dev/null || true
refuse "no VM process is left on the host" pgrep -f 'shop\.py|/srv/pgdata'
"$shuttle" vm ls
check "db's data directory survives its stop (in its upper layer)" \
  test -f "$SHUTTLE_ROOT/state/vms/db/upper/srv/pgdata/PG_VERSION"
echo
echo "Done: three VMs, one allowed channel, everything else isolated and audited."
