//! Helpers to run real clusters in tests: processes killed on drop, stdout lines, `grokctl up`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A workspace binary with one compute thread.
pub fn bin(name: &str) -> Command {
    let p = crate::bin(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first",
        p.display()
    );
    let mut c = Command::new(p);
    c.env("GROK_THREADS", "1");
    c
}

/// Lines of a child's stdout, delivered through a channel.
pub fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line starting with `prefix`; returns the rest of it.
pub fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l[prefix.len()..].to_string(),
            Ok(_) => continue,
            Err(e) => panic!("no `{prefix}` line within {secs} s: {e}"),
        }
    }
}

/// A running `grokctl up` and its gRPC endpoint (`http://ADDR`).
pub struct Cluster {
    pub proc: Proc,
    pub endpoint: String,
    /// The HTTP API address (`ADDR`, no scheme) when started with `--http-listen`.
    pub http: Option<String>,
    pub lines: mpsc::Receiver<String>,
}

/// `grokctl up` with extra arguments; waits until the cluster serves.
pub fn up(model: &Path, args: &[&str]) -> Cluster {
    let log = model.with_extension(format!("up-{}.log", std::process::id()));
    let mut c = bin("grokctl")
        .args([
            "up",
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut c);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut http = None;
    let endpoint = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                if let Some(a) = l.strip_prefix("http listening on ") {
                    http = Some(a.to_string());
                }
                if let Some(e) = l.strip_prefix("ready: ") {
                    break e.to_string();
                }
            }
            Err(_) => panic!(
                "grokctl up {args:?} did not come up:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    };
    Cluster {
        proc: Proc(c),
        endpoint,
        http,
        lines: rx,
    }
}
