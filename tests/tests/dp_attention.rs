//! Data-parallel attention with expert parallelism (`--dp-attention --ep E --expert-copies K`)
//! on CPU worker processes over loopback: every rank runs attention for its own sequences and
//! the MoE exchanges rows by all-to-all. Prompt logits of the f32 model stay within 1e-5 of
//! one process and greedy ids are identical, for one request and for several at once (spread
//! over the ranks); bad placements are refused with the rule named.

use grok_shared::config::ModelConfig;
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_shared::generate::{generate, GenerateOptions};
use grok_shared::model::Model;
use grok_tests::cluster::{bin, greedy, http_get, json_ids, lines_of, status, up, wait_line, Proc};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    (0..6)
        .map(|i| {
            (0..(3 + 5 * i))
                .map(|j| ((j * 37 + i * 11 + 2) % (vocab - 2) + 1) as u32)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_attention_matches_the_single_process_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny8", None).unwrap();
    genmodel::generate(&c, GenDType::F32, 21, &model, 1 << 30, |_, _| {}).unwrap();
    let v = c.vocab_size;
    let m = Model::load(&Checkpoint::open(&model).unwrap()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        stop_at_eos: false,
        prompt_logits: true,
        ..Default::default()
    };
    let ps = prompts(v);
    let want: Vec<_> = ps
        .iter()
        .map(|p| generate(&m, p, &opts, |_| {}).unwrap())
        .collect();
    for (ep, k) in [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)] {
        let what = format!("dp-attention ep {ep} copies {k}");
        let cl = up(
            &model,
            &[
                "--dp-attention",
                "--ep",
                &ep.to_string(),
                "--expert-copies",
                &k.to_string(),
                "--kv-blocks",
                "32",
                "--http-listen",
                "127.0.0.1:0",
            ],
        );
        let st = status(&cl.endpoint).await;
        let l = st.layout.unwrap();
        assert!(
            l.dp_attention && l.ep == ep && l.expert_copies == k,
            "{what}: {l:?}"
        );
        assert_eq!(st.shards.len(), ep as usize, "{what}");
        // Each rank's KV cache (32 blocks of 16 slots, every head of 3 layers, a visibility
        // flag per slot) and device.
        let want_kv = 32 * 16 * (2 * 4 * (c.num_kv_heads * c.key_size) * c.num_layers + 1);
        for sh in &st.shards {
            assert_eq!(sh.kv_bytes as usize, want_kv, "{what}: rank {}", sh.rank);
            assert_eq!(sh.device, "cpu", "{what}");
        }
        // One request with its prompt logits.
        let npy = tmp.path().join(format!("dp{ep}{k}.npy"));
        let p = &ps[3];
        let ids: Vec<String> = p.iter().map(|x| x.to_string()).collect();
        let out = bin("grokctl")
            .args(["generate", "--endpoint", &cl.endpoint, "--prompt-ids"])
            .arg(ids.join(","))
            .args(["--max-new-tokens", "8", "--ignore-eos", "--json"])
            .arg("--logits-out")
            .arg(&npy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            json_ids(&out.stdout),
            want[3].ids,
            "{what}: greedy ids differ"
        );
        let (shape, logits) = grok_shared::formats::npy::read_f32(&npy).unwrap();
        assert_eq!(shape, vec![p.len(), v]);
        let wl = want[3].prompt_logits.as_ref().unwrap();
        for i in 0..p.len() {
            let w: Vec<f64> = wl[i * v..(i + 1) * v].iter().map(|&x| x as f64).collect();
            let e = grok_tests::reference::rel_err(&logits[i * v..(i + 1) * v], &w);
            assert!(e <= 1e-5, "{what}: position {i}: rel err {e:.2e}");
        }
        // Every prompt at once: the sequences spread over the ranks.
        let runs: Vec<_> = ps
            .iter()
            .map(|p| tokio::spawn(greedy_owned(cl.endpoint.clone(), p.clone())))
            .collect();
        for (i, r) in runs.into_iter().enumerate() {
            let got = r.await.unwrap().unwrap();
            assert_eq!(got, want[i].ids, "{what}: prompt {i} run with the others");
        }
        // Every routed token's expert work ran exactly once, on ranks holding the expert, and
        // every rank did some.
        let body = http_get(cl.http.as_deref().unwrap(), "/metrics");
        let series = |name: &str| -> Vec<(String, f64)> {
            body.lines()
                .filter(|l| l.starts_with(name))
                .map(|l| {
                    let (k, v) = l.rsplit_once(' ').unwrap();
                    (k.to_string(), v.parse().unwrap())
                })
                .collect()
        };
        let routed: f64 = series("grok_expert_routed_tokens_total{")
            .iter()
            .map(|x| x.1)
            .sum();
        let served = series("grok_expert_served_tokens_total{");
        let total: f64 = served.iter().map(|x| x.1).sum();
        assert!(
            routed > 0.0 && total == routed,
            "{what}: routed {routed}, served {total}"
        );
        let layout = grok_shared::sharding::Layout::dp_attention(ep as usize, k as usize);
        let held = layout.expert_ranks(&c);
        for r in 0..ep as usize {
            let mine: Vec<&(String, f64)> = served
                .iter()
                .filter(|x| x.0.contains(&format!("rank=\"{r}\"")))
                .collect();
            assert!(!mine.is_empty(), "{what}: rank {r} served nothing");
            for (k, _) in mine {
                let e: usize = k
                    .split("expert=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(held[e].contains(&r), "{what}: rank {r} served expert {e}");
            }
        }
    }
}

async fn greedy_owned(endpoint: String, prompt: Vec<u32>) -> Result<Vec<u32>, tonic::Status> {
    greedy(&endpoint, prompt, 8).await
}

#[test]
fn bad_placements_are_refused_with_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny8", None).unwrap();
    genmodel::generate(&c, GenDType::Bf16, 1, &model, 1 << 30, |_, _| {}).unwrap();
    for (args, rule) in [
        (
            vec!["--dp-attention", "--ep", "4", "--expert-copies", "5"],
            "expert copies (5) exceed the ep ranks (4)",
        ),
        (vec!["--dp-attention", "--ep", "16"], "without an expert"),
        (
            vec!["--dp-attention", "--ep", "4", "--tp", "2"],
            "tp (2) must equal ep (4)",
        ),
        (
            vec!["--ep", "2", "--tp", "2", "--expert-copies", "2"],
            "need data-parallel attention",
        ),
    ] {
        let out = bin("grokctl")
            .args(["up", "--model"])
            .arg(&model)
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(rule), "{args:?}: {err}");
    }
}

/// A coordinator for data-parallel attention over `ep` ranks with `k` copies of each expert;
/// its address.
fn dp_coordinator(model: &Path, ep: usize, k: usize) -> (Proc, String) {
    let (ep, k) = (ep.to_string(), k.to_string());
    dp_coordinator_with(model, &["--ep", &ep, "--expert-copies", &k])
}

/// A coordinator for data-parallel attention with these arguments; its address.
fn dp_coordinator_with(model: &Path, args: &[&str]) -> (Proc, String) {
    let mut c = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--dp-attention",
        ])
        .args(args)
        .args(["--kv-blocks", "64", "--comm-timeout-ms", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let addr = wait_line(&rx, "listening on ", 30);
    (Proc(c), addr)
}

/// A worker for rank `rank`, its log (info level) in `log`.
fn dp_worker(addr: &str, id: &str, rank: usize, log: &Path) -> Child {
    bin("grok-worker")
        .args([
            "--coordinator",
            addr,
            "--id",
            id,
            "--rank",
            &rank.to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// A greedy stream of `n` tokens: its ids and the longest time between two of them.
async fn timed_stream(endpoint: String, prompt: Vec<u32>, n: u32) -> (Vec<u32>, Duration) {
    use tokio_stream::StreamExt;
    let mut c =
        grok_proto::v1::inference_client::InferenceClient::connect(format!("http://{endpoint}"))
            .await
            .unwrap();
    let mut s = c
        .generate(grok_proto::v1::GenerateRequest {
            prompt: Some(grok_proto::v1::generate_request::Prompt::Ids(
                grok_proto::v1::TokenIds { ids: prompt },
            )),
            max_tokens: n,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut ids, mut gap, mut last) = (vec![], Duration::ZERO, None::<Instant>);
    while let Some(m) = s.next().await {
        let m = m.unwrap_or_else(|e| panic!("stream failed after {} tokens: {e}", ids.len()));
        if !m.ids.is_empty() {
            let now = Instant::now();
            if let Some(l) = last {
                gap = gap.max(now - l);
            }
            last = Some(now);
        }
        ids.extend(m.ids);
    }
    (ids, gap)
}

fn count(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
}

async fn wait_detail(addr: &str, what: &str, secs: u64) -> grok_proto::v1::ClusterStatusResponse {
    let t = Instant::now();
    loop {
        let st = status(addr).await;
        if st.detail.contains(what) {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "state `{}` ({}) does not say `{what}` after {secs} s",
            st.state,
            st.detail
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL of a rank under 8 streaming requests, every expert held twice: every stream
/// completes with the tokens it would have had, the replica serves on the 3 others without
/// reloading any weights, and a worker that registers for the rank again is taken back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_rank_keeps_serving_and_its_return_is_taken_in() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny8", None).unwrap();
    genmodel::generate(&c, GenDType::F32, 5, &model, 1 << 30, |_, _| {}).unwrap();
    let m = Model::load(&Checkpoint::open(&model).unwrap()).unwrap();
    let n = 160u32;
    let ps = prompts(c.vocab_size);
    let ps: Vec<Vec<u32>> = ps.iter().chain(&ps[..2]).cloned().collect();
    let opts = GenerateOptions {
        max_new_tokens: n as usize,
        stop_at_eos: false,
        ..Default::default()
    };
    let want: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| generate(&m, p, &opts, |_| {}).unwrap().ids)
        .collect();
    let (_coord, addr) = dp_coordinator(&model, 4, 2);
    let logs: Vec<PathBuf> = (0..4)
        .map(|r| tmp.path().join(format!("w{r}.log")))
        .collect();
    let mut ws: Vec<Option<Child>> = (0..4)
        .map(|r| Some(dp_worker(&addr, &format!("w{r}"), r, &logs[r])))
        .collect();
    wait_detail(&addr, "serving with 4 workers", 60).await;
    let runs: Vec<_> = ps
        .iter()
        .map(|p| tokio::spawn(timed_stream(addr.clone(), p.clone(), n)))
        .collect();
    // Kill rank 2 once the streams are under way.
    let t = Instant::now();
    while status(&addr).await.generated_tokens < 8 * 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the streams do not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut w2 = ws[2].take().unwrap();
    w2.kill().unwrap();
    let _ = w2.wait();
    let mut longest = Duration::ZERO;
    for (i, r) in runs.into_iter().enumerate() {
        let (ids, gap) = r.await.unwrap();
        assert_eq!(ids, want[i], "stream {i} through the loss of rank 2");
        longest = longest.max(gap);
    }
    eprintln!("longest gap between two tokens of a stream through the loss of a rank: {longest:?}");
    let st = wait_detail(&addr, "serving with 3 of 4 workers", 30).await;
    assert_eq!(st.state, "ready", "{}", st.detail);
    // It serves new requests, and no survivor loaded its weights again.
    let ids = greedy(&addr, ps[1].clone(), 12).await.unwrap();
    assert_eq!(ids, want[1][..12]);
    for r in [0, 1, 3] {
        assert_eq!(count(&logs[r], "shard loaded"), 1, "rank {r} reloaded");
        assert!(count(&logs[r], "collectives reconnected") >= 1, "rank {r}");
    }
    // A worker registers for rank 2 again: the replica takes it back in.
    let log2 = tmp.path().join("w2b.log");
    ws[2] = Some(dp_worker(&addr, "w2b", 2, &log2));
    wait_detail(&addr, "serving again with 4 workers", 60).await;
    let ids = greedy(&addr, ps[4].clone(), 12).await.unwrap();
    assert_eq!(ids, want[4][..12]);
    for r in [0, 1, 3] {
        assert_eq!(count(&logs[r], "shard loaded"), 1, "rank {r} reloaded");
    }
    for w in ws.iter_mut().flatten() {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// With one copy of each expert the loss of a rank loses experts: the replica says which and
/// does not serve (never wrong results), until the rank is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_only_copy_of_an_expert_stops_the_replica_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny8", None).unwrap();
    genmodel::generate(&c, GenDType::Bf16, 5, &model, 1 << 30, |_, _| {}).unwrap();
    let (_coord, addr) = dp_coordinator(&model, 2, 1);
    let logs: Vec<PathBuf> = (0..2)
        .map(|r| tmp.path().join(format!("w{r}.log")))
        .collect();
    let _w0 = Proc(dp_worker(&addr, "w0", 0, &logs[0]));
    let mut w1 = dp_worker(&addr, "w1", 1, &logs[1]);
    wait_detail(&addr, "serving with 2 workers", 60).await;
    let want = greedy(&addr, vec![3, 4, 5], 6).await.unwrap();
    w1.kill().unwrap();
    let _ = w1.wait();
    let st = wait_detail(&addr, "has no copy left", 30).await;
    assert_eq!(st.state, "recovering", "{}", st.detail);
    let e = greedy(&addr, vec![3, 4, 5], 6).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let _w1 = Proc(dp_worker(&addr, "w1b", 1, &tmp.path().join("w1b.log")));
    wait_detail(&addr, "serving again with 2 workers", 60).await;
    assert_eq!(greedy(&addr, vec![3, 4, 5], 6).await.unwrap(), want);
}

/// Rebalancing a serving replica: after some load, `grokctl rebalance` gives the busiest
/// experts more copies; the workers load only those (none loads its shard again, no restart)
/// and the replica serves on with the outputs of one process. A placement file is used as
/// given, and a bad one is refused with its rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_loads_only_the_new_copies_and_placement_files_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny8", None).unwrap();
    genmodel::generate(&c, GenDType::Bf16, 8, &model, 1 << 30, |_, _| {}).unwrap();
    let m = Model::load(&Checkpoint::open(&model).unwrap()).unwrap();
    let ps = prompts(c.vocab_size);
    let opts = GenerateOptions {
        max_new_tokens: 10,
        stop_at_eos: false,
        ..Default::default()
    };
    let want: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| generate(&m, p, &opts, |_| {}).unwrap().ids)
        .collect();
    // Experts 0-5 on rank 0, 5-7 on rank 1: rank 0 does most of the expert work.
    let placement = tmp.path().join("placement.json");
    std::fs::write(&placement, "[[0], [0], [0], [0], [0], [1, 0], [1], [1]]").unwrap();
    let (_coord, addr) = dp_coordinator_with(
        &model,
        &[
            "--ep",
            "2",
            "--expert-placement",
            placement.to_str().unwrap(),
        ],
    );
    let logs: Vec<PathBuf> = (0..2)
        .map(|r| tmp.path().join(format!("w{r}.log")))
        .collect();
    let _ws: Vec<Proc> = (0..2)
        .map(|r| Proc(dp_worker(&addr, &format!("w{r}"), r, &logs[r])))
        .collect();
    wait_detail(&addr, "serving with 2 workers", 60).await;
    let st = status(&addr).await;
    assert_eq!(st.shards[0].experts, "0,1,2,3,4,5", "{:?}", st.shards);
    assert_eq!(st.shards[1].experts, "5,6,7");
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            greedy(&addr, p.clone(), 10).await.unwrap(),
            want[i],
            "prompt {i}"
        );
    }
    // A dry run changes nothing; then two more copies are applied.
    let dry = bin("grokctl")
        .args([
            "rebalance",
            "--endpoint",
            &addr,
            "--extra-copies",
            "2",
            "--dry-run",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(d["applied"], false);
    let added: usize = d["after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_array().unwrap().len())
        .sum();
    assert!(added > 9 && added <= 11, "{d}");
    assert!(
        d["max_rank_share_after"].as_f64() < d["max_rank_share_before"].as_f64(),
        "{d}"
    );
    assert_eq!(status(&addr).await.shards[0].experts, "0,1,2,3,4,5");
    let out = bin("grokctl")
        .args([
            "rebalance",
            "--endpoint",
            &addr,
            "--extra-copies",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a["applied"], true);
    assert_eq!(a["after"], d["after"]);
    // A request sent while the replica reloads waits for it instead of being refused.
    assert_eq!(
        greedy(&addr, ps[0].clone(), 10).await.unwrap(),
        want[0],
        "a request during the reload"
    );
    wait_detail(&addr, "serving again with 2 workers", 60).await;
    let st = status(&addr).await;
    let after: Vec<Vec<u64>> = serde_json::from_value(a["after"].clone()).unwrap();
    for (r, s) in st.shards.iter().enumerate() {
        let mine: Vec<String> = (0..8)
            .filter(|&e| after[e].contains(&(r as u64)))
            .map(|e| e.to_string())
            .collect();
        assert_eq!(s.experts, mine.join(","), "rank {r}");
    }
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            greedy(&addr, p.clone(), 10).await.unwrap(),
            want[i],
            "prompt {i} after"
        );
    }
    for log in &logs {
        assert_eq!(count(log, "shard loaded"), 1, "{}", log.display());
    }
    assert!(
        logs.iter().any(|l| count(l, "new experts loaded") == 1),
        "no worker loaded a new expert"
    );
    // Placement files that break a rule.
    for (text, rule) in [
        (
            "[[0], [0], [0, 1], [0], [1], [], [1], [1]]",
            "expert 5 has no copy",
        ),
        (
            "[[0], [0], [0, 2], [0], [1], [1], [1], [1]]",
            "outside the 2 ep ranks",
        ),
        (
            "[[0], [0], [0], [0], [0], [0], [0], [0]]",
            "rank 1 of the 2 ranks holds no expert",
        ),
        ("[[0], [1]]", "names 2 experts; the model has 8"),
        (
            "[[0, 0], [0], [0, 1], [0], [1], [1], [1], [1]]",
            "placed twice on one rank",
        ),
        ("not json", "expected a list"),
    ] {
        std::fs::write(&placement, text).unwrap();
        let out = bin("grok-coordinator")
            .args([
                "--model",
                model.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--dp-attention", "--ep", "2", "--expert-placement"])
            .arg(&placement)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(rule), "{text}: {err}");
    }
}
