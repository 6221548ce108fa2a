#!/usr/bin/env bash
# The fault matrix (`kvplugin bench faults`) on local disk, s3s-fs and Garage: the two servers are
# started on 127.0.0.1 by the `bench-faults` binary (integration-tests) and stopped at the end.
#
#   scripts/bench-faults.sh [OUT_DIR] [extra `bench faults` arguments, e.g. --context 1024]
#
# Writes OUT_DIR/faults.json (default OUT_DIR: .kvplugin/bench-faults-out). Needs `make setup-tests`
# (the servers). Fails when any row has a wrong answer or a lost request.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/.kvplugin/bench-faults-out}"
shift || true
mkdir -p "$out"
store="$(mktemp -d)"
trap 'rm -rf "$store"' EXIT
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-kvplugin/target}"
# The whole workspace, as `make setup` builds it: building one package alone resolves other
# features and would build the engine again.
cargo build --release --locked --workspace
"$CARGO_TARGET_DIR/release/bench-faults" \
  --store "$store" --json "$out/faults.json" "$@"
