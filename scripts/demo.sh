#!/usr/bin/env bash
# The main job: a real system split into OS-level VMs, declared in one manifest
# (examples/shop/system.toml) and brought up with `shuttle up`:
#
#   VM db        PostgreSQL 15 with its own data directory (initialised on first use)
#   VM shop      a web shop that reads its catalogue from db with psql, only through a
#                `connect` rule on db's unix socket (PostgreSQL's `peer` authentication sees
#                the shop's own OS user through the channel), and prints invoices on ...
#   VM printer   ... whose print-invoice program the shop runs through an `invoke` rule (the
#                invoice file, its argument, is shown to it read-only)
#   VM intruder  with no rule: it keeps trying to reach the database and reaches nothing
#
# Every claim is checked (the script exits non-zero if one does not hold), every cross-VM
# decision shows in the audit and in the system's graph, and everything is cleaned up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/demo.sh needs root (VMs use namespaces, mounts and cgroups): run it with sudo" >&2
  exit 1
fi
scripts/install-deps.sh
echo "building shuttle (release)..." >&2
cargo build --release --locked --quiet -p shuttle

export SHUTTLE_ROOT
SHUTTLE_ROOT=$(mktemp -d /tmp/shuttle-demo.XXXXXX)
shuttle=target/release/shuttle
manifest=examples/shop/system.toml
cleanup() {
  "$shuttle" down "$manifest" >/dev/null 2>&1 || true
  for vm in db shop printer intruder; do "$shuttle" vm rm --force "$vm" >/dev/null 2>&1 || true; done
  "$shuttle" daemon --stop >/dev/null 2>&1 || true
  rm -rf "$SHUTTLE_ROOT"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
check() { # check DESCRIPTION COMMAND...: the command must succeed
  local what=$1; shift
  if "$@"; then printf '  \033[32mok\033[0m   %s\n' "$what"; else printf '  \033[31mFAIL\033[0m %s\n' "$what"; exit 1; fi
}
refuse() { # refuse DESCRIPTION COMMAND...: the command must fail
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then printf '  \033[31mFAIL\033[0m %s\n' "$what"; exit 1; else printf '  \033[32mok\033[0m   %s\n' "$what"; fi
}
wait_for() { # wait_for COMMAND...: up to 15 s
  for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@"
}
page() { # page PATH: the shop's page, fetched inside VM shop
  "$shuttle" run shop -- python3 -c "import sys, urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080' + sys.argv[1], timeout=10).read().decode().strip())" "$1"
}

step "shuttle up $manifest"
"$shuttle" up "$manifest"

step "the shop's catalogue, served in VM shop with data from VM db (connect rule)"
page / | sed 's/^/    /'
check "the catalogue crossed from db to shop as role shop (peer authentication through Shuttle)" \
  sh -c "$(declare -f page); shuttle='$shuttle'; page / | grep -q '^shop|teapot|24.50'"

step "an invoice printed on VM printer (invoke rule, the invoice file passed read-only)"
page /invoice | sed 's/^/    /'
check "print-invoice ran in VM printer on the shop's file" \
  sh -c "'$shuttle' run printer -- grep -q '^teapot|24.50' /tmp/printed-invoices.log"
refuse "the shop's own print-invoice is only a stub: nothing was printed in VM shop" \
  "$shuttle" run shop -- test -e /tmp/printed-invoices.log

step "shuttle ps"
"$shuttle" ps

step "isolation: what no rule allows stays impossible"
check "the intruder keeps trying, is refused and audited" \
  wait_for sh -c "'$shuttle' audit --denied --json | grep -q '\"from\":\"intruder\"'"
"$shuttle" audit --denied | tail -n 1 | cut -c1-160
refuse "intruder cannot reach the shop's port (own network namespace)" \
  "$shuttle" run intruder -- python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/', timeout=2)"
refuse "intruder cannot see the other VMs' processes (own PID namespace)" \
  sh -c "'$shuttle' run intruder -- ps ax | grep -q 'bin/postgres -D\|shop\.py'"
refuse "intruder cannot read db's data directory (own copy-on-write root)" \
  "$shuttle" run intruder -- ls /srv/pgdata
refuse "intruder cannot see Shuttle's state (every VM's upper layer) through the host root" \
  sh -c "'$shuttle' run intruder -- ls '$SHUTTLE_ROOT/state' | grep -q ."
refuse "the host's own root is untouched by the VMs' writes" test -e /srv/pgdata
refuse "mount is refused inside a VM" "$shuttle" run shop -- mount -t tmpfs none /mnt
refuse "new namespaces are refused inside a VM" "$shuttle" run shop -- unshare -n true
refuse "kernel settings are read-only inside a VM" "$shuttle" run shop -- sh -c 'echo 1 > /proc/sys/kernel/sysrq'

step "the system's graph: VMs, applications, dependencies, allowed interactions with audit counts"
"$shuttle" graph "$manifest" | grep -- '->' | sed 's/^/    /'

step "shuttle down $manifest"
"$shuttle" down "$manifest"
refuse "no VM process is left on the host" pgrep -f 'shop\.py|/srv/pgdata'
check "db's data survives for the next up (in its upper layer)" \
  test -f "$SHUTTLE_ROOT/state/vms/db/upper/srv/pgdata/PG_VERSION"
echo
echo "Done: four VMs from one manifest, two allowed channels, everything else isolated and audited."
