#!/usr/bin/env python3
"""Decode and prefill of this project against llama.cpp on the same weights, in one run.

Usage:
  benchmarks/cpu/llamacpp_compare.py --llama-bench PATH/llama-bench \
      --bf16 models/small-bf16 --int8 models/small-int8 \
      --f16-gguf small-f16.gguf --q8-gguf small-q8_0.gguf [--rounds 3] [--threads 1,2] \
      [--out benchmarks/cpu/llamacpp_small.json]

The GGUF files come from `scripts/gguf-from-checkpoint.py` (f16 from the bf16 checkpoint, q8_0
with the embedding kept in f16, as the int8 checkpoint keeps it in bf16). Both programs run the
same cases, alternating, `--rounds` times: prefill of 512 tokens from an empty cache, then 128
decode steps at batch 1 after 512 tokens of context (`grokctl bench --prompt-len 512
--gen-len 128`; `llama-bench -p 512 -n 0` and `-p 0 -n 128 -d 512`). The read bandwidth that
`grokctl bench` measures in each of its runs is the decode roofline of both.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

GROKCTL = "target/release/grokctl"


def ours(model, threads):
    out = subprocess.run(
        [GROKCTL, "bench", "--model", model, "--threads", str(threads), "--prompt-len", "512",
         "--gen-len", "128", "--json"],
        check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return {
        "prefill": j["prompt_tokens_per_s"],
        "decode": j["decode_tokens_per_s"],
        "bandwidth_gbs": j["bandwidth_bytes_per_s"] / 1e9,
        "active_mb": j["active_weight_bytes_per_token"] / 1e6,
    }


def llama(bench, gguf, threads):
    res = {}
    for key, args in (("prefill", ["-p", "512", "-n", "0"]), ("decode", ["-p", "0", "-n", "128", "-d", "512"])):
        out = subprocess.run(
            [bench, "-m", gguf, "-t", str(threads), "-r", "3", "-o", "json", *args],
            check=True, capture_output=True, text=True).stdout
        res[key] = json.loads(out)[0]["avg_ts"]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--bf16", required=True)
    ap.add_argument("--int8", required=True)
    ap.add_argument("--f16-gguf", required=True)
    ap.add_argument("--q8-gguf", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--out")
    a = ap.parse_args()
    cases = [("bf16 / f16", a.bf16, a.f16_gguf), ("int8 / q8_0", a.int8, a.q8_gguf)]
    rows = []
    for t in [int(x) for x in a.threads.split(",")]:
        for name, ckpt, gguf in cases:
            runs = {"ours": [], "llama.cpp": []}
            for r in range(a.rounds):
                runs["ours"].append(ours(ckpt, t))
                runs["llama.cpp"].append(llama(a.llama_bench, gguf, t))
                print(f"{name} {t}t round {r + 1}: ours {runs['ours'][-1]} llama.cpp {runs['llama.cpp'][-1]}",
                      file=sys.stderr, flush=True)
            med = lambda side, k: statistics.median(x[k] for x in runs[side])
            bw = statistics.median(x["bandwidth_gbs"] for x in runs["ours"])
            active = runs["ours"][0]["active_mb"]
            roof = bw * 1e3 / active
            rows.append({
                "weights": name, "threads": t, "bandwidth_gbs": bw, "active_mb_per_token": active,
                "roofline_tok_s": roof,
                "ours": {k: med("ours", k) for k in ("prefill", "decode")},
                "llama_cpp": {k: med("llama.cpp", k) for k in ("prefill", "decode")},
                "runs": runs,
            })
    print("| weights | threads | bandwidth GB/s | roofline tok/s | decode ours | llama.cpp | ratio | "
          "ours % of roofline | prefill 512 ours | llama.cpp | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, l = r["ours"], r["llama_cpp"]
        print(f"| {r['weights']} | {r['threads']} | {r['bandwidth_gbs']:.1f} | {r['roofline_tok_s']:.1f} | "
              f"{o['decode']:.1f} | {l['decode']:.1f} | {o['decode'] / l['decode']:.2f}x | "
              f"{100 * o['decode'] / r['roofline_tok_s']:.0f}% | {o['prefill']:.0f} | {l['prefill']:.0f} | "
              f"{o['prefill'] / l['prefill']:.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rounds": a.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
