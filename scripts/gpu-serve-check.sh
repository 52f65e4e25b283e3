#!/usr/bin/env bash
# Serving on CUDA: clusters of `grok-worker --device cuda:0` processes (prebuilt binaries in
# dist/) on the one GPU, in the layouts one worker (tp 1), tp 2, tp 2 x ep 2, pp 2, 2 replicas
# and data-parallel attention over 2 ranks, each against the CPU single-process run of the same
# bf16 checkpoint at Grok-1's widths (one layer): greedy ids equal and the prompt's logits within
# bf16 tolerance. Writes OUT/serve_check.json (`cluster_checks`: layout, workers, max_rel_err,
# greedy_equal) and fails on any difference or any step that cannot run.
# Usage: scripts/gpu-serve-check.sh OUT   (called by gpu-check.sh too)
set -u
OUT=${1:?usage: gpu-serve-check.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
D=dist
for b in grokctl grok-coordinator grok-worker; do
  [ -x "$D/$b" ] || { echo "SERVE: FAIL ($D/$b missing: build it with --features grok-worker/cuda)"; exit 1; }
done
if [ -z "${GROK_LD_READY:-}" ]; then
  # Same library set-up as gpu-check.sh.
  for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
  export LD_LIBRARY_PATH
fi
M=$(mktemp -d)
trap 'rm -rf "$M"' EXIT
PROMPT=${SERVE_PROMPT:-5,17,99,3,42,7,0,311,6001,12}
# One layer at Grok-1's real widths (the CUDA attention kernel needs a head dim of 32..256).
# SERVE_MODEL and SERVE_DEVICE exist to try the script itself on a CPU host (e.g.
# SERVE_MODEL="--preset tiny8" SERVE_DEVICE=cpu); the GPU check uses the defaults.
"$D/grokctl" gen-model ${SERVE_MODEL:---preset grok-1 --layers 1} --dtype bf16 --seed 5 --out "$M/m" 2>/dev/null \
  || { echo "SERVE: FAIL (gen-model)"; exit 1; }
cpu=$("$D/grokctl" generate --model "$M/m" --prompt-ids $PROMPT --max-new-tokens 12 --ignore-eos --json \
  --logits-out "$M/cpu.npy" 2>/dev/null | tail -n1)
[ -n "$cpu" ] || { echo "SERVE: FAIL (the CPU run)"; exit 1; }
FAILS=0
: > "$M/checks.jsonl"
# name | coordinator flags | workers
LAYOUTS=(
  "tp1|--tp 1|1"
  "tp2|--tp 2|2"
  "tp2ep2|--tp 2 --ep 2|2"
  "pp2|--pp 2|2"
  "replicas2|--replicas 2|2"
  "dp2|--dp-attention --ep 2 --expert-copies 2|2"
)
for spec in "${LAYOUTS[@]}"; do
  IFS='|' read -r name flags n <<< "$spec"
  "$D/grok-coordinator" --model "$M/m" --listen 127.0.0.1:0 --kv-blocks 32 $flags \
    > "$M/coord-$name.out" 2> "$OUT/serve-$name-coordinator.log" &
  cp=$!
  for _ in $(seq 1 100); do grep -q 'listening on' "$M/coord-$name.out" && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$M/coord-$name.out")
  wps=()
  for i in $(seq 0 $((n - 1))); do
    "$D/grok-worker" --coordinator "$addr" --device "${SERVE_DEVICE:-cuda:0}" --id "gpu$i" --threads 4 \
      2> "$OUT/serve-$name-worker$i.log" &
    wps+=($!)
  done
  timeout 180 "$D/grokctl" status --endpoint "$addr" --wait-ready 170 > "$OUT/serve-$name-status.txt" 2>&1
  st=$?
  gpu=""
  if [ "$st" = 0 ]; then
    gpu=$(timeout 120 "$D/grokctl" generate --endpoint "$addr" --prompt-ids $PROMPT --max-new-tokens 12 \
      --ignore-eos --json --logits-out "$M/$name.npy" 2>>"$OUT/serve-$name-client.log" | tail -n1)
  fi
  kill "${wps[@]}" $cp 2>/dev/null; wait 2>/dev/null
  python3 - "$name" "$n" "$M/cpu.npy" "$M/$name.npy" "$cpu" "$gpu" "$flags" >> "$M/checks.jsonl" <<'EOF'
import json, sys
name, n, cpu_npy, gpu_npy, cpu, gpu, flags = sys.argv[1:8]
def load_npy(p):
    # The f32 .npy files grokctl writes (no numpy needed).
    import array, ast
    b = open(p, "rb").read()
    assert b[:6] == b"\x93NUMPY", p
    n, off = (int.from_bytes(b[8:10], "little"), 10) if b[6] == 1 else (int.from_bytes(b[8:12], "little"), 12)
    h = ast.literal_eval(b[off:off + n].decode("latin1"))
    assert h["descr"] == "<f4" and not h["fortran_order"], h
    a = array.array("f")
    a.frombytes(b[off + n:])
    return h["shape"], a
rel = None
try:
    (sa, a), (sb, b) = load_npy(cpu_npy), load_npy(gpu_npy)
    if sa == sb:
        w = sa[1]
        rel = max(max(abs(x - y) for x, y in zip(a[i * w:(i + 1) * w], b[i * w:(i + 1) * w]))
                  / max(max(abs(x) for x in a[i * w:(i + 1) * w]), 1e-30) for i in range(sa[0]))
except Exception as e:
    print(f"{name}: logits not compared: {e}", file=sys.stderr)
ids = lambda s: json.loads(s)["ids"] if s else None
layout = {"tp": 1, "ep": 1, "pp": 1, "replicas": 1, "dp_attention": "--dp-attention" in flags}
f = flags.split()
for k in ("tp", "ep", "pp", "replicas"):
    if f"--{k}" in f:
        layout[k] = int(f[f.index(f"--{k}") + 1])
print(json.dumps({"name": name, "layout": layout, "workers": int(n), "max_rel_err": rel,
                  "greedy_equal": bool(gpu) and ids(gpu) == ids(cpu), "ids_cuda": ids(gpu), "ids_cpu": ids(cpu)}))
EOF
  line=$(tail -n1 "$M/checks.jsonl")
  ok=$(python3 -c "import json,sys; c=json.loads(sys.argv[1]); print(int(c['greedy_equal'] and c['max_rel_err'] is not None and c['max_rel_err'] <= 1e-3))" "$line")
  echo "$name ($n workers on ${SERVE_DEVICE:-cuda:0}): $line"
  if [ "$ok" != 1 ]; then
    FAILS=$((FAILS + 1))
    echo "  FAIL: $name"; tail -5 "$OUT/serve-$name-worker0.log"
  fi
done
python3 - "$M/checks.jsonl" "$OUT/serve_check.json" <<'EOF'
import json, sys
checks = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({"cluster_checks": checks, "tolerance_rel": 1e-3}, open(sys.argv[2], "w"), indent=1)
EOF
if [ "$FAILS" = 0 ]; then echo "SERVE: PASS (every layout: same greedy ids, logits within 1e-3)"; exit 0; fi
echo "SERVE: FAIL ($FAILS layouts)"; exit 1
