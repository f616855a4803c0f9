#!/usr/bin/env bash
# Shows that every escape probe can fail: runs the probes of crates/shuttle/tests/escape.rs
# where their channels are open (on the host itself, or in the victim VM's namespaces without
# its seccomp filter and capability limits) and prints, for each case, whether the probe
# detects the open channel. The probes change nothing on the host (see the header of
# crates/shuttle/tests/escape/probes.py). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/escape-on-host.sh needs root (it creates VMs): run it with sudo" >&2
  exit 1
fi
exec cargo nextest run -p shuttle --test escape --run-ignored only --no-capture "$@"
