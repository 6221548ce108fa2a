#!/usr/bin/env bash
# The engine patches are additive: with their features off, the patched mistralrs-core must
# compile as the stock engine plus the bug fixes (every kv-hooks and kv-blend line is behind
# its feature). Inside the workspace cargo would unify mistralrs-core's features with those the
# plugin asks for, so the check runs on a helper package of its own (patches/check) whose lock
# file starts as a copy of the workspace's (same versions). It shares the workspace's target
# folder and release profile, so dependencies already checked with the same features (by
# `make lint`'s clippy run) are reused. With the features on, the workspace build compiles
# mistralrs-core, `mistralrs` and `mistralrs-server-core` (integration-tests depends on both).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-kvplugin/target}"
cp "$root/Cargo.lock" "$root/patches/check/Cargo.lock"
echo "check-engine-features: cargo check of mistralrs-core with kv-hooks, kv-blend and paged-attn-cpu off" >&2
cargo check --quiet --profile release --manifest-path "$root/patches/check/Cargo.toml" \
  --target-dir "$target"
features="$(cargo tree --quiet --manifest-path "$root/patches/check/Cargo.toml" -e features \
  -i mistralrs-core --prefix none --format '{f}' | head -n 1)"
if [[ "$features" == *kv-hooks* || "$features" == *kv-blend* || "$features" == *paged-attn-cpu* ]]; then
  echo "check-engine-features: mistralrs-core was built with '$features'" >&2
  exit 1
fi
echo "check-engine-features: ok (mistralrs-core features: '${features}')" >&2
echo "check-engine-features: cargo check of mistralrs-core with kv-hooks alone (no paged-attn-cpu)" >&2
cargo check --quiet --profile release --manifest-path "$root/patches/check/Cargo.toml" \
  --target-dir "$target" --features hooks-only
echo "check-engine-features: ok (kv-hooks alone)" >&2
