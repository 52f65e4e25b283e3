//! The OpenAI-compatible HTTP API of the coordinator, against real clusters on loopback:
//! completions (streaming or not) give the gRPC path's ids and text; chat streams end with
//! `[DONE]`; usage and logprobs have OpenAI's shape; every bad input is a 400 with OpenAI's
//! error body naming the field; health, readiness, metrics and models; and the official
//! `openai` Python client works against it (tests/python/test_openai.py).

use grok_shared::config::ModelConfig;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_tests::cluster::{bin, Proc};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, secs: u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return Some(l[prefix.len()..].to_string()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

struct Cluster {
    _proc: Proc,
    /// gRPC endpoint (`http://ADDR`).
    grpc: String,
    /// HTTP API address (`HOST:PORT`).
    http: String,
}

/// `grokctl up` with the HTTP API, once ready.
fn up(model: &Path, tokenizer: Option<&Path>) -> Cluster {
    let log = model.with_file_name("up.log");
    let mut cmd = bin("grokctl");
    cmd.args(["up", "--model", model.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--kv-blocks", "64"]);
    if let Some(t) = tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let failed = |what: &str| -> ! {
        panic!(
            "grokctl up: no `{what}` line:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    let http = wait_line(&rx, "http listening on ", 60).unwrap_or_else(|| failed("http"));
    let grpc = wait_line(&rx, "ready: ", 90).unwrap_or_else(|| failed("ready"));
    Cluster {
        _proc: proc,
        grpc,
        http,
    }
}

fn tiny_model(dir: &Path) {
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 13, dir, 1 << 30, |_, _| {}).unwrap();
}

/// A tiny model with Grok-1's real vocabulary (131072), so the real tokenizer fits it.
fn real_vocab_model(dir: &Path) {
    let mut c = ModelConfig::preset("small", Some(1)).unwrap();
    c.emb_size = 64;
    c.ffn_size = 128;
    c.num_q_heads = 4;
    c.num_kv_heads = 2;
    c.key_size = 16;
    genmodel::generate(&c, GenDType::Bf16, 21, dir, 1 << 30, |_, _| {}).unwrap();
}

fn tokenizer_path() -> PathBuf {
    grok_tests::shared_dir()
        .expect("../shared (with models/grok-1/tokenizer.model) must sit beside the project root")
        .join("models/grok-1/tokenizer.model")
}

// --- a minimal HTTP/1.1 client -----------------------------------------------------------------

struct Resp {
    status: u16,
    content_type: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        assert!(
            self.content_type.starts_with("text/event-stream"),
            "not an event stream ({}): {}",
            self.content_type,
            self.body
        );
        self.body
            .split("\n\n")
            .filter_map(|ev| {
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                (!data.is_empty()).then(|| data.join("\n"))
            })
            .collect()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let line = std::str::from_utf8(&b[..nl]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        b = &b[nl + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn request(addr: &str, method: &str, path: &str, body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let rest = &raw[split + 4..];
    let body = if header("transfer-encoding").contains("chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        content_type: header("content-type"),
        body: String::from_utf8(body).unwrap(),
    }
}

/// Sends a POST, reads until the first SSE `data:` line, then closes the connection.
fn post_and_hang_up(addr: &str, path: &str, body: &Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data:") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before any event");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
}

fn get(addr: &str, path: &str) -> Resp {
    request(addr, "GET", path, "")
}

fn post(addr: &str, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, &body.to_string())
}

/// A 400 with OpenAI's error body naming `param`.
fn assert_bad(r: &Resp, param: Option<&str>, case: &str) {
    assert_eq!(r.status, 400, "{case}: {}", r.body);
    assert!(
        r.content_type.starts_with("application/json"),
        "{case}: {}",
        r.content_type
    );
    let e = &r.json()["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{case}: {e}"
    );
    assert_eq!(e["type"], "invalid_request_error", "{case}: {e}");
    assert_eq!(e["param"], json!(param), "{case}: {e}");
    assert!(e["code"].is_null(), "{case}: {e}");
}

/// `grokctl generate --endpoint` (the gRPC path): (ids, text).
fn grpc_generate(endpoint: &str, args: &[&str]) -> (Vec<u64>, String) {
    let out = bin("grokctl")
        .args(["generate", "--endpoint", endpoint, "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let j: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ids = j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    (ids, j["text"].as_str().unwrap_or("").to_string())
}

fn ids_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The chunks of a streamed answer (the JSON events before `[DONE]`, which must end it).
fn stream_chunks(r: &Resp) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[test]
fn token_id_api_matches_grpc_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny-http");
    tiny_model(&model);
    let c = up(&model, None);
    let h = c.http.as_str();

    // Liveness, readiness, models.
    let r = get(h, "/health");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = get(h, "/ready");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "ready");
    let m = get(h, "/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny-http");
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(m["data"][0]["owned_by"], "grok-cluster");
    assert!(m["data"][0]["created"].as_u64().is_some());

    // Greedy ids: HTTP (non-streaming and streaming) == gRPC.
    let prompt = [7u32, 0, 33, 101, 5, 250, 19, 64];
    let ids_arg: Vec<String> = prompt.iter().map(|x| x.to_string()).collect();
    let (want, _) = grpc_generate(
        &c.grpc,
        &[
            "--prompt-ids",
            &ids_arg.join(","),
            "--max-new-tokens",
            "8",
            "--ignore-eos",
        ],
    );
    assert_eq!(want.len(), 8);
    let req = json!({
        "model": "tiny-http", "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "ignore_eos": true, "logprobs": 3, "return_token_ids": true,
    });
    let r = post(h, "/v1/completions", &req);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert!(j["id"].as_str().unwrap().starts_with("cmpl-"), "{j}");
    assert_eq!(j["object"], "text_completion");
    assert_eq!(j["model"], "tiny-http");
    assert!(j["created"].as_u64().is_some());
    let ch = &j["choices"][0];
    assert_eq!(ch["index"], 0);
    assert_eq!(ch["finish_reason"], "length");
    assert_eq!(ch["text"], "", "no tokenizer: no text");
    assert_eq!(ids_of(&ch["token_ids"]), want, "HTTP ids differ from gRPC");
    assert_eq!(
        j["usage"],
        json!({"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16,
            "prompt_tokens_details": {"cached_tokens": 0}})
    );
    // Logprobs: without a tokenizer the token strings are the ids; greedy picks the top one.
    let lp = &ch["logprobs"];
    let toks: Vec<String> = want.iter().map(|x| x.to_string()).collect();
    assert_eq!(lp["tokens"], json!(toks));
    let lps = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!((lps.len(), tops.len()), (8, 8));
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), 8);
    for (i, (l, top)) in lps.iter().zip(tops).enumerate() {
        let l = l.as_f64().unwrap();
        assert!(l <= 0.0, "{l}");
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3, "{top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((top[&toks[i]].as_f64().unwrap() - l).abs() < 1e-6);
        assert!(
            (best - l).abs() < 1e-6,
            "greedy token {i} is not the top one"
        );
    }

    // Streaming: the same ids, usage last, [DONE] at the end.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    sreq["prompt"] = json!([prompt]);
    let r = post(h, "/v1/completions", &sreq);
    let chunks = stream_chunks(&r);
    let mut got = Vec::new();
    let mut reasons = Vec::new();
    for ch in &chunks {
        assert_eq!(ch["object"], "text_completion");
        assert!(ch["id"].as_str().unwrap().starts_with("cmpl-"));
        if let Some(c0) = ch["choices"].get(0) {
            got.extend(ids_of(&c0["token_ids"]));
            if !c0["finish_reason"].is_null() {
                reasons.push(c0["finish_reason"].clone());
            }
            if let Some(t) = c0["logprobs"]["tokens"].as_array() {
                assert_eq!(t.len(), c0["token_ids"].as_array().unwrap().len());
            }
        }
    }
    assert_eq!(got, want, "streamed ids differ");
    assert_eq!(reasons, vec![json!("length")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 8);
    assert_eq!(last["usage"]["total_tokens"], 16);

    // Seeded sampling: streaming and not give the same ids, as does gRPC.
    let (want_s, _) = grpc_generate(
        &c.grpc,
        &[
            "--prompt-ids",
            &ids_arg.join(","),
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--temperature",
            "0.9",
            "--seed",
            "7",
        ],
    );
    let sampled = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0.9, "seed": 7,
        "ignore_eos": true, "return_token_ids": true});
    let j = post(h, "/v1/completions", &sampled).json();
    assert_eq!(ids_of(&j["choices"][0]["token_ids"]), want_s);
    let mut s = sampled.clone();
    s["stream"] = json!(true);
    let got: Vec<u64> = stream_chunks(&post(h, "/v1/completions", &s))
        .iter()
        .flat_map(|c| ids_of(&c["choices"][0]["token_ids"]))
        .collect();
    assert_eq!(got, want_s);

    // n choices: choice i samples with seed + i (choice 0 is the n = 1 output), streamed
    // chunks carry their index, usage counts every choice; best_of keeps the most likely.
    let seeded = |seed: u64, extra: Value| {
        let mut v = json!({"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": seed,
            "ignore_eos": true, "return_token_ids": true, "logprobs": 0});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let alone: Vec<Value> = (0..3)
        .map(|i| {
            post(h, "/v1/completions", &seeded(40 + i, json!({}))).json()["choices"][0].clone()
        })
        .collect();
    let three = post(h, "/v1/completions", &seeded(40, json!({"n": 3}))).json();
    assert_eq!(three["choices"].as_array().unwrap().len(), 3, "{three}");
    for (i, want) in alone.iter().enumerate() {
        let got = &three["choices"][i];
        assert_eq!(got["index"], i, "{three}");
        assert_eq!(
            got["token_ids"], want["token_ids"],
            "choice {i} is seed 40 + {i}"
        );
    }
    assert_eq!(three["usage"]["completion_tokens"], 18, "{three}");
    let score = |c: &Value| -> f64 {
        c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum()
    };
    let best = alone
        .iter()
        .max_by(|a, b| score(a).partial_cmp(&score(b)).unwrap())
        .unwrap();
    let b = post(h, "/v1/completions", &seeded(40, json!({"best_of": 3}))).json();
    assert_eq!(b["choices"].as_array().unwrap().len(), 1, "{b}");
    assert_eq!(b["choices"][0]["token_ids"], best["token_ids"], "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 18, "{b}");
    let st = stream_chunks(&post(
        h,
        "/v1/completions",
        &seeded(
            40,
            json!({"n": 3, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    ));
    for (i, want) in alone.iter().enumerate() {
        let got: Vec<u64> = st
            .iter()
            .filter_map(|c| c["choices"].as_array())
            .flatten()
            .filter(|c| c["index"] == i)
            .flat_map(|c| ids_of(&c["token_ids"]))
            .collect();
        assert_eq!(got, ids_of(&want["token_ids"]), "streamed choice {i}");
    }
    let usage_chunks: Vec<&Value> = st.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage_chunks.len(), 1);
    assert_eq!(usage_chunks[0]["usage"]["completion_tokens"], 18);
    // The choices share the prompt's blocks: the second and third take its two full blocks of
    // 16 tokens from the prefix cache.
    let hits = |h: &str| {
        grok_tests::cluster::metric(
            &get(h, "/metrics").body,
            "grok_prefix_cache_hit_tokens_total",
        )
        .unwrap()
    };
    let before = hits(h);
    let long: Vec<u32> = (0..40).map(|i| 5 + i * 3).collect();
    let r = post(
        h,
        "/v1/completions",
        &json!({"prompt": long, "max_tokens": 3, "n": 3, "temperature": 1.0, "seed": 9,
            "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 3);
    assert_eq!(hits(h) - before, 64.0);

    // echo with logprobs scores the prompt (vLLM's form: the first token has no score).
    let e = post(
        h,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2}),
    )
    .json();
    let lp = &e["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len(), "{e}");
    assert!(
        lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(),
        "{e}"
    );
    for i in 1..prompt.len() {
        let v = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(v.is_finite() && v <= 0.0, "{e}");
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 2, "{e}");
    }
    assert_eq!(e["usage"]["completion_tokens"], 0, "{e}");
    let e3 = post(
        h,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 3, "echo": true, "logprobs": 1,
            "temperature": 0, "ignore_eos": true}),
    )
    .json();
    let lp3 = &e3["choices"][0]["logprobs"];
    assert_eq!(
        lp3["token_logprobs"].as_array().unwrap().len(),
        prompt.len() + 3,
        "{e3}"
    );
    assert_eq!(
        lp3["token_logprobs"].as_array().unwrap()[..prompt.len()],
        lp["token_logprobs"].as_array().unwrap()[..],
        "the prompt's scores do not depend on what follows"
    );
    assert_bad(
        &post(
            h,
            "/v1/completions",
            &json!({"prompt": prompt, "echo": true, "stream": true}),
        ),
        Some("echo"),
        "echo streamed",
    );

    // Fields that cannot change the output are accepted; the default max_tokens is 16.
    let r = post(
        h,
        "/v1/completions",
        &json!({"prompt": [5, 6], "ignore_eos": true, "user": "me", "metadata": {"k": "v"},
            "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 16);
    // A field the server does not implement, with a value that would change the output, is
    // refused naming it, never silently ignored.
    for (field, value) in [
        ("frobnicate", json!({"x": 1})),
        ("response_format", json!({"type": "xml"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("auto")),
    ] {
        let mut body = json!({"prompt": [5, 6], "max_tokens": 2});
        body[field] = value;
        assert_bad(&post(h, "/v1/completions", &body), Some(field), field);
        let mut chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        chat[field] = body[field].clone();
        let r = post(h, "/v1/chat/completions", &chat);
        assert_eq!(r.status, 400, "chat {field}: {}", r.body);
    }

    // Bad input: 400, OpenAI's error body, the field named.
    let long: Vec<u32> = (0..600).map(|i| 1 + i % 200).collect();
    let base = |extra: Value| {
        let mut v = json!({"prompt": [5, 6, 7], "max_tokens": 2});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "temperature < 0",
            base(json!({"temperature": -0.5})),
            Some("temperature"),
        ),
        ("top_p 0", base(json!({"top_p": 0})), Some("top_p")),
        (
            "presence_penalty 3",
            base(json!({"presence_penalty": 3})),
            Some("presence_penalty"),
        ),
        (
            "frequency_penalty -2.5",
            base(json!({"frequency_penalty": -2.5})),
            Some("frequency_penalty"),
        ),
        (
            "repetition_penalty 0",
            base(json!({"repetition_penalty": 0})),
            Some("repetition_penalty"),
        ),
        (
            "logit_bias 101",
            base(json!({"logit_bias": {"5": 101}})),
            Some("logit_bias"),
        ),
        (
            "logit_bias outside the vocabulary",
            base(json!({"logit_bias": {"99999999": 1}})),
            Some("logit_bias"),
        ),
        (
            "logit_bias key not an id",
            base(json!({"logit_bias": {"abc": 1}})),
            Some("logit_bias"),
        ),
        (
            "min_tokens past max_tokens",
            base(json!({"min_tokens": 3})),
            Some("min_tokens"),
        ),
        ("top_p 1.5", base(json!({"top_p": 1.5})), Some("top_p")),
        (
            "max_tokens 0",
            base(json!({"max_tokens": 0})),
            Some("max_tokens"),
        ),
        (
            "max_tokens past the context",
            base(json!({"max_tokens": 600})),
            Some("max_tokens"),
        ),
        (
            "max_completion_tokens 0",
            base(json!({"max_completion_tokens": 0})),
            Some("max_completion_tokens"),
        ),
        (
            "prompt longer than the context",
            base(json!({"prompt": long})),
            Some("prompt"),
        ),
        (
            "unknown model",
            base(json!({"model": "gpt-4"})),
            Some("model"),
        ),
        (
            "temperature of the wrong type",
            base(json!({"temperature": "hot"})),
            Some("temperature"),
        ),
        (
            "max_tokens of the wrong type",
            base(json!({"max_tokens": "many"})),
            Some("max_tokens"),
        ),
        (
            "stream of the wrong type",
            base(json!({"stream": "yes"})),
            Some("stream"),
        ),
        (
            "max_tokens past any context",
            base(json!({"max_tokens": u64::MAX})),
            Some("max_tokens"),
        ),
        ("n = 0", base(json!({"n": 0})), Some("n")),
        ("n = 17", base(json!({"n": 17})), Some("n")),
        (
            "best_of < n",
            base(json!({"n": 3, "best_of": 2})),
            Some("best_of"),
        ),
        (
            "best_of streamed",
            base(json!({"best_of": 2, "stream": true})),
            Some("best_of"),
        ),
        (
            "two prompts",
            base(json!({"prompt": [[1, 2], [3]]})),
            Some("prompt"),
        ),
        (
            "a prompt of the wrong type",
            base(json!({"prompt": {"x": 1}})),
            Some("prompt"),
        ),
        ("no prompt", json!({"max_tokens": 2}), Some("prompt")),
        ("empty prompt", base(json!({"prompt": []})), Some("prompt")),
        (
            "id outside the vocabulary",
            base(json!({"prompt": [5, 256]})),
            Some("prompt"),
        ),
        (
            "text without a tokenizer",
            base(json!({"prompt": "hello"})),
            Some("prompt"),
        ),
        (
            "stop strings without a tokenizer",
            base(json!({"stop": "x"})),
            Some("stop"),
        ),
        (
            "too many logprobs",
            base(json!({"logprobs": 21})),
            Some("logprobs"),
        ),
    ];
    for (case, body, param) in &cases {
        assert_bad(&post(h, "/v1/completions", body), *param, case);
    }
    // The same checks apply to streaming requests, before the stream starts.
    let mut s = base(json!({"temperature": -1, "stream": true}));
    assert_bad(
        &post(h, "/v1/completions", &s),
        Some("temperature"),
        "stream",
    );
    s["temperature"] = json!(0);
    s["top_p"] = json!(2);
    assert_bad(&post(h, "/v1/completions", &s), Some("top_p"), "stream");
    for (case, raw) in [
        ("malformed JSON", r#"{"prompt": [1, 2"#),
        ("not an object", "[1, 2]"),
        ("empty body", ""),
    ] {
        assert_bad(&request(h, "POST", "/v1/completions", raw), None, case);
        assert_bad(&request(h, "POST", "/v1/chat/completions", raw), None, case);
    }
    let chat = |extra: Value| {
        let mut v = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let chat_cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "chat without a tokenizer",
            chat(json!({})),
            Some("messages"),
        ),
        ("chat n = 30", chat(json!({"n": 30})), Some("n")),
        (
            "chat unknown model",
            chat(json!({"model": "x"})),
            Some("model"),
        ),
        (
            "chat temperature type",
            chat(json!({"temperature": [1]})),
            Some("temperature"),
        ),
        (
            "chat messages type",
            chat(json!({"messages": "hi"})),
            Some("messages"),
        ),
        (
            "chat unknown role",
            chat(json!({"messages": [{"role": "robot", "content": "x"}]})),
            Some("messages"),
        ),
        (
            "chat image part",
            chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
            Some("messages"),
        ),
        (
            "chat no messages",
            json!({"max_tokens": 2}),
            Some("messages"),
        ),
    ];
    for (case, body, param) in &chat_cases {
        assert_bad(&post(h, "/v1/chat/completions", body), *param, case);
    }
    // Unknown routes answer OpenAI's error body too.
    let r = get(h, "/v1/nothing");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());

    // Metrics.
    let r = get(h, "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "text/plain; version=0.0.4");
    for name in [
        "grok_requests_total",
        "grok_expert_routed_tokens_total",
        "outcome=\"rejected\"",
        "outcome=\"length\"",
    ] {
        assert!(r.body.contains(name), "/metrics lacks {name}:\n{}", r.body);
    }
}

#[test]
fn text_and_chat_with_the_real_tokenizer() {
    let tok_path = tokenizer_path();
    let tok = grok_shared::tokenizer::Tokenizer::from_file(&tok_path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("grok-text");
    real_vocab_model(&model);
    let c = up(&model, Some(&tok_path));
    let h = c.http.as_str();

    // /tokenize and /detokenize (vLLM's): the ids generation sees, and back.
    let t = post(
        h,
        "/tokenize",
        &json!({"model": "grok-text", "prompt": "The capital of France is"}),
    )
    .json();
    let want_prompt_ids: Vec<u64> = tok
        .encode("The capital of France is")
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    assert_eq!(ids_of(&t["tokens"]), want_prompt_ids, "{t}");
    assert_eq!(t["count"], json!(want_prompt_ids.len()));
    assert!(t["max_model_len"].as_u64().is_some_and(|m| m > 0), "{t}");
    let d = post(h, "/detokenize", &json!({"tokens": t["tokens"]})).json();
    assert_eq!(d["prompt"], json!("The capital of France is"), "{d}");
    let conv = json!({"messages": [{"role": "user", "content": "Hi"}]});
    let t = post(h, "/tokenize", &conv).json();
    let want: Vec<u64> = tok
        .encode(&grok_coordinator::api::http::chat_prompt(&[(
            "User".to_string(),
            "Hi".to_string(),
        )]))
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    assert_eq!(ids_of(&t["tokens"]), want, "{t}");
    for (path, body, param) in [
        ("/tokenize", json!({}), "prompt"),
        (
            "/tokenize",
            json!({"prompt": "a", "add_special_tokens": true}),
            "add_special_tokens",
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "model": "other"}),
            "model",
        ),
        ("/detokenize", json!({"tokens": "abc"}), "tokens"),
        ("/detokenize", json!({"tokens": [1, 99999999]}), "tokens"),
    ] {
        assert_bad(&post(h, path, &body), Some(param), path);
    }

    // Text completion == gRPC, streaming == not.
    let prompt = "The capital of France is";
    let (want_ids, want_text) = grpc_generate(
        &c.grpc,
        &["--prompt", prompt, "--max-new-tokens", "8", "--ignore-eos"],
    );
    let req = json!({"model": "grok-text", "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "ignore_eos": true, "return_token_ids": true, "logprobs": 2});
    let j = post(h, "/v1/completions", &req).json();
    let ch = &j["choices"][0];
    assert_eq!(ids_of(&ch["token_ids"]), want_ids);
    assert_eq!(ch["text"], want_text.as_str());
    assert!(!want_text.is_empty());
    assert_eq!(
        j["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        tok.encode(prompt).unwrap().len()
    );
    // Token strings are decoded; offsets add up to the text.
    let toks: Vec<String> = ch["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let want_toks: Vec<String> = want_ids
        .iter()
        .map(|&id| tok.decode(&[id as u32]).unwrap())
        .collect();
    assert_eq!(toks, want_toks);
    let offs = ids_of(&ch["logprobs"]["text_offset"]);
    assert_eq!(offs[0], 0);
    for i in 1..offs.len() {
        assert_eq!(offs[i], offs[i - 1] + toks[i - 1].chars().count() as u64);
    }
    let mut s = req.clone();
    s["stream"] = json!(true);
    let text: String = stream_chunks(&post(h, "/v1/completions", &s))
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, want_text);

    // A stop string cuts the text before it.
    let chars: Vec<char> = want_text.chars().collect();
    if chars.len() >= 4 {
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let cut = &want_text[..want_text.find(&stop).unwrap()];
        let mut r = req.clone();
        r["stop"] = json!([stop]);
        let j = post(h, "/v1/completions", &r).json();
        assert_eq!(j["choices"][0]["text"], cut, "stop {stop:?}");
        assert_eq!(j["choices"][0]["finish_reason"], "stop");
    }

    // Chat: streaming and not agree; the prompt is the documented template.
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [
            {"type": "text", "text": "Name a "},
            {"type": "text", "text": "colour."},
        ]},
    ]);
    let template = "System: You are terse.\n\nUser: Name a colour.\n\nAssistant:";
    let creq = json!({"model": "grok-text", "messages": messages, "max_tokens": 6,
        "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let r = post(h, "/v1/chat/completions", &creq);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(j["object"], "chat.completion");
    let ch = &j["choices"][0];
    assert_eq!(ch["message"]["role"], "assistant");
    let content = ch["message"]["content"].as_str().unwrap().to_string();
    assert!(["stop", "length"].contains(&ch["finish_reason"].as_str().unwrap()));
    let u = &j["usage"];
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() as usize,
        tok.encode(template).unwrap().len()
    );
    let n = u["completion_tokens"].as_u64().unwrap();
    assert_eq!(u["total_tokens"], u["prompt_tokens"].as_u64().unwrap() + n);
    let lc = ch["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lc.len() as u64, n);
    for e in lc {
        assert!(e["token"].is_string() && e["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2, "{e}");
        assert!(e["top_logprobs"][0]["token"].is_string());
    }

    let mut s = creq.clone();
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&post(h, "/v1/chat/completions", &s));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finish = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
        if let Some(c0) = c["choices"].get(0) {
            streamed.push_str(c0["delta"]["content"].as_str().unwrap_or(""));
            if !c0["finish_reason"].is_null() {
                finish.push(c0["finish_reason"].clone());
            }
        }
    }
    assert_eq!(streamed, content);
    assert_eq!(finish, vec![ch["finish_reason"].clone()]);
    assert_eq!(chunks.last().unwrap()["usage"], *u);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));

    // A client that goes away cancels its request (the engine frees the sequence).
    let outcome = |m: &str, o: &str| {
        let key = format!("grok_requests_total{{outcome=\"{o}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map_or(0, |v| v.parse::<u64>().unwrap())
    };
    let lengths = outcome(&get(h, "/metrics").body, "length");
    post_and_hang_up(
        h,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": 1000, "ignore_eos": true, "stream": true,
            "return_token_ids": true}),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = get(h, "/metrics").body;
        if outcome(&m, "cancelled") == 1 {
            break;
        }
        assert_eq!(
            outcome(&m, "length"),
            lengths,
            "the abandoned request ran to its end:\n{m}"
        );
        assert!(Instant::now() < deadline, "no cancellation:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A prompt past the context is refused naming `messages`.
    let big = "word ".repeat(9000);
    let r = post(
        h,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": big}], "max_tokens": 2}),
    );
    assert_bad(&r, Some("messages"), "long chat");
}

#[test]
fn the_openai_python_client_works() {
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the `openai` Python package does not import with python3: run scripts/test.sh \
         (it installs it) or `python3 -m pip install openai`"
    );
    let tok_path = tokenizer_path();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("grok-py");
    real_vocab_model(&model);
    let c = up(&model, Some(&tok_path));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_openai.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}/v1", c.http))
        .arg("grok-py")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
