//! Membership through a real etcd (Debian's etcd-server, one per test on free loopback ports):
//! workers announce themselves and the coordinator finds them; killing etcd while serving stops
//! nothing, and membership works again once etcd is back (a worker replaced afterwards is found
//! through the watch); two coordinators elect a leader, and when the leader is killed the
//! standby serves within 10 s with the workers it finds.

use grok_shared::config::ModelConfig;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_tests::cluster::{bin, greedy, json_ids, lines_of, status, wait_line, wait_state, Proc};
use grok_tests::etcd::EtcdServer;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The tests that start etcd run one at a time: one kills its etcd and restarts it on the same
/// ports, and while those ports are free another test's free-port pick could take them.
static ONE_ETCD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn model(dir: &Path) {
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 21, dir, 1 << 30, |_, _| {}).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A coordinator on etcd; its gRPC address.
fn coordinator(model: &Path, etcd: &str, cluster: &str, port: u16) -> (Proc, String) {
    let mut c = bin("grok-coordinator")
        .args(["--model", model.to_str().unwrap(), "--tp", "2"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--etcd",
            etcd,
            "--cluster",
            cluster,
            "--comm-timeout-ms",
            "3000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let addr = wait_line(&rx, "listening on ", 30);
    (Proc(c), addr)
}

fn worker(etcd: &str, cluster: &str, rank: usize) -> Child {
    bin("grok-worker")
        .args(["--etcd", etcd, "--cluster", cluster])
        .args(["--id", &format!("w{rank}"), "--rank", &rank.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_found_in_etcd_and_serving_survives_an_etcd_outage() {
    let _one = ONE_ETCD.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    model(&tmp.path().join("m"));
    let mut etcd = EtcdServer::start(tmp.path());
    let (_coord, addr) = coordinator(&tmp.path().join("m"), &etcd.url, "outage", 0);
    let _w0 = Proc(worker(&etcd.url, "outage", 0));
    let mut w1 = Some(Proc(worker(&etcd.url, "outage", 1)));
    wait_state(&addr, "ready", 60).await;
    let want = greedy(&addr, vec![4, 8, 15], 6).await.unwrap();
    assert_eq!(want.len(), 6);

    // etcd goes away: for longer than a lease lives, every request still completes.
    etcd.kill();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        assert_eq!(greedy(&addr, vec![4, 8, 15], 6).await.unwrap(), want);
        assert_eq!(status(&addr).await.state, "ready");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // etcd is back: membership follows it again. A worker replaced now is found through etcd.
    etcd.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(w1.take());
    wait_state(&addr, "recovering", 10).await;
    let _w1 = Proc(worker(&etcd.url, "outage", 1));
    let took = wait_state(&addr, "ready", 30).await;
    eprintln!("replacement found through etcd after the outage: ready {took:?} after its start");
    assert_eq!(greedy(&addr, vec![4, 8, 15], 6).await.unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_coordinator_takes_over_when_the_leader_dies() {
    let _one = ONE_ETCD.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    model(&tmp.path().join("m"));
    let etcd = EtcdServer::start(tmp.path());
    let m = tmp.path().join("m");
    let (mut leader, a) = coordinator(&m, &etcd.url, "ha", free_port());
    // The first coordinator leads before the second starts. (The first election waits for a
    // freshly started etcd and coordinator; on a loaded 2-core CI machine that once took more
    // than 15 s. The takeover below is what is timed.)
    let t = Instant::now();
    loop {
        let st = status(&a).await;
        if st.state != "standby" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(45),
            "no leader elected in 45 s: {} ({}); etcd log: {}",
            st.state,
            st.detail,
            std::fs::read_to_string(tmp.path().join("etcd.log"))
                .map(|l| l.lines().rev().take(15).collect::<Vec<_>>().join(" | "))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_standby, b) = coordinator(&m, &etcd.url, "ha", free_port());
    let _w: Vec<Proc> = (0..2).map(|r| Proc(worker(&etcd.url, "ha", r))).collect();
    wait_state(&a, "ready", 60).await;
    let want = greedy(&a, vec![16, 23, 42], 6).await.unwrap();
    // The standby points at the leader and refuses work with a retryable status.
    let t = Instant::now();
    loop {
        let st = status(&b).await;
        assert_eq!(st.state, "standby", "{}", st.detail);
        if st.detail.contains(&a) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{}", st.detail);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = greedy(&b, vec![16, 23, 42], 6).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // The leader dies: the standby serves within 10 s.
    let killed = Instant::now();
    leader.0.kill().unwrap();
    let _ = leader.0.wait();
    wait_state(&b, "ready", 10).await;
    let took = killed.elapsed();
    eprintln!("standby serving {took:?} after the leader was killed");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let out = bin("grokctl")
        .args(["generate", "--endpoint", &b, "--prompt-ids", "16,23,42"])
        .args(["--max-new-tokens", "6", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = json_ids(&out.stdout);
    assert_eq!(ids, want, "the standby serves the same model");
}

#[test]
fn bad_etcd_settings_are_usage_errors() {
    for (args, want) in [
        (vec!["--etcd", "not a url"], "--etcd"),
        (
            vec!["--etcd", "127.0.0.1:1", "--cluster", "a/b"],
            "--cluster",
        ),
        (
            vec!["--etcd", "127.0.0.1:1", "--etcd-user", "u"],
            "password",
        ),
    ] {
        let o = bin("grok-coordinator")
            .args(["--model", "/nonexistent"])
            .args(&args)
            .env_remove("GROK_ETCD_PASSWORD")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{args:?}: {e}");
    }
    // A worker on etcd must name its rank.
    let o = bin("grok-worker")
        .args(["--etcd", "127.0.0.1:1"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--rank"), "{e}");
}
