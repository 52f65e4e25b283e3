//! Distributed execution with real processes on loopback: every layout gives the single-process
//! greedy ids and logits; a killed worker ends the request with UNAVAILABLE naming it; bad
//! layouts, extra workers, duplicate ranks and unreadable models are clear errors.

use grok_shared::config::ModelConfig;
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_shared::generate::{generate, GenerateOptions};
use grok_shared::model::Model;
use grok_tests::cluster::{bin, json_ids, lines_of, wait_line, Proc};
use grok_tests::netns::{in_ns, Net};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `grokctl up` in the background; returns it and the endpoint once ready.
fn up(model: &Path, tp: usize, ep: usize, pp: usize) -> (Proc, String) {
    let log = model.with_file_name(format!("up-{tp}-{ep}-{pp}.log"));
    let mut c = bin("grokctl")
        .args([
            "up",
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--kv-blocks",
            "64",
        ])
        .args([
            "--tp",
            &tp.to_string(),
            "--ep",
            &ep.to_string(),
            "--pp",
            &pp.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let ep_url = std::panic::catch_unwind(|| wait_line(&rx, "ready: ", 90)).unwrap_or_else(|_| {
        panic!(
            "grokctl up tp={tp} ep={ep} pp={pp} did not come up:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    (Proc(c), ep_url)
}

fn gen_model(dir: &Path, layers: usize) -> ModelConfig {
    let c = ModelConfig::preset("tiny", Some(layers)).unwrap();
    genmodel::generate(&c, GenDType::F32, 13, dir, 1 << 30, |_, _| {}).unwrap();
    c
}

#[test]
fn every_layout_matches_the_single_process_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let cfg = gen_model(&model, 3);
    let v = cfg.vocab_size;
    let prompt = [7u32, 0, 33, 101, 5, 250, 19, 64];
    let m = Model::load(&Checkpoint::open(&model).unwrap()).unwrap();
    let want = generate(
        &m,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 8,
            stop_at_eos: false,
            prompt_logits: true,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    let want_logits = want.prompt_logits.unwrap();
    let layouts = [
        (1, 1, 1),
        (2, 1, 1),
        (2, 2, 1),
        (4, 1, 1),
        (4, 2, 1),
        (4, 4, 1),
        (1, 1, 2),
        (2, 1, 2),
        (2, 2, 2),
        (1, 1, 3),
    ];
    for (tp, ep, pp) in layouts {
        let (_cluster, url) = up(&model, tp, ep, pp);
        let npy = tmp.path().join(format!("l{tp}{ep}{pp}.npy"));
        let ids_s: Vec<String> = prompt.iter().map(|x| x.to_string()).collect();
        let out = bin("grokctl")
            .args([
                "generate",
                "--endpoint",
                &url,
                "--prompt-ids",
                &ids_s.join(","),
                "--max-new-tokens",
                "8",
            ])
            .args([
                "--ignore-eos",
                "--json",
                "--logits-out",
                npy.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tp={tp} ep={ep} pp={pp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids = json_ids(&out.stdout);
        assert_eq!(ids, want.ids, "tp={tp} ep={ep} pp={pp}: greedy ids differ");
        let (shape, logits) = grok_shared::formats::npy::read_f32(&npy).unwrap();
        assert_eq!(shape, vec![prompt.len(), v]);
        for p in 0..prompt.len() {
            let w: Vec<f64> = want_logits[p * v..(p + 1) * v]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let e = grok_tests::reference::rel_err(&logits[p * v..(p + 1) * v], &w);
            assert!(
                e <= 1e-5,
                "tp={tp} ep={ep} pp={pp} position {p}: rel err {e:.2e}"
            );
        }
        // The status command shows the layout and every shard ready.
        let st = bin("grokctl")
            .args(["status", "--endpoint", &url, "--json"])
            .output()
            .unwrap();
        let sj: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        assert_eq!(sj["state"], "ready");
        assert_eq!(sj["shards"].as_array().unwrap().len(), tp * pp);
        assert_eq!(sj["layout"]["tp"], tp);
    }
}

/// Starts a coordinator by hand (so workers can be killed individually).
fn coordinator(model: &Path, tp: usize, pp: usize) -> (Proc, String, mpsc::Receiver<String>) {
    let (tp, pp) = (tp.to_string(), pp.to_string());
    coordinator_with(model, &["--kv-blocks", "64", "--tp", &tp, "--pp", &pp])
}

/// A coordinator by hand with `args` (the layout, limits...).
fn coordinator_with(model: &Path, args: &[&str]) -> (Proc, String, mpsc::Receiver<String>) {
    let mut c = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--comm-timeout-ms", "5000"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let addr = wait_line(&rx, "listening on ", 30);
    (Proc(c), addr, rx)
}

fn worker(addr: &str, id: &str, rank: Option<usize>) -> Child {
    let mut c = bin("grok-worker");
    c.args(["--coordinator", addr, "--id", id])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(r) = rank {
        c.args(["--rank", &r.to_string()]);
    }
    c.spawn().unwrap()
}

fn wait_ready(addr: &str) {
    let st = bin("grokctl")
        .args(["status", "--endpoint", addr, "--wait-ready", "60"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

#[test]
fn killing_a_worker_ends_the_request_with_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    gen_model(&model, 2);
    let (_coord, addr, _rx) = coordinator(&model, 2, 1);
    let _w0 = Proc(worker(&addr, "w0", Some(0)));
    let mut w1 = worker(&addr, "w1", Some(1));
    wait_ready(&addr);
    let mut g = bin("grokctl")
        .args([
            "generate",
            "--endpoint",
            &addr,
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "500",
            "--ignore-eos",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first streamed ids, then kill rank 1.
    let mut buf = [0u8; 16];
    let mut out = g.stdout.take().unwrap();
    out.read_exact(&mut buf).unwrap();
    let killed = Instant::now();
    w1.kill().unwrap();
    let _ = w1.wait();
    let res = g.wait_with_output().unwrap();
    let elapsed = killed.elapsed();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "generation should fail");
    assert!(err.contains("Unavailable") && err.contains("w1"), "{err}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    // The coordinator stays up and reports the lost worker.
    let st = bin("grokctl")
        .args(["status", "--endpoint", &addr, "--json"])
        .output()
        .unwrap();
    assert!(st.status.success());
    let sj: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(sj["state"], "recovering");
    assert!(sj["detail"].as_str().unwrap().contains("w1"));
    // New requests are refused clearly.
    let again = bin("grokctl")
        .args([
            "generate",
            "--endpoint",
            &addr,
            "--prompt-ids",
            "5",
            "--max-new-tokens",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not serving"));
}

#[test]
fn bad_layouts_workers_and_models_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    gen_model(&model, 2);
    // A layout that does not divide: tiny has 4 query heads.
    let o = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--tp",
            "3",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("tp (3) must divide the 4 query heads")
            && e.contains("no layout of this model uses exactly 3 workers"),
        "{e}"
    );
    let o = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--tp",
            "4",
            "--ep",
            "3",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("ep (3) must divide tp (4)") && e.contains("layouts that work with 4 workers: tp=4 ep=1 pp=1, tp=4 ep=2 pp=1, tp=4 ep=4 pp=1, tp=2 ep=1 pp=2"), "{e}");

    // A second worker claiming the same rank, and a worker the layout does not need.
    let (_coord, addr, _rx) = coordinator(&model, 1, 1);
    let _w0 = Proc(worker(&addr, "w0", Some(0)));
    wait_ready(&addr);
    let dup = worker(&addr, "w-dup", Some(0)).wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&dup.stderr);
    assert_eq!(dup.status.code(), Some(1));
    assert!(e.contains("rank 0 is already held by worker `w0`"), "{e}");
    let extra = worker(&addr, "w-extra", None).wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&extra.stderr);
    assert_eq!(extra.status.code(), Some(1));
    assert!(e.contains("all 1 ranks of the layout are taken"), "{e}");

    // A model the workers cannot read: the load fails, naming the worker and the file.
    let broken = tmp.path().join("broken");
    gen_model(&broken, 2);
    let f = broken.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (_c2, addr2, _rx2) = coordinator(&broken, 1, 1);
    let _w = Proc(worker(&addr2, "wb", None));
    let st = bin("grokctl")
        .args(["status", "--endpoint", &addr2, "--wait-ready", "30"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success());
    assert!(
        e.contains("wb") && e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn workers_on_separate_hosts_in_network_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    gen_model(&model, 2);
    let tag = format!("gc{}", std::process::id() % 100000);
    let subnet = format!("10.213.{}", std::process::id() % 250 + 1);
    let (c_ip, w0_ip, w1_ip) = (
        format!("{subnet}.1"),
        format!("{subnet}.2"),
        format!("{subnet}.3"),
    );
    let net = match Net::create(
        &tag,
        &[("coord", &c_ip), ("w0", &w0_ip), ("w1", &w1_ip)],
        None,
    ) {
        Ok(n) => n,
        Err(why) => {
            eprintln!("SKIPPED: network namespaces cannot be created here ({why})");
            return;
        }
    };
    let listen = format!("{c_ip}:50051");
    let mut coord = in_ns(&net.ns("coord"), "grok-coordinator");
    coord
        .args([
            "--model",
            model.to_str().unwrap(),
            "--tp",
            "2",
            "--listen",
            &listen,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut coord = coord.spawn().unwrap();
    let rx = lines_of(&mut coord);
    let _coord = Proc(coord);
    wait_line(&rx, "listening on ", 30);
    let mut workers = vec![];
    for (i, wip) in [(0, &w0_ip), (1, &w1_ip)] {
        let mut w = in_ns(&net.ns(&format!("w{i}")), "grok-worker");
        w.args([
            "--coordinator",
            &listen,
            "--listen",
            &format!("{wip}:0"),
            "--id",
            &format!("host{i}"),
            "--rank",
            &i.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        workers.push(Proc(w.spawn().unwrap()));
    }
    let st = in_ns(&net.ns("coord"), "grokctl")
        .args([
            "status",
            "--endpoint",
            &listen,
            "--wait-ready",
            "60",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let sj: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let addrs: Vec<&str> = sj["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap())
        .collect();
    assert!(
        addrs[0].starts_with(&w0_ip) && addrs[1].starts_with(&w1_ip),
        "{addrs:?}"
    );
    let out = in_ns(&net.ns("coord"), "grokctl")
        .args([
            "generate",
            "--endpoint",
            &listen,
            "--prompt-ids",
            "9,8,7,6",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = json_ids(&out.stdout);
    let m = Model::load(&Checkpoint::open(&model).unwrap()).unwrap();
    let want = generate(
        &m,
        &[9, 8, 7, 6],
        &GenerateOptions {
            max_new_tokens: 6,
            stop_at_eos: false,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(ids, want.ids);

    // A partition: host 1 drops off the network in the middle of a request. The coordinator
    // treats it as lost (no reset ever arrives: the health monitor's deadline decides).
    let mut g = in_ns(&net.ns("coord"), "grokctl")
        .args([
            "generate",
            "--endpoint",
            &listen,
            "--prompt-ids",
            "9,8,7",
            "--max-new-tokens",
            "500",
            "--ignore-eos",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    // The output pipe stays open until the request has ended.
    let mut stdout = g.stdout.take().unwrap();
    stdout.read_exact(&mut first).unwrap();
    let cut = Instant::now();
    net.partition(2).unwrap();
    let res = g.wait_with_output().unwrap();
    drop(stdout);
    let ended = cut.elapsed();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "the request should fail");
    assert!(
        err.contains("Unavailable") && err.contains("host1"),
        "{err}"
    );
    assert!(ended < Duration::from_secs(10), "took {ended:?}");
    let st = in_ns(&net.ns("coord"), "grokctl")
        .args(["status", "--endpoint", &listen, "--json"])
        .output()
        .unwrap();
    let sj: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(sj["state"], "recovering", "{sj}");
    assert_eq!(sj["shards"][1]["state"], "lost", "{sj}");
    eprintln!("partitioned worker detected; its request ended {ended:?} after the cut");
    drop(workers);
    drop(_coord);
    drop(net);
}

#[test]
fn each_worker_holds_only_its_share_of_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("wide");
    // Experts dominate: 2 layers x 8 experts x 3 x 256 x 8192 f32 = 403 MB of the 404 MB.
    let mut c = ModelConfig::preset("tiny8", Some(2)).unwrap();
    c.emb_size = 256;
    c.ffn_size = 8192;
    c.num_q_heads = 4;
    c.num_kv_heads = 2;
    c.key_size = 64;
    genmodel::generate(&c, GenDType::F32, 1, &model, 1 << 30, |_, _| {}).unwrap();
    let total: u64 = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    let (_cluster, url) = up(&model, 2, 2, 1);
    let st = bin("grokctl")
        .args(["status", "--endpoint", &url, "--json"])
        .output()
        .unwrap();
    let sj: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    eprintln!("model file: {:.1} MB", total as f64 / 1e6);
    for s in sj["shards"].as_array().unwrap() {
        let share = s["weight_bytes"].as_u64().unwrap();
        let rss = s["resident_bytes"].as_u64().unwrap();
        eprintln!(
            "rank {}: experts {} share {:.1} MB, resident {:.1} MB",
            s["rank"],
            s["experts"],
            share as f64 / 1e6,
            rss as f64 / 1e6
        );
        // Half the experts each; the shard is resident, the other half of the file is not.
        assert!(share < total * 55 / 100, "share {share} of {total}");
        assert!(rss >= share * 9 / 10, "shard not resident: {rss} < {share}");
        assert!(
            rss < share + 64_000_000,
            "worker holds more than its share: {rss} vs {share}"
        );
    }
}

#[test]
fn a_worker_that_cannot_reach_a_peer_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    gen_model(&model, 2);
    let mut c = bin("grok-coordinator")
        .args([
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--tp",
            "2",
            "--comm-timeout-ms",
            "2000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let _coord = Proc(c);
    let addr = wait_line(&rx, "listening on ", 30);
    let _w0 = Proc(worker(&addr, "w0", Some(0)));
    // Rank 1 advertises an address where nothing listens: rank 0 cannot connect to it.
    let mut w1 = bin("grok-worker");
    w1.args([
        "--coordinator",
        &addr,
        "--id",
        "w1",
        "--rank",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--advertise",
        "127.0.0.2:4",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _w1 = Proc(w1.spawn().unwrap());
    let st = bin("grokctl")
        .args(["status", "--endpoint", &addr, "--wait-ready", "30"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success());
    assert!(
        e.contains("worker `w0` (rank 0)")
            && e.contains("cannot connect with rank 1 at 127.0.0.2:"),
        "{e}"
    );
}

#[test]
fn presharded_directories_load_per_rank_and_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    gen_model(&model, 2);
    let shards = tmp.path().join("tp2pp2");
    let o = bin("grokctl")
        .args([
            "convert",
            "--from",
            model.to_str().unwrap(),
            "--to",
            shards.to_str().unwrap(),
            "--tp",
            "2",
            "--pp",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(bin("grokctl")
        .args(["verify", shards.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    // Same layout: the pre-sharded cluster generates what the full directory does.
    let ids = |m: &Path| {
        let (_c, url) = up(m, 2, 1, 2);
        let out = bin("grokctl")
            .args([
                "generate",
                "--endpoint",
                &url,
                "--prompt-ids",
                "9,8,7,6,5",
                "--max-new-tokens",
                "6",
                "--ignore-eos",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    assert_eq!(ids(&model), ids(&shards));
    // Another layout is refused, naming the one the directory was made for.
    let (_c, addr, _rx) = coordinator(&shards, 2, 1);
    let _w0 = Proc(worker(&addr, "a", Some(0)));
    let _w1 = Proc(worker(&addr, "b", Some(1)));
    let st = bin("grokctl")
        .args(["status", "--endpoint", &addr, "--wait-ready", "30"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&st.stderr);
    assert!(
        !st.status.success() && e.contains("sharded for tp=2 ep=1 pp=2"),
        "{e}"
    );
    // A flipped byte: caught by verify and at load, naming the tensor and the file.
    let f = shards.join("rank-00001.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 10] ^= 0x40;
    std::fs::write(&f, b).unwrap();
    let v = bin("grokctl")
        .args(["verify", shards.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&v.stderr);
    assert!(
        !v.status.success() && e.contains("rank-00001.safetensors") && e.contains("sha256"),
        "{e}"
    );
    let (_c2, addr2, _rx2) = coordinator(&shards, 2, 2);
    let _ws: Vec<Proc> = (0..4)
        .map(|r| Proc(worker(&addr2, &format!("w{r}"), Some(r))))
        .collect();
    let st = bin("grokctl")
        .args(["status", "--endpoint", &addr2, "--wait-ready", "30"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&st.stderr);
    assert!(
        !st.status.success() && e.contains("rank-00001.safetensors") && e.contains("sha256"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_bootstrap_messages_are_refused_by_cpu_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    gen_model(&model, 1);
    let (_coord, addr, _rx) = coordinator(&model, 2, 1);
    // One worker of two: it registers and waits (the replica is incomplete, nothing loads).
    let mut w = worker(&addr, "w0", Some(0));
    let err = w.stderr.take().unwrap();
    let _w = Proc(w);
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(err)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("registered as rank"))
            .expect("the worker registers")
    })
    .await
    .unwrap();
    let grpc = line.rsplit("(grpc ").next().unwrap().trim_end_matches(')');
    let mut c = grok_proto::v1::worker_client::WorkerClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let e = c
        .nccl_unique_id(grok_proto::v1::NcclIdRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("CPU") && e.message().contains("TCP"),
        "{e:?}"
    );
    let e = c
        .load(grok_proto::v1::LoadRequest {
            model_dir: model.display().to_string(),
            layout: Some(grok_proto::v1::Layout {
                tp: 2,
                ep: 1,
                pp: 1,
                replicas: 1,
                ..Default::default()
            }),
            world_peers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            tp_peers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            world_nccl_id: vec![1; 128],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("NCCL id") && e.message().contains("CPU worker"),
        "{e:?}"
    );
}

fn worker_capped(addr: &str, id: &str, rank: usize, kv_memory: Option<u64>) -> Proc {
    let mut c = bin("grok-worker");
    c.args([
        "--coordinator",
        addr,
        "--id",
        id,
        "--rank",
        &rank.to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(b) = kv_memory {
        c.args(["--kv-memory", &b.to_string()]);
    }
    Proc(c.spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kv_blocks_a_replica_admits_against_the_smallest_cache_its_workers_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = gen_model(&model, 2);
    // pp 2: each worker holds one layer and every KV head.
    let per_block = grok_shared::model::kv_block_bytes(1, c.num_kv_heads * c.key_size, 16, 1);
    let cap = 10 * per_block + per_block / 2;
    let (_coord, addr, _rx) = coordinator_with(&model, &["--pp", "2"]);
    let _w0 = worker_capped(&addr, "w0", 0, None);
    let _w1 = worker_capped(&addr, "w1", 1, Some(cap));
    wait_ready(&addr);
    // Worker 0 took the CPU default, worker 1 what its --kv-memory holds: the replica
    // schedules against 10 blocks of 16 tokens.
    let s = grok_tests::cluster::status(&addr).await;
    assert_eq!((s.kv_blocks_free, s.kv_blocks_used), (10, 0), "{s:?}");
    let kv: Vec<u64> = s.shards.iter().map(|w| w.kv_bytes).collect();
    assert_eq!(
        kv,
        vec![512 * per_block, 10 * per_block],
        "each worker reports the cache it allocated"
    );
    let blocks: Vec<u32> = s.shards.iter().map(|w| w.kv_blocks).collect();
    assert_eq!(blocks, vec![512, 10]);
    // A prompt beyond the 160 tokens is refused up front, naming the real capacity.
    let long: Vec<u32> = (0..170).map(|i| 5 + i % 50).collect();
    let e = grok_tests::cluster::greedy(&addr, long, 4)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("160 tokens"), "{e:?}");
    // One that fits runs, and one that outgrows the cache while generating ends with
    // RESOURCE_EXHAUSTED naming the 10 blocks (not a hang, not a crash).
    let ids = grok_tests::cluster::greedy(&addr, vec![5, 6, 7], 8)
        .await
        .unwrap();
    assert_eq!(ids.len(), 8);
    let grows: Vec<u32> = (0..150).map(|i| 5 + i % 50).collect();
    let e = grok_tests::cluster::greedy(&addr, grows, 40)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("10 KV blocks"), "{e:?}");
    let ids = grok_tests::cluster::greedy(&addr, vec![5, 6, 7], 8)
        .await
        .unwrap();
    assert_eq!(ids.len(), 8, "the replica still serves");

    // A fixed --kv-blocks beyond a worker's --kv-memory: that worker refuses to load and says
    // why, and the cluster does not serve.
    let (_coord, addr, _rx) = coordinator_with(&model, &["--pp", "2", "--kv-blocks", "11"]);
    let _w0 = worker_capped(&addr, "x0", 0, None);
    let _w1 = worker_capped(&addr, "x1", 1, Some(cap));
    let t = Instant::now();
    let detail = loop {
        let s = grok_tests::cluster::status(&addr).await;
        assert_ne!(s.state, "ready", "{s:?}");
        if let Some(w) = s.shards.iter().find(|w| w.detail.contains("--kv-memory")) {
            break w.detail.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        detail.contains("--kv-blocks 11") && detail.contains("at most 10 blocks"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_goes_to_a_replica_whose_cache_holds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = gen_model(&model, 1);
    let per_block = grok_shared::model::kv_block_bytes(1, c.num_kv_heads * c.key_size, 16, 1);
    // Two replicas of one worker: replica 1's cache holds 10 blocks (160 tokens), replica 0's
    // the CPU default of 512.
    let (_coord, addr, _rx) = coordinator_with(&model, &["--replicas", "2"]);
    let _w0 = worker_capped(&addr, "r0", 0, None);
    let _w1 = worker_capped(&addr, "r1", 1, Some(10 * per_block));
    wait_ready(&addr);
    let s = grok_tests::cluster::status(&addr).await;
    let blocks: Vec<u32> = s.shards.iter().map(|w| w.kv_blocks).collect();
    assert_eq!(blocks, vec![512, 10]);
    // Prompts only replica 0 can hold all run there, whichever replica's turn it is; short
    // ones still go to both.
    // (Distinct prompts: no cached prefix draws them to one replica.)
    for k in 0..4u32 {
        let long: Vec<u32> = (0..200).map(|i| 5 + (i + 7 * k) % 50).collect();
        let ids = grok_tests::cluster::greedy(&addr, long, 4).await.unwrap();
        assert_eq!(ids.len(), 4);
    }
    for _ in 0..4 {
        let ids = grok_tests::cluster::greedy(&addr, vec![5, 6, 7], 4)
            .await
            .unwrap();
        assert_eq!(ids.len(), 4);
    }
    let steps: Vec<u64> = grok_tests::cluster::status(&addr)
        .await
        .shards
        .iter()
        .map(|w| w.steps)
        .collect();
    assert!(
        steps.iter().all(|&n| n > 0),
        "both replicas served: {steps:?}"
    );
}
