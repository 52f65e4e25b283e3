"""The GPU check's summary: OUT/gpu_summary.json from the run's files.

Usage: python3 scripts/gpu_summary.py OUT
Fields: card, date, commit (dist/COMMIT), cluster_checks (gpu-serve-check.sh), serve
(gpu-serve-bench.sh), decode_batch1 and prefill (grok-gpu-check's model-perf group),
gemm_crossover_rows (its gemm group; informative). Exits 1 when a required part is missing.
"""
import datetime, json, os, subprocess, sys

out = sys.argv[1]


def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return {}


try:
    card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
except Exception:
    card = ""
commit = open("dist/COMMIT").read().strip() if os.path.exists("dist/COMMIT") else ""
gc, sc, sb = load("gpu_check.json"), load("serve_check.json"), load("serve_bench.json")
perf = (gc.get("model_perf") or {}).get("rows") or []
p0 = perf[0] if perf else {}
summary = {
    "card": card,
    "date": datetime.date.today().isoformat(),
    "commit": commit,
    "cluster_checks": [{k: c.get(k) for k in ("layout", "workers", "max_rel_err", "greedy_equal")}
                       for c in sc.get("cluster_checks", [])],
    "serve": [{"concurrency": l["concurrency"], "output_tokens_per_s": l["output_tokens_per_s"],
               "ttft_ms_p50": l["ttft_p50_ms"], "itl_ms_p50": l["itl_p50_ms"]} for l in sb.get("levels", [])],
    "serve_layers": sb.get("layers"),
    "decode_batch1": {"ms_per_token": p0.get("decode_ms_median"),
                      "roofline_fraction": p0.get("decode_frac_of_roofline")},
    "prefill": {"tokens": p0.get("prefill_tokens"), "tflops": p0.get("prefill_tflops"),
                "peak_fraction": p0.get("prefill_frac_of_peak")},
    # The fewest rows from which cuBLAS (split precision) beat the GEMV, per weight shape: what
    # grok-worker --gemm-min-rows should be on this card (grok-gpu-check's gemm group).
    "gemm_crossover_rows": (gc.get("gemm") or {}).get("split_faster_from_rows"),
}
json.dump(summary, open(os.path.join(out, "gpu_summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
missing = [k for k in ("card", "commit", "cluster_checks", "serve") if not summary[k]]
missing += [k for k in ("decode_batch1", "prefill") if not any(v is not None for v in summary[k].values())]
if missing:
    print("missing in the summary:", ", ".join(missing))
    sys.exit(1)
