//! A real etcd (Debian's etcd-server) for tests: on free loopback ports, in a directory of the
//! test, stopped on drop; it can be killed and started again on the same ports and data.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    /// Starts etcd with its data under `dir`; fails the test clearly when etcd is missing.
    pub fn start(dir: &Path) -> EtcdServer {
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "/usr/bin/etcd is missing: scripts/test.sh installs Debian's etcd-server"
        );
        let mut e = EtcdServer {
            client_port: free_port(),
            peer_port: free_port(),
            url: String::new(),
            dir: dir.to_path_buf(),
            child: None,
        };
        e.url = format!("http://127.0.0.1:{}", e.client_port);
        e.restart();
        e
    }

    /// Kills etcd at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts etcd on the same ports and data, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let c = Command::new("/usr/bin/etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("etcd-data"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.child = Some(c);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.healthy() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "etcd is not healthy after 20 s:\n{}",
            std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
        );
    }

    fn healthy(&self) -> bool {
        let Ok(mut t) = std::net::TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = t.set_read_timeout(Some(Duration::from_secs(2)));
        if t.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut s = String::new();
        let _ = t.read_to_string(&mut s);
        s.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
