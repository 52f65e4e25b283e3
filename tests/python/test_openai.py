#!/usr/bin/env python3
"""The official `openai` client against grok-cluster's HTTP API.

Usage: test_openai.py BASE_URL MODEL   (e.g. http://127.0.0.1:8000/v1 grok-1)

Run by tests/tests/http.rs against a cluster with a tokenizer: a completion, a streaming
completion and a streaming chat completion, logit bias, penalties and min_tokens, n choices,
prompt scoring, structured output (plus the model list and refused requests).
Exits non-zero when an assertion fails.
"""

import json
import re
import sys

import jsonschema
import openai
from openai import OpenAI


def main() -> int:
    base_url, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base_url, api_key="none", timeout=60, max_retries=0)

    ids = [m.id for m in client.models.list().data]
    assert ids == [model], ids

    # A completion (greedy, fixed length).
    prompt = "The quick brown fox"
    c = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert c.id.startswith("cmpl-"), c.id
    assert c.object == "text_completion", c.object
    assert c.model == model, c.model
    assert len(c.choices) == 1
    choice = c.choices[0]
    assert choice.finish_reason == "length", choice.finish_reason
    assert isinstance(choice.text, str) and choice.text, choice
    assert c.usage.completion_tokens == 6, c.usage
    assert c.usage.prompt_tokens > 0, c.usage
    assert c.usage.total_tokens == c.usage.prompt_tokens + 6, c.usage
    assert len(choice.logprobs.tokens) == 6, choice.logprobs
    assert len(choice.logprobs.token_logprobs) == 6, choice.logprobs
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs), choice.logprobs
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs), choice.logprobs

    # The same completion, streamed: the same text, usage in the last chunk.
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == choice.text, (text, choice.text)
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == ["length"], reasons
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6, chunks[-1]

    # A streaming chat completion: the role first, then content, then one finish reason.
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    content = ""
    finish = []
    for ch in chunks:
        assert ch.object == "chat.completion.chunk", ch.object
        assert ch.id.startswith("chatcmpl-"), ch.id
        if ch.choices:
            content += ch.choices[0].delta.content or ""
            if ch.choices[0].finish_reason:
                finish.append(ch.choices[0].finish_reason)
    assert len(finish) == 1 and finish[0] in ("stop", "length"), finish
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= 8, usage

    # The non-streaming chat answer is the same.
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion", r.object
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == content, (r.choices[0].message.content, content)
    assert r.choices[0].finish_reason == finish[0]
    assert r.usage.completion_tokens == usage.completion_tokens, (r.usage, usage)

    # Logit bias and penalties (OpenAI's meanings) through the client's own parameters, and
    # vLLM's min_tokens through extra_body. Token ids come back with return_token_ids.
    def ids_of(c):
        return (c.choices[0].model_extra or {}).get("token_ids")

    def complete(max_tokens=12, temperature=0, **kw):
        extra = {"return_token_ids": True, "ignore_eos": True}
        extra.update(kw.pop("extra_body", {}))
        return client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            extra_body=extra,
            **kw,
        )

    assert ids_of(complete(logit_bias={"1000": 100})) == [1000] * 12
    both = {"1000": 100, "1001": 90}
    assert ids_of(complete(logit_bias=both)) == [1000] * 12
    # 1000 pays 2 per occurrence: within 64 tokens (126 of penalty against a bias gap of 10
    # plus the model's own difference) the other biased token takes over.
    penalized = ids_of(complete(max_tokens=64, logit_bias=both, frequency_penalty=2))
    assert penalized[0] == 1000 and 1001 in penalized, penalized
    assert set(penalized) <= {1000, 1001}, penalized
    eos = complete(logit_bias={"2": 100}, extra_body={"ignore_eos": False, "min_tokens": 3})
    assert eos.choices[0].finish_reason == "stop", eos
    assert eos.usage.completion_tokens == 4, eos.usage
    try:
        complete(frequency_penalty=2.5)
    except openai.BadRequestError as e:
        assert e.param == "frequency_penalty", e.body
    else:
        raise AssertionError("frequency_penalty 2.5 was accepted")

    # n choices (choice i is seed + i; choice 0 equals the n = 1 answer), streamed with indices.
    three = complete(n=3, temperature=1.0, seed=5)
    assert [ch.index for ch in three.choices] == [0, 1, 2], three
    one = complete(temperature=1.0, seed=5)
    assert ids_of(three) == ids_of(one), (three, one)
    assert three.usage.completion_tokens == 36, three.usage
    seen = {}
    for ch in client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, temperature=1.0, seed=3, n=2, stream=True
    ):
        for c in ch.choices:
            seen.setdefault(c.index, []).append(c.delta.content or "")
    assert sorted(seen) == [0, 1], seen

    # Prompt scoring as evaluation harnesses do it: echo, logprobs, max_tokens 0.
    scored = client.completions.create(
        model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=0
    )
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt, scored
    assert len(lp.token_logprobs) == scored.usage.prompt_tokens, (lp, scored.usage)
    assert lp.token_logprobs[0] is None, lp
    assert all(v <= 0 for v in lp.token_logprobs[1:]), lp
    assert scored.usage.completion_tokens == 0, scored.usage

    structured_output(client, model, messages)

    # A refused request raises BadRequestError naming the field.
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, temperature=-1)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e.status_code
        assert e.param == "temperature", e.body
    else:
        raise AssertionError("temperature -1 was accepted")

    print("openai client: ok")
    return 0


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


def refused(param, call):
    try:
        call()
    except openai.BadRequestError as e:
        assert e.status_code == 400, e.status_code
        assert e.param == param, (param, e.body)
    else:
        raise AssertionError(f"{param}: accepted")


def structured_output(client, model, messages):
    """The model has random weights: only the token masks keep its output in the grammar."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):
        chat = client.chat.completions.create(
            model=model, messages=messages, max_tokens=200, temperature=1.0, seed=seed,
            response_format=fmt,
        )
        msg = chat.choices[0]
        assert msg.finish_reason == "stop", chat
        jsonschema.validate(json.loads(msg.message.content), SCHEMA)
    # Streamed, two choices: each choice's deltas join into valid JSON.
    parts = {}
    for ch in client.completions.create(
        model=model, prompt="A person:", max_tokens=200, temperature=1.0, seed=9, n=2,
        stream=True, extra_body={"response_format": fmt},
    ):
        for c in ch.choices:
            parts.setdefault(c.index, []).append(c.text)
    assert sorted(parts) == [0, 1], parts
    for texts in parts.values():
        jsonschema.validate(json.loads("".join(texts)), SCHEMA)
    # vLLM's fields: a regular expression, a choice, a Lark grammar, a schema.
    def complete(**extra):
        return client.completions.create(
            model=model, prompt="Answer:", max_tokens=60, temperature=1.0, seed=4,
            extra_body=extra,
        ).choices[0]
    for seed in range(3):
        c = client.completions.create(
            model=model, prompt="Code:", max_tokens=40, temperature=1.0, seed=seed,
            extra_body={"guided_regex": "[0-9]{3}-[a-z]{2,5}"},
        ).choices[0]
        assert c.finish_reason == "stop" and re.fullmatch("[0-9]{3}-[a-z]{2,5}", c.text), c
    c = complete(guided_choice=["yes", "no", "maybe so"])
    assert c.text in ("yes", "no", "maybe so"), c
    c = complete(guided_grammar='start: "(" D ("," D){0,4} ")"\nD: /[0-9]/\n')
    assert c.finish_reason == "stop" and re.fullmatch(r"\([0-9](,[0-9]){0,4}\)", c.text), c
    small = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
             "maxItems": 2}
    c = complete(guided_json=small)
    assert c.finish_reason == "stop", c
    jsonschema.validate(json.loads(c.text), small)
    # Any JSON object: whenever it ends, it parses.
    c = client.completions.create(
        model=model, prompt="{}", max_tokens=120, temperature=0.7, seed=1,
        extra_body={"response_format": {"type": "json_object"}},
    ).choices[0]
    assert c.text.startswith("{"), c
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict), c
    # Refused, naming the field: a schema that is not one, a bad expression, two at once, a
    # format that does not exist, ignore_eos.
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}
    refused("response_format", lambda: client.completions.create(
        model=model, prompt="x", max_tokens=4, extra_body={"response_format": bad_schema}))
    refused("guided_regex", lambda: client.completions.create(
        model=model, prompt="x", max_tokens=4, extra_body={"guided_regex": "([a-"}))
    refused("guided_regex", lambda: client.completions.create(
        model=model, prompt="x", max_tokens=4,
        extra_body={"response_format": {"type": "json_object"}, "guided_regex": "a"}))
    refused("response_format", lambda: client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, response_format={"type": "xml"}))
    refused("ignore_eos", lambda: client.completions.create(
        model=model, prompt="x", max_tokens=4,
        extra_body={"response_format": {"type": "json_object"}, "ignore_eos": True}))


if __name__ == "__main__":
    sys.exit(main())
