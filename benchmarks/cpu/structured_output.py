"""Decode speed with structured output (a JSON schema) against the same requests without it.

Usage: structured_output.py HTTP_ADDR LABEL [CLIENTS]
CLIENTS (default 1) concurrent streaming completions, 6 each, one after another. With the
schema, every output is a JSON object with one 150-200-character string (so about 40 or more
tokens); without it, `ignore_eos` and max_tokens 48. Prints JSON: inter-token latency p50/p90
(time between streamed chunks), generated tokens/s over the run, and how many outputs parsed.
"""
import json, sys, threading, time, urllib.request

addr, label = sys.argv[1], sys.argv[2]
clients = int(sys.argv[3]) if len(sys.argv) > 3 else 1
SCHEMA = {"type": "object",
          "properties": {"text": {"type": "string", "minLength": 150, "maxLength": 200}},
          "required": ["text"], "additionalProperties": False}
lock = threading.Lock()
gaps, stats = [], {"tokens": 0, "parsed": 0, "outputs": 0}

def one(seed, constrained):
    body = {"prompt": "Describe the cluster:", "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body.update(max_tokens=240, response_format={
            "type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})
    else:
        body.update(max_tokens=48, ignore_eos=True)
    req = urllib.request.Request(f"http://{addr}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    last, mine, text, toks = None, [], [], 0
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices"):
                now = time.time()
                if last is not None:
                    mine.append(now - last)
                last = now
                text.append(ev["choices"][0].get("text") or "")
            if ev.get("usage"):
                toks = ev["usage"]["completion_tokens"]
    ok = 0
    if constrained:
        try:
            ok = isinstance(json.loads("".join(text)), dict)
        except ValueError:
            ok = 0
    with lock:
        gaps.extend(mine)
        stats["tokens"] += toks
        stats["parsed"] += int(ok)
        stats["outputs"] += 1

def run(constrained):
    gaps.clear()
    stats.update(tokens=0, parsed=0, outputs=0)
    t0 = time.time()
    def client(c):
        for k in range(6):
            one(100 * c + k, constrained)
    th = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.time() - t0
    g = sorted(gaps)
    return {"itl_p50_ms": round(1000 * g[len(g) // 2], 2), "itl_p90_ms": round(1000 * g[int(len(g) * 0.9)], 2),
            "tok_per_s": round(stats["tokens"] / wall, 2), "tokens": stats["tokens"],
            "parsed": stats["parsed"], "outputs": stats["outputs"]}

one(0, False)  # warm-up
print(json.dumps({"label": label, "clients": clients, "plain": run(False), "json_schema": run(True)}))
