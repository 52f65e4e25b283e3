//! The serving engine over gRPC on a real tp=2 cluster: 64 concurrent streaming clients get
//! exactly their solo outputs, seeded sampling is batch-invariant, preemption keeps outputs,
//! cancellation frees KV blocks at once, a full queue refuses at once, bad requests are
//! INVALID_ARGUMENT naming the field, and health and reflection answer.

use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_tests::cluster::{up, Cluster};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

fn model(dir: &Path) {
    let c = ModelConfig::preset("tiny", None).unwrap();
    genmodel::generate(&c, GenDType::F32, 17, dir, 1 << 30, |_, _| {}).unwrap();
}

type Client = pb::inference_client::InferenceClient<tonic::transport::Channel>;

async fn client(c: &Cluster) -> Client {
    pb::inference_client::InferenceClient::connect(c.endpoint.clone())
        .await
        .unwrap()
}

async fn status(c: &Cluster) -> pb::ClusterStatusResponse {
    let mut a = pb::admin_client::AdminClient::connect(c.endpoint.clone())
        .await
        .unwrap();
    a.cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn req(prompt: &[u32], max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Ids(pb::TokenIds {
            ids: prompt.to_vec(),
        })),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Runs one request to the end: (ids, finish reason, completion tokens).
async fn run(
    mut cl: Client,
    r: pb::GenerateRequest,
) -> Result<(Vec<u32>, String, u32), tonic::Status> {
    let mut s = cl.generate(r).await?.into_inner();
    let mut ids = vec![];
    let mut finish = String::new();
    let mut usage = 0;
    while let Some(m) = s.next().await {
        let m = m?;
        ids.extend(m.ids);
        if !m.finish_reason.is_empty() {
            finish = m.finish_reason;
            usage = m.usage.map_or(0, |u| u.completion_tokens);
        }
    }
    Ok((ids, finish, usage))
}

fn prompts() -> Vec<(Vec<u32>, u32)> {
    let mut r = grok_shared::sampling::Rng::new(3);
    (0..8)
        .map(|i| {
            let len = 3 + (r.next_u64() % 40) as usize;
            let p: Vec<u32> = (0..len).map(|_| 1 + (r.next_u64() % 255) as u32).collect();
            (p, 4 + 5 * i as u32)
        })
        .collect()
}

async fn wait_kv_free(c: &Cluster) -> pb::ClusterStatusResponse {
    let t = Instant::now();
    loop {
        let s = status(c).await;
        if s.kv_blocks_used == 0 && s.running_sequences == 0 || t.elapsed() > Duration::from_secs(5)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_their_solo_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    // A small cache (40 blocks of 16 tokens) so that 64 sequences of up to 80 tokens must
    // wait for blocks and get preempted; a token budget that chunks the longer prompts.
    let c = up(
        &m,
        &[
            "--tp",
            "2",
            "--kv-blocks",
            "40",
            "--max-batch-tokens",
            "32",
            "--max-seqs",
            "64",
        ],
    );
    let cl = client(&c).await;
    let ps = prompts();
    let mut solo = vec![];
    for (p, n) in &ps {
        solo.push(run(cl.clone(), req(p, *n)).await.unwrap());
        let mut seeded = req(p, *n);
        seeded.temperature = 0.9;
        seeded.top_p = 0.95;
        seeded.seed = 11;
        solo.push(run(cl.clone(), seeded).await.unwrap());
    }
    // 64 clients at once: each of the 16 requests (8 greedy, 8 seeded) 4 times.
    let mut tasks = vec![];
    for k in 0..64 {
        let (p, n) = ps[(k / 2) % 8].clone();
        let mut r = req(&p, n);
        if k % 2 == 1 {
            r.temperature = 0.9;
            r.top_p = 0.95;
            r.seed = 11;
        }
        let cl = cl.clone();
        tasks.push(tokio::spawn(async move { (k, run(cl, r).await) }));
    }
    for t in tasks {
        let (k, res) = t.await.unwrap();
        let (ids, finish, usage) = res.unwrap();
        let want = &solo[((k / 2) % 8) * 2 + k % 2];
        assert_eq!(
            &ids, &want.0,
            "client {k}: output differs from the request run alone"
        );
        assert_eq!(finish, "length");
        assert_eq!(usage as usize, ids.len());
    }
    let s = wait_kv_free(&c).await;
    assert_eq!(
        s.kv_blocks_used, 0,
        "blocks still used after every request finished"
    );
    assert_eq!(s.kv_blocks_free, 40);
    // The small cache forced preemptions, and outputs still matched.
    let http = std::process::Command::new(grok_tests::bin("grokctl"))
        .args(["status", "--endpoint", &c.endpoint])
        .output()
        .unwrap();
    assert!(http.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_frees_blocks_and_full_queue_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let c = up(
        &m,
        &[
            "--tp",
            "2",
            "--kv-blocks",
            "64",
            "--max-seqs",
            "1",
            "--max-queue",
            "1",
        ],
    );
    let mut cl = client(&c).await;
    // A long request: read a few tokens, then drop the stream.
    let mut s = cl
        .generate(req(&[5, 6, 7], 400))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        s.next().await.unwrap().unwrap();
    }
    assert!(status(&c).await.kv_blocks_used > 0);
    drop(s);
    let st = wait_kv_free(&c).await;
    assert_eq!(st.kv_blocks_used, 0, "cancelled request kept its blocks");
    assert_eq!(st.running_sequences, 0);

    // One running, one queued: the next is refused at once, and the running one is unharmed.
    // (The long request runs to the end of the context: the steps below wait on the status,
    // not on a clock, so a fast machine cannot finish it before they are done.)
    let long = tokio::spawn(run(cl.clone(), req(&[9, 9, 9], 500)));
    let until = |what: &'static str, f: fn(&pb::ClusterStatusResponse) -> bool| {
        let c = &c;
        async move {
            let t = Instant::now();
            loop {
                if f(&status(c).await) {
                    return;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{what} never happened"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    until("the long request running", |s| s.running_sequences == 1).await;
    let queued = tokio::spawn(run(cl.clone(), req(&[8, 8], 5)));
    until("a request queued", |s| s.queued_requests == 1).await;
    let t = Instant::now();
    let refused = run(cl.clone(), req(&[7, 7], 5)).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    let (ids, finish, _) = long.await.unwrap().unwrap();
    assert_eq!((ids.len(), finish.as_str()), (500, "length"));
    assert_eq!(queued.await.unwrap().unwrap().0.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_health_and_reflection_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let c = up(&m, &["--tp", "2"]);
    let cl = client(&c).await;
    // A request running meanwhile is not disturbed.
    let running = tokio::spawn(run(cl.clone(), req(&[4, 5, 6], 200)));
    let ctx = 512;
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            pb::GenerateRequest {
                temperature: -0.5,
                ..req(&[1, 2], 4)
            },
            "temperature",
        ),
        (
            pb::GenerateRequest {
                top_p: 1.5,
                ..req(&[1, 2], 4)
            },
            "top_p",
        ),
        (
            pb::GenerateRequest {
                top_p: -0.1,
                ..req(&[1, 2], 4)
            },
            "top_p",
        ),
        (req(&[1, 2], 0), "max_tokens"),
        (req(&[1, 2], ctx), "max_tokens"),
        (req(&vec![3; ctx as usize + 1], 1), "prompt"),
        (req(&[1, 256], 4), "prompt"),
        (req(&[], 4), "prompt"),
        (
            pb::GenerateRequest {
                prompt: None,
                ..req(&[1], 4)
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                logprobs: 50,
                ..req(&[1], 4)
            },
            "logprobs",
        ),
    ];
    for (r, field) in cases {
        let e = run(cl.clone(), r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    // Text without a tokenizer, stop strings without a tokenizer.
    let mut r = req(&[1], 4);
    r.prompt = Some(pb::generate_request::Prompt::Text("hi".into()));
    assert_eq!(
        run(cl.clone(), r).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    let (ids, finish, _) = running.await.unwrap().unwrap();
    assert_eq!((ids.len(), finish.as_str()), (200, "length"));

    // Logprobs: the sampled token's and the top 3, most likely first; greedy picks the top one.
    let mut cl2 = cl.clone();
    let mut s = cl2
        .generate(pb::GenerateRequest {
            logprobs: 3,
            ..req(&[5, 6], 3)
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        if m.ids.is_empty() {
            continue;
        }
        let top = &m.top_logprobs[0].top;
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].token, m.ids[0]);
        assert!((top[0].logprob - m.logprobs[0]).abs() < 1e-6);
        assert!(
            top[0].logprob >= top[1].logprob
                && top[1].logprob >= top[2].logprob
                && top[0].logprob <= 0.0
        );
        seen += 1;
    }
    assert_eq!(seen, 3);

    // Standard health: liveness and readiness.
    let ch = tonic::transport::Channel::from_shared(c.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for svc in ["", "grok.v1.Inference"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: svc.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{svc} not SERVING");
    }
    // Server reflection lists the services.
    let mut refl =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch);
    let list = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut rs = refl
        .server_reflection_info(tokio_stream::iter(vec![list]))
        .await
        .unwrap()
        .into_inner();
    let resp = rs.next().await.unwrap().unwrap();
    let listed = format!("{:?}", resp.message_response);
    assert!(
        listed.contains("grok.v1.Inference") && listed.contains("grpc.health.v1.Health"),
        "{listed}"
    );
    // And v1alpha, through grpcio's own reflection client.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_reflection.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(c.endpoint.trim_start_matches("http://"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{} failed (scripts/test.sh installs grpcio and grpcio-reflection):\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Stop strings and stop ids: a stop id ends the request with "stop" and is not counted past it.
    let (ids, _, _) = run(cl.clone(), req(&[5, 6], 6)).await.unwrap();
    let stop_at = ids[2];
    let (ids2, finish2, _) = run(
        cl.clone(),
        pb::GenerateRequest {
            stop_token_ids: vec![stop_at],
            ..req(&[5, 6], 6)
        },
    )
    .await
    .unwrap();
    let first = ids.iter().position(|&x| x == stop_at).unwrap();
    assert_eq!(ids2, ids[..=first].to_vec());
    assert_eq!(finish2, "stop");
}

fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_guards_the_client_apis() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let secret = "tok-8c1f0b6a";
    let log = tmp.path().join("up.log");
    let mut c = grok_tests::cluster::bin("grokctl");
    c.args([
        "up",
        "--model",
        m.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .env("GROK_API_TOKEN", secret)
    .env("RUST_LOG", "debug")
    .stdout(std::process::Stdio::piped())
    .stderr(std::fs::File::create(&log).unwrap());
    let mut child = c.spawn().unwrap();
    let rx = grok_tests::cluster::lines_of(&mut child);
    let _p = grok_tests::cluster::Proc(child);
    let mut http = None;
    let endpoint = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("cluster did not come up");
        if let Some(a) = l.strip_prefix("http listening on ") {
            http = Some(a.to_string());
        }
        if let Some(e) = l.strip_prefix("ready: ") {
            break e.to_string();
        }
    };
    let http = http.unwrap();
    // gRPC: no token, a wrong token, the right one.
    let ch = tonic::transport::Channel::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cl = pb::inference_client::InferenceClient::new(ch.clone());
    let e = cl.generate(req(&[5, 6], 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(req(&[5, 6], 2));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        cl.generate(wrong).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let mut right = tonic::Request::new(req(&[5, 6], 2));
    right
        .metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let mut s = cl.generate(right).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        n += m.unwrap().ids.len();
    }
    assert_eq!(n, 2);
    let mut admin = pb::admin_client::AdminClient::new(ch);
    assert_eq!(
        admin
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    // HTTP: the API needs it, the probes do not.
    let (code, body) = http_get(&http, "/v1/models", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"error\""));
    assert_eq!(http_get(&http, "/v1/models", Some("nope")).0, 401);
    assert_eq!(http_get(&http, "/v1/models", Some(secret)).0, 200);
    assert_eq!(http_get(&http, "/health", None).0, 200);
    assert_eq!(http_get(&http, "/ready", None).0, 200);
    // grokctl passes the token from the environment.
    let st = std::process::Command::new(grok_tests::bin("grokctl"))
        .args(["status", "--endpoint", &endpoint])
        .env("GROK_API_TOKEN", secret)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // The secret never reaches the logs.
    drop(_p);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains(secret), "the token appears in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_work_and_refuses_new_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let c = up(&m, &["--tp", "2"]);
    let cl = client(&c).await;
    let long = tokio::spawn(run(cl.clone(), req(&[3, 4, 5], 300)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let drain = tokio::task::spawn_blocking({
        let ep = c.endpoint.clone();
        move || {
            std::process::Command::new(grok_tests::bin("grokctl"))
                .args(["drain", "--endpoint", &ep, "--timeout-s", "60"])
                .output()
                .unwrap()
        }
    });
    // Readiness turns false while draining; new requests are refused.
    let ch = tonic::transport::Channel::from_shared(c.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let t = Instant::now();
    loop {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "grok.v1.Inference".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.status == 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "readiness did not turn false"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = run(cl.clone(), req(&[7], 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("draining"));
    let live = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live.status, 1, "liveness stays SERVING while draining");
    // The in-flight request finishes, then the drain reports.
    let (ids, finish, _) = long.await.unwrap().unwrap();
    assert_eq!((ids.len(), finish.as_str()), (300, "length"));
    let out = drain.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("drained"));
    // Resume: serving again.
    let r = std::process::Command::new(grok_tests::bin("grokctl"))
        .args(["drain", "--endpoint", &c.endpoint, "--resume"])
        .output()
        .unwrap();
    assert!(r.status.success());
    assert_eq!(run(cl.clone(), req(&[7], 2)).await.unwrap().0.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_outputs_are_batch_invariant_at_tp4() {
    // With 4 tensor ranks the all-reduce order of an element must not depend on the batch size.
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let c = up(&m, &["--tp", "4", "--max-batch-tokens", "24"]);
    let cl = client(&c).await;
    let seeded = |p: &[u32]| pb::GenerateRequest {
        temperature: 1.0,
        seed: 5,
        ..req(p, 12)
    };
    let alone = run(cl.clone(), seeded(&[9, 8, 7, 6])).await.unwrap().0;
    let greedy_alone = run(cl.clone(), req(&[11, 12, 13], 12)).await.unwrap().0;
    let mut tasks = vec![];
    for k in 0..6u32 {
        let cl = cl.clone();
        let r = match k % 3 {
            0 => seeded(&[9, 8, 7, 6]),
            1 => req(&[11, 12, 13], 12),
            _ => req(
                &[
                    40 + k,
                    41,
                    42,
                    43,
                    44,
                    45,
                    46,
                    47,
                    48,
                    49,
                    50,
                    51,
                    52,
                    53,
                    54,
                    55,
                    56,
                    57,
                    58,
                    59,
                ],
                12,
            ),
        };
        tasks.push(tokio::spawn(
            async move { (k, run(cl, r).await.unwrap().0) },
        ));
    }
    for t in tasks {
        let (k, ids) = t.await.unwrap();
        match k % 3 {
            0 => assert_eq!(ids, alone, "seeded request changed in a batch"),
            1 => assert_eq!(ids, greedy_alone, "greedy request changed in a batch"),
            _ => assert_eq!(ids.len(), 12),
        }
    }
    // Bit for bit: the prompt logits of a request alone and sharing its prefill step.
    let logits = |mut cl: Client, p: Vec<u32>| async move {
        let mut s = cl
            .generate(pb::GenerateRequest {
                prompt_logits: true,
                ..req(&p, 1)
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = vec![];
        while let Some(m) = s.next().await {
            out.extend(m.unwrap().prompt_logits);
        }
        out
    };
    let p: Vec<u32> = (1..=9).collect();
    let solo = logits(cl.clone(), p.clone()).await;
    // Keep the engine busy so that the next two requests are admitted into one step with it.
    let busy = tokio::spawn(run(cl.clone(), req(&[3, 3, 3], 200)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = tokio::spawn(logits(cl.clone(), (20..=34).collect()));
    let together = logits(cl.clone(), p).await;
    other.await.unwrap();
    busy.await.unwrap().unwrap();
    assert_eq!(solo.len(), 9 * 256);
    assert!(
        solo == together,
        "prompt logits changed when the step was shared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_worker_drains_its_replica_while_the_other_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let c = up(&m, &["--replicas", "2"]);
    let st = status(&c).await;
    assert_eq!(st.shards.len(), 2);
    assert_eq!(st.layout.unwrap().replicas, 2);
    let cl = client(&c).await;
    // Round robin: the first request goes to replica 0 (worker-0).
    let long = tokio::spawn(run(cl.clone(), req(&[3, 4, 5], 300)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let drain = tokio::task::spawn_blocking({
        let ep = c.endpoint.clone();
        move || {
            std::process::Command::new(grok_tests::bin("grokctl"))
                .args(["drain", "--endpoint", &ep, "--worker", "worker-0"])
                .args(["--timeout-s", "60"])
                .output()
                .unwrap()
        }
    });
    let t = Instant::now();
    loop {
        let st = status(&c).await;
        if st.detail.contains("replica 0 draining") {
            assert_eq!(st.state, "ready", "the other replica serves on");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{}", st.detail);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New requests are served (by replica 1) while replica 0 finishes its request.
    for _ in 0..3 {
        assert_eq!(run(cl.clone(), req(&[7], 2)).await.unwrap().0.len(), 2);
    }
    let (ids, _, _) = long.await.unwrap().unwrap();
    assert_eq!(ids.len(), 300);
    let out = drain.await.unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("drained"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = std::process::Command::new(grok_tests::bin("grokctl"))
        .args([
            "drain",
            "--endpoint",
            &c.endpoint,
            "--worker",
            "worker-0",
            "--resume",
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let st = status(&c).await;
    assert!(
        st.detail.contains("2 of 2 replicas serving"),
        "{}",
        st.detail
    );
    // An unknown worker is NOT_FOUND.
    let bad = std::process::Command::new(grok_tests::bin("grokctl"))
        .args(["drain", "--endpoint", &c.endpoint, "--worker", "nobody"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no worker `nobody`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_requests_go_to_the_least_loaded_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    // Eight layers: the long request lasts far longer than the short ones.
    let cfg = ModelConfig::preset("tiny", Some(8)).unwrap();
    genmodel::generate(&cfg, GenDType::F32, 17, &m, 1 << 30, |_, _| {}).unwrap();
    let c = up(&m, &["--replicas", "2"]);
    let cl = client(&c).await;
    // A long request, running once its first token arrives.
    let mut long = cl
        .clone()
        .generate(req(&[3, 4, 5], 500))
        .await
        .unwrap()
        .into_inner();
    long.next().await.unwrap().unwrap();
    let busy_steps = |st: &pb::ClusterStatusResponse| -> Vec<u64> {
        st.shards.iter().map(|s| s.steps).collect()
    };
    let before = busy_steps(&status(&c).await);
    // Three short requests one after another: all go to the idle replica (two steps each).
    for _ in 0..3 {
        assert_eq!(run(cl.clone(), req(&[7], 2)).await.unwrap().0.len(), 2);
    }
    let mid = status(&c).await;
    assert_eq!(
        mid.running_sequences, 1,
        "the long request still runs while the short ones come and go"
    );
    let after = busy_steps(&mid);
    drop(long);
    let idle = if after[0] - before[0] < after[1] - before[1] {
        0
    } else {
        1
    };
    assert_eq!(
        after[idle] - before[idle],
        6,
        "steps before {before:?}, after {after:?}: the short requests all ran on the idle replica"
    );
}

/// Pipeline parallelism with steps in flight: pp 2 and pp 3 keep up to pp steps in flight
/// (each over its own sequences) and give exactly the outputs of pp 1 to 32 concurrent
/// greedy and seeded streams, with a cache small enough to force preemptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_stages_with_steps_in_flight_give_the_single_stage_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    // Six layers: two per stage at pp 3.
    let cfg = ModelConfig::preset("tiny", Some(6)).unwrap();
    genmodel::generate(&cfg, GenDType::F32, 29, &m, 1 << 30, |_, _| {}).unwrap();
    let ps = prompts();
    let request = |k: usize| {
        let (p, n) = &ps[k % 8];
        let mut r = req(p, *n);
        if (k / 8) % 2 == 1 {
            r.temperature = 0.8;
            r.top_p = 0.9;
            r.seed = 5 + k as u64 % 8;
        }
        r
    };
    // The reference: each of the 16 requests alone on one stage.
    let mut want = vec![];
    {
        let c = up(&m, &[]);
        let cl = client(&c).await;
        for k in 0..16 {
            want.push(run(cl.clone(), request(k)).await.unwrap().0);
        }
    }
    for pp in ["2", "3"] {
        let c = up(
            &m,
            &[
                "--pp",
                pp,
                "--kv-blocks",
                "24",
                "--max-batch-tokens",
                "32",
                "--max-seqs",
                "32",
                "--http-listen",
                "127.0.0.1:0",
            ],
        );
        let cl = client(&c).await;
        let mut tasks = vec![];
        for k in 0..32 {
            let cl = cl.clone();
            let r = request(k % 16);
            tasks.push(tokio::spawn(async move { (k, run(cl, r).await) }));
        }
        for t in tasks {
            let (k, res) = t.await.unwrap();
            let (ids, finish, _) = res.unwrap();
            assert_eq!(ids, want[k % 16], "pp {pp}: stream {k} differs from pp 1");
            assert_eq!(finish, "length");
        }
        let s = status(&c).await;
        assert!(
            s.pipelined_steps > 0,
            "pp {pp}: no step was sent while another was in flight"
        );
        assert!(s.coordinator_step_seconds > 0.0 && s.coordinator_step_seconds.is_finite());
        let body = grok_tests::cluster::http_get(c.http.as_deref().unwrap(), "/metrics");
        let preempted = grok_tests::cluster::metric(&body, "grok_preemptions_total").unwrap();
        assert!(
            preempted > 0.0,
            "pp {pp}: the small cache forced no preemption"
        );
        // Every stage reports its layers' routed tokens (tensor rank 0 of each stage): each
        // layer routes every computed token to 2 experts, so all 6 layers count the same.
        let routed = |layer: usize| -> f64 {
            let prefix = format!("grok_expert_routed_tokens_total{{layer=\"{layer}\",");
            body.lines()
                .filter(|l| l.starts_with(&prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let per_layer: Vec<f64> = (0..6).map(routed).collect();
        assert!(
            per_layer[0] > 0.0 && per_layer.iter().all(|&x| x == per_layer[0]),
            "pp {pp}: routed tokens per layer {per_layer:?}"
        );
        let s = wait_kv_free(&c).await;
        assert_eq!(s.kv_blocks_used, 0, "pp {pp}: blocks still used at the end");
    }
}

/// Logit bias, penalties and min_tokens change what is sampled as OpenAI and vLLM define them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn biases_penalties_and_min_tokens_steer_sampling() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let eos = ModelConfig::preset("tiny", None).unwrap().eos_token_id;
    let c = up(&m, &["--tp", "2"]);
    let cl = client(&c).await;
    let base = req(&[5, 6, 7], 24);
    // A bias of +100 makes a token win every greedy step.
    let (ids, _, _) = run(
        cl.clone(),
        pb::GenerateRequest {
            logit_bias: [(42, 100.0)].into(),
            ..base.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids, vec![42; 24]);
    // Biased 10 above the next one, a token pays 2 per occurrence (frequency penalty): it wins
    // first, and the other biased token takes over within a few steps.
    let biased = [(42, 100.0), (43, 90.0)];
    let (ids, _, _) = run(
        cl.clone(),
        pb::GenerateRequest {
            logit_bias: biased.into(),
            frequency_penalty: 2.0,
            ..base.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids[0], 42, "{ids:?}");
    assert!(ids.contains(&43), "{ids:?}");
    assert!(ids.iter().all(|&t| t == 42 || t == 43), "{ids:?}");
    let (plain, _, _) = run(
        cl.clone(),
        pb::GenerateRequest {
            logit_bias: biased.into(),
            ..base.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        plain,
        vec![42; 24],
        "without the penalty the first bias always wins"
    );
    // EOS pushed to the top ends a request at once, unless min_tokens holds it back.
    let eos_first = pb::GenerateRequest {
        logit_bias: [(eos, 100.0)].into(),
        ignore_eos: false,
        ..base.clone()
    };
    let (ids, finish, n) = run(cl.clone(), eos_first.clone()).await.unwrap();
    assert_eq!(
        (ids.as_slice(), finish.as_str(), n),
        (&[eos][..], "stop", 1)
    );
    let (ids, finish, n) = run(
        cl.clone(),
        pb::GenerateRequest {
            min_tokens: 5,
            ..eos_first
        },
    )
    .await
    .unwrap();
    assert_eq!((finish.as_str(), n), ("stop", 6), "{ids:?}");
    assert!(
        ids[..5].iter().all(|&t| t != eos) && ids[5] == eos,
        "{ids:?}"
    );
    // Out of range: INVALID_ARGUMENT naming the field.
    for (r, field) in [
        (
            pb::GenerateRequest {
                presence_penalty: 2.5,
                ..base.clone()
            },
            "presence_penalty",
        ),
        (
            pb::GenerateRequest {
                logit_bias: [(1 << 30, 1.0)].into(),
                ..base.clone()
            },
            "logit_bias",
        ),
        (
            pb::GenerateRequest {
                min_tokens: 25,
                ..base.clone()
            },
            "min_tokens",
        ),
    ] {
        let e = run(cl.clone(), r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
}

/// Prompt scoring: the log-probability of every prompt token after the first and its top
/// alternatives, without shipping logit rows, equal to what the prompt's logits give; across
/// chunked prefill (a 5-token budget splits a 12-token prompt), with max_tokens 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_scores_match_the_prompt_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let vocab = ModelConfig::preset("tiny", None).unwrap().vocab_size;
    let c = up(&m, &["--max-batch-tokens", "5"]);
    let mut cl = client(&c).await;
    let prompt: Vec<u32> = (0..12).map(|i| 3 + (i * 37) % 200).collect();
    // The reference: whole logit rows (tests only).
    let mut s = cl
        .generate(pb::GenerateRequest {
            prompt_logits: true,
            ..req(&prompt, 1)
        })
        .await
        .unwrap()
        .into_inner();
    let mut rows = vec![];
    while let Some(msg) = s.next().await {
        rows.extend(msg.unwrap().prompt_logits);
    }
    assert_eq!(rows.len(), prompt.len() * vocab);
    let mut s = cl
        .generate(pb::GenerateRequest {
            prompt_logprobs: Some(3),
            ..req(&prompt, 0)
        })
        .await
        .unwrap()
        .into_inner();
    let (mut scores, mut ids, mut finish, mut usage) = (vec![], vec![], String::new(), None);
    while let Some(msg) = s.next().await {
        let msg = msg.unwrap();
        scores.extend(msg.prompt_logprobs);
        ids.extend(msg.ids);
        if !msg.finish_reason.is_empty() {
            finish = msg.finish_reason;
            usage = msg.usage;
        }
    }
    assert!(ids.is_empty(), "max_tokens 0 generates nothing: {ids:?}");
    assert_eq!(finish, "length");
    assert_eq!(usage.unwrap().completion_tokens, 0);
    let positions: Vec<u32> = scores.iter().map(|x| x.position).collect();
    assert_eq!(
        positions,
        (1..12).collect::<Vec<u32>>(),
        "every position once, in order"
    );
    for x in &scores {
        let p = x.position as usize;
        assert_eq!(x.token, prompt[p]);
        // log-softmax of the previous position's row, in f64.
        let row: Vec<f64> = rows[(p - 1) * vocab..p * vocab]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        let want = row[prompt[p] as usize] - lse;
        assert!(
            (x.logprob as f64 - want).abs() < 1e-4 && x.logprob.is_finite(),
            "position {p}: {} vs {want}",
            x.logprob
        );
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
        let top: Vec<u32> = x.top.iter().map(|t| t.token).collect();
        assert_eq!(
            top,
            order[..3].iter().map(|&t| t as u32).collect::<Vec<_>>()
        );
    }
    // max_tokens 0 is for scoring only.
    let e = run(cl.clone(), req(&prompt, 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("max_tokens"), "{}", e.message());
}

/// Prefix caching: requests that share a prompt prefix reuse its KV blocks (tp 2, pp 2 with
/// steps in flight), with exactly the outputs of a cluster without the cache, greedy and
/// seeded, one at a time and all at once; usage and /metrics report the reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_reused_and_outputs_do_not_change() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let prefix: Vec<u32> = (0..40).map(|i| 3 + (i * 7) % 250).collect();
    let request = |k: usize| {
        let mut p = prefix.clone();
        p.extend((0..5 + k % 4).map(|i| 10 + (k * 13 + i) as u32));
        let mut r = req(&p, 12);
        if k % 2 == 1 {
            r.temperature = 0.9;
            r.top_p = 0.95;
            r.seed = 3 + k as u64;
        }
        r
    };
    let layout = ["--tp", "2", "--pp", "2", "--http-listen", "127.0.0.1:0"];
    let mut want = vec![];
    {
        let c = grok_tests::cluster::up_with_env(&m, &layout, &[("GROK_NO_PREFIX_CACHE", "true")]);
        let cl = client(&c).await;
        for k in 0..8 {
            want.push(run(cl.clone(), request(k)).await.unwrap().0);
        }
        let body = grok_tests::cluster::http_get(c.http.as_deref().unwrap(), "/metrics");
        let hits = grok_tests::cluster::metric(&body, "grok_prefix_cache_hit_tokens_total");
        assert_eq!(hits, Some(0.0), "no reuse with the cache off");
    }
    let c = up(&m, &layout);
    let mut cl = client(&c).await;
    for (k, w) in want.iter().enumerate() {
        let mut s = cl.generate(request(k)).await.unwrap().into_inner();
        let (mut ids, mut usage) = (vec![], None);
        while let Some(msg) = s.next().await {
            let msg = msg.unwrap();
            ids.extend(msg.ids);
            usage = usage.or(msg.usage);
        }
        assert_eq!(&ids, w, "request {k} alone");
        let cached = usage.unwrap().cached_tokens;
        if k == 0 {
            assert_eq!(cached, 0);
        } else {
            // The prefix's two full blocks of 16 tokens.
            assert_eq!(cached, 32, "request {k}");
        }
    }
    let mut tasks = vec![];
    for k in 0..16 {
        let cl = cl.clone();
        let r = request(k % 8);
        tasks.push(tokio::spawn(async move { (k, run(cl, r).await) }));
    }
    for t in tasks {
        let (k, res) = t.await.unwrap();
        assert_eq!(res.unwrap().0, want[k % 8], "request {k} with the others");
    }
    let body = grok_tests::cluster::http_get(c.http.as_deref().unwrap(), "/metrics");
    let hits = grok_tests::cluster::metric(&body, "grok_prefix_cache_hit_tokens_total").unwrap();
    assert!(hits >= 32.0 * 7.0, "{hits}");
    let blocks = grok_tests::cluster::metric(&body, "grok_prefix_cache_blocks").unwrap();
    assert!(blocks >= 2.0, "{blocks}");
    let s = wait_kv_free(&c).await;
    assert_eq!(s.running_sequences, 0);
}

/// Cache-aware routing: with two replicas, requests that share a prefix go to the replica that
/// holds it (every one after the first reuses it), and different prefixes spread over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_their_cached_prefix_across_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let c = up(&m, &["--replicas", "2"]);
    // `up` returns once one replica serves: wait for both.
    let t = Instant::now();
    while !status(&c).await.detail.contains("2 of 2 replicas serving") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the second replica never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cl = client(&c).await;
    let mut cached = vec![];
    for k in 0..12u32 {
        // Two families of prompts, two of each in turn (so that taking replicas in turn would
        // send each family to both): 40 shared tokens, then 6 of their own.
        let fam = (k / 2) % 2;
        let mut p: Vec<u32> = (0..40).map(|i| 3 + fam * 100 + i).collect();
        p.extend((0..6).map(|i| 150 + (k * 7 + i) % 100));
        let mut s = cl.generate(req(&p, 2)).await.unwrap().into_inner();
        let mut usage = None;
        while let Some(msg) = s.next().await {
            usage = usage.or(msg.unwrap().usage);
        }
        cached.push(usage.unwrap().cached_tokens);
    }
    assert_eq!(&cached[..4], &[0, 32, 0, 32], "{cached:?}");
    assert!(cached[4..].iter().all(|&t| t == 32), "{cached:?}");
    let st = status(&c).await;
    assert!(
        st.detail.contains("2 of 2 replicas serving"),
        "{}",
        st.detail
    );
}

/// Structured output over gRPC: with random weights, 24 seeded streams under a regular
/// expression, on tp 2 and on pp 2 with a cache small enough to force preemptions (a
/// preempted sequence's grammar resumes past the tokens it had), all match it and equal their
/// solo outputs; a grammar that does not compile is INVALID_ARGUMENT naming `constraint`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_holds_through_preemption_and_pipelining() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let tok = grok_tests::shared_dir()
        .expect("../shared beside the project")
        .join("models/grok-1/tokenizer.model");
    let tok = tok.to_str().unwrap();
    // The tiny model's 512 tokens hold the digits (one token each) but no letters.
    let regex = "[0-9]{6,30}";
    let re_ok = |ids: &[u32], text: &str| {
        assert!(
            (6..=30).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()),
            "{text:?} ({ids:?}) does not match {regex}"
        );
    };
    let request = |k: usize| {
        let mut r = req(&prompts()[k % 8].0, 60);
        r.ignore_eos = false;
        r.temperature = 1.0;
        r.seed = k as u64;
        r.constraint = Some(pb::Constraint {
            kind: Some(pb::constraint::Kind::Regex(regex.into())),
        });
        r
    };
    async fn text_of(mut cl: Client, r: pb::GenerateRequest) -> (Vec<u32>, String, String) {
        let mut s = cl.generate(r).await.unwrap().into_inner();
        let (mut ids, mut text, mut finish) = (vec![], String::new(), String::new());
        while let Some(m) = s.next().await {
            let m = m.unwrap();
            ids.extend(m.ids);
            text.push_str(&m.text);
            if !m.finish_reason.is_empty() {
                finish = m.finish_reason;
            }
        }
        (ids, text, finish)
    }
    let mut want = vec![];
    {
        let c = up(&m, &["--tp", "2", "--tokenizer", tok]);
        let cl = client(&c).await;
        for k in 0..24 {
            let (ids, text, finish) = text_of(cl.clone(), request(k)).await;
            assert_eq!(finish, "stop", "{text:?}");
            re_ok(&ids, &text);
            want.push(ids);
        }
        let mut bad = request(0);
        bad.constraint = Some(pb::Constraint {
            kind: Some(pb::constraint::Kind::Regex("([a-".into())),
        });
        let e = cl.clone().generate(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("constraint:"), "{e:?}");
        // Letters compile but no token of this vocabulary spells one: the request ends with
        // the reason, and the replica serves the next one.
        let mut letters = request(1);
        letters.constraint = Some(pb::Constraint {
            kind: Some(pb::constraint::Kind::Regex("[a-z]{3}".into())),
        });
        let e = run(cl.clone(), letters).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("structured output"), "{e:?}");
        assert_eq!(text_of(cl.clone(), request(0)).await.0, want[0]);
    }
    let c = up(
        &m,
        &[
            "--pp",
            "2",
            "--tokenizer",
            tok,
            "--kv-blocks",
            "12",
            "--max-batch-tokens",
            "32",
            "--max-seqs",
            "24",
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let cl = client(&c).await;
    let mut tasks = vec![];
    for k in 0..24 {
        let cl = cl.clone();
        tasks.push(tokio::spawn(
            async move { (k, text_of(cl, request(k)).await) },
        ));
    }
    for t in tasks {
        let (k, (ids, text, finish)) = t.await.unwrap();
        assert_eq!(finish, "stop", "stream {k}: {text:?}");
        re_ok(&ids, &text);
        assert_eq!(ids, want[k], "stream {k} differs from its solo output");
    }
    let body = grok_tests::cluster::http_get(c.http.as_deref().unwrap(), "/metrics");
    let preempted = grok_tests::cluster::metric(&body, "grok_preemptions_total").unwrap();
    assert!(preempted > 0.0, "the small cache forced no preemption");
    drop(c);
    // Data-parallel attention: every rank samples its own sequences under their grammars.
    let c = up(
        &m,
        &[
            "--dp-attention",
            "--ep",
            "2",
            "--tokenizer",
            tok,
            "--kv-blocks",
            "24",
        ],
    );
    let cl = client(&c).await;
    let mut tasks = vec![];
    for k in 0..24 {
        let cl = cl.clone();
        tasks.push(tokio::spawn(
            async move { (k, text_of(cl, request(k)).await) },
        ));
    }
    for t in tasks {
        let (k, (ids, text, finish)) = t.await.unwrap();
        assert_eq!(finish, "stop", "dp-attention stream {k}: {text:?}");
        re_ok(&ids, &text);
        assert_eq!(
            ids, want[k],
            "dp-attention stream {k} differs from its solo output"
        );
    }
}

/// Penalties count every prompt token, whichever step computed it: a prompt prefilled in
/// chunks of 8 (the chunks before the last ask for no logits) gives the output of the prompt
/// in one step, on one worker and with data-parallel attention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_see_the_whole_prompt_however_it_is_chunked() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    model(&m);
    let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 7 % 23) as u32).collect();
    let penalised = |mut r: pb::GenerateRequest| {
        r.repetition_penalty = 3.0;
        r.presence_penalty = 1.5;
        r
    };
    let mut outs = vec![];
    for args in [
        &["--max-batch-tokens", "512"][..],
        &["--max-batch-tokens", "8"][..],
        &["--max-batch-tokens", "8", "--dp-attention", "--ep", "2"][..],
    ] {
        let c = up(&m, args);
        let cl = client(&c).await;
        let plain = run(cl.clone(), req(&prompt, 16)).await.unwrap().0;
        let pen = run(cl.clone(), penalised(req(&prompt, 16)))
            .await
            .unwrap()
            .0;
        assert_ne!(plain, pen, "{args:?}: the penalties changed nothing");
        outs.push((args, pen));
    }
    for (args, pen) in &outs[1..] {
        assert_eq!(
            pen, &outs[0].1,
            "{args:?}: chunked prefill changed the penalised output"
        );
    }
}
