//! `grokctl launch` over an ssh client: a cluster described by a config file starts on its
//! hosts, serves a generation, and `--stop` leaves no process behind; an unreachable host or a
//! missing binary is a clear error.
//!
//! The ssh client here is a stand-in that runs the command on this machine (the hosts are all
//! 127.0.0.1), so the test exercises the launcher's commands, records and stop logic; it does not
//! exercise OpenSSH itself.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn fake_ssh(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("fake-ssh");
    std::fs::write(
        &p,
        "#!/bin/sh\n# fake ssh: skip options, the target and `--`, run the command here\nwhile [ \"$1\" = \"-o\" ]; do shift 2; done\ntarget=$1; shift\n[ \"$1\" = \"--\" ] && shift\nif [ \"$target\" = \"unreachable\" ]; then echo \"ssh: connect to host unreachable port 22: Connection timed out\" >&2; exit 255; fi\nexec sh -c \"$*\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn launch_and_stop_a_two_host_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = grok_shared::config::ModelConfig::preset("tiny", None).unwrap();
    grok_shared::genmodel::generate(
        &c,
        grok_shared::genmodel::GenDType::F32,
        3,
        &model,
        1 << 30,
        |_, _| {},
    )
    .unwrap();
    let ssh = fake_ssh(tmp.path());
    let bins = grok_tests::bin("grokctl")
        .parent()
        .unwrap()
        .display()
        .to_string();
    let port = free_port();
    let cfg = tmp.path().join("cluster.toml");
    // Two "hosts" on this machine with one CPU device each (ports 50061 on both would clash, so
    // the second host uses a second loopback address).
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\n[layout]\ntp = 2\n[coordinator]\nlisten = \"127.0.0.1:{port}\"\n[[hosts]]\nname = \"a\"\naddress = \"127.0.0.1\"\ndevices = [\"cpu\"]\nbin_dir = \"{bins}\"\n[[hosts]]\nname = \"b\"\naddress = \"127.0.0.2\"\ndevices = [\"cpu\"]\nbin_dir = \"{bins}\"\n",
            model.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(grok_tests::bin("grokctl"))
            .args(args)
            .env("GROK_SSH", &ssh)
            .env("GROK_THREADS", "1")
            .output()
            .unwrap()
    };
    let o = run(&[
        "launch",
        "--config",
        cfg.to_str().unwrap(),
        "--ready-timeout-s",
        "60",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let stopper = || run(&["launch", "--config", cfg.to_str().unwrap(), "--stop"]);
    if !o.status.success() {
        stopper();
        panic!("launch failed: {err}");
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("ready: http://127.0.0.1:{port}")));
    assert!(
        err.contains("host a") && err.contains("host b") && err.contains("worker rank 1"),
        "{err}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.with_extension("launch.json")).unwrap())
            .unwrap();
    let pids: Vec<i32> = record
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 3);
    let g = Command::new(grok_tests::bin("grokctl"))
        .args([
            "generate",
            "--endpoint",
            &format!("127.0.0.1:{port}"),
            "--prompt-ids",
            "4,5,6",
            "--max-new-tokens",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    // Stop: every recorded process is gone, the record removed.
    let s = stopper();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    for pid in pids {
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "process {pid} is still running");
    }
    assert!(!cfg.with_extension("launch.json").exists());

    // An unreachable host and a missing binary: clear errors, nothing started.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, format!("[model]\npath = \"{}\"\n[coordinator]\nlisten = \"127.0.0.1:{port}\"\n[[hosts]]\nname = \"far\"\naddress = \"10.255.255.1\"\nssh = \"unreachable\"\ndevices = [\"cpu\"]\n", model.display())).unwrap();
    let o = run(&["launch", "--config", bad.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("host `far`") && e.contains("unreachable"),
        "{e}"
    );
    let nobin = tmp.path().join("nobin.toml");
    std::fs::write(&nobin, format!("[model]\npath = \"{}\"\n[coordinator]\nlisten = \"127.0.0.1:{port}\"\n[[hosts]]\nname = \"a\"\naddress = \"127.0.0.1\"\nbin_dir = \"/nonexistent\"\ndevices = [\"cpu\"]\n", model.display())).unwrap();
    let o = run(&["launch", "--config", nobin.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("/nonexistent/grok-worker"),
        "{e}"
    );
    assert!(!nobin.with_extension("launch.json").exists());
}
