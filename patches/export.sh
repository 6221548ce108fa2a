#!/usr/bin/env bash
# Regenerate patches/mistralrs-core/{0001-kv-hooks.patch,cargo-toml/crates-io.patch} from the
# edited sources in patched/mistralrs-core, for engineers changing the engine patch.
#
# Workflow: `rm -rf patched && KVPLUGIN_PATCH_DEV=1 bash patches/apply.sh` unpacks the pristine
# release, commits it in a git repository inside patched/mistralrs-core and applies the patches on
# top; edit there, build, then run this script. The stamp is refreshed so that apply.sh leaves the
# folder (and cargo's build of it) alone. The git-checkout manifest patch is edited by hand.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
crate="$root/patched/mistralrs-core"
[[ -d "$crate/.git" ]] || { echo "export.sh: $crate is not a dev checkout (see the header)" >&2; exit 1; }
cd "$crate"
git add -A -- src Cargo.toml
prefix=(--src-prefix=a/mistralrs-core/ --dst-prefix=b/mistralrs-core/)
git diff --cached "${prefix[@]}" -- src >"$root/patches/mistralrs-core/0001-kv-hooks.patch"
git diff --cached "${prefix[@]}" -- Cargo.toml >"$root/patches/mistralrs-core/cargo-toml/crates-io.patch"
rm -f .kvplugin-stamp
# apply.sh computes the stamp; a dry run on a scratch copy gives it without touching this folder.
KVPLUGIN_STAMP_ONLY=1 bash "$root/patches/apply.sh" >.kvplugin-stamp
echo "export.sh: patches written; stamp $(cat .kvplugin-stamp)"
