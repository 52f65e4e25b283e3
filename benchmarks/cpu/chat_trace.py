"""Throughput of a multi-turn chat trace (the prefix cache's common case), cache on or off.

Usage: chat_trace.py HTTP_ADDR LABEL [CONVERSATIONS] [TURNS]
CONVERSATIONS (default 4) clients, each a conversation of TURNS (default 4) turns over the
chat API: a shared ~600-token system prompt, then each turn adds a ~40-word user message and
the previous reply (max_tokens 24, seeded sampling). Every turn resends the whole conversation,
as chat clients do. Prints JSON: turns, wall time, turns/s, generated and prompt tokens/s,
TTFT p50/p90 (streamed), cached prompt tokens.
"""
import json, random, sys, threading, time, urllib.request

addr, label = sys.argv[1], sys.argv[2]
convs = int(sys.argv[3]) if len(sys.argv) > 3 else 4
turns = int(sys.argv[4]) if len(sys.argv) > 4 else 4
rng = random.Random(7)
WORDS = ("cluster replica worker token expert layer cache prefix request answer model "
         "shard queue stream latency memory tensor router batch decode prefill").split()

def words(n, r):
    return " ".join(r.choice(WORDS) for _ in range(n))

system = "You are a helpful assistant. " + words(450, rng)
lock = threading.Lock()
ttfts, usage = [], {"prompt": 0, "completion": 0, "cached": 0}

def turn(messages, seed):
    body = json.dumps({"messages": messages, "max_tokens": 24, "temperature": 0.8,
                       "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    t = time.time()
    first, text, u = None, [], None
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices", []):
                piece = ch.get("delta", {}).get("content") or ""
                # The first chunk carries only the role; the first token's text comes after.
                if first is None and (piece or ch.get("finish_reason")):
                    first = time.time() - t
                text.append(piece)
            if ev.get("usage"):
                u = ev["usage"]
    return first, "".join(text), u

def client(c):
    r = random.Random(100 + c)
    messages = [{"role": "system", "content": system}]
    for k in range(turns):
        messages.append({"role": "user", "content": words(40, r)})
        first, reply, u = turn(messages, 1000 * c + k)
        messages.append({"role": "assistant", "content": reply})
        with lock:
            ttfts.append(first)
            usage["prompt"] += u["prompt_tokens"]
            usage["completion"] += u["completion_tokens"]
            usage["cached"] += (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)

t0 = time.time()
threads = [threading.Thread(target=client, args=(c,)) for c in range(convs)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.time() - t0
ttfts.sort()
n = len(ttfts)
print(json.dumps({"label": label, "conversations": convs, "turns": n, "wall_s": round(wall, 2),
                  "turns_per_s": round(n / wall, 4),
                  "generated_tok_per_s": round(usage["completion"] / wall, 2),
                  "prompt_tok_per_s": round(usage["prompt"] / wall, 1),
                  "ttft_p50_s": round(ttfts[n // 2], 3), "ttft_p90_s": round(ttfts[int(n * 0.9)], 3),
                  "prompt_tokens": usage["prompt"], "cached_tokens": usage["cached"]}))
