#!/usr/bin/env bash
# The main job (README: "Run it"): build, write a small random model with Grok-1's architecture,
# start a local CPU cluster (coordinator + tp*pp worker processes), generate tokens through it,
# show the cluster, and stop it.
#   scripts/demo.sh [PRESET] [DTYPE] [TP] [PP]    defaults: tiny8 bf16 2 1
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
preset=${1:-tiny8}
dtype=${2:-bf16}
tp=${3:-2}
pp=${4:-1}
model=models/$preset-$dtype

# etcd-client's build script needs protoc (Debian's protobuf-compiler).
if ! command -v protoc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler) >/dev/null 2>&1 || true
  fi
  command -v protoc >/dev/null 2>&1 || { echo "error: building needs protoc: install Debian's protobuf-compiler" >&2; exit 1; }
fi
cargo build --release --bins --locked
if [ ! -f "$model/config.json" ]; then
  target/release/grokctl gen-model --preset "$preset" --dtype "$dtype" --seed 1 --out "$model"
fi

log=$(mktemp)
target/release/grokctl up --model "$model" --tp "$tp" --pp "$pp" --listen 127.0.0.1:0 >"$log" &
up_pid=$!
trap 'kill $up_pid 2>/dev/null; wait $up_pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  grep -q '^ready: ' "$log" && break
  kill -0 $up_pid 2>/dev/null || { echo "the cluster did not start" >&2; exit 1; }
  sleep 0.2
done
endpoint=$(sed -n 's/^ready: //p' "$log")
[ -n "$endpoint" ] || { echo "the cluster is not ready after 120 s" >&2; exit 1; }

target/release/grokctl status --endpoint "$endpoint"
echo
target/release/grokctl generate --endpoint "$endpoint" --prompt-ids 5,17,99,3,42 --max-new-tokens 16 --json
