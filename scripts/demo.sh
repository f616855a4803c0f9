#!/usr/bin/env bash
# The main job: builds Shuttle and shows OS-level VMs isolating a real workload on this host.
#
# A web shop (Python's HTTP server) runs in VM "shop"; VM "intruder" runs beside it on the same
# host. Nothing is allowed across VMs yet (no policy rules exist), so the shop works inside its
# own VM and is unreachable, invisible and untouchable from the other one, while each VM keeps
# its own files, processes, IPC objects and resource limits. Every claim is checked: the script
# exits non-zero if isolation does not hold. It cleans up after itself.
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
cleanup() {
  for vm in shop intruder; do "$shuttle" vm rm --force "$vm" >/dev/null 2>&1 || true; done
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

step "create two VMs: copy-on-write views of this host's root"
"$shuttle" vm create shop --memory 256M --pids 256 --tag web
"$shuttle" vm create intruder
"$shuttle" vm ls

step "start the shop: a web server inside VM shop, on its own loopback"
"$shuttle" run shop -- sh -c 'mkdir -p /srv/shop && echo "welcome to the shop" > /srv/shop/index.html'
"$shuttle" run shop -w /srv/shop -- sh -c 'python3 -m http.server 8080 --bind 127.0.0.1 >/tmp/http.log 2>&1 &'
fetch='import sys, urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8080/", timeout=2).read().decode().strip())'
for _ in $(seq 50); do "$shuttle" run shop -- python3 -c "$fetch" >/dev/null 2>&1 && break; sleep 0.1; done
check "the shop answers inside its own VM: $("$shuttle" run shop -- python3 -c "$fetch")" \
  "$shuttle" run shop -- python3 -c "$fetch"

step "the intruder, on the same host, cannot reach, see or touch the shop"
refuse "intruder cannot connect to the shop's port (own network namespace)" \
  "$shuttle" run intruder -- python3 -c "$fetch"
refuse "intruder cannot see the shop's server process (own PID namespace)" \
  sh -c "'$shuttle' run intruder -- ps ax | grep -q http.server"
refuse "intruder cannot read the shop's files (own copy-on-write root)" \
  "$shuttle" run intruder -- cat /srv/shop/index.html
refuse "the host's own root is untouched by the shop's writes" test -e /srv/shop/index.html
check "the shop's files live in its upper layer: $SHUTTLE_ROOT/state/vms/shop/upper/srv/shop" \
  test -f "$SHUTTLE_ROOT/state/vms/shop/upper/srv/shop/index.html"
"$shuttle" run shop -- ipcmk -Q >/dev/null
refuse "intruder cannot see the shop's SysV message queue (own IPC namespace)" \
  sh -c "'$shuttle' run intruder -- ipcs -q | grep -q '^0x'"
refuse "intruder cannot see Shuttle's state (every VM's upper layer) through the host root" \
  sh -c "'$shuttle' run intruder -- ls '$SHUTTLE_ROOT/state' | grep -q ."
check "hostnames differ: $("$shuttle" run shop -- hostname) / $("$shuttle" run intruder -- hostname)" \
  test "$("$shuttle" run shop -- hostname)" != "$("$shuttle" run intruder -- hostname)"

step "hardening: root inside a VM is not root over the host"
refuse "mount is refused inside a VM" "$shuttle" run shop -- mount -t tmpfs none /mnt
refuse "new namespaces are refused inside a VM" "$shuttle" run shop -- unshare -n true
refuse "kernel settings are read-only inside a VM" "$shuttle" run shop -- sh -c 'echo 1 > /proc/sys/kernel/sysrq'

step "resource limits: a memory hog in the shop is killed, the shop keeps serving"
set +e
"$shuttle" run shop -- python3 -c "b = b'x' * (1 << 30)" 2>/dev/null
status=$?
set -e
check "the hog got exit status $status (128 + SIGKILL) from the VM's 256M limit" test "$status" -eq 137
check "the shop still answers" "$shuttle" run shop -- python3 -c "$fetch"

step "stop: SIGTERM to every process of a VM, and nothing left behind"
"$shuttle" vm stop shop
"$shuttle" vm stop intruder 2>/dev/null || true
refuse "no shop process is left on the host" sh -c "ps ax | grep -v grep | grep -q 'http.server 8080'"
"$shuttle" vm ls
echo
echo "The shop's files survive its stop: they are back on its next run."
"$shuttle" run shop -- cat /srv/shop/index.html
"$shuttle" vm stop shop >/dev/null 2>&1
