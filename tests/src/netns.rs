//! Network namespaces as separate hosts on one machine (needs root and iproute2): each host is a
//! namespace with one address on a /24, all joined by a bridge in a "switch" namespace. The
//! root namespace (where the test runs) can be attached to the bridge too, so that the test and
//! the programs it starts reach the hosts directly.

use std::ffi::OsStr;
use std::process::Command;

/// Runs `ip` with arguments; Err(stderr) on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A `/24` prefix `A.B.N` (no trailing dot) under `a_b` (e.g. "10.214") that no address or
/// route of the root namespace uses, starting from a number derived from the process id.
pub fn unused_subnet(a_b: &str) -> String {
    let used = ip_output(&["-4", "-o", "addr", "show"]) + &ip_output(&["-4", "route", "show"]);
    let first = std::process::id() % 250;
    (0..250)
        .map(|i| format!("{a_b}.{}", (first + i) % 250 + 1))
        .find(|s| !used.contains(&format!("{s}.")))
        .unwrap_or_else(|| format!("{a_b}.{}", first + 1))
}

/// Network namespaces `TAG-HOST` joined by a bridge in the namespace `TAG-sw`; deleted (with
/// the root namespace's link, when attached) on drop.
pub struct Net {
    tag: String,
    names: Vec<String>,
    root_link: Option<String>,
}

impl Net {
    /// Creates one namespace per `(host, address)` (the address gets a /24) and, with
    /// `root = Some(address)`, a link from the root namespace to the bridge carrying that
    /// address (/24). `tag` names everything created: keep it at most 10 characters (interface
    /// names are limited to 15).
    pub fn create(tag: &str, hosts: &[(&str, &str)], root: Option<&str>) -> Result<Net, String> {
        let mut net = Net {
            tag: tag.to_string(),
            names: vec![],
            root_link: None,
        };
        let sw = format!("{tag}-sw");
        ip(&["netns", "add", &sw])?;
        net.names.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, (host, addr)) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            ip(&["netns", "add", &ns])?;
            net.names.push(ns.clone());
            let (a, b) = (format!("{tag}a{i}"), format!("{tag}b{i}"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &a, "netns", &ns])?;
            ip(&["link", "set", &b, "netns", &sw])?;
            ip(&["-n", &sw, "link", "set", &b, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &b, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &a])?;
            ip(&["-n", &ns, "link", "set", &a, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        if let Some(addr) = root {
            let (a, b) = (format!("{tag}r"), format!("{tag}rs"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            net.root_link = Some(a.clone());
            ip(&["link", "set", &b, "netns", &sw])?;
            ip(&["-n", &sw, "link", "set", &b, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &b, "up"])?;
            ip(&["addr", "add", &format!("{addr}/24"), "dev", &a])?;
            ip(&["link", "set", &a, "up"])?;
        }
        Ok(net)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    /// Cuts host number `index` (in `create`'s order) off the network: its switch port goes
    /// down, so its packets vanish (no reset, no refusal), as in a partition.
    pub fn partition(&self, index: usize) -> Result<(), String> {
        let (sw, port) = (format!("{}-sw", self.tag), format!("{}b{index}", self.tag));
        ip(&["-n", &sw, "link", "set", &port, "down"])
    }
}

impl Net {
    /// Puts host number `index` back on the network after [`Net::partition`].
    pub fn heal(&self, index: usize) -> Result<(), String> {
        let (sw, port) = (format!("{}-sw", self.tag), format!("{}b{index}", self.tag));
        ip(&["-n", &sw, "link", "set", &port, "up"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(l) = &self.root_link {
            let _ = ip(&["link", "del", l]);
        }
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// `program` run inside the namespace `ns` (`ip netns exec`, which execs it: the child's pid is
/// the program's).
pub fn ns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// A workspace binary run inside the namespace `ns`, with one compute thread.
pub fn in_ns(ns: &str, name: &str) -> Command {
    let mut c = ns_command(ns, crate::bin(name));
    c.env("GROK_THREADS", "1");
    c
}
