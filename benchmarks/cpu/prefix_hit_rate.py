"""Prefix-cache hit rate with 8 distinct shared prefixes, as a cluster routes them.

Usage: prefix_hit_rate.py HTTP_ADDR LABEL
48 requests, one at a time, in a seeded random order: 8 prefixes of 256 tokens, 6 requests
each with its own 16-token suffix, max_tokens 1. Prints the hit rate from /metrics (prompt
tokens served from the prefix cache over prompt tokens) as JSON.
"""
import json, random, sys, urllib.request

addr, label = sys.argv[1], sys.argv[2]
rng = random.Random(2)
prefixes = [[rng.randrange(3, 30000) for _ in range(256)] for _ in range(8)]
order = [p for p in range(8) for _ in range(6)]
rng.shuffle(order)

def metric(name):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0

hit0, prompt0 = metric("grok_prefix_cache_hit_tokens_total"), metric("grok_prompt_tokens_total")
for p in order:
    suffix = [rng.randrange(3, 30000) for _ in range(16)]
    body = json.dumps({"prompt": prefixes[p] + suffix, "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        json.load(r)
hit = metric("grok_prefix_cache_hit_tokens_total") - hit0
prompt = metric("grok_prompt_tokens_total") - prompt0
print(json.dumps({"label": label, "requests": len(order), "hit_tokens": hit,
                  "prompt_tokens": prompt, "hit_rate": hit / prompt}))
