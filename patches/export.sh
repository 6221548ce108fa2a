#!/usr/bin/env bash
# Regenerate the patch files of one crate from a dev checkout in patched/<crate>, for engineers
# changing the engine patches.
#
# Workflow:
#   rm -rf patched && KVPLUGIN_PATCH_DEV=1 bash patches/apply.sh
# unpacks each pristine release and commits it, then commits each patch file on top (one commit
# per file, its subject the file name). Edit, build and test; fold each change into the commit of
# the patch it belongs to (`git commit --fixup=<commit>` then `git rebase -i --autosquash
# --root`), or add a commit whose subject is a new file name (`0005-....patch`). Then
#   bash patches/export.sh [crate]        # default: mistralrs-core; also: mistralrs
# writes one patch file per commit (source files only) and the manifest patch (Cargo.toml against
# the pristine commit), and refreshes the stamp so that apply.sh leaves the folder (and cargo's
# build of it) alone. The git-checkout manifest patch (cargo-toml/git.patch) is edited by hand;
# apply.sh checks that it applies.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${1:-mistralrs-core}"
crate="$root/patched/$name"
out="$root/patches/$name"
fail() {
  echo "export.sh: $*" >&2
  exit 1
}
# A dev checkout is a repository of its own (git must not find this project's, above it) with
# commits; a plain unpack has only apply.sh's object-less `.git` (pin_git_revision).
[[ "$(git -C "$crate" rev-parse --git-dir 2>/dev/null)" == ".git" ]] \
  && git -C "$crate" rev-list --max-parents=0 HEAD >/dev/null 2>&1 \
  || fail "$crate is not a dev checkout (see the header)"
cd "$crate"
[[ -z "$(git status --porcelain -- src Cargo.toml)" ]] \
  || fail "uncommitted changes in $crate: commit them into the patch they belong to first"
pristine="$(git rev-list --max-parents=0 HEAD)"
prefix=(--src-prefix="a/$name/" --dst-prefix="b/$name/")
rm -f "$out"/*.patch
for commit in $(git rev-list --reverse "$pristine..HEAD"); do
  file="$(git log -1 --format=%s "$commit")"
  [[ "$file" == cargo-toml/* || "$file" == crates-io.patch ]] && continue
  [[ "$file" =~ ^[0-9]{4}-[a-z0-9-]+\.patch$ ]] \
    || fail "commit $commit: its subject '$file' is not a patch file name (NNNN-name.patch)"
  if [[ -n "$(git diff "$commit~1" "$commit" -- src)" ]]; then
    git diff "${prefix[@]}" "$commit~1" "$commit" -- src >"$out/$file"
  fi
done
git diff "${prefix[@]}" "$pristine" HEAD -- Cargo.toml >"$out/cargo-toml/crates-io.patch"
KVPLUGIN_STAMP_ONLY="$name" bash "$root/patches/apply.sh" >.kvplugin-stamp
echo "export.sh: $(ls "$out"/*.patch | wc -l) patch files written for $name; stamp $(cat .kvplugin-stamp)"
