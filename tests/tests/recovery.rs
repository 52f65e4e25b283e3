//! Surviving a lost worker: under 16 concurrent streaming requests on a tp=2 replica, SIGKILL of
//! one worker ends every request (completed, or a retryable UNAVAILABLE naming the worker)
//! within 10 s, and the coordinator stays up; a worker restarted for the lost rank registers,
//! the survivor reconnects keeping its weights (its process is never restarted), and the
//! replica serves again within 30 s with the same greedy outputs as before.

use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_tests::cluster::{bin, greedy, lines_of, status, wait_line, wait_state, Proc};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

type Client = pb::inference_client::InferenceClient<tonic::transport::Channel>;

fn worker(addr: &str, id: &str, rank: usize) -> Child {
    bin("grok-worker")
        .args([
            "--coordinator",
            addr,
            "--id",
            id,
            "--rank",
            &rank.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn req(prompt: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Ids(pb::TokenIds {
            ids: prompt,
        })),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_survives_a_lost_worker_and_comes_back_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 9, &model, 1 << 30, |_, _| {}).unwrap();
    let mut coord = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--tp",
            "2",
            "--kv-blocks",
            "512",
            "--comm-timeout-ms",
            "3000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut coord);
    let mut coord = Proc(coord);
    let addr = wait_line(&rx, "listening on ", 30);
    let endpoint = format!("http://{addr}");
    let w0 = Proc(worker(&addr, "w0", 0));
    let w1 = worker(&addr, "w1", 1);
    wait_state(&endpoint, "ready", 60).await;
    let client = Client::connect(endpoint.clone()).await.unwrap();
    let prompt = vec![5, 9, 13, 2];
    let before = greedy(&endpoint, prompt.clone(), 8).await.unwrap();
    assert_eq!(before.len(), 8);

    // 16 streaming requests, long enough to be in flight when the worker dies.
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(16);
    let mut tasks = vec![];
    for i in 0..16u32 {
        let mut c = client.clone();
        let first_tx = first_tx.clone();
        tasks.push(tokio::spawn(async move {
            let r: Result<usize, tonic::Status> = async {
                let mut s = c.generate(req(vec![3 + i, 7, 11], 500)).await?.into_inner();
                let mut n = 0;
                while let Some(m) = s.next().await {
                    n += m?.ids.len();
                    if n == 1 {
                        let _ = first_tx.send(()).await;
                    }
                }
                Ok(n)
            }
            .await;
            (r, Instant::now())
        }));
    }
    drop(first_tx);
    for _ in 0..16 {
        tokio::time::timeout(Duration::from_secs(60), first_rx.recv())
            .await
            .expect("every request streams a first token")
            .unwrap();
    }
    let mut w1 = w1;
    let killed = Instant::now();
    w1.kill().unwrap();
    let _ = w1.wait();
    let mut unavailable = 0;
    for t in tasks {
        let (r, done) = tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("no request hangs")
            .unwrap();
        assert!(
            done.duration_since(killed) < Duration::from_secs(10),
            "a request ended {:?} after the kill",
            done.duration_since(killed)
        );
        match r {
            Ok(n) => assert_eq!(n, 500, "a completed request has all its tokens"),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(
                    s.message().contains("w1") && s.message().contains("retry"),
                    "{s:?}"
                );
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0, "the kill interrupted no request");

    // The coordinator is up, says why, and refuses new work with a retryable status.
    wait_state(&endpoint, "recovering", 10).await;
    let st = status(&endpoint).await;
    assert!(st.detail.contains("w1"), "{}", st.detail);
    assert_eq!(st.shards[1].state, "lost");
    let e = greedy(&endpoint, prompt.clone(), 8).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // The worker comes back (same id and rank): serving again within 30 s, same outputs.
    let restarted = Instant::now();
    let _w1 = Proc(worker(&addr, "w1", 1));
    let took = wait_state(&endpoint, "ready", 30).await;
    eprintln!(
        "lost worker replaced: serving again {took:?} after the restart ({:?} after the kill)",
        restarted.duration_since(killed) + took
    );
    let after = greedy(&endpoint, prompt.clone(), 8).await.unwrap();
    assert_eq!(after, before, "outputs after recovery match those before");
    // And under load again: several requests at once.
    let mut again = vec![];
    for i in 0..4u32 {
        let ep = endpoint.clone();
        again.push(tokio::spawn(
            async move { greedy(&ep, vec![1 + i, 2], 8).await },
        ));
    }
    for a in again {
        assert_eq!(a.await.unwrap().unwrap().len(), 8);
    }
    // The survivor was never restarted, the coordinator neither.
    let mut w0 = w0;
    assert!(w0.0.try_wait().unwrap().is_none(), "worker 0 kept running");
    assert!(
        coord.0.try_wait().unwrap().is_none(),
        "the coordinator kept running"
    );
}

/// 16 seeded streaming requests, each to its end: their ids (a failure fails the test).
async fn run_16(client: &Client, on_first: Option<tokio::sync::mpsc::Sender<()>>) -> Vec<Vec<u32>> {
    seeded(client, 16, 400, on_first)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|s| panic!("a request failed: {s:?}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_a_lost_replica_complete_on_the_other() {
    lost_replica_moves_its_requests("2", "1").await;
}

/// The same with two pipeline stages per replica: the lost worker is a stage of a replica
/// with steps in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stage_with_steps_in_flight_moves_its_requests() {
    lost_replica_moves_its_requests("1", "2").await;
}

/// Two replicas of two workers (`tp` x `pp`); a worker of replica 1 is killed while 16
/// seeded streams run: every request completes with the output it has without the fault.
async fn lost_replica_moves_its_requests(tp: &str, pp: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 4, &model, 1 << 30, |_, _| {}).unwrap();
    let mut coord = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--tp",
            tp,
            "--pp",
            pp,
            "--replicas",
            "2",
            "--kv-blocks",
            "512",
            "--comm-timeout-ms",
            "3000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut coord);
    let _coord = Proc(coord);
    let addr = wait_line(&rx, "listening on ", 30);
    let endpoint = format!("http://{addr}");
    let mut ws: Vec<Option<Child>> = (0..4)
        .map(|r| Some(worker(&addr, &format!("w{r}"), r)))
        .collect();
    wait_state(&endpoint, "ready", 60).await;
    let st = status(&endpoint).await;
    assert_eq!(st.shards.len(), 4);
    assert_eq!(
        st.shards.iter().map(|s| s.replica).collect::<Vec<_>>(),
        [0, 0, 1, 1]
    );
    let client = Client::connect(endpoint.clone()).await.unwrap();
    // Reference: the same 16 requests with both replicas healthy.
    let want = run_16(&client, None).await;
    assert!(want.iter().all(|ids| ids.len() == 400));

    // Again, and kill a worker of replica 1 once every request has streamed a token.
    let (tx, mut first) = tokio::sync::mpsc::channel(16);
    let run = tokio::spawn({
        let client = client.clone();
        async move { run_16(&client, Some(tx)).await }
    });
    for _ in 0..16 {
        tokio::time::timeout(Duration::from_secs(60), first.recv())
            .await
            .expect("a first token")
            .unwrap();
    }
    let mut w3 = ws[3].take().unwrap();
    w3.kill().unwrap();
    let _ = w3.wait();
    let got = run.await.unwrap();
    // Every request completed, with exactly the output it has without the failure.
    assert_eq!(got, want, "moved requests continue where they stopped");
    let st = status(&endpoint).await;
    assert_eq!(st.state, "ready", "{}", st.detail);
    assert!(
        st.detail.contains("1 of 2 replicas serving"),
        "{}",
        st.detail
    );
    assert_eq!(st.shards[3].state, "lost");
    for w in ws.iter_mut().flatten() {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// A newer Load (a new leader's, after a failover that the old leader has not noticed) takes a
/// serving worker over: its step stream to the old coordinator closes, and the old coordinator
/// finds the worker lost at its next step and stops driving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_load_takes_a_worker_over_from_the_old_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny", Some(1)).unwrap();
    genmodel::generate(&c, GenDType::F32, 2, &model, 1 << 30, |_, _| {}).unwrap();
    let mut coord = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--comm-timeout-ms", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut coord);
    let _coord = Proc(coord);
    let addr = wait_line(&rx, "listening on ", 30);
    let endpoint = format!("http://{addr}");
    let _w = Proc(worker(&addr, "w0", 0));
    wait_state(&endpoint, "ready", 60).await;
    let worker_addr = status(&endpoint).await.shards[0].address.clone();
    let mut w = pb::worker_client::WorkerClient::connect(format!("http://{worker_addr}"))
        .await
        .unwrap();
    let mut load = tokio::time::timeout(
        Duration::from_secs(20),
        w.load(pb::LoadRequest {
            model_dir: model.display().to_string(),
            layout: Some(pb::Layout {
                tp: 1,
                ep: 1,
                pp: 1,
                replicas: 1,
                ..Default::default()
            }),
            rank: 0,
            world_peers: vec!["127.0.0.1:1".into()],
            tp_peers: vec!["127.0.0.1:1".into()],
            kv_blocks: 512,
            block_size: 16,
            comm_timeout_ms: 3000,
            ..Default::default()
        }),
    )
    .await
    .expect("the Load is answered in bounded time")
    .unwrap()
    .into_inner();
    let mut last = String::new();
    while let Some(p) = load.next().await {
        last = p.unwrap().stage;
    }
    assert_eq!(
        last, "ready",
        "the worker reconnected for the newer Load, keeping its weights"
    );
    // The old coordinator's step stream closed: its next step finds the worker lost, the
    // request ends with a retryable UNAVAILABLE and it stops driving the worker.
    let e = greedy(&endpoint, vec![3, 4], 8).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("w0"), "{e:?}");
    wait_state(&endpoint, "recovering", 10).await;
}

/// A coordinator with extra flags; its gRPC endpoint and HTTP address.
fn coordinator(model: &std::path::Path, args: &[&str]) -> (Proc, String, String) {
    let mut c = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let addr = wait_line(&rx, "listening on ", 30);
    let http = wait_line(&rx, "http listening on ", 30);
    (Proc(c), addr, http)
}

/// Seeded streaming requests, each to its end: their ids, or the first error. `first` hears
/// of each request's first token.
async fn seeded(
    client: &Client,
    n: u32,
    max_tokens: u32,
    first: Option<tokio::sync::mpsc::Sender<()>>,
) -> Vec<Result<Vec<u32>, tonic::Status>> {
    let mut tasks = vec![];
    for i in 0..n {
        let mut c = client.clone();
        let first = first.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = req(vec![4 + i, 8, 1], max_tokens);
            r.temperature = 0.9;
            r.seed = 7 + i as u64;
            let mut s = c.generate(r).await?.into_inner();
            let mut ids = vec![];
            while let Some(m) = s.next().await {
                ids.extend(m?.ids);
                if ids.len() == 1 {
                    if let Some(f) = &first {
                        let _ = f.send(()).await;
                    }
                }
            }
            Ok::<_, tonic::Status>(ids)
        }));
    }
    drop(first);
    let mut out = vec![];
    for t in tasks {
        out.push(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("no request hangs")
                .unwrap(),
        );
    }
    out
}

/// A worker frozen past the health monitor's patience (SIGSTOP, then SIGCONT: a VM pause, a
/// page-fault storm) is found lost, and rejoins by itself when it resumes: no process is
/// restarted, no operator acts, the weights stay, and the requests in flight wait it out and
/// finish with exactly the tokens of a fault-free run. The recovery is counted in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_rejoins_by_itself_and_requests_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 5, &model, 1 << 30, |_, _| {}).unwrap();
    let (mut coord, addr, http) = coordinator(
        &model,
        &[
            "--tp",
            "2",
            "--comm-timeout-ms",
            "3000",
            "--fault-hold-ms",
            "60000",
        ],
    );
    let endpoint = format!("http://{addr}");
    let mut w0 = Proc(worker(&addr, "w0", 0));
    let mut w1 = Proc(worker(&addr, "w1", 1));
    wait_state(&endpoint, "ready", 60).await;
    let client = Client::connect(endpoint.clone()).await.unwrap();
    let want = seeded(&client, 8, 300, None).await;
    let want: Vec<Vec<u32>> = want.into_iter().map(|r| r.unwrap()).collect();
    assert!(want.iter().all(|ids| ids.len() == 300));

    let (tx, mut first) = tokio::sync::mpsc::channel(8);
    let run = tokio::spawn({
        let client = client.clone();
        async move {
            seeded(&client, 8, 300, Some(tx))
                .await
                .into_iter()
                .map(|r| r.unwrap_or_else(|s| panic!("a request failed: {s:?}")))
                .collect::<Vec<_>>()
        }
    });
    for _ in 0..8 {
        tokio::time::timeout(Duration::from_secs(60), first.recv())
            .await
            .expect("a first token")
            .unwrap();
    }
    let pid = w1.0.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_state(&endpoint, "recovering", 15).await;
    let st = status(&endpoint).await;
    assert_eq!(st.shards[1].state, "lost", "{:?}", st.shards[1]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed = Instant::now();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let took = wait_state(&endpoint, "ready", 30).await;
    eprintln!("the frozen worker serves again {took:?} after it resumed");
    let got = run.await.unwrap();
    assert_eq!(got, want, "resumed requests give the fault-free tokens");
    let m = grok_tests::cluster::http_get(&http, "/metrics");
    let metric = |n: &str| grok_tests::cluster::metric(&m, n).unwrap_or(-1.0);
    assert!(metric("grok_replica_faults_total") >= 1.0, "{m}");
    assert!(metric("grok_replica_recoveries_total") >= 1.0, "{m}");
    assert!(metric("grok_recovery_seconds_count") >= 1.0, "{m}");
    assert!(metric("grok_resumed_requests_total") >= 1.0, "{m}");
    assert!(resumed.elapsed() < Duration::from_secs(60));
    // Nobody was restarted.
    for p in [&mut w0, &mut w1, &mut coord] {
        assert!(p.0.try_wait().unwrap().is_none(), "a process exited");
    }
    let st = status(&endpoint).await;
    assert!(
        st.shards.iter().all(|s| s.state == "ready"),
        "{:?}",
        st.shards
    );
}

/// Prompt logits over a 131072-token vocabulary (8 MiB for 16 tokens, twice the 4 MiB a gRPC
/// message may carry by default) stream in chunks that a client with default limits reads,
/// equal to the single-process run; a request for more than the cluster returns is refused up
/// front naming the limit; the worker is never taken for lost, and the cluster serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logits_past_the_message_limit_stream_in_chunks_and_the_cluster_stays_up() {
    use grok_shared::formats::checkpoint::Checkpoint;
    use grok_shared::generate::{generate, GenerateOptions};
    use grok_shared::model::Model;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let mut c = ModelConfig::preset("tiny", Some(1)).unwrap();
    c.vocab_size = 131072;
    c.max_position_embeddings = 1024;
    genmodel::generate(&c, GenDType::F32, 6, &model, 1 << 30, |_, _| {}).unwrap();
    let prompt: Vec<u32> = (0..16).map(|i| 1 + i * 7919).collect();
    let m = Model::load(&Checkpoint::open(&model).unwrap()).unwrap();
    let want = generate(
        &m,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 1,
            stop_at_eos: false,
            prompt_logits: true,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap()
    .prompt_logits
    .unwrap();
    drop(m);
    let (_coord, addr, _http) = coordinator(&model, &["--tp", "2", "--comm-timeout-ms", "5000"]);
    let endpoint = format!("http://{addr}");
    let _w0 = Proc(worker(&addr, "w0", 0));
    let _w1 = Proc(worker(&addr, "w1", 1));
    wait_state(&endpoint, "ready", 90).await;
    // tonic's default: 4 MiB per message decoded.
    let mut client = Client::connect(endpoint.clone()).await.unwrap();
    let mut s = client
        .generate(pb::GenerateRequest {
            prompt_logits: true,
            ..req(prompt.clone(), 2)
        })
        .await
        .unwrap()
        .into_inner();
    let (mut logits, mut ids, mut messages) = (vec![], vec![], 0);
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        assert!(m.prompt_logits.len() * 4 <= 1 << 20, "a chunk over 1 MiB");
        assert!(
            m.prompt_logits.is_empty() || ids.is_empty(),
            "prompt logits come before the first token"
        );
        logits.extend(m.prompt_logits);
        ids.extend(m.ids);
        messages += 1;
    }
    assert_eq!(ids.len(), 2);
    assert!(messages > 8, "8 MiB of logits came in {messages} messages");
    assert_eq!(logits.len(), want.len());
    let err = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    assert!(
        err < 1e-4,
        "prompt logits differ from the single process by {err}"
    );

    // 600 tokens x 131072 x 4 bytes = 300 MiB: refused up front, naming the limit.
    let e = client
        .generate(pb::GenerateRequest {
            prompt_logits: true,
            ..req((1..=600).collect(), 1)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("256 MiB") && e.message().contains("prompt_logits"),
        "{e:?}"
    );
    // The cluster never took a worker for lost and serves on.
    let st = status(&endpoint).await;
    assert_eq!(st.state, "ready", "{}", st.detail);
    assert!(
        st.shards.iter().all(|s| s.state == "ready"),
        "{:?}",
        st.shards
    );
    assert_eq!(greedy(&endpoint, vec![3, 4], 4).await.unwrap().len(), 4);
}
