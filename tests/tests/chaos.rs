//! Chaos: faults under continuous load, and what they may cost (nothing lost, no replica left
//! down, every retryable failure succeeding when retried).
//!
//! - A short run of `grokctl bench chaos` (2 replicas of tp 2, 8 streaming clients, a seeded
//!   schedule of SIGKILL + restart and SIGSTOP/SIGCONT of workers).
//! - A network partition that heals: a worker on its own host (network namespace) is cut off
//!   (its switch port down: packets vanish, nothing is refused) and put back; its replica is
//!   found lost, rejoins by itself when the link returns, and the requests complete with the
//!   tokens of a fault-free run.

use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_tests::cluster::{bin, lines_of, status, wait_line, Proc};
use grok_tests::netns::{in_ns, Net};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

#[test]
fn a_short_chaos_soak_loses_nothing_and_leaves_no_replica_down() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 21, &model, 1 << 30, |_, _| {}).unwrap();
    let out = bin("grokctl")
        .args(["bench", "chaos", "--model", model.to_str().unwrap()])
        .args(["--tp", "2", "--replicas", "2", "--clients", "8"])
        .args(["--duration-s", "20", "--interval-s", "2", "--seed", "11"])
        .args(["--max-tokens", "32", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    eprintln!("{r}");
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(n("lost"), 0, "{r}");
    assert_eq!(n("replicas_left_down"), 0, "{r}");
    assert_eq!(n("retries_exhausted"), 0, "{r}");
    assert!(n("completed") > 16, "{r}");
    let faults = r["faults"].as_array().unwrap();
    assert!(faults.len() >= 3, "{r}");
    assert_eq!(
        r["recover_s"].as_array().unwrap().len(),
        faults.len(),
        "{r}"
    );
    assert!(r["recover_max_s"].as_f64().unwrap() < 60.0, "{r}");
}

type Client = pb::inference_client::InferenceClient<tonic::transport::Channel>;

/// Request `k` of the load: seeded, so its tokens are the same whatever happens around it.
fn request(k: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Ids(pb::TokenIds {
            ids: vec![3 + k, 17, 5],
        })),
        max_tokens: 120,
        temperature: 0.9,
        seed: 50 + k as u64,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Request `k` to its end, retrying a retryable failure (each retry counted) until it works.
async fn until_done(mut c: Client, k: u32, retries: &std::sync::atomic::AtomicU64) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r: Result<Vec<u32>, tonic::Status> = async {
            let mut s = c.generate(request(k)).await?.into_inner();
            let mut ids = vec![];
            while let Some(m) = s.next().await {
                ids.extend(m?.ids);
            }
            Ok(ids)
        }
        .await;
        match r {
            Ok(ids) => return ids,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => panic!("request {k} failed: {s:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_rejoins_when_the_network_heals() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 22, &model, 1 << 30, |_, _| {}).unwrap();
    let tag = format!("gh{}", std::process::id() % 100000);
    let subnet = grok_tests::netns::unused_subnet("10.215");
    let ip = |i: usize| format!("{subnet}.{}", i + 2);
    let hosts: Vec<(String, String)> = (0..4).map(|i| (format!("w{i}"), ip(i))).collect();
    let host_refs: Vec<(&str, &str)> = hosts
        .iter()
        .map(|(h, a)| (h.as_str(), a.as_str()))
        .collect();
    let root_ip = format!("{subnet}.1");
    // The test needs namespaces (root and iproute2, which the test command installs): a
    // failure to make them fails the test.
    let net = Net::create(&tag, &host_refs, Some(&root_ip))
        .unwrap_or_else(|why| panic!("network namespaces cannot be created here: {why}"));
    let listen = format!("{root_ip}:0");
    let mut coord = bin("grok-coordinator")
        .args(["--model", model.to_str().unwrap(), "--listen", &listen])
        .args(["--tp", "2", "--replicas", "2", "--comm-timeout-ms", "3000"])
        .args(["--fault-hold-ms", "30000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut coord);
    let _coord = Proc(coord);
    let addr = wait_line(&rx, "listening on ", 30);
    let endpoint = format!("http://{addr}");
    let mut workers = vec![];
    for (i, (h, a)) in hosts.iter().enumerate() {
        let mut w = in_ns(&net.ns(h), "grok-worker");
        w.args(["--coordinator", &addr, "--listen", &format!("{a}:0")])
            .args(["--id", h, "--rank", &i.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        workers.push(Proc(w.spawn().unwrap()));
    }
    grok_tests::cluster::wait_state(&endpoint, "ready", 90).await;
    let client = Client::connect(endpoint.clone()).await.unwrap();
    let retries = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let run = |retries: std::sync::Arc<std::sync::atomic::AtomicU64>| {
        let client = client.clone();
        async move {
            let tasks: Vec<_> = (0..8u32)
                .map(|k| {
                    let (c, r) = (client.clone(), retries.clone());
                    tokio::spawn(async move { until_done(c, k, &r).await })
                })
                .collect();
            let mut out = vec![];
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let want = run(std::sync::Arc::default()).await;
    assert!(want.iter().all(|ids| ids.len() == 120));

    // Under the same load, host w1 (replica 0) drops off the network for 6 s.
    let load = tokio::spawn(run(retries.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    net.partition(1).unwrap();
    let t = Instant::now();
    loop {
        let st = status(&endpoint).await;
        if st.shards[1].state == "lost" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", st.shards[1]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(t.elapsed())).await;
    net.heal(1).unwrap();
    let healed = Instant::now();
    // Replica 0 serves again by itself: every shard ready.
    loop {
        let st = status(&endpoint).await;
        if st.shards.iter().all(|s| s.state == "ready") && st.state == "ready" {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(40),
            "replica 0 did not rejoin: {} {:?}",
            st.detail,
            st.shards
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the partitioned worker serves again {:?} after the network healed",
        healed.elapsed()
    );
    let got = tokio::time::timeout(Duration::from_secs(150), load)
        .await
        .expect("no request hangs")
        .unwrap();
    assert_eq!(got, want, "every request gave its fault-free tokens");
    eprintln!(
        "retryable failures retried: {}",
        retries.load(std::sync::atomic::Ordering::Relaxed)
    );
    // No worker process was restarted.
    for w in &mut workers {
        assert!(w.0.try_wait().unwrap().is_none(), "a worker exited");
    }
}
