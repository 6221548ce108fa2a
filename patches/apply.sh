#!/usr/bin/env bash
# Materialise the patched engine crates that `[patch.crates-io]` in the root Cargo.toml points to.
#
# For each crate listed below: obtain the exact crates.io release through cargo (no other download),
# check the .crate file against the SHA-256 pinned here, unpack it into the git-ignored folder
# `patched/<crate>` (or `$KVPLUGIN_PATCHED_DIR/<crate>`), and apply `patches/<crate>/*.patch` in
# order, then the manifest patch. Idempotent: a stamp file records the crate checksum and the
# patches applied; when nothing changed the folder is left untouched (so cargo does not rebuild
# the engine).
#
# Environment:
#   CARGO_HOME             where cargo keeps its registry cache (default ~/.cargo); the crates are
#                          fetched into it when missing, so an empty cache works.
#   KVPLUGIN_PATCHED_DIR   where to unpack (default <repo>/patched); CI unpacks into a scratch
#                          folder with an empty CARGO_HOME to prove a fresh machine works.
#   KVPLUGIN_PATCH_DEV=1   for editing the patches (see export.sh): the pristine release and each
#                          patch file become commits of a git repository in the unpacked folder.
#   KVPLUGIN_STAMP_ONLY=NAME  print the stamp of crate NAME and change nothing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
patched="${KVPLUGIN_PATCHED_DIR:-$root/patched}"

fail() {
  echo "apply.sh: $*" >&2
  exit 1
}

# crate name, version, sha256 of the published .crate
crates=(
  "mistralrs-core 0.8.1 a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4"
  "mistralrs 0.8.1 9bb0a83340b4492ebba9760ba6845364de369c7e10c1f91af8733d574c7405fa"
)

# The .crate file in cargo's registry cache, or nothing. No match is an answer, not a failure:
# under `set -e -o pipefail` a failing `ls` would end the script before the fetch below.
find_crate_file() {
  local name=$1 version=$2 f
  for f in "$cargo_home"/registry/cache/*/"$name-$version.crate"; do
    [[ -f "$f" ]] && { echo "$f"; return 0; }
  done
  return 0
}

# mistralrs-core's build script records `git rev-parse HEAD` (run in the crate's folder) as
# MISTRALRS_GIT_REVISION and asks cargo to rerun when `.git/HEAD` changes. An unpacked release has
# no `.git`: git answered with this project's own HEAD (the engine recompiled after every commit
# here) and the missing `.git/HEAD` made cargo rerun the script, and so recompile the engine, on
# every build. A minimal repository whose detached HEAD is the release's upstream commit (from
# `.cargo_vcs_info.json`) makes the revision the one a stock build reports, and stable. It holds no
# objects, so `export.sh` never mistakes it for a dev checkout. Dev checkouts keep their own `.git`.
pin_git_revision() {
  local dir=$1 sha
  [[ -e "$dir/.git" ]] && return 0
  sha="$(sed -n 's/.*"sha1": *"\([0-9a-f]\{40\}\)".*/\1/p' "$dir/.cargo_vcs_info.json" 2>/dev/null)"
  [[ -n "$sha" ]] || sha=0000000000000000000000000000000000000000
  mkdir -p "$dir/.git/objects" "$dir/.git/refs"
  echo "$sha" >"$dir/.git/HEAD"
}

command -v cargo >/dev/null || fail "cargo is not on PATH (install the Rust toolchain first)"
command -v patch >/dev/null || fail "the 'patch' program is missing (apt-get install patch)"
command -v sha256sum >/dev/null || fail "sha256sum is missing (coreutils)"

for entry in "${crates[@]}"; do
  read -r name version want_sha <<<"$entry"
  if [[ -n "${KVPLUGIN_STAMP_ONLY:-}" && "$KVPLUGIN_STAMP_ONLY" != "$name" ]]; then
    continue
  fi
  crate_file="$(find_crate_file "$name" "$version")"
  if [[ -z "$crate_file" ]]; then
    echo "apply.sh: fetching $name $version through cargo (into $cargo_home)" >&2
    cargo fetch --locked --manifest-path "$root/patches/fetch/Cargo.toml" >&2 \
      || fail "cargo fetch of $name $version failed (is crates.io reachable?)"
    crate_file="$(find_crate_file "$name" "$version")"
    [[ -n "$crate_file" ]] || fail "cargo fetch did not produce $name-$version.crate in $cargo_home"
  fi
  got_sha="$(sha256sum "$crate_file" | cut -d' ' -f1)"
  [[ "$got_sha" == "$want_sha" ]] \
    || fail "checksum mismatch for $crate_file: expected $want_sha, got $got_sha"

  # Source patches apply to the crates.io release and to a git checkout alike; the manifest is
  # normalised by `cargo publish`, so it has a variant of its own for each (cargo-toml/).
  shopt -s nullglob
  source_patches=("$root/patches/$name"/*.patch)
  manifest_patch=("$root/patches/$name"/cargo-toml/crates-io.patch)
  git_manifest_patch=("$root/patches/$name"/cargo-toml/git.patch)
  shopt -u nullglob
  stamp="$(
    {
      echo "$got_sha"
      for p in "${source_patches[@]}" "${manifest_patch[@]}" "${git_manifest_patch[@]}"; do
        echo "$(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"
      done
    } | sha256sum | cut -d' ' -f1
  )"
  if [[ -n "${KVPLUGIN_STAMP_ONLY:-}" ]]; then
    echo "$stamp"
    continue
  fi
  dest="$patched/$name"
  if [[ -f "$dest/.kvplugin-stamp" && "$(cat "$dest/.kvplugin-stamp")" == "$stamp" ]]; then
    pin_git_revision "$dest"
    continue
  fi

  mkdir -p "$patched"
  work="$(mktemp -d "$patched/.tmp.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$crate_file" -C "$work" || fail "cannot unpack $crate_file"
  mv "$work/$name-$version" "$work/$name"
  dev_commit() {
    if [[ -n "${KVPLUGIN_PATCH_DEV:-}" ]]; then
      (cd "$work/$name" && git add -A && git -c user.name=dev -c user.email=dev@localhost \
        commit -qm "$1")
    fi
  }
  if [[ -n "${KVPLUGIN_PATCH_DEV:-}" ]]; then
    # For editing the patches (see export.sh): the pristine release, then one commit per patch
    # file, named after it.
    (cd "$work/$name" && git init -q)
    dev_commit "$name $version pristine"
  fi
  for p in "${source_patches[@]}" "${manifest_patch[@]}"; do
    echo "apply.sh: applying $(basename "$p") to $name $version" >&2
    patch --quiet --batch --forward -p1 -d "$work" <"$p" \
      || fail "$(basename "$p") does not apply to $name $version"
    dev_commit "$(basename "$p")"
  done
  # The git-checkout variant of the manifest patch must apply to the original manifest that the
  # release ships as Cargo.toml.orig.
  for p in "${git_manifest_patch[@]}"; do
    mkdir -p "$work/git/$name"
    cp "$work/$name/Cargo.toml.orig" "$work/git/$name/Cargo.toml"
    patch --quiet --batch --forward -p1 -d "$work/git" <"$p" \
      || fail "$(basename "$p") does not apply to the original manifest of $name $version"
  done
  echo "$stamp" >"$work/$name/.kvplugin-stamp"
  pin_git_revision "$work/$name"

  rm -rf "$dest"
  mv "$work/$name" "$dest"
  rm -rf "$work"
  trap - EXIT
done
