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
    up_with_env(model, args, &[])
}

/// [`up`] with environment variables for every process it starts.
pub fn up_with_env(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Cluster {
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
        .envs(env.iter().copied())
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

/// `http://ADDR` for `ADDR` (an endpoint with a scheme is kept).
fn url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// The cluster's status over gRPC (`ADDR` or `http://ADDR`).
pub async fn status(endpoint: &str) -> grok_proto::v1::ClusterStatusResponse {
    let mut a = grok_proto::v1::admin_client::AdminClient::connect(url(endpoint))
        .await
        .unwrap();
    a.cluster_status(grok_proto::v1::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the cluster's state is `want` (at most `secs`); the time it took.
pub async fn wait_state(endpoint: &str, want: &str, secs: u64) -> Duration {
    let t = Instant::now();
    loop {
        let st = status(endpoint).await;
        if st.state == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{endpoint}: state `{}` ({}) is not `{want}` after {secs} s",
            st.state,
            st.detail
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A greedy request of `max_tokens` tokens (EOS ignored) streamed to its end: its ids.
pub async fn greedy(
    endpoint: &str,
    prompt: Vec<u32>,
    max_tokens: u32,
) -> Result<Vec<u32>, tonic::Status> {
    use tokio_stream::StreamExt;
    let mut c = grok_proto::v1::inference_client::InferenceClient::connect(url(endpoint))
        .await
        .unwrap();
    let mut s = c
        .generate(grok_proto::v1::GenerateRequest {
            prompt: Some(grok_proto::v1::generate_request::Prompt::Ids(
                grok_proto::v1::TokenIds { ids: prompt },
            )),
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut ids = vec![];
    while let Some(m) = s.next().await {
        ids.extend(m?.ids);
    }
    Ok(ids)
}

/// The ids in the last stdout line of `grokctl generate --json`.
pub fn json_ids(stdout: &[u8]) -> Vec<u32> {
    let text = String::from_utf8_lossy(stdout);
    let j: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a JSON line")).expect("JSON");
    j["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The body of `GET path` from the HTTP server at `addr` (`ADDR`, no scheme).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of an unlabelled Prometheus sample `name` in a `/metrics` body.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
