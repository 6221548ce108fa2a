#!/usr/bin/env bash
# `kvplugin bench serve` side by side: two plugin servers on one fresh local-disk store and one
# stock server (`--no-plugin`) on 127.0.0.1, started here and stopped at the end.
#
#   scripts/bench-serve.sh [OUT_DIR] [extra `bench serve` arguments for chat and rag]
#
# WORKLOADS=rag (or chat) runs only that one side by side; SHARE=0 skips the share workload.
# Writes OUT_DIR/serve-chat-rag.json and OUT_DIR/serve-share.json (default OUT_DIR:
# .kvplugin/bench-serve), and each server's log next to them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/.kvplugin/bench-serve}"
shift || true
bin="${CARGO_TARGET_DIR:-$HOME/.cache/mistralrs-kvplugin/target}/release/kvplugin"
[[ -x "$bin" ]] || { echo "bench-serve: $bin is missing (make setup)" >&2; exit 1; }
mkdir -p "$out"
store="$(mktemp -d)"
cat > "$out/kvplugin.toml" <<TOML
[store]
url = "$store"
TOML
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$store"
}
trap cleanup EXIT
start() { # name port args...
  local name="$1" port="$2"
  shift 2
  "$bin" serve --port "$port" "$@" >"$out/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    grep -q "listening on" "$out/$name.log" && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "bench-serve: $name died:" >&2; cat "$out/$name.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "bench-serve: $name did not start" >&2
  exit 1
}
start plugin-1 18001 --config "$out/kvplugin.toml"
start plugin-2 18002 --config "$out/kvplugin.toml"
start stock 18003 --no-plugin
workloads="${WORKLOADS:-chat,rag}"
"$bin" bench serve --url http://127.0.0.1:18001 --url http://127.0.0.1:18003 \
  --workload "$workloads" --json "$out/serve-${workloads//,/-}.json" "$@"
if [[ "${SHARE:-1}" != 0 ]]; then
  "$bin" bench serve --url http://127.0.0.1:18001 --url http://127.0.0.1:18002 \
    --workload share --json "$out/serve-share.json"
fi
