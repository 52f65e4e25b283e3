"""TTFT of requests sharing a 2,000-token prefix (32-token suffixes), cache on or off.

Usage: prefix.py HTTP_ADDR LABEL
Sends one request to warm the prefix, then 8 more one at a time, each with max_tokens 1
(the answer's time is the time to the first token), and prints JSON.
"""
import json, random, sys, time, urllib.request

addr, label = sys.argv[1], sys.argv[2]
rng = random.Random(1)
prefix = [rng.randrange(3, 30000) for _ in range(2000)]

def ask(k):
    suffix = [rng.randrange(3, 30000) for _ in range(32)]
    body = json.dumps({"prompt": prefix + suffix, "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/completions", body, {"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return time.time() - t, out["usage"]

first, u0 = ask(0)
times, cached = [], []
for k in range(1, 9):
    dt, u = ask(k)
    times.append(dt)
    cached.append(u.get("prompt_tokens_details", {}).get("cached_tokens", 0))
times.sort()
print(json.dumps({"label": label, "first_s": first, "ttft_p50_s": (times[3] + times[4]) / 2,
                  "ttft_min_s": times[0], "ttft_max_s": times[-1], "cached_tokens": cached,
                  "prompt_tokens": u0["prompt_tokens"]}))
