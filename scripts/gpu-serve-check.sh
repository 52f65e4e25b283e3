#!/usr/bin/env bash
# Serving on CUDA: a coordinator and one `grok-worker --device cuda:0` (prebuilt binaries in
# dist/), greedy generation through the cluster compared with the CPU single-process run of the
# same bf16 checkpoint. Usage: scripts/gpu-serve-check.sh OUT   (called by gpu-check.sh too)
set -u
OUT=${1:?usage: gpu-serve-check.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
D=dist
for b in grokctl grok-coordinator grok-worker; do
  [ -x "$D/$b" ] || { echo "serve check skipped: $D/$b missing"; exit 0; }
done
if [ -z "${GROK_LD_READY:-}" ]; then
  # Same library set-up as gpu-check.sh.
  for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
  export LD_LIBRARY_PATH
fi
M=$(mktemp -d)
# One layer at Grok-1's real widths (the CUDA attention kernel needs a head dim of 32..256).
"$D/grokctl" gen-model --preset grok-1 --layers 1 --dtype bf16 --seed 5 --out "$M/tiny" 2>/dev/null
cpu=$("$D/grokctl" generate --model "$M/tiny" --prompt-ids 5,17,99,3,42,7 --max-new-tokens 12 --ignore-eos --json 2>/dev/null | tail -n1)
"$D/grok-coordinator" --model "$M/tiny" --listen 127.0.0.1:0 --kv-blocks 32 > "$M/coord.out" 2> "$OUT/serve-coordinator.log" &
cp=$!
for _ in $(seq 1 100); do grep -q 'listening on' "$M/coord.out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$M/coord.out")
"$D/grok-worker" --coordinator "$addr" --device cuda:0 --id gpu0 2> "$OUT/serve-worker.log" &
wp=$!
"$D/grokctl" status --endpoint "$addr" --wait-ready 120 > "$OUT/serve-status.txt" 2>&1
st=$?
gpu=$("$D/grokctl" generate --endpoint "$addr" --prompt-ids 5,17,99,3,42,7 --max-new-tokens 12 --ignore-eos --json 2>>"$OUT/serve-client.log" | tail -n1)
t0=$(date +%s.%N)
"$D/grokctl" generate --endpoint "$addr" --prompt-ids 5,17,99,3,42,7 --max-new-tokens 200 --ignore-eos > /dev/null 2>>"$OUT/serve-client.log"
t1=$(date +%s.%N)
kill $wp $cp 2>/dev/null; wait 2>/dev/null
echo "cluster ready: exit $st"; cat "$OUT/serve-status.txt" | head -12
echo "cpu  (single process): $cpu"
echo "cuda (cluster, cuda:0): $gpu"
echo "200 tokens through the cluster in $(python3 -c "print(round($t1 - $t0, 3))") s (one Grok-1-width layer, batch 1, including RPC)"
rm -rf "$M"
if [ "$st" = 0 ] && [ -n "$gpu" ] && [ "$cpu" = "$gpu" ]; then echo "SERVE: PASS (same greedy ids)"; exit 0; fi
echo "SERVE: FAIL"; tail -20 "$OUT/serve-worker.log"; exit 1
