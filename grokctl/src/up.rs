//! `grokctl up`: a coordinator and `tp * pp` workers as local processes, in the foreground.
//! Children die with `grokctl` (PR_SET_PDEATHSIG) and are stopped on Ctrl-C or SIGTERM.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct UpArgs {
    pub model: PathBuf,
    pub tp: usize,
    pub ep: usize,
    pub pp: usize,
    pub replicas: usize,
    pub listen: String,
    pub tokenizer: Option<PathBuf>,
    pub threads_per_worker: usize,
    /// None: each worker sizes its KV cache from its memory.
    pub kv_blocks: Option<usize>,
    pub ready_timeout_s: u64,
    /// Extra arguments for the coordinator (e.g. `--http-listen ADDR`).
    pub coordinator_args: Vec<String>,
    /// Mutual TLS: the coordinator and every worker get these files.
    pub tls: Option<grok_proto::tls::TlsPaths>,
}

/// `--tls-ca CA --tls-cert CERT --tls-key KEY` when TLS is on (the paths, never the content).
pub fn tls_args(tls: Option<&grok_proto::tls::TlsPaths>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    if let Some(t) = tls {
        for (flag, p) in [
            ("--tls-ca", &t.ca),
            ("--tls-cert", &t.cert),
            ("--tls-key", &t.key),
        ] {
            if let Some(p) = p {
                out.push(flag.into());
                out.push(p.clone().into_os_string());
            }
        }
    }
    out
}

pub(crate) fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating grokctl")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to grokctl ({}); build the workspace binaries",
            name,
            p.display()
        );
    }
    Ok(p)
}

pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

struct Children(Vec<(String, Child)>);

impl Children {
    fn stop(&mut self) {
        for (_, c) in self.0.iter_mut() {
            // SAFETY: sending a signal to our own child process id.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, c) in self.0.iter_mut() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("{name} did not stop in time; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }

    fn exited(&mut self) -> Option<String> {
        for (name, c) in self.0.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(format!("{name} exited ({st})"));
            }
        }
        None
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn up(a: &UpArgs) -> Result<()> {
    let coord_bin = sibling("grok-coordinator")?;
    let worker_bin = sibling("grok-worker")?;
    let world = a.tp * a.pp * a.replicas.max(1);
    let mut kids = Children(Vec::new());
    let mut cmd = Command::new(&coord_bin);
    cmd.arg("--model")
        .arg(&a.model)
        .args([
            "--tp",
            &a.tp.to_string(),
            "--ep",
            &a.ep.to_string(),
            "--pp",
            &a.pp.to_string(),
            "--replicas",
            &a.replicas.max(1).to_string(),
        ])
        .args(["--listen", &a.listen])
        .stdout(Stdio::piped());
    if let Some(b) = a.kv_blocks {
        cmd.arg("--kv-blocks").arg(b.to_string());
    }
    if let Some(t) = &a.tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    cmd.args(&a.coordinator_args);
    cmd.args(tls_args(a.tls.as_ref()));
    die_with_parent(&mut cmd);
    let mut coord = cmd
        .spawn()
        .with_context(|| format!("starting {}", coord_bin.display()))?;
    let stdout = coord.stdout.take().expect("piped");
    kids.0.push(("coordinator".into(), coord));
    // The coordinator prints `listening on ADDR` once bound, or exits with an error.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for l in lines.map_while(Result::ok) {
            println!("{l}");
        }
    });
    let addr = loop {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            match l.strip_prefix("listening on ") {
                Some(a) => break a.to_string(),
                None => bail!("unexpected coordinator output: {l}"),
            }
        }
        if let Some(why) = kids.exited() {
            bail!("the coordinator did not start: {why}");
        }
    };
    eprintln!("coordinator listening on {addr}; starting {world} workers");
    for i in 0..world {
        let mut w = Command::new(&worker_bin);
        w.args([
            "--coordinator",
            &addr,
            "--listen",
            "127.0.0.1:0",
            "--id",
            &format!("worker-{i}"),
        ])
        .args([
            "--rank",
            &i.to_string(),
            "--threads",
            &a.threads_per_worker.to_string(),
        ])
        .args(tls_args(a.tls.as_ref()));
        die_with_parent(&mut w);
        let c = w
            .spawn()
            .with_context(|| format!("starting {}", worker_bin.display()))?;
        kids.0.push((format!("worker-{i}"), c));
    }
    let start = Instant::now();
    let mut bar = crate::progress::LoadProgress::default();
    loop {
        if let Some(why) = kids.exited() {
            bar.finish();
            bail!("the cluster did not come up: {why}");
        }
        if let Ok(s) = crate::client::fetch_status(&addr).await {
            bar.show(&s);
            if s.state == "ready" {
                bar.finish();
                break;
            }
            if s.state == "failed" {
                bar.finish();
                bail!("the cluster failed to load: {}", s.detail);
            }
        }
        if start.elapsed() > Duration::from_secs(a.ready_timeout_s) {
            bar.finish();
            bail!("the cluster is not ready after {} s", a.ready_timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scheme = if a.tls.is_some() { "https" } else { "http" };
    println!("ready: {scheme}://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        tokio::select! {
            _ = grok_proto::process::shutdown_signal() => {
                eprintln!("stopping the cluster");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(why) = kids.exited() {
                    eprintln!("{why}; the cluster keeps running without it (Ctrl-C stops the rest)");
                    // Keep the remaining processes; forget the one that exited.
                    kids.0.retain_mut(|(_, c)| !matches!(c.try_wait(), Ok(Some(_))));
                }
            }
        }
    }
    kids.stop();
    Ok(())
}
