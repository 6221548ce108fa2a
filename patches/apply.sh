#!/usr/bin/env bash
# Materialise the patched engine crates that `[patch.crates-io]` in the root Cargo.toml points to.
#
# For each crate listed below: obtain the exact crates.io release through cargo (no other download),
# check the .crate file against the SHA-256 pinned here, unpack it into the git-ignored folder
# `patched/<crate>`, and apply `patches/<crate>/*.patch` in order. Idempotent: a stamp file records
# the crate checksum and the patches applied; when nothing changed the folder is left untouched (so
# cargo does not rebuild the engine).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"

# crate name, version, sha256 of the published .crate
crates=(
  "mistralrs-core 0.8.1 a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4"
  "mistralrs 0.8.1 9bb0a83340b4492ebba9760ba6845364de369c7e10c1f91af8733d574c7405fa"
)

find_crate_file() {
  local name=$1 version=$2
  ls "$cargo_home"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -n 1
}

for entry in "${crates[@]}"; do
  read -r name version want_sha <<<"$entry"
  crate_file="$(find_crate_file "$name" "$version")"
  if [[ -z "$crate_file" ]]; then
    echo "apply.sh: fetching $name $version through cargo" >&2
    cargo fetch --locked --manifest-path "$root/patches/fetch/Cargo.toml" >&2
    crate_file="$(find_crate_file "$name" "$version")"
    [[ -n "$crate_file" ]] || { echo "apply.sh: cargo fetch did not produce $name-$version.crate" >&2; exit 1; }
  fi
  got_sha="$(sha256sum "$crate_file" | cut -d' ' -f1)"
  if [[ "$got_sha" != "$want_sha" ]]; then
    echo "apply.sh: checksum mismatch for $crate_file: expected $want_sha, got $got_sha" >&2
    exit 1
  fi

  # Source patches apply to the crates.io release and to a git checkout alike; the manifest is
  # normalised by `cargo publish`, so it has a variant of its own for each (cargo-toml/).
  shopt -s nullglob
  patch_files=("$root/patches/$name"/*.patch "$root/patches/$name"/cargo-toml/crates-io.patch)
  git_manifest_patch=("$root/patches/$name"/cargo-toml/git.patch)
  shopt -u nullglob
  stamp="$(
    {
      echo "$got_sha"
      for p in "${patch_files[@]}" "${git_manifest_patch[@]}"; do sha256sum "$p" | cut -d' ' -f1; done
    } | sha256sum | cut -d' ' -f1
  )"
  dest="$root/patched/$name"
  if [[ -n "${KVPLUGIN_STAMP_ONLY:-}" ]]; then
    echo "$stamp"
    continue
  fi
  if [[ -f "$dest/.kvplugin-stamp" && "$(cat "$dest/.kvplugin-stamp")" == "$stamp" ]]; then
    continue
  fi

  work="$(mktemp -d "$root/patched.tmp.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$crate_file" -C "$work"
  mv "$work/$name-$version" "$work/$name"
  if [[ -n "${KVPLUGIN_PATCH_DEV:-}" ]]; then
    # For editing the patch (see export.sh): the pristine release committed in a git repository,
    # the patches on top as uncommitted changes.
    (cd "$work/$name" && git init -q && git add -A \
      && git -c user.name=dev -c user.email=dev@localhost commit -qm "$name $version pristine")
  fi
  for p in "${patch_files[@]}"; do
    echo "apply.sh: applying $(basename "$p") to $name $version" >&2
    patch --quiet --batch --forward -p1 -d "$work" <"$p" || {
      echo "apply.sh: $(basename "$p") does not apply to $name $version" >&2
      exit 1
    }
  done
  # The git-checkout variant of the manifest patch must apply to the original manifest that the
  # release ships as Cargo.toml.orig.
  for p in "${git_manifest_patch[@]}"; do
    mkdir -p "$work/git/$name"
    cp "$work/$name/Cargo.toml.orig" "$work/git/$name/Cargo.toml"
    patch --quiet --batch --forward -p1 -d "$work/git" <"$p" || {
      echo "apply.sh: $(basename "$p") does not apply to the original manifest of $name $version" >&2
      exit 1
    }
  done
  echo "$stamp" >"$work/$name/.kvplugin-stamp"

  mkdir -p "$root/patched"
  rm -rf "$dest"
  mv "$work/$name" "$dest"
  rm -rf "$work"
  trap - EXIT
done
