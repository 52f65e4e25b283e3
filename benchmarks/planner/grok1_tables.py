"""The planner's Grok-1 figures on one node of 8 GPUs (BENCHMARKS.md "Planner: Grok-1 on 8 GPUs").

Usage: grok1_tables.py [GROKCTL]   (default target/release/grokctl)
For each device and dtype: the best layout at batch 1, and the highest output throughput whose
TPOT (decode step time) stays within 50 ms, over concurrencies 1..1024 (powers of two); with
the decode step's parts. Prints a Markdown table.
"""
import json, subprocess, sys

grokctl = sys.argv[1] if len(sys.argv) > 1 else "target/release/grokctl"

def plan(gpu, dtype, conc):
    out = subprocess.run([grokctl, "plan", "--model", "grok-1", "--gpu", gpu, "--gpus-per-node", "8",
                          "--dtype", dtype, "--prompt-len", "1000", "--gen-len", "200",
                          "--concurrency", str(conc), "--tpot-ms", "50", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return [l for l in json.loads(out)["layouts"] if l["fits"]]

def parts(l):
    s = l["decode_step"]
    coll = ", ".join(f'{c["op"]} {c["algorithm"]} {c["protocol"]} {1e3 * c["seconds"]:.2f}' for c in s["collectives"])
    return f'weights {1e3 * s["weights"]:.2f}, KV {1e3 * s["kv"]:.2f}, {coll or "no collectives"}'

print("| device | dtype | case | layout | batch/replica | TPOT ms | out tok/s | bound | decode step (ms) |")
print("|---|---|---|---|---|---|---|---|---|")
for gpu in ["a100-80gb", "h100-sxm", "h200"]:
    for dtype in ["int8", "bf16"]:
        one = plan(gpu, dtype, 1)
        if not one:
            print(f"| {gpu} | {dtype} | does not fit on 8 | | | | | | |")
            continue
        best1 = min(one, key=lambda l: l["itl_ms"])
        rows = [("batch 1", best1)]
        top = None
        c = 1
        while c <= 1024:
            ok = [l for l in plan(gpu, dtype, c) if l["meets_slo"]]
            if ok:
                b = max(ok, key=lambda l: l["output_tokens_per_s"])
                if top is None or b["output_tokens_per_s"] > top["output_tokens_per_s"]:
                    top = b
            c *= 2
        if top:
            rows.append(("best within 50 ms TPOT", top))
        for case, l in rows:
            lay = f'tp{l["tp"]} ep{l["ep"]} pp{l["pp"]} x{l["replicas"]}'
            print(f'| {gpu} | {dtype} | {case} | {lay} | {l["batch_per_replica"]} | {l["itl_ms"]:.1f} | {l["output_tokens_per_s"]:.0f} | {l["decode_bound"]} | {parts(l)} |')
