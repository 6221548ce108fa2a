#!/usr/bin/env bash
# The engine patches are additive: with their features off, the patched mistralrs-core must
# compile as the stock engine plus the three bug fixes (every kv-hooks and kv-blend line is behind
# its feature). `cargo check -p mistralrs-core` resolves the features of mistralrs-core alone (its
# own manifest asks for none of ours). It shares the target folder and profile of `make lint`'s
# clippy run, so dependencies checked there with the same features are reused. With the features
# on, the workspace build compiles mistralrs-core, `mistralrs` and `mistralrs-server-core`
# (integration-tests depends on both).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
echo "check-engine-features: cargo check of mistralrs-core with kv-hooks and kv-blend off" >&2
cargo check --locked --quiet --profile release --manifest-path "$root/Cargo.toml" -p mistralrs-core
echo "check-engine-features: ok" >&2
