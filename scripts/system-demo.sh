#!/usr/bin/env bash
# The main job as a declared system: `shuttle up examples/shop/system.toml` starts PostgreSQL in
# VM db (initialised on first use), the web shop in VM shop (which reaches the database only
# through the manifest's policy) and an intruder VM, in dependency order behind readiness
# probes; then the script shows the shop's page, `shuttle ps`, the audit and the system's graph,
# and brings it down. Every claim is checked; everything is cleaned up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/system-demo.sh needs root (VMs use namespaces, mounts and cgroups): run it with sudo" >&2
  exit 1
fi
scripts/install-deps.sh
echo "building shuttle (release)..." >&2
cargo build --release --locked --quiet -p shuttle

export SHUTTLE_ROOT
SHUTTLE_ROOT=$(mktemp -d /tmp/shuttle-system-demo.XXXXXX)
shuttle=target/release/shuttle
manifest=examples/shop/system.toml
cleanup() {
  "$shuttle" down "$manifest" >/dev/null 2>&1 || true
  for vm in db shop intruder; do "$shuttle" vm rm --force "$vm" >/dev/null 2>&1 || true; done
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
fetch='import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8080/", timeout=5).read().decode().strip())'

step "shuttle up $manifest"
"$shuttle" up "$manifest"

step "the shop's page, served in VM shop with data from VM db"
"$shuttle" run shop -- python3 -c "$fetch" | sed 's/^/    /'
check "the catalogue crossed from db to shop as role shop" \
  sh -c "'$shuttle' run shop -- python3 -c '$fetch' | grep -q '^shop|teapot|24.50'"

step "shuttle ps"
"$shuttle" ps

step "the intruder's attempts, audited"
check "the intruder is refused and audited" \
  wait_for sh -c "'$shuttle' audit --denied --json | grep -q '\"from\":\"intruder\"'"
"$shuttle" audit --denied | tail -n 2

step "shuttle graph (Graphviz source; --format svg renders it)"
"$shuttle" graph "$manifest" | grep -- '->'

step "shuttle down $manifest"
"$shuttle" down "$manifest"
refuse "no VM process is left on the host" pgrep -f 'shop\.py|/srv/pgdata'
echo
echo "Done: a whole system from one manifest, in order, behind readiness probes, and down again."
