//! `grokctl launch`: start a cluster described by a config file on its hosts over ssh (the
//! system OpenSSH client), and `grokctl launch --stop` to stop it.
//!
//! The coordinator runs on the first host; every device of every `[[hosts]]` entry gets one
//! worker (port 50061 + device index), ranks in file order. The processes started are
//! recorded in a state file next to the config, which `--stop` reads.
//!
//! Every ssh call is `SSH [launch.ssh_options] -o BatchMode=yes -o ConnectTimeout=5 TARGET --
//! COMMAND` (ssh keeps the first value of an option, so `ssh_options` may override these two).
//! The remote processes write their logs to `launch.log_dir` (default /tmp) on their host.

use crate::cluster_file::{ClusterFile, HostSection, LaunchSettings};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct LaunchArgs {
    pub config: PathBuf,
    pub stop: bool,
    /// The ssh program (default `ssh`, or GROK_SSH).
    pub ssh: String,
    pub ready_timeout_s: u64,
    /// Mutual TLS: files the coordinator and every worker get (paths on the hosts).
    pub tls: Option<grok_proto::tls::TlsPaths>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Started {
    role: String,
    host: String,
    target: String,
    pid: u32,
}

fn state_path(config: &Path) -> PathBuf {
    config.with_extension("launch.json")
}

/// The ssh program and the extra arguments it gets before the target.
struct Ssh<'a> {
    program: &'a str,
    options: &'a [String],
}

/// Runs `cmd` on `target` through ssh; stdout on success, an error naming the host otherwise.
fn remote(ssh: &Ssh, host: &str, target: &str, cmd: &str) -> Result<String> {
    let o = Command::new(ssh.program)
        .args(ssh.options)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            target,
            "--",
            cmd,
        ])
        .output()
        .with_context(|| format!("cannot run `{}`", ssh.program))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
        if o.status.code() == Some(255) {
            bail!("host `{host}` ({target}) is unreachable over ssh: {err}");
        }
        if err.is_empty() {
            bail!("host `{host}` ({target}): `{cmd}` failed ({})", o.status);
        }
        bail!("host `{host}` ({target}): {err}");
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn target_of(h: &HostSection) -> String {
    h.ssh.clone().unwrap_or_else(|| h.address.clone())
}

fn bin_dir(h: &HostSection) -> String {
    h.bin_dir
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/usr/local/bin".into())
}

/// Quotes a word for the remote shell.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub async fn launch(a: &LaunchArgs) -> Result<()> {
    if a.stop {
        return stop(a);
    }
    let file = ClusterFile::load(&a.config)?;
    let env = |k: &str| std::env::var(k).ok();
    let s = crate::cluster_file::resolve_up(&file, &Default::default(), &env)?;
    let LaunchSettings {
        ssh_options,
        log_dir,
    } = crate::cluster_file::resolve_launch(&file, &env)?;
    let ssh = Ssh {
        program: &a.ssh,
        options: &ssh_options,
    };
    let log_dir = log_dir.display().to_string();
    let log = |name: &str| q(&format!("{}/{name}", log_dir.trim_end_matches('/')));
    let world = s.tp * s.pp * s.replicas;
    let devices: usize = file.hosts.iter().map(|h| h.devices.len().max(1)).sum();
    if file.hosts.is_empty() {
        bail!("{}: no [[hosts]] to launch workers on", a.config.display());
    }
    if devices != world {
        bail!(
            "{}: the hosts list {devices} devices but the layout tp={} x pp={} x {} replicas needs {world} workers",
            a.config.display(),
            s.tp,
            s.pp,
            s.replicas
        );
    }
    let listen: std::net::SocketAddr = s.listen.parse().context("coordinator.listen")?;
    if listen.port() == 0 {
        bail!("coordinator.listen: launch needs a fixed port (workers must know it), got {listen}");
    }
    // The coordinator binds `listen`; workers and this command reach it at the first host's
    // address when `listen` is a wildcard (0.0.0.0 / [::]).
    let reach = if listen.ip().is_unspecified() {
        format!("{}:{}", file.hosts[0].address, listen.port())
    } else {
        s.listen.clone()
    };
    let state = state_path(&a.config);
    if state.exists() {
        bail!("{} exists: a launched cluster may still run; stop it first (grokctl launch --config {} --stop)", state.display(), a.config.display());
    }
    // ` --tls-ca CA --tls-cert CERT --tls-key KEY` (paths on the hosts) when TLS is on.
    let tls_args: String = crate::up::tls_args(a.tls.as_ref())
        .iter()
        .map(|w| format!(" {}", q(&w.to_string_lossy())))
        .collect();
    let mut started: Vec<Started> = Vec::new();
    let save =
        |st: &Vec<Started>| std::fs::write(&state, serde_json::to_vec_pretty(st).expect("json"));
    // Check every host first: reachable, binaries present, log_dir writable.
    for h in &file.hosts {
        let t = target_of(h);
        let bin = format!("{}/grok-worker", bin_dir(h));
        remote(
            &ssh,
            &h.name,
            &t,
            &format!(
                "test -x {b} || {{ echo {b} is missing or not executable, see bin_dir >&2; exit 3; }}; mkdir -p {d} 2>/dev/null; {{ test -d {d} && test -w {d}; }} || {{ echo cannot write the log_dir {d} >&2; exit 3; }}",
                b = q(&bin),
                d = q(&log_dir)
            ),
        )
        .context("checking the hosts")?;
        eprintln!("host {:<16} reachable, {} present", h.name, bin);
    }
    // The coordinator, on the first host's machine when the config names none.
    let coord_host = file.hosts[0].name.clone();
    let coord_target = target_of(&file.hosts[0]);
    let coord_bin = format!("{}/grok-coordinator", bin_dir(&file.hosts[0]));
    let mut cmd = format!(
        "{} --model {} --tp {} --ep {} --pp {} --replicas {} --listen {}",
        q(&coord_bin),
        q(&s.model.display().to_string()),
        s.tp,
        s.ep,
        s.pp,
        s.replicas,
        q(&s.listen),
    );
    if let Some(b) = s.kv_blocks {
        cmd += &format!(" --kv-blocks {b}");
    }
    if s.dp_attention {
        cmd += &format!(" --dp-attention --expert-copies {}", s.expert_copies);
    }
    if let Some(h) = &s.http_listen {
        cmd += &format!(" --http-listen {}", q(h));
    }
    cmd += &tls_args;
    let env = |k: &str| std::env::var(k).ok();
    let (cargs, wargs) = file.process_args(&env, false);
    let words = |v: &[String]| v.iter().map(|w| format!(" {}", q(w))).collect::<String>();
    cmd += &words(&cargs);
    // With etcd, workers announce themselves there instead of calling the coordinator.
    let join = if file.uses_etcd(&env) {
        words(&wargs)
    } else {
        format!(" --coordinator {}", q(&reach))
    };
    let pid = remote(
        &ssh,
        &coord_host,
        &coord_target,
        &format!(
            "nohup {cmd} > {} 2>&1 < /dev/null & echo $!",
            log("grok-coordinator.log")
        ),
    )?;
    started.push(Started {
        role: "coordinator".into(),
        host: coord_host.clone(),
        target: coord_target,
        pid: pid.parse().context("coordinator pid")?,
    });
    save(&started)?;
    eprintln!(
        "host {:<16} coordinator started (pid {pid}), listening on {} (reached at {reach})",
        coord_host, s.listen
    );
    let mut rank = 0;
    for h in &file.hosts {
        let t = target_of(h);
        let devs: Vec<String> = if h.devices.is_empty() {
            vec!["cpu".into()]
        } else {
            h.devices.clone()
        };
        for (i, dev) in devs.iter().enumerate() {
            let port = 50061 + i;
            let wcmd = format!(
                "{}/grok-worker{join} --listen {}:{port} --advertise {}:{port} --rank {rank} --id {}-{i} --device {}{tls_args}",
                bin_dir(h),
                h.address,
                h.address,
                q(&h.name),
                q(dev)
            );
            let pid = remote(
                &ssh,
                &h.name,
                &t,
                &format!(
                    "nohup {wcmd} > {} 2>&1 < /dev/null & echo $!",
                    log(&format!("grok-worker-{rank}.log"))
                ),
            )?;
            started.push(Started {
                role: format!("worker rank {rank}"),
                host: h.name.clone(),
                target: t.clone(),
                pid: pid.parse().context("worker pid")?,
            });
            save(&started)?;
            eprintln!(
                "host {:<16} worker rank {rank} on {dev} started (pid {pid})",
                h.name
            );
            rank += 1;
        }
    }
    let start = Instant::now();
    let mut bar = crate::progress::LoadProgress::default();
    loop {
        if let Ok(st) = crate::client::fetch_status(&reach).await {
            bar.show(&st);
            if st.state == "ready" {
                bar.finish();
                let scheme = if a.tls.is_some() { "https" } else { "http" };
                println!("ready: {scheme}://{reach}");
                return Ok(());
            }
            if st.state == "failed" {
                bar.finish();
                bail!(
                    "the cluster failed to load: {} (stop it with --stop)",
                    st.detail
                );
            }
        }
        if start.elapsed() > Duration::from_secs(a.ready_timeout_s) {
            bar.finish();
            bail!("the cluster is not ready after {} s (logs: {log_dir}/grok-*.log on the hosts; stop it with --stop)", a.ready_timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn stop(a: &LaunchArgs) -> Result<()> {
    let state = state_path(&a.config);
    let text = std::fs::read_to_string(&state)
        .with_context(|| format!("no launched cluster recorded in {}", state.display()))?;
    let started: Vec<Started> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a launch record", state.display()))?;
    // The ssh options of the config (and GROK_SSH_OPTIONS) apply to stopping too.
    let file = ClusterFile::load(&a.config)?;
    let ssh_options =
        crate::cluster_file::resolve_launch(&file, &|k| std::env::var(k).ok())?.ssh_options;
    let ssh = Ssh {
        program: &a.ssh,
        options: &ssh_options,
    };
    let mut failed = Vec::new();
    // Workers first, the coordinator last. An exited process that nobody reaps (a zombie, where
    // the host's init does not reap orphans) counts as gone.
    for s in started.iter().rev() {
        let cmd = format!("alive() {{ kill -0 {pid} 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' /proc/{pid}/status; }}; kill {pid} 2>/dev/null; for i in 1 2 3 4 5 6 7 8 9 10; do alive || exit 0; sleep 0.5; done; kill -9 {pid} 2>/dev/null; exit 0", pid = s.pid);
        match remote(&ssh, &s.host, &s.target, &cmd) {
            Ok(_) => eprintln!("host {:<16} {} (pid {}) stopped", s.host, s.role, s.pid),
            Err(e) => {
                eprintln!("host {:<16} {} (pid {}): {e:#}", s.host, s.role, s.pid);
                failed.push(s.host.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "could not stop everything on: {}; {} is kept",
            failed.join(", "),
            state.display()
        );
    }
    std::fs::remove_file(&state).ok();
    println!("stopped");
    Ok(())
}
