#!/usr/bin/env bash
# Serving benchmark on CUDA: a Grok-1-width int8 checkpoint of SERVE_LAYERS layers (default 4,
# about 22 GB: the card's half would be ~13 layers, which takes longer to write than the GPU
# check's budget), a coordinator and one `grok-worker --device cuda:0`, then `grokctl bench
# serve` at concurrency 1, 8 and 64 (random 128-token prompts, 64 output tokens each).
# Writes OUT/serve_bench.json; fails when a step cannot run.
# Usage: scripts/gpu-serve-bench.sh OUT   (called by gpu-check.sh)
set -u
OUT=${1:?usage: gpu-serve-bench.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
D=dist
for b in grokctl grok-coordinator grok-worker; do
  [ -x "$D/$b" ] || { echo "BENCH: FAIL ($D/$b missing)"; exit 1; }
done
L=${SERVE_LAYERS:-4}
M=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$M"; }
trap cleanup EXIT
# SERVE_MODEL and SERVE_DEVICE exist to try the script on a CPU host (SERVE_MODEL="--preset
# tiny8" SERVE_DEVICE=cpu); the GPU check uses the defaults.
"$D/grokctl" gen-model ${SERVE_MODEL:---preset grok-1 --layers $L} --dtype int8 --seed 9 --out "$M/m" > /dev/null 2>&1 \
  || { echo "BENCH: FAIL (gen-model)"; exit 1; }
"$D/grok-coordinator" --model "$M/m" --listen 127.0.0.1:0 --kv-blocks 4096 --max-seqs 64 \
  --max-batch-tokens 2048 > "$M/coord.out" 2> "$OUT/bench-coordinator.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$M/coord.out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$M/coord.out")
[ -n "$addr" ] || { echo "BENCH: FAIL (the coordinator did not start)"; exit 1; }
"$D/grok-worker" --coordinator "$addr" --device "${SERVE_DEVICE:-cuda:0}" --id gpu0 --threads 8 2> "$OUT/bench-worker.log" &
pids+=($!)
"$D/grokctl" status --endpoint "$addr" --wait-ready 200 > /dev/null \
  || { echo "BENCH: FAIL (the cluster did not get ready)"; tail -5 "$OUT/bench-worker.log"; exit 1; }
"$D/grokctl" bench serve --endpoint "$addr" --concurrency 1,8,64 --requests "${SERVE_REQUESTS:-64}" --prompt-len 128 \
  --gen-len 64 --json > "$M/bench.out" || { echo "BENCH: FAIL (bench serve)"; exit 1; }
python3 - "$M/bench.out" "$L" "$OUT/serve_bench.json" <<'PY' || { echo "BENCH: FAIL (its output)"; exit 1; }
import json, sys
j = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
j["layers"] = int(sys.argv[2])
json.dump(j, open(sys.argv[3], "w"), indent=1)
for l in j["levels"]:
    print(f"concurrency {l['concurrency']:>3}: {l['output_tokens_per_s']:8.1f} output tok/s, TTFT p50 {l['ttft_p50_ms']:.1f} ms, ITL p50 {l['itl_p50_ms']:.2f} ms")
PY
echo "BENCH: done ($L layers)"
