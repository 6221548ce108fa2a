#!/usr/bin/env bash
# Runs the patch step (patches/apply.sh) the way a fresh machine does: an empty CARGO_HOME (no
# registry cache, no index), unpacking into a scratch folder, and checks that it produces exactly
# the sources this checkout builds. It cannot pass on a warm cache only: the temporary CARGO_HOME
# starts empty, so the crates must be fetched through cargo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
echo "fresh-patch-check: patches/apply.sh with an empty CARGO_HOME ($scratch/cargo)" >&2
CARGO_HOME="$scratch/cargo" KVPLUGIN_PATCHED_DIR="$scratch/patched" \
  bash "$root/patches/apply.sh"
for crate in "$scratch/patched"/*/; do
  name="$(basename "$crate")"
  [[ -f "$crate/Cargo.toml" && -d "$crate/src" ]] \
    || { echo "fresh-patch-check: $name was not unpacked" >&2; exit 1; }
  if [[ -d "$root/patched/$name" ]]; then
    diff -r -q -x .git -x .kvplugin-stamp -x target "$crate" "$root/patched/$name" >&2 \
      || { echo "fresh-patch-check: $name differs from patched/$name" >&2; exit 1; }
  fi
done
echo "fresh-patch-check: ok ($(ls "$scratch/patched" | tr '\n' ' '))" >&2
