#!/usr/bin/env bash
# Installs what the tests need, then runs every check CI runs: formatting, lints, unit tests,
# privileged integration tests and end-to-end tests (as root: they create real VMs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/test.sh needs root (the tests create namespaces, mounts and cgroups): run it with sudo" >&2
  exit 1
fi
scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
cargo test --workspace --doc --locked
