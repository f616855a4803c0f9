#!/usr/bin/env bash
# Installs what building, testing and demonstrating Shuttle needs on a fresh Debian 12 machine
# (run as root). The Rust toolchain and cargo-nextest come with the machine.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
  bubblewrap      # the baseline the benchmarks compare against
  socat           # the user-space relay `shuttle-bench --throughput` compares against
  busybox-static  # a tiny self-contained root tree for the --base DIR tests
  python3         # test programs run inside VMs (memory hogs, socket servers)
  procps          # ps inside VMs
  util-linux      # unshare, mount, ipcmk, ipcs used by the isolation tests
  iproute2
  # The PostgreSQL end-to-end test and `shuttle-bench --pgbench` run their own server inside a
  # VM (own data directory, socket directory and network namespace). Debian's postinst also
  # creates a host cluster 15/main and asks the init system to start it on the host's port
  # 5432: nothing of Shuttle's uses or touches it.
  postgresql-15         # postgres, initdb, pg_ctl and pgbench (in /usr/lib/postgresql/15/bin)
  postgresql-client-15  # psql
  graphviz        # `dot`, for `shuttle graph --format svg` (tests/system.rs renders one)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
