"""Data-parallel attention with expert parallelism against tensor parallelism on CPU workers.

Usage: dp_attention.py BIN_DIR MODEL_DIR OUT.json

For each layout (tp 2; tp 2 with ep 2; --dp-attention --ep 2) it starts a local cluster
(`grokctl up`, one compute thread per worker) and runs `grokctl bench serve` at concurrency
1, 8 and 32 (random 64-token prompts, 32 output tokens each): output tokens/s, ITL, the mean
time of a step on a rank and the bytes all ranks sent through their collectives per step.

Then the loss of a rank: a coordinator with --dp-attention --ep 2 --expert-copies 2 and two
workers started by hand, `bench serve` at concurrency 8, SIGKILL of rank 1, and the same
benchmark on the rank left (every expert has its copy there). Prints and writes JSON.
"""
import json, os, signal, subprocess, sys, time

bin_dir, model, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
grokctl = os.path.join(bin_dir, "grokctl")
env = dict(os.environ, GROK_THREADS="1")
BENCH = ["--requests", "32", "--prompt-len", "64", "--gen-len", "32", "--json"]


def wait_ready(proc):
    for line in proc.stdout:
        if line.startswith("ready: "):
            return line.split()[1]
    raise SystemExit("the cluster did not come up")


def bench(endpoint, levels):
    r = subprocess.run([grokctl, "bench", "serve", "--endpoint", endpoint, "--concurrency", levels] + BENCH,
                       capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["levels"]


def status(endpoint):
    r = subprocess.run([grokctl, "status", "--endpoint", endpoint, "--json"], capture_output=True, text=True,
                       env=env, check=True)
    return json.loads(r.stdout)


results = {"model": model, "layouts": [], "loss": {}}
for name, args in [("tp 2", ["--tp", "2"]), ("tp 2 ep 2", ["--tp", "2", "--ep", "2"]),
                   ("dp-attention ep 2", ["--dp-attention", "--ep", "2"])]:
    up = subprocess.Popen([grokctl, "up", "--model", model, "--listen", "127.0.0.1:0", "--kv-blocks", "256"] + args,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        ep = wait_ready(up)
        levels = bench(ep, "1,8,32")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait()
    results["layouts"].append({"layout": name, "levels": levels})
    for l in levels:
        print(f"{name:18} c={l['concurrency']:>2}  {l['output_tokens_per_s']:7.1f} tok/s  ITL p50 {l['itl_p50_ms']:7.1f} ms"
              f"  step {l['step_ms']:7.1f} ms  {l['collective_bytes_per_step'] / 1e3:8.1f} kB/step", flush=True)

# The loss of a rank.
coord = subprocess.Popen([os.path.join(bin_dir, "grok-coordinator"), "--model", model, "--listen", "127.0.0.1:0",
                          "--dp-attention", "--ep", "2", "--expert-copies", "2", "--kv-blocks", "256"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
addr = None
for line in coord.stdout:
    if line.startswith("listening on "):
        addr = line.split()[2]
        break
workers = [subprocess.Popen([os.path.join(bin_dir, "grok-worker"), "--coordinator", addr, "--id", f"w{r}",
                             "--rank", str(r)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
           for r in range(2)]
try:
    subprocess.run([grokctl, "status", "--endpoint", addr, "--wait-ready", "120"], check=True, env=env,
                   capture_output=True)
    before = bench(addr, "8")[0]
    workers[1].kill()
    workers[1].wait()
    t = time.time()
    while "of 2 workers" not in status(addr)["detail"]:
        time.sleep(0.05)
        if time.time() - t > 60:
            raise SystemExit("the replica did not serve on the rank left")
    after = bench(addr, "8")[0]
    results["loss"] = {"layout": "dp-attention ep 2, 2 copies", "before": before, "after_losing_rank_1": after,
                       "detail": status(addr)["detail"]}
    print(f"loss of a rank (c=8): {before['output_tokens_per_s']:.1f} -> {after['output_tokens_per_s']:.1f} tok/s",
          flush=True)
finally:
    for w in workers:
        w.kill()
    coord.kill()
with open(out_path, "w") as f:
    json.dump(results, f, indent=1)
