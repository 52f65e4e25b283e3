//! The cost of a collective as NCCL runs it: for each algorithm (ring, tree, NVLS on NVSwitch
//! systems) and protocol (LL, LL128, Simple), a fixed latency plus the bytes over the bus
//! bandwidth that protocol reaches; NCCL picks the fastest, and so does the model.
//!
//! The constants are the device's (`Device::nccl`), fitted to published nccl-tests runs that
//! the catalog file cites; a device without them (the CPU host: the project's TCP collective,
//! and devices with no published per-size figures) keeps the ring of messages with the
//! catalog's link latency and bandwidth (for the CPU host, as `grokctl plan calibrate`
//! measures them).

use super::catalog::Device;
use serde::{Deserialize, Serialize};

/// What one collective costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CollectiveCost {
    pub op: &'static str,
    /// ring, tree, nvls, p2p, or tcp (the project's TCP collective).
    pub algorithm: String,
    /// LL, LL128, Simple, or - (not NCCL's).
    pub protocol: String,
    /// Bytes per rank of one call.
    pub bytes: f64,
    /// Calls per step.
    pub count: f64,
    /// Seconds of all of them.
    pub seconds: f64,
}

impl CollectiveCost {
    /// `n` calls of this one.
    pub fn times(mut self, n: f64) -> Self {
        self.count *= n;
        self.seconds *= n;
        self
    }
}

/// One regime of a collective: the algorithm and protocol NCCL runs there, a fixed latency and
/// the bus bandwidth it reaches (nccl-tests' busbw). The time of a call is the least over a
/// device's regimes of `latency + bytes x factor / busbw`: an envelope fitted to published
/// nccl-tests times, labelled with the algorithm and protocol NCCL's tuner picks in that range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Regime {
    pub algorithm: String,
    pub protocol: String,
    pub latency_us: f64,
    pub busbw_gbs: f64,
}

/// A device's NCCL constants (`[device.nccl]` in the catalog; absent: the ring of messages on
/// the catalog's link latency and bandwidth). Every entry cites its nccl-tests source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NcclModel {
    /// Where the figures come from (publication, date, NCCL version, GPU count).
    #[serde(default)]
    pub source: String,
    /// GPUs per node of the measured runs.
    #[serde(default)]
    pub ranks: usize,
    /// All-reduce inside a node.
    #[serde(default)]
    pub all_reduce: Vec<Regime>,
    /// All-reduce across two nodes (`2 x ranks` GPUs).
    #[serde(default)]
    pub all_reduce_inter: Vec<Regime>,
    /// Bus bandwidth of the other collectives inside a node (all-gather, reduce-scatter,
    /// all-to-all, send/recv: NCCL's ring, no NVLS), and their small-message latency.
    #[serde(default)]
    pub ring_busbw_gbs: f64,
    #[serde(default)]
    pub ring_latency_us: f64,
}

/// The least-time regime for `bytes` with busbw factor `factor`.
fn fastest(
    op: &'static str,
    regimes: &[Regime],
    bytes: f64,
    factor: f64,
) -> Option<CollectiveCost> {
    regimes
        .iter()
        .filter(|r| r.busbw_gbs > 0.0)
        .map(|r| CollectiveCost {
            op,
            algorithm: r.algorithm.clone(),
            protocol: r.protocol.clone(),
            bytes,
            count: 1.0,
            seconds: r.latency_us * 1e-6 + bytes * factor / (r.busbw_gbs * 1e9),
        })
        .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
}

/// One all-reduce of `bytes` per rank over `n` ranks (across nodes when `inter_node`). The
/// measured latency stands for any rank count up to the measured one; the bandwidth term
/// scales with the ring's 2(n-1)/n.
pub fn all_reduce(dev: &Device, n: usize, bytes: f64, inter_node: bool) -> CollectiveCost {
    let nf = n.max(1) as f64;
    let factor = 2.0 * (nf - 1.0) / nf;
    let m = &dev.nccl;
    if n > 1 {
        let regimes = if inter_node {
            &m.all_reduce_inter
        } else {
            &m.all_reduce
        };
        if let Some(c) = fastest("all-reduce", regimes, bytes, factor) {
            return c;
        }
    }
    ring_of_messages("all-reduce", dev, n, bytes, inter_node, 2.0)
}

/// One all-gather of `bytes` (the gathered result) over `n` ranks: (n-1)/n of it on the wire.
pub fn all_gather(dev: &Device, n: usize, bytes: f64, inter_node: bool) -> CollectiveCost {
    CollectiveCost {
        op: "all-gather",
        ..all_to_all(dev, n, bytes, inter_node)
    }
}

/// One reduce-scatter of `bytes` (the input) over `n` ranks: (n-1)/n of it on the wire.
pub fn reduce_scatter(dev: &Device, n: usize, bytes: f64, inter_node: bool) -> CollectiveCost {
    CollectiveCost {
        op: "reduce-scatter",
        ..all_to_all(dev, n, bytes, inter_node)
    }
}

/// One all-to-all of `bytes` per rank over `n` ranks: each rank sends (n-1)/n of its bytes.
pub fn all_to_all(dev: &Device, n: usize, bytes: f64, inter_node: bool) -> CollectiveCost {
    let m = &dev.nccl;
    let nf = n.max(1) as f64;
    if n > 1 && !inter_node && m.ring_busbw_gbs > 0.0 {
        return CollectiveCost {
            op: "all-to-all",
            algorithm: "p2p".into(),
            protocol: "Simple".into(),
            bytes,
            count: 1.0,
            seconds: m.ring_latency_us * 1e-6 + bytes * (nf - 1.0) / nf / (m.ring_busbw_gbs * 1e9),
        };
    }
    ring_of_messages("all-to-all", dev, n, bytes, inter_node, 1.0)
}

/// One send/recv of `bytes` between two ranks (a pipeline stage boundary).
pub fn send_recv(dev: &Device, bytes: f64, inter_node: bool) -> CollectiveCost {
    let m = &dev.nccl;
    if !inter_node && m.ring_busbw_gbs > 0.0 {
        return CollectiveCost {
            op: "send/recv",
            algorithm: "p2p".into(),
            protocol: "Simple".into(),
            bytes,
            count: 1.0,
            seconds: m.ring_latency_us * 1e-6 + bytes / (m.ring_busbw_gbs * 1e9),
        };
    }
    let (link, lat) = link(dev, inter_node);
    CollectiveCost {
        op: "send/recv",
        algorithm: if m.all_reduce.is_empty() {
            "tcp"
        } else {
            "p2p"
        }
        .into(),
        protocol: "-".into(),
        bytes,
        count: 1.0,
        seconds: bytes / link + lat,
    }
}

fn link(dev: &Device, inter_node: bool) -> (f64, f64) {
    if inter_node {
        (dev.inter_node_gbs * 1e9, dev.inter_node_latency_us * 1e-6)
    } else {
        (dev.intra_node_gbs * 1e9, dev.intra_node_latency_us * 1e-6)
    }
}

/// A ring of messages: `passes` x (n-1) messages of bytes/n each, every one paying the link
/// latency (the TCP collective, calibrated by `grokctl plan calibrate`, and the fallback for a
/// device without NCCL figures).
fn ring_of_messages(
    op: &'static str,
    dev: &Device,
    n: usize,
    bytes: f64,
    inter_node: bool,
    passes: f64,
) -> CollectiveCost {
    let (link, lat) = link(dev, inter_node);
    let nf = n.max(1) as f64;
    let seconds = if n > 1 {
        passes * (nf - 1.0) / nf * bytes / link + passes * (nf - 1.0) * lat
    } else {
        0.0
    };
    CollectiveCost {
        op,
        algorithm: if dev.nccl.all_reduce.is_empty() {
            "tcp"
        } else {
            "ring"
        }
        .into(),
        protocol: "-".into(),
        bytes,
        count: 1.0,
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Catalog;

    /// all_reduce_perf busbw (GB/s) at 1 KB, 2 KB, ... 8 GB (24 sizes, powers of two), the
    /// cited runs of the built-in catalog (Azure/AI-benchmarking-guide, Azure_Results).
    const H200_BUSBW: [f64; 24] = [
        0.06, 0.12, 0.23, 0.47, 0.93, 1.84, 3.72, 7.39, 14.75, 29.38, 52.96, 88.78, 138.44, 181.94,
        240.41, 300.91, 368.11, 412.45, 432.24, 442.72, 467.58, 472.57, 477.41, 479.98,
    ];
    const A100_BUSBW: [f64; 24] = [
        0.04, 0.08, 0.17, 0.33, 0.67, 1.37, 2.70, 5.15, 10.11, 19.24, 36.22, 53.54, 71.43, 89.99,
        109.22, 132.77, 166.63, 174.18, 213.87, 221.58, 228.10, 230.22, 230.48, 231.58,
    ];
    /// 2 x 8 H100 over GPUDirect-TCPXO: (bytes, out-of-place microseconds).
    const H100X16_US: [(f64, f64); 10] = [
        (8.0, 135.8),
        (1024.0, 147.1),
        (65536.0, 159.4),
        (262144.0, 167.1),
        (1048576.0, 203.2),
        (4194304.0, 364.6),
        (268435456.0, 2360.9),
        (1073741824.0, 6759.0),
        (4294967296.0, 24361.0),
        (8589934592.0, 47535.0),
    ];

    fn worst(dev: &str, n: usize, inter: bool, rows: &[(f64, f64)]) -> f64 {
        let d = Catalog::builtin().get(dev).unwrap().clone();
        rows.iter()
            .map(|&(bytes, us)| {
                let t = all_reduce(&d, n, bytes, inter).seconds * 1e6;
                (t - us).abs() / us
            })
            .fold(0.0, f64::max)
    }

    fn from_busbw(busbw: &[f64], n: usize) -> Vec<(f64, f64)> {
        let f = 2.0 * (n as f64 - 1.0) / n as f64;
        busbw
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let bytes = (1u64 << (10 + i)) as f64;
                (bytes, bytes * f / (b * 1e9) * 1e6)
            })
            .collect()
    }

    #[test]
    fn the_model_reproduces_its_cited_nccl_tests_runs_within_15_percent() {
        let e = worst("h200", 8, false, &from_busbw(&H200_BUSBW, 8));
        assert!(e < 0.15, "h200: {e}");
        let e = worst("a100-80gb", 8, false, &from_busbw(&A100_BUSBW, 8));
        assert!(e < 0.15, "a100-80gb: {e}");
        let e = worst("h100-sxm", 16, true, &H100X16_US);
        assert!(e < 0.15, "h100-sxm x 16: {e}");
    }

    #[test]
    fn nccl_picks_a_regime_by_size_and_cpu_hosts_keep_the_tcp_ring() {
        let cat = Catalog::builtin();
        let h = cat.get("h100-sxm").unwrap();
        // A decode all-reduce (one token of Grok-1: 6144 x 2 bytes) is latency-bound (LL);
        // a prefill chunk's (4096 tokens) runs on NVLS.
        let small = all_reduce(h, 8, 12288.0, false);
        assert_eq!(
            (small.algorithm.as_str(), small.protocol.as_str()),
            ("ring", "LL")
        );
        assert!(small.seconds < 35e-6, "{small:?}");
        let big = all_reduce(h, 8, 4096.0 * 12288.0, false);
        assert_eq!(big.algorithm, "nvls");
        // Across nodes it costs more; fewer ranks move fewer bytes.
        assert!(all_reduce(h, 16, 12288.0, true).seconds > small.seconds);
        assert!(all_reduce(h, 2, 4096.0 * 12288.0, false).seconds < big.seconds);
        // One rank: nothing to do.
        assert_eq!(all_reduce(h, 1, 1e6, false).seconds, 0.0);
        // The CPU host: the TCP ring of messages, 2(n-1) messages of the calibrated latency.
        let cpu = cat.get("cpu-host").unwrap();
        let c = all_reduce(cpu, 2, 8192.0, false);
        assert_eq!(c.algorithm, "tcp");
        let want = 8192.0 / (cpu.intra_node_gbs * 1e9) + 2.0 * cpu.intra_node_latency_us * 1e-6;
        assert!((c.seconds - want).abs() < 1e-12, "{c:?}");
        // All-to-all moves (n-1)/n of the bytes at the ring bandwidth.
        let a = all_to_all(h, 8, 1e8, false);
        assert!(
            (a.seconds - (29.7e-6 + 1e8 * 7.0 / 8.0 / 370e9)).abs() < 1e-9,
            "{a:?}"
        );
        assert!(send_recv(h, 1e8, false).seconds > 0.0);
        // All-gather and reduce-scatter put the same bytes on the wire as all-to-all.
        assert_eq!(all_gather(h, 8, 1e8, false).seconds, a.seconds);
        assert_eq!(reduce_scatter(h, 8, 1e8, false).op, "reduce-scatter");
        // Half the bus bandwidth of an all-reduce of the same bytes, at large sizes.
        let ar = all_reduce(h, 8, 1e9, false);
        assert!(ar.seconds > all_gather(h, 8, 1e9, false).seconds);
    }
}
