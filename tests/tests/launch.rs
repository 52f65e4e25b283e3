//! `grokctl launch` against real ssh: two hosts are network namespaces, each running Debian's
//! OpenSSH server (`/usr/sbin/sshd`, keys made here), reached from the root namespace over a
//! bridge. The launched cluster serves a generation, `--stop` leaves no process behind, an
//! unreachable host is a clear error within a bounded time, and a missing binary names its path.
//!
//! Needs root (namespaces; the test prints SKIPPED where they cannot be created) and
//! openssh-server (scripts/test.sh installs it).

use grok_tests::cluster::Proc;
use grok_tests::netns::{ns_command, unused_subnet, Net};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// Whether `pid` is a live process (an exited one nobody reaped, a zombie, is not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => !s
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("Z (zombie)")),
        Err(_) => false,
    }
}

/// The hosts: sshd in each namespace, the namespaces, and any processes a launch recorded.
/// Dropping it (also on a panic) kills what a launch left, then the sshd, then deletes the
/// namespaces.
struct Hosts {
    records: Vec<PathBuf>,
    sshd: Vec<Proc>,
    logs: Vec<PathBuf>,
    net: Net,
}

impl Hosts {
    fn sshd_logs(&self) -> String {
        self.logs
            .iter()
            .map(|l| {
                format!(
                    "--- {}:\n{}",
                    l.display(),
                    std::fs::read_to_string(l).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for r in &self.records {
            let Ok(text) = std::fs::read_to_string(r) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            for s in v.as_array().into_iter().flatten() {
                if let Some(pid) = s["pid"].as_i64() {
                    // SAFETY: killing a process this test started (through sshd).
                    unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

fn keygen(path: &Path) {
    let o = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "grok-launch-test",
            "-f",
        ])
        .arg(path)
        .output()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(
        o.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Starts sshd on `addr` inside the namespace `ns`; `n` numbers its files in `dir`.
fn start_sshd(dir: &Path, n: usize, ns: &str, addr: &str) -> (Proc, PathBuf) {
    let host_key = dir.join(format!("host-key-{n}"));
    keygen(&host_key);
    let cfg = dir.join(format!("sshd-{n}.conf"));
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress {addr}\nPort 22\nHostKey {hk}\nAuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\nPidFile {d}/sshd-{n}.pid\nPrintMotd no\n",
            hk = host_key.display(),
            d = dir.display()
        ),
    )
    .unwrap();
    let log = dir.join(format!("sshd-{n}.log"));
    let child = ns_command(ns, SSHD)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Proc(child), log)
}

/// Waits until every sshd accepts TCP connections (from the root namespace).
fn wait_sshd(hosts: &mut Hosts, addrs: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for a in addrs {
        let sa: SocketAddr = format!("{a}:22").parse().unwrap();
        loop {
            if TcpStream::connect_timeout(&sa, Duration::from_millis(500)).is_ok() {
                break;
            }
            for p in &mut hosts.sshd {
                if let Ok(Some(st)) = p.0.try_wait() {
                    panic!("sshd exited ({st}):\n{}", hosts.sshd_logs());
                }
            }
            assert!(
                Instant::now() < deadline,
                "sshd does not accept connections on {sa} within 20 s:\n{}",
                hosts.sshd_logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn grokctl(args: &[&str]) -> Output {
    Command::new(grok_tests::bin("grokctl"))
        .args(args)
        .env_remove("GROK_SSH")
        .env_remove("GROK_SSH_OPTIONS")
        .env("GROK_THREADS", "1")
        .output()
        .unwrap()
}

fn launch(cfg: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["launch", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    grokctl(&args)
}

/// A net namespace's inode, as `/proc/PID/ns/net` links show it.
fn netns_inode(ns: &str) -> u64 {
    std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino()
}

fn netns_of(pid: i32) -> u64 {
    let l = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let s = l.to_string_lossy();
    s.trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .unwrap()
}

#[test]
fn launch_over_openssh_to_hosts_in_network_namespaces() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tag = format!("gl{}", std::process::id() % 100000);
    let subnet = unused_subnet("10.214");
    let (a_ip, b_ip, root_ip, unused_ip) = (
        format!("{subnet}.1"),
        format!("{subnet}.2"),
        format!("{subnet}.254"),
        format!("{subnet}.9"),
    );
    let net = match Net::create(&tag, &[("a", &a_ip), ("b", &b_ip)], Some(&root_ip)) {
        Ok(n) => n,
        Err(why) => {
            eprintln!("SKIPPED: network namespaces cannot be created here ({why})");
            return;
        }
    };
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: install Debian's openssh-server (scripts/test.sh installs it)"
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    let key = dir.join("client-key");
    keygen(&key);
    std::fs::copy(key.with_extension("pub"), dir.join("authorized_keys")).unwrap();
    let mut hosts = Hosts {
        records: vec![],
        sshd: vec![],
        logs: vec![],
        net,
    };
    for (n, (h, addr)) in [("a", &a_ip), ("b", &b_ip)].into_iter().enumerate() {
        let (p, log) = start_sshd(dir, n, &hosts.net.ns(h), addr);
        hosts.sshd.push(p);
        hosts.logs.push(log);
    }
    wait_sshd(&mut hosts, &[&a_ip, &b_ip]);
    eprintln!("sshd up on {a_ip} and {b_ip} after {:?}", t0.elapsed());

    let model = dir.join("m");
    let c = grok_shared::config::ModelConfig::preset("tiny", None).unwrap();
    grok_shared::formats::genmodel::generate(
        &c,
        grok_shared::formats::genmodel::GenDType::F32,
        3,
        &model,
        1 << 30,
        |_, _| {},
    )
    .unwrap();
    let bins = grok_tests::bin("grokctl")
        .parent()
        .unwrap()
        .display()
        .to_string();
    let launch_section = format!(
        "[launch]\nssh_options = [\"-F\", \"/dev/null\", \"-i\", \"{}\", \"-o\", \"IdentitiesOnly=yes\", \"-o\", \"StrictHostKeyChecking=no\", \"-o\", \"UserKnownHostsFile=/dev/null\", \"-o\", \"LogLevel=ERROR\"]\nlog_dir = \"{}\"\n",
        key.display(),
        dir.join("logs").display()
    );
    let head = |listen: &str, tp: usize| {
        format!(
            "[model]\npath = \"{}\"\n[layout]\ntp = {tp}\n[coordinator]\nlisten = \"{listen}\"\n{launch_section}",
            model.display()
        )
    };
    let host = |name: &str, addr: &str, bin_dir: &str| {
        format!("[[hosts]]\nname = \"{name}\"\naddress = \"{addr}\"\ndevices = [\"cpu\"]\nbin_dir = \"{bin_dir}\"\n")
    };
    // The coordinator binds every address of host a; workers and grokctl reach it at a's.
    let listen = format!("{a_ip}:50051");
    let cfg = dir.join("cluster.toml");
    std::fs::write(
        &cfg,
        head("0.0.0.0:50051", 2) + &host("a", &a_ip, &bins) + &host("b", &b_ip, &bins),
    )
    .unwrap();
    let record = cfg.with_extension("launch.json");
    hosts.records.push(record.clone());

    let t = Instant::now();
    let o = launch(&cfg, &["--ready-timeout-s", "90"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let remote_logs = || {
        std::fs::read_dir(dir.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                format!(
                    "--- {}:\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    assert!(
        o.status.success(),
        "launch failed: {err}\n{}\n{}",
        remote_logs(),
        hosts.sshd_logs()
    );
    eprintln!("launched in {:?}", t.elapsed());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("ready: http://{listen}")),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.contains("host a") && err.contains("host b") && err.contains("worker rank 1"),
        "{err}"
    );
    let started: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let started: Vec<(String, i32)> = started
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["host"].as_str().unwrap().to_string(),
                s["pid"].as_i64().unwrap() as i32,
            )
        })
        .collect();
    assert_eq!(started.len(), 3, "{started:?}");
    // Every process runs on its host: in that host's network namespace.
    for (h, pid) in &started {
        assert!(alive(*pid), "pid {pid} on {h} is not running");
        assert_eq!(
            netns_of(*pid),
            netns_inode(&hosts.net.ns(h)),
            "pid {pid} is not in host {h}'s namespace"
        );
    }
    for f in [
        "grok-coordinator.log",
        "grok-worker-0.log",
        "grok-worker-1.log",
    ] {
        assert!(dir.join("logs").join(f).exists(), "no {f} in the log_dir");
    }

    let g = grokctl(&[
        "generate",
        "--endpoint",
        &listen,
        "--prompt-ids",
        "4,5,6",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        g.status.success(),
        "generate: {}\n{}",
        String::from_utf8_lossy(&g.stderr),
        remote_logs()
    );
    let out = String::from_utf8_lossy(&g.stdout);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(j["ids"].as_array().unwrap().len(), 3, "{out}");

    // Stop: every recorded process is gone, the record removed.
    let t = Instant::now();
    let s = launch(&cfg, &["--stop"]);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    eprintln!("stopped in {:?}", t.elapsed());
    for (h, pid) in &started {
        assert!(!alive(*pid), "process {pid} on {h} is still running");
    }
    assert!(!record.exists());

    // An unreachable host: a clear error naming it, within a bounded time, nothing started.
    let far = dir.join("far.toml");
    std::fs::write(&far, head(&listen, 1) + &host("far", &unused_ip, &bins)).unwrap();
    hosts.records.push(far.with_extension("launch.json"));
    let t = Instant::now();
    let o = launch(&far, &[]);
    let took = t.elapsed();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("host `far`") && e.contains("unreachable"),
        "{e}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}: {e}");
    assert!(!far.with_extension("launch.json").exists());
    eprintln!("unreachable host reported in {took:?}: {}", e.trim());

    // A missing binary on a reachable host names the path.
    let nobin = dir.join("nobin.toml");
    std::fs::write(&nobin, head(&listen, 1) + &host("a", &a_ip, "/nonexistent")).unwrap();
    hosts.records.push(nobin.with_extension("launch.json"));
    let o = launch(&nobin, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("host `a`") && e.contains("/nonexistent/grok-worker"),
        "{e}"
    );
    assert!(!nobin.with_extension("launch.json").exists());
    eprintln!("missing binary reported: {}", e.trim());
    drop(hosts);
    eprintln!("total {:?}", t0.elapsed());
}
