//! Prometheus metrics of the coordinator, rendered in the text exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Mean of the observations (0 before any).
    pub fn mean(&self) -> f64 {
        let n = self.count.load(Ordering::Relaxed);
        if n == 0 {
            return 0.0;
        }
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6 / n as f64
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// The coordinator's own time per step is microseconds to milliseconds.
const STEP_OVERHEAD_BOUNDS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
];

pub struct Metrics {
    /// Finished requests by outcome: stop, length, context_length, cancelled, error, rejected.
    pub requests: Mutex<BTreeMap<String, u64>>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    pub kv_used: AtomicU64,
    pub kv_free: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    /// Replica faults (a lost worker, a failed step), replicas back in service after one, the
    /// time from a fault's end (every worker back) to serving, and requests that resumed on a
    /// replica that came back.
    pub replica_faults: AtomicU64,
    pub recoveries: AtomicU64,
    pub recovery: Histogram,
    pub resumed: AtomicU64,
    /// The coordinator's own time per step (planning it, applying its result; not the
    /// workers'), and steps sent while another step of the replica was in flight (pipeline
    /// parallelism).
    pub coordinator_step: Histogram,
    pub pipelined_steps: AtomicU64,
    /// Prompt tokens taken from the prefix cache, and each replica's cached blocks.
    pub prefix_hit_tokens: AtomicU64,
    pub cached_blocks: Mutex<BTreeMap<usize, u64>>,
    /// Routed tokens per (layer, expert).
    pub expert_tokens: Mutex<Vec<u64>>,
    pub num_experts: usize,
    /// Token rows each rank's experts computed, per (global rank, expert).
    pub expert_served: Mutex<std::collections::BTreeMap<(usize, usize), u64>>,
}

impl Metrics {
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            ttft: Histogram::new(LATENCY_BOUNDS),
            itl: Histogram::new(LATENCY_BOUNDS),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            kv_used: AtomicU64::new(0),
            kv_free: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            replica_faults: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            recovery: Histogram::new(LATENCY_BOUNDS),
            resumed: AtomicU64::new(0),
            coordinator_step: Histogram::new(STEP_OVERHEAD_BOUNDS),
            pipelined_steps: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            cached_blocks: Mutex::new(BTreeMap::new()),
            expert_tokens: Mutex::new(vec![0; num_layers * num_experts]),
            num_experts,
            expert_served: Mutex::new(Default::default()),
        }
    }

    pub fn request_done(&self, outcome: &str) {
        *grok_shared::sync::lock(&self.requests)
            .entry(outcome.to_string())
            .or_default() += 1;
    }

    /// Records replica `r`'s number of cached blocks.
    pub fn set_cached_blocks(&self, r: usize, blocks: u64) {
        grok_shared::sync::lock(&self.cached_blocks).insert(r, blocks);
    }

    /// Adds the rows rank `rank` (global) computed per expert.
    pub fn add_expert_served(&self, rank: usize, served: &[u64]) {
        let mut m = grok_shared::sync::lock(&self.expert_served);
        for (e, &c) in served.iter().enumerate() {
            if c > 0 {
                *m.entry((rank, e)).or_insert(0) += c;
            }
        }
    }

    pub fn add_expert_counts(&self, first_layer: usize, counts: &[u64]) {
        let mut e = grok_shared::sync::lock(&self.expert_tokens);
        let off = first_layer * self.num_experts;
        for (i, c) in counts.iter().enumerate() {
            if let Some(slot) = e.get_mut(off + i) {
                *slot += c;
            }
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP grok_requests_total Finished requests by outcome.\n# TYPE grok_requests_total counter");
        for (k, v) in grok_shared::sync::lock(&self.requests).iter() {
            let _ = writeln!(o, "grok_requests_total{{outcome=\"{k}\"}} {v}");
        }
        self.ttft.render(
            "grok_time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            &mut o,
        );
        self.itl.render(
            "grok_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            &mut o,
        );
        self.recovery.render(
            "grok_recovery_seconds",
            "Time from a fault's end (every worker of the replica back) to the replica serving again.",
            &mut o,
        );
        self.coordinator_step.render(
            "grok_coordinator_step_seconds",
            "The coordinator's own time per step: planning it and applying its result (not the workers' time).",
            &mut o,
        );
        let gauges = [
            (
                "grok_queue_depth",
                "Requests waiting for admission.",
                &self.queue_depth,
            ),
            (
                "grok_running_sequences",
                "Sequences in the running batch.",
                &self.running,
            ),
            (
                "grok_kv_blocks_used",
                "KV cache blocks in use (per worker).",
                &self.kv_used,
            ),
            (
                "grok_kv_blocks_free",
                "KV cache blocks free (per worker).",
                &self.kv_free,
            ),
        ];
        for (n, h, v) in gauges {
            let _ = writeln!(
                o,
                "# HELP {n} {h}\n# TYPE {n} gauge\n{n} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let counters = [
            (
                "grok_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "grok_prompt_tokens_total",
                "Prompt tokens admitted.",
                &self.prompt_tokens,
            ),
            (
                "grok_preemptions_total",
                "Sequences preempted (recomputed later) for lack of KV blocks.",
                &self.preemptions,
            ),
            (
                "grok_replica_faults_total",
                "Replica faults: a lost worker or a failed step.",
                &self.replica_faults,
            ),
            (
                "grok_replica_recoveries_total",
                "Replicas serving again after a fault, with no operator action.",
                &self.recoveries,
            ),
            (
                "grok_resumed_requests_total",
                "Requests that waited out a fault and resumed on a replica serving again.",
                &self.resumed,
            ),
            (
                "grok_prefix_cache_hit_tokens_total",
                "Prompt tokens whose keys and values came from the prefix cache (hit rate: over grok_prompt_tokens_total).",
                &self.prefix_hit_tokens,
            ),
            (
                "grok_pipelined_steps_total",
                "Steps sent while another step of the same replica was in flight (pipeline parallelism).",
                &self.pipelined_steps,
            ),
        ];
        for (n, h, v) in counters {
            let _ = writeln!(
                o,
                "# HELP {n} {h}\n# TYPE {n} counter\n{n} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let cached: u64 = grok_shared::sync::lock(&self.cached_blocks).values().sum();
        let _ = writeln!(
            o,
            "# HELP grok_prefix_cache_blocks KV blocks in the prefix cache (all replicas).\n# TYPE grok_prefix_cache_blocks gauge\ngrok_prefix_cache_blocks {cached}"
        );
        let _ = writeln!(
            o,
            "# HELP grok_expert_routed_tokens_total Tokens routed to each expert of each layer.\n# TYPE grok_expert_routed_tokens_total counter"
        );
        let e = grok_shared::sync::lock(&self.expert_tokens);
        for (i, v) in e.iter().enumerate() {
            let _ = writeln!(
                o,
                "grok_expert_routed_tokens_total{{layer=\"{}\",expert=\"{}\"}} {v}",
                i / self.num_experts,
                i % self.num_experts
            );
        }
        let _ = writeln!(
            o,
            "# HELP grok_expert_served_tokens_total Token rows each rank's experts computed (over its layers): where expert work ran.\n# TYPE grok_expert_served_tokens_total counter"
        );
        for ((rank, e), v) in grok_shared::sync::lock(&self.expert_served).iter() {
            let _ = writeln!(
                o,
                "grok_expert_served_tokens_total{{rank=\"{rank}\",expert=\"{e}\"}} {v}"
            );
        }
        o
    }
}
