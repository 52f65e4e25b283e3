#!/usr/bin/env bash
# GPU host check of the CUDA backend, in one run (a few minutes):
#   scripts/gpu-check.sh OUT [--quick]
# Run from the repository root of a copy that holds the prebuilt binaries in dist/
# (scripts/build-dist.sh builds them, stripped, with dist/COMMIT).
# Needs the NVIDIA driver; NVRTC and cuBLAS 13 from a CUDA toolkit or the Python nvidia-* wheels;
# python3 with PyTorch for the baseline. No Rust, no network.
#
# Steps (each runs even when an earlier one failed; the exit status is non-zero if any failed):
#   1. find libcuda.so.1, libnvrtc.so.13, libcublas.so.13 (and NCCL) and set LD_LIBRARY_PATH;
#   2. nvidia-smi;
#   3. dist/grok-gpu-check --out OUT (OUT/gpu_check.json); if a kernel fault loses the CUDA
#      context (exit 3), the groups not yet run are run again in a new process (OUT/rerunN/);
#   3b. scripts/gpu-serve-check.sh: CUDA clusters in every layout against the CPU;
#   3c. scripts/gpu-serve-bench.sh: bench serve at concurrency 1, 8, 64 (OUT/serve_bench.json);
#   3d. scripts/gpu_summary.py: OUT/gpu_summary.json;
#   4. python3 scripts/gpu_torch_bench.py --out OUT (OUT/torch_bench.json);
#   5. a table of our GEMV against PyTorch eager.
set -u

if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu-check.sh OUT [--quick]" >&2
  exit 2
fi
OUT=$1
shift
QUICK=()
if [ "${1:-}" = "--quick" ]; then QUICK=(--quick); fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
FAILED=()
T0=$(date +%s)

step() { echo; echo "==== $* ($(($(date +%s) - T0)) s) ===="; }

# ---- 1. libraries ---------------------------------------------------------------------------
step "1. CUDA libraries"
DIRS=()
add_dir() { [ -d "$1" ] && DIRS+=("$1"); }
# The driver first (containers mount it under /usr/local/nvidia), then a toolkit, then the
# system folders, then the Python nvidia-* wheels (nvidia/cu13/lib, nvidia/<lib>/lib).
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 \
         /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
  add_dir "$d"
done
PY_NVIDIA=$(python3 - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
seen = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        if d not in seen:
            seen.append(d)
print("\n".join(seen))
EOF
)
while IFS= read -r d; do [ -n "$d" ] && add_dir "$d"; done <<< "$PY_NVIDIA"

find_lib() {  # find_lib NAME_GLOB -> first path in DIRS, else from ldconfig
  local pat=$1 d f
  for d in "${DIRS[@]}"; do
    for f in "$d"/$pat; do
      if [ -e "$f" ]; then echo "$f"; return 0; fi
    done
  done
  ldconfig -p 2>/dev/null | awk -v p="${pat%%\**}" '$1 ~ "^"p {print $NF; exit}'
}

LIBDIRS=()
need_dir() { local f=$1 d; d=$(dirname "$f"); for x in "${LIBDIRS[@]}"; do [ "$x" = "$d" ] && return; done; LIBDIRS+=("$d"); }
for lib in libcuda.so.1 libnvrtc.so.13 'libnvrtc-builtins.so.13*' libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
  f=$(find_lib "$lib")
  if [ -n "$f" ]; then
    echo "found $lib: $f"
    need_dir "$f"
  else
    echo "MISSING $lib"
    case $lib in libnccl*) ;; *) FAILED+=("find $lib") ;; esac
  fi
done
# cudarc looks for libnccl.so (and a few versioned names) but not libnccl.so.2.
NCCL=$(find_lib libnccl.so.2)
if [ -n "$NCCL" ]; then
  NCCL_LINK=$(mktemp -d)
  ln -sf "$NCCL" "$NCCL_LINK/libnccl.so"
  LIBDIRS+=("$NCCL_LINK")
  echo "libnccl.so -> $NCCL (in $NCCL_LINK)"
fi
LD=$(IFS=:; echo "${LIBDIRS[*]}")
export LD_LIBRARY_PATH="$LD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -2; fi

# ---- 2. nvidia-smi --------------------------------------------------------------------------
step "2. nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi || FAILED+=("nvidia-smi")
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
else
  echo "nvidia-smi not found"
  FAILED+=("nvidia-smi")
fi

# ---- 3. grok-gpu-check ----------------------------------------------------------------------
step "3. dist/grok-gpu-check"
BIN=dist/grok-gpu-check
if [ ! -x "$BIN" ]; then
  echo "missing $BIN (build: cargo build --release --features grok-tools/cuda --bin grok-gpu-check)"
  FAILED+=("grok-gpu-check: binary missing")
else
  ONLY=()
  if [ -n "${GPU_CHECK_ONLY:-}" ]; then ONLY=(--only "$GPU_CHECK_ONLY"); fi
  timeout 330 "$BIN" --out "$OUT" ${QUICK[@]+"${QUICK[@]}"} ${ONLY[@]+"${ONLY[@]}"}
  rc=$?
  echo "grok-gpu-check exit status $rc"
  n=0
  # Exit 3: a kernel fault lost the CUDA context; run the groups not yet run in a new process.
  while [ "$rc" = 3 ] && [ $n -lt 2 ]; do
    n=$((n + 1))
    REST=$(python3 - "$OUT" $n <<'EOF'
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
groups = ["bandwidth", "gemv_simt", "gemv_mma", "rms_norm", "rope", "gelu", "router",
          "attention", "bench_gemv", "cublas", "gemm", "grouped", "model", "device", "model-perf", "nccl"]
done = set()
for i in range(n):
    p = os.path.join(out, "gpu_check.json") if i == 0 else os.path.join(out, f"rerun{i}", "gpu_check.json")
    try:
        for g in json.load(open(p)).get("groups", []):
            if g.get("status") != "skipped_context_lost":
                done.add(g["group"])
    except Exception:
        pass
only = [g for g in os.environ.get("GPU_CHECK_ONLY", "").split(",") if g]
if only:
    groups = [g for g in groups if g in only]
print(",".join(g for g in groups if g not in done))
EOF
)
    if [ -z "$REST" ]; then break; fi
    echo; echo "---- rerun $n (context lost): --only $REST"
    timeout 240 "$BIN" --out "$OUT/rerun$n" --only "$REST" ${QUICK[@]+"${QUICK[@]}"}
    rc2=$?
    echo "grok-gpu-check (rerun $n) exit status $rc2"
    [ "$rc2" = 3 ] || break
  done
  [ "$rc" = 0 ] || FAILED+=("grok-gpu-check (exit $rc)")
fi

step "3b. serving on CUDA (grok-worker --device cuda:0 against the CPU run)"
GROK_LD_READY=1 timeout 300 scripts/gpu-serve-check.sh "$OUT" || FAILED+=("gpu-serve-check")

if [ -z "${GPU_CHECK_ONLY:-}" ]; then
  step "3c. serving benchmark on CUDA (bench serve at concurrency 1, 8 and 64)"
  GROK_LD_READY=1 timeout 300 scripts/gpu-serve-bench.sh "$OUT" || FAILED+=("gpu-serve-bench")
  step "3d. summary (OUT/gpu_summary.json)"
  python3 scripts/gpu_summary.py "$OUT" || FAILED+=("summary")
fi

# GPU_CHECK_ONLY=groups runs only those groups of grok-gpu-check and skips steps 4-5.
if [ -n "${GPU_CHECK_ONLY:-}" ]; then
  step "done (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)"
  ls -l "$OUT"
  [ ${#FAILED[@]} -eq 0 ] && exit 0
  printf '  - %s\n' "${FAILED[@]}"
  exit 1
fi

# ---- 4. PyTorch baseline --------------------------------------------------------------------
step "4. PyTorch eager baseline"
PYTHONUNBUFFERED=1 timeout 150 python3 scripts/gpu_torch_bench.py --out "$OUT" ${QUICK[@]+"${QUICK[@]}"}
rc=$?
echo "gpu_torch_bench exit status $rc"
[ "$rc" = 0 ] || FAILED+=("gpu_torch_bench (exit $rc)")

# ---- 5. ours vs PyTorch ---------------------------------------------------------------------
step "5. GEMV: ours vs PyTorch eager"
python3 - "$OUT" <<'EOF' || FAILED+=("comparison table")
import glob, json, os, sys
out = sys.argv[1]
ours = []
for p in [os.path.join(out, "gpu_check.json")] + sorted(glob.glob(os.path.join(out, "rerun*", "gpu_check.json"))):
    try:
        ours += json.load(open(p)).get("perf_gemv", [])
    except Exception as e:
        print(f"(cannot read {p}: {e})")
try:
    torch = json.load(open(os.path.join(out, "torch_bench.json")))
except Exception as e:
    torch = {}
    print(f"(cannot read torch_bench.json: {e})")
tg = torch.get("gemv", [])
def find(rows, **k):
    for r in rows:
        if all(r.get(a) == b for a, b in k.items()):
            return r
    return None
keys = []
for r in ours:
    k = (r["dtype"], r["out"], r["in"], r["m"])
    if k not in keys:
        keys.append(k)
for r in tg:
    k = (r["dtype"], r["out"], r["in"], r["m"])
    if k not in keys:
        keys.append(k)
print(f"{'dtype':<5} {'[out x in]':<13} {'m':>3} | {'mma us':>8} {'GB/s':>6} | {'simt us':>8} {'GB/s':>6} | {'torch us':>9} {'GB/s':>6} | best vs torch")
for dt, o, i, m in keys:
    a = find(ours, dtype=dt, out=o, m=m, kernel="mma", **{"in": i})
    b = find(ours, dtype=dt, out=o, m=m, kernel="simt", **{"in": i})
    t = find(tg, dtype=dt, out=o, m=m, **{"in": i})
    def cell(r):
        return f"{r['median_us']:>8.1f} {r['gbps']:>6.0f}" if r else f"{'-':>8} {'-':>6}"
    best = min([r["median_us"] for r in (a, b) if r] or [float("nan")])
    sp = f"{t['median_us'] / best:.2f}x" if t and best == best else "-"
    tc = f"{t['median_us']:>9.1f} {t['gbps']:>6.0f}" if t else f"{'-':>9} {'-':>6}"
    print(f"{dt:<5} {f'[{o}x{i}]':<13} {m:>3} | {cell(a)} | {cell(b)} | {tc} | {sp}")
for g in torch.get("gemm", []):
    print(f"torch bf16 gemm m={g['m']} [{g['out']}x{g['in']}]: {g['median_us']:.1f} us, {g['tflops']:.0f} TFLOP/s")
if torch.get("copy_gbps"):
    print(f"torch copy bandwidth: {torch['copy_gbps']:.0f} GB/s (read + write)")
print("(int8 in PyTorch: dequantize q.to(bf16) * scale, then x @ W.T, as a naive eager port; our GB/s and theirs count the int8 weights + f32 scales read once)")
EOF

step "done"
ls -l "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED steps:"
  for f in "${FAILED[@]}"; do echo "  - $f"; done
  exit 1
fi
echo "all steps passed"
