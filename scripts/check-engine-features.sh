#!/usr/bin/env bash
# The engine patches are additive: with their features off, the patched mistralrs-core must
# compile as the stock engine plus the two bug fixes (every kv-hooks and kv-blend line is behind
# its feature). `cargo check` of mistralrs-core alone resolves its features from its own manifest
# (none of ours), into a separate target folder so that the release build is left alone. With the
# features on, the workspace build compiles mistralrs-core, `mistralrs` and `mistralrs-server-core`
# (integration-tests depends on both).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-kvplugin/target}/engine-features-off"
echo "check-engine-features: cargo check of mistralrs-core with kv-hooks and kv-blend off" >&2
cargo check --locked --quiet --manifest-path "$root/Cargo.toml" -p mistralrs-core \
  --target-dir "$target"
echo "check-engine-features: ok" >&2
