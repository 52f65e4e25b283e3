//! Mutual TLS between the coordinator and the workers: `grokctl certs` makes a CA and
//! certificates; a cluster with TLS serves `grokctl generate --tls-ca`; a worker with no
//! certificate, or one from another CA, cannot join (it exits with a clear message and the
//! coordinator does not list it); a client without a certificate cannot register or drive a
//! worker; a plaintext client is refused clearly; incomplete TLS flags are usage errors; no
//! key ever reaches a log.

use grok_proto::tls::{Tls, TlsPaths};
use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_tests::cluster::{bin, lines_of, wait_line, Proc};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

fn gen_model(dir: &Path) {
    let c = ModelConfig::preset("tiny", Some(2)).unwrap();
    genmodel::generate(&c, GenDType::F32, 7, dir, 1 << 30, |_, _| {}).unwrap();
}

/// `grokctl certs --out DIR --hosts 127.0.0.1,localhost`, checked.
fn certs(dir: &Path) -> String {
    let o = bin("grokctl")
        .args(["certs", "--out", dir.to_str().unwrap()])
        .args(["--hosts", "127.0.0.1,localhost", "--days", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `--tls-ca DIR/ca.pem --tls-cert DIR/ROLE.pem --tls-key DIR/ROLE.key`.
fn tls_flags(dir: &Path, role: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        s(&dir.join("ca.pem")).into(),
        "--tls-cert".into(),
        s(&dir.join(format!("{role}.pem"))).into(),
        "--tls-key".into(),
        s(&dir.join(format!("{role}.key"))).into(),
    ]
}

/// Waits (bounded) for a child to exit; returns its status and stderr.
fn exit_of(mut c: Child, secs: u64) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut e) = c.stderr.take() {
                e.read_to_string(&mut err).unwrap();
            }
            return (st, err);
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("the process did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A worker that must not get in: it exits non-zero within the bound; returns its stderr.
fn rejected_worker(addr: &str, id: &str, flags: &[String]) -> String {
    let c = bin("grok-worker")
        .args([
            "--coordinator",
            addr,
            "--id",
            id,
            "--register-timeout-s",
            "10",
        ])
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, err) = exit_of(c, 40);
    assert!(!st.success(), "worker {id} joined: {err}");
    err
}

fn grokctl(args: &[&str]) -> Output {
    let mut c = bin("grokctl");
    c.args(args).stdin(Stdio::null());
    // Timeout-bounded: a client that cannot connect gives up after its connect timeout.
    c.output().unwrap()
}

fn status_json(addr: &str, ca: &Path) -> serde_json::Value {
    let o = grokctl(&["status", "--endpoint", addr, "--tls-ca", s(ca), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap()
}

/// The base64 lines of a PEM key (what must never be printed).
fn key_body(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(String::from)
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn certs_writes_private_keys_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("c");
    let out = certs(&d);
    for f in [
        "ca.pem",
        "ca.key",
        "coordinator.pem",
        "coordinator.key",
        "worker.pem",
        "worker.key",
    ] {
        let p = d.join(f);
        assert!(out.contains(s(&p)), "{f} not reported:\n{out}");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        let want = if f.ends_with(".key") { 0o600 } else { 0o644 };
        assert_eq!(mode, want, "{f}: mode {mode:o}");
    }
    assert!(
        out.contains("--tls-ca") && out.contains("--tls-cert") && out.contains("--tls-key"),
        "{out}"
    );
    // The key itself is written, never printed.
    for l in key_body(&d.join("ca.key")) {
        assert!(!out.contains(&l), "the CA key was printed");
    }
    let before = std::fs::read(d.join("ca.pem")).unwrap();
    let o = grokctl(&["certs", "--out", s(&d)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--force") && err.contains("ca.pem"), "{err}");
    assert_eq!(before, std::fs::read(d.join("ca.pem")).unwrap());
    let o = grokctl(&["certs", "--out", s(&d), "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(before, std::fs::read(d.join("ca.pem")).unwrap());
    let o = grokctl(&[
        "certs",
        "--out",
        s(&tmp.path().join("x")),
        "--hosts",
        "no such host",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such host"));
}

#[test]
fn incomplete_tls_flags_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca.pem");
    let check = |o: Output, missing: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(missing), "`{missing}` not named: {err}");
    };
    check(
        bin("grok-coordinator")
            .args(["--model", s(tmp.path()), "--tls-ca", s(&ca)])
            .output()
            .unwrap(),
        "--tls-cert and --tls-key are missing",
    );
    check(
        bin("grok-worker")
            .args(["--coordinator", "127.0.0.1:1", "--tls-cert", "c.pem"])
            .args(["--tls-key", "c.key"])
            .output()
            .unwrap(),
        "--tls-ca is missing",
    );
    // The environment counts as given.
    check(
        bin("grok-worker")
            .args(["--coordinator", "127.0.0.1:1"])
            .env("GROK_TLS_CA", &ca)
            .env("GROK_TLS_CERT", "c.pem")
            .output()
            .unwrap(),
        "--tls-key is missing",
    );
    check(
        grokctl(&["up", "--model", s(tmp.path()), "--tls-ca", s(&ca)]),
        "--tls-cert and --tls-key are missing",
    );
    check(
        grokctl(&["status", "--endpoint", "127.0.0.1:1", "--tls-cert", "c.pem"]),
        "--tls-ca and --tls-key are missing",
    );
}

#[test]
fn mutual_tls_cluster_serves_and_keeps_outsiders_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    certs(&a);
    certs(&b);
    let model = tmp.path().join("tiny");
    gen_model(&model);
    let ca = a.join("ca.pem");

    let coord_log = tmp.path().join("coordinator.log");
    let mut c = bin("grok-coordinator")
        .args(["--model", s(&model), "--tp", "2", "--listen", "127.0.0.1:0"])
        .args(["--kv-blocks", "64"])
        .args(tls_flags(&a, "coordinator"))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&coord_log).unwrap())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let coord = Proc(c);
    let addr = wait_line(&rx, "listening on ", 30);

    // A plaintext worker: refused at the TLS layer, told to give the CA.
    let err = rejected_worker(&addr, "rogue-plain", &[]);
    assert!(err.contains("--tls-ca"), "{err}");
    // A worker of another CA: it does not trust the coordinator either.
    let err = rejected_worker(&addr, "rogue-other-ca", &tls_flags(&b, "worker"));
    assert!(err.contains("not signed by the CA"), "{err}");
    // Trusting the cluster's CA but presenting another CA's certificate.
    let mut mixed = tls_flags(&b, "worker");
    mixed[1] = s(&ca).into();
    let err = rejected_worker(&addr, "rogue-foreign-cert", &mixed);
    assert!(err.contains("signed by the cluster's CA"), "{err}");

    // TLS without a client certificate: the coordinator's port admits the connection (clients
    // use it) but Register refuses it.
    let client_only = Tls::load(&TlsPaths::new(Some(ca.clone()), None, None))
        .unwrap()
        .unwrap();
    let refused = rt().block_on(async {
        let ch = grok_proto::tls::endpoint(&addr, Some(&client_only))
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::cluster_client::ClusterClient::new(ch)
            .register(pb::RegisterRequest {
                worker_id: "rogue-no-cert".into(),
                address: "127.0.0.1:9".into(),
                world_comm_address: "127.0.0.1:9".into(),
                tp_comm_address: "127.0.0.1:9".into(),
                rank: -1,
                device: "cpu".into(),
            })
            .await
            .unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("client certificate signed by the cluster's CA"),
        "{}",
        refused.message()
    );

    let st = status_json(&addr, &ca);
    assert_eq!(st["state"], "waiting_for_workers", "{st}");
    for sh in st["shards"].as_array().unwrap() {
        assert_eq!(sh["worker_id"], "", "a rejected worker holds a rank: {st}");
        assert_eq!(sh["state"], "waiting", "{st}");
    }

    // The cluster's own workers join and the cluster serves over TLS.
    let mut workers = Vec::new();
    let mut worker_logs = Vec::new();
    for i in 0..2 {
        let log = tmp.path().join(format!("worker-{i}.log"));
        workers.push(Proc(
            bin("grok-worker")
                .args(["--coordinator", &addr, "--id", &format!("w{i}")])
                .args(tls_flags(&a, "worker"))
                .env("RUST_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ));
        worker_logs.push(log);
    }
    let o = grokctl(&["status", "--endpoint", &addr, "--tls-ca", s(&ca)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = grokctl(&[
        "status",
        "--endpoint",
        &addr,
        "--tls-ca",
        s(&ca),
        "--wait-ready",
        "60",
    ]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(&coord_log).unwrap_or_default()
    );
    let gen = |endpoint: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--endpoint",
            endpoint,
            "--prompt-ids",
            "5,17,99",
        ];
        args.extend_from_slice(&["--max-new-tokens", "4", "--ignore-eos", "--json"]);
        args.extend_from_slice(extra);
        grokctl(&args)
    };
    let o = gen(&addr, &["--tls-ca", s(&ca)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let remote: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(remote["ids"].as_array().unwrap().len(), 4, "{remote}");
    let o = grokctl(&[
        "generate",
        "--model",
        s(&model),
        "--prompt-ids",
        "5,17,99",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]);
    let local: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(remote["ids"], local["ids"]);
    // https:// endpoints and a client certificate work too.
    let https = format!("https://{addr}");
    let mut with_cert = vec!["--tls-ca", s(&ca)];
    let cert = a.join("coordinator.pem");
    let key = a.join("coordinator.key");
    with_cert.extend_from_slice(&["--tls-cert", s(&cert), "--tls-key", s(&key)]);
    let o = gen(&https, &with_cert);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Clients that do not speak the cluster's TLS are refused with a clear message.
    let o = gen(&addr, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--tls-ca"), "{err}");
    let o = grokctl(&["status", "--endpoint", &https]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--tls-ca"), "{err}");
    let o = grokctl(&[
        "status",
        "--endpoint",
        &addr,
        "--tls-ca",
        s(&b.join("ca.pem")),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not signed by the CA"),
        "{err}"
    );

    // Only a CA-signed client drives a worker: without a certificate, Health is refused.
    let st = status_json(&addr, &ca);
    assert_eq!(st["state"], "ready", "{st}");
    let mut ids: Vec<&str> = st["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["worker_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["w0", "w1"], "{st}");
    let worker_addr = st["shards"][0]["address"].as_str().unwrap().to_string();
    let health = rt().block_on(async {
        let ep = grok_proto::tls::endpoint(&worker_addr, Some(&client_only)).unwrap();
        match ep.connect().await {
            Err(e) => Err(grok_proto::tls::error_chain(&e)),
            Ok(ch) => pb::worker_client::WorkerClient::new(ch)
                .health(pb::HealthRequest {})
                .await
                .map(|_| ())
                .map_err(|s| grok_proto::tls::status_chain(&s)),
        }
    });
    let why = health.expect_err("a worker answered a client without a certificate");
    let signed = Tls::load(&TlsPaths::new(
        Some(ca.clone()),
        Some(a.join("coordinator.pem")),
        Some(a.join("coordinator.key")),
    ))
    .unwrap()
    .unwrap();
    let state = rt().block_on(async {
        let ch = grok_proto::tls::endpoint(&worker_addr, Some(&signed))
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::worker_client::WorkerClient::new(ch)
            .health(pb::HealthRequest {})
            .await
            .unwrap()
            .into_inner()
            .state
    });
    assert_eq!(state, "ready");
    // The server's alert or, when the connection goes first, just its end (closed, reset or a
    // broken pipe, depending on who notices first).
    assert!(
        [
            "CertificateRequired",
            "connection closed",
            "broken pipe",
            "connection reset"
        ]
        .iter()
        .any(|w| why.contains(w)),
        "{why}"
    );

    // No key reaches a log, even at debug level.
    drop(workers);
    drop(coord);
    let mut logs = vec![std::fs::read_to_string(&coord_log).unwrap()];
    for l in &worker_logs {
        logs.push(std::fs::read_to_string(l).unwrap());
    }
    assert!(logs[0].contains("worker registered"), "{}", logs[0]);
    let keys: Vec<PathBuf> = ["ca.key", "coordinator.key", "worker.key"]
        .iter()
        .map(|k| a.join(k))
        .collect();
    for k in &keys {
        for line in key_body(k) {
            for log in &logs {
                assert!(!log.contains(&line), "{} appears in a log", k.display());
            }
        }
    }
}

#[test]
fn grokctl_up_gives_tls_to_every_process() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    certs(&a);
    let model = tmp.path().join("tiny");
    gen_model(&model);
    // Through the environment, as a deployment would set it.
    let mut c = bin("grokctl");
    c.args([
        "up",
        "--model",
        s(&model),
        "--tp",
        "2",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(["--kv-blocks", "64"])
    .env("GROK_TLS_CA", a.join("ca.pem"))
    .env("GROK_TLS_CERT", a.join("coordinator.pem"))
    .env("GROK_TLS_KEY", a.join("coordinator.key"))
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let rx = lines_of(&mut child);
    let _up = Proc(child);
    let endpoint = wait_line(&rx, "ready: ", 90);
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let o = grokctl(&[
        "generate",
        "--endpoint",
        &endpoint,
        "--tls-ca",
        s(&a.join("ca.pem")),
        "--prompt-ids",
        "5,17,99",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = grokctl(&["status", "--endpoint", &endpoint]);
    assert!(!o.status.success());
}
