//! Capacity planning: for a model, a device from the hardware catalog, a cluster shape, a dtype,
//! a context length and a workload, every layout `(tp, ep, pp, replicas)` with its memory per
//! device, KV capacity, and a roofline prediction of TTFT, inter-token latency, throughput and
//! cost. Pure functions; no I/O except reading a catalog file.
//!
//! Memory accounting mirrors the loader exactly: the weight bytes of a rank are computed from the
//! same [`ShardSpec`] the worker loads, with the same element sizes (`bf16` 2 bytes; `int8` 1
//! byte plus f32 scales, `nb = 1` for q/k/v and `linear`/`linear_v`, `nb = 8` for the attention
//! output and `linear_1`, the embedding in bf16; `fp8` like int8; the router in f32; norms in
//! f32), so the planner and [`crate::model::Model::weight_bytes`] agree to the byte.
//!
//! Step time model (decode, one replica, batch `B`): per stage, `max(bytes / bandwidth, flops /
//! peak)` where bytes are the weights the step touches (attention, router, the experts that `B`
//! tokens are expected to hit, the output matrix on the sampling rank) plus the KV cache read,
//! and flops are `2 x touched parameters x B` plus attention; stages run one after the other (no
//! micro-batching), each boundary costs one send/recv; each layer costs two all-reduces of
//! `B x d_model` in bf16 over the tensor-parallel group: a ring, `2 (tp-1)/tp x bytes / link +
//! 2 (tp-1) x latency`. Prefill (TTFT) is the same with `B x prompt_len` rows (compute-bound).

use crate::config::ModelConfig;
use crate::model::ShardSpec;
use crate::sharding::Layout;
use serde::{Deserialize, Serialize};

/// The catalog shipped with the project.
pub const BUILTIN_CATALOG: &str = include_str!("../data/hardware.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    pub memory_gb: f64,
    pub mem_bw_gbs: f64,
    pub bf16_tflops: f64,
    pub fp8_tflops: f64,
    pub int8_tops: f64,
    pub intra_node_gbs: f64,
    pub intra_node_latency_us: f64,
    pub inter_node_gbs: f64,
    pub inter_node_latency_us: f64,
    pub price_per_hour: f64,
    pub max_per_node: usize,
    /// Fixed cost of one kernel launch / matmul call (optional; 0 when absent).
    #[serde(default)]
    pub launch_overhead_us: f64,
    /// Measured matmul throughput (bf16 weights, TFLOP/s) at `gemm_rows[i]` rows per call
    /// (`grokctl plan calibrate`); empty: the peak at any row count. A matmul with few rows
    /// (a decode batch, an expert's share of a prefill) reaches less than the peak.
    #[serde(default)]
    pub gemm_rows: Vec<f64>,
    #[serde(default)]
    pub gemm_tflops: Vec<f64>,
    /// Host time to sample one token, per logit of the vocabulary (softmax, log-probability,
    /// filtering on the sampling rank; optional, 0 when absent: negligible on a GPU).
    #[serde(default)]
    pub sample_ns_per_logit: f64,
}

impl Device {
    /// FLOP/s of one matmul call with `rows` rows, given the dtype's `peak`: the measured curve
    /// (linear between measured row counts, flat beyond them) scaled to that peak, else `peak`.
    pub fn matmul_rate(&self, peak: f64, rows: f64) -> f64 {
        let (r, t) = (&self.gemm_rows, &self.gemm_tflops);
        if r.is_empty() || r.len() != t.len() || self.bf16_tflops <= 0.0 {
            return peak;
        }
        let scale = peak / (self.bf16_tflops * 1e12);
        let at = if rows <= r[0] {
            t[0]
        } else if rows >= r[r.len() - 1] {
            t[t.len() - 1]
        } else {
            let i = r.iter().position(|&x| x >= rows).unwrap_or(r.len() - 1);
            let f = (rows - r[i - 1]) / (r[i] - r[i - 1]);
            t[i - 1] + f * (t[i] - t[i - 1])
        };
        at * 1e12 * scale
    }
}

#[derive(Debug, Deserialize)]
struct CatalogFile {
    device: Vec<Device>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read catalog {path}: {why}")]
    Catalog { path: String, why: String },
    #[error("unknown device `{name}` (known: {known})")]
    UnknownDevice { name: String, known: String },
    #[error("invalid plan input: {0}")]
    Input(String),
}

/// The hardware catalog: built-in entries, optionally extended or overridden by a user file.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub devices: Vec<Device>,
}

impl Catalog {
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_CATALOG, "built-in").expect("the built-in catalog parses")
    }

    pub fn parse(text: &str, what: &str) -> Result<Self, PlanError> {
        let f: CatalogFile = toml::from_str(text).map_err(|e| PlanError::Catalog {
            path: what.into(),
            why: e.to_string(),
        })?;
        for d in &f.device {
            if !(d.memory_gb > 0.0
                && d.mem_bw_gbs > 0.0
                && d.bf16_tflops > 0.0
                && d.max_per_node > 0)
            {
                return Err(PlanError::Catalog {
                    path: what.into(),
                    why: format!("device `{}` needs positive memory_gb, mem_bw_gbs, bf16_tflops and max_per_node", d.name),
                });
            }
        }
        Ok(Self { devices: f.device })
    }

    /// Adds (or replaces by name) the entries of `other`.
    pub fn extend(&mut self, other: Catalog) {
        for d in other.devices {
            self.devices.retain(|x| x.name != d.name);
            self.devices.push(d);
        }
    }

    pub fn get(&self, name: &str) -> Result<&Device, PlanError> {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| PlanError::UnknownDevice {
                name: name.into(),
                known: self
                    .devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Weight storage of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PlanDType {
    F32,
    Bf16,
    Int8,
    Fp8,
}

impl std::str::FromStr for PlanDType {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        Ok(match s {
            "f32" => Self::F32,
            "bf16" => Self::Bf16,
            "int8" => Self::Int8,
            "fp8" => Self::Fp8,
            o => {
                return Err(PlanError::Input(format!(
                    "unknown dtype `{o}` (f32, bf16, int8, fp8)"
                )))
            }
        })
    }
}

impl PlanDType {
    fn quantized(self) -> bool {
        matches!(self, Self::Int8 | Self::Fp8)
    }
    /// Bytes per element of a layer matrix.
    fn matrix_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
            Self::Int8 | Self::Fp8 => 1,
        }
    }
    /// Bytes per element of the embedding / output matrix.
    fn embed_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }
    /// Peak dense throughput on `d` for this dtype's matmuls, FLOP/s.
    fn peak(self, d: &Device) -> f64 {
        let t = match self {
            Self::F32 | Self::Bf16 => d.bf16_tflops,
            // Weight-only int8 computes in bf16 (dequantized in registers).
            Self::Int8 => d.bf16_tflops,
            Self::Fp8 => {
                if d.fp8_tflops > 0.0 {
                    d.fp8_tflops
                } else {
                    d.bf16_tflops
                }
            }
        };
        t * 1e12
    }
}

/// Bytes of a `[rows, cols]` matrix slice of a `[out, in]` weight whose int8 scales have `nb`
/// blocks along `in`, exactly as the loader holds it.
fn matrix(dt: PlanDType, rows: u64, cols: u64, full_in: u64, nb: u64, col_start: u64) -> u64 {
    let mut b = rows * cols * dt.matrix_bytes();
    if dt.quantized() {
        let bs = full_in / nb;
        let new_nb = if col_start.is_multiple_of(bs) && cols.is_multiple_of(bs) {
            cols / bs
        } else {
            1
        };
        b += 4 * new_nb * rows;
    }
    b
}

/// Weight bytes the loader holds for `shard` (norms, router and embedding included).
pub fn shard_weight_bytes(c: &ModelConfig, dt: PlanDType, s: &ShardSpec) -> u64 {
    let d = c.emb_size as u64;
    let ks = c.key_size as u64;
    let mut b = 0u64;
    if s.embed || s.logits {
        b += c.vocab_size as u64 * d * dt.embed_bytes();
    }
    if s.logits {
        b += 4 * d;
    }
    let nq = s.q_heads.len() as u64 * ks;
    let nkv = s.kv_heads.len() as u64 * ks;
    let nb_o = if c.q_size().is_multiple_of(8) { 8 } else { 1 };
    let nb_d = if c.ffn_size.is_multiple_of(8) { 8 } else { 1 };
    for _ in s.layers.clone() {
        b += 4 * 4 * d; // norms
        b += matrix(dt, nq, d, d, 1, 0) + 2 * matrix(dt, nkv, d, d, 1, 0);
        b += matrix(
            dt,
            d,
            nq,
            c.q_size() as u64,
            nb_o,
            s.q_heads.start as u64 * ks,
        );
        b += 4 * c.num_experts as u64 * d; // router
        for (_, f) in &s.experts {
            let fl = f.len() as u64;
            b += 2 * matrix(dt, fl, d, d, 1, 0);
            b += matrix(dt, d, fl, c.ffn_size as u64, nb_d, f.start as u64);
        }
    }
    b
}

/// What to plan for.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub device: Device,
    pub gpus_per_node: usize,
    pub nodes: usize,
    pub dtype: PlanDType,
    pub context: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// Sequences in flight across the cluster.
    pub concurrency: usize,
    pub ttft_slo_ms: Option<f64>,
    pub itl_slo_ms: Option<f64>,
    /// Fraction of device memory usable (the rest: runtime, fragmentation).
    pub memory_utilization: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayoutPlan {
    pub tp: usize,
    pub ep: usize,
    pub pp: usize,
    pub replicas: usize,
    pub fits: bool,
    pub weight_bytes_per_gpu: u64,
    pub kv_bytes_per_token_per_gpu: u64,
    pub workspace_bytes_per_gpu: u64,
    pub kv_capacity_tokens: u64,
    pub kv_capacity_sequences: u64,
    /// Bytes missing per device when it does not fit.
    pub shortfall_bytes_per_gpu: u64,
    pub batch_per_replica: usize,
    pub ttft_ms: f64,
    pub itl_ms: f64,
    pub output_tokens_per_s: f64,
    pub cost_per_million_output_tokens: f64,
    pub meets_slo: bool,
    /// What bounds the decode step: memory, compute, links.
    pub decode_bound: String,
    pub notes: Vec<String>,
}

/// Time of one forward step of `rows` new tokens per sequence for `batch` sequences attending to
/// `ctx` positions, and what bounds it.
fn step_time(
    c: &ModelConfig,
    dt: PlanDType,
    dev: &Device,
    layout: &Layout,
    gpus_per_node: usize,
    batch: f64,
    rows: f64,
    ctx: f64,
) -> (f64, &'static str) {
    let bw = dev.mem_bw_gbs * 1e9;
    let peak = dt.peak(dev);
    let tokens = batch * rows;
    let (tp, ep, pp) = (layout.tp as f64, layout.ep as f64, layout.pp as f64);
    let d = c.emb_size as f64;
    let e = c.num_experts as f64;
    let k = c.num_selected_experts as f64;
    let wb = dt.matrix_bytes() as f64;
    let layers_per_stage = (c.num_layers as f64 / pp).ceil();
    // Per rank, per layer.
    let attn_params = (2.0 * d * c.q_size() as f64 + 2.0 * d * c.kv_size() as f64) / tp;
    let expert_params = 3.0 * d * c.ffn_size as f64 / (tp / ep); // one local expert slice
    let local_experts = e / ep;
    let p_hit = 1.0 - (1.0 - k / e).powf(tokens);
    let touched_experts = local_experts * p_hit;
    let kv_per_token_layer = 2.0 * (c.kv_size() as f64 / tp).max(c.key_size as f64) * 2.0; // bf16
    let bytes_layer =
        attn_params * wb + touched_experts * expert_params * wb + batch * ctx * kv_per_token_layer;
    // Each token runs k experts; a given expert is local to this rank with probability 1/ep.
    let flops_layer = 2.0 * tokens * (attn_params + k / ep * expert_params)
        + 4.0 * tokens * ctx * (c.q_size() as f64 / tp);
    let t_mem = layers_per_stage * bytes_layer / bw;
    let t_cmp = layers_per_stage * flops_layer / peak;
    // Call by call: the projections see every token, a touched expert only its share of them
    // (tokens x k / experts, given that it is touched), and a call with few rows reaches less
    // than the peak (the device's measured curve). Each call streams its weights or computes,
    // whichever is slower; the KV cache streams once.
    let expert_rows = (tokens * k / e / p_hit.max(1e-9)).max(1.0);
    let t_attn_call =
        (attn_params * wb / bw).max(2.0 * tokens * attn_params / dev.matmul_rate(peak, tokens));
    let t_expert_call = (expert_params * wb / bw)
        .max(2.0 * expert_rows * expert_params / dev.matmul_rate(peak, expert_rows));
    let t_core = 4.0 * tokens * ctx * (c.q_size() as f64 / tp) / dev.matmul_rate(peak, tokens);
    let t_calls_layer = t_attn_call
        + touched_experts * t_expert_call
        + t_core
        + batch * ctx * kv_per_token_layer / bw;
    let t_layers = (layers_per_stage * t_calls_layer).max(t_mem.max(t_cmp));
    // Output projection on the sampling rank.
    let out_bytes = c.vocab_size as f64 * d * dt.embed_bytes() as f64;
    let t_out = (out_bytes / bw)
        .max(2.0 * batch * c.vocab_size as f64 * d / dev.matmul_rate(peak, batch))
        + batch * c.vocab_size as f64 * dev.sample_ns_per_logit * 1e-9;
    // Collectives: two all-reduces per layer over tp, one send/recv per stage boundary.
    let (link, lat) = if layout.tp <= gpus_per_node {
        (dev.intra_node_gbs * 1e9, dev.intra_node_latency_us * 1e-6)
    } else {
        (dev.inter_node_gbs * 1e9, dev.inter_node_latency_us * 1e-6)
    };
    let ar_bytes = tokens * d * 2.0;
    let t_ar = if layout.tp > 1 {
        2.0 * (tp - 1.0) / tp * ar_bytes / link + 2.0 * (tp - 1.0) * lat
    } else {
        0.0
    };
    let t_coll = 2.0 * c.num_layers as f64 * t_ar;
    let (plink, plat) = if layout.tp * layout.pp <= gpus_per_node {
        (dev.intra_node_gbs * 1e9, dev.intra_node_latency_us * 1e-6)
    } else {
        (dev.inter_node_gbs * 1e9, dev.inter_node_latency_us * 1e-6)
    };
    let t_p2p = (pp - 1.0) * (ar_bytes / plink + plat);
    // Fixed cost per matmul call: q, k, v, o, router, and three per touched expert.
    let calls = layers_per_stage * (5.0 + 3.0 * touched_experts) + 1.0;
    let t_calls = calls * dev.launch_overhead_us * 1e-6;
    let t_compute = pp * (t_layers + t_calls) + t_out;
    let total = t_compute + t_coll + t_p2p;
    let bound = if t_coll + t_p2p > t_compute {
        "links"
    } else if t_cmp > t_mem {
        "compute"
    } else {
        "memory bandwidth"
    };
    (total, bound)
}

/// Every layout of the cluster, best first: fitting layouts that meet the SLO by cost per
/// million output tokens, then the others.
pub fn plan(c: &ModelConfig, p: &PlanInput) -> Result<Vec<LayoutPlan>, PlanError> {
    if p.nodes == 0 || p.gpus_per_node == 0 {
        return Err(PlanError::Input(
            "nodes and gpus per node must be at least 1".into(),
        ));
    }
    if p.gpus_per_node > p.device.max_per_node {
        return Err(PlanError::Input(format!(
            "{} holds at most {} devices per node, not {}",
            p.device.name, p.device.max_per_node, p.gpus_per_node
        )));
    }
    if p.context == 0 || p.context > c.max_position_embeddings {
        return Err(PlanError::Input(format!(
            "context {} must be between 1 and the model's {}",
            p.context, c.max_position_embeddings
        )));
    }
    if p.prompt_len + p.gen_len > p.context {
        return Err(PlanError::Input(format!(
            "prompt ({}) + output ({}) tokens exceed the context {}",
            p.prompt_len, p.gen_len, p.context
        )));
    }
    if p.concurrency == 0 {
        return Err(PlanError::Input("concurrency must be at least 1".into()));
    }
    let n = p.gpus_per_node * p.nodes;
    let mem = p.device.memory_gb * 1e9 * p.memory_utilization;
    let mut out = Vec::new();
    for replicas in 1..=n {
        if !n.is_multiple_of(replicas) {
            continue;
        }
        for mut l in Layout::candidates(c, n / replicas) {
            l.replicas = replicas;
            let world = l.world_size();
            let weights = (0..world)
                .map(|r| shard_weight_bytes(c, p.dtype, &l.shard(c, r)))
                .max()
                .unwrap_or(0);
            let stage_layers = (0..l.pp)
                .map(|s| l.stage_layers(c, s).len())
                .max()
                .unwrap_or(0) as u64;
            let kv_heads_local = (c.num_kv_heads / l.tp).max(1) as u64;
            let kv_tok = stage_layers * 2 * kv_heads_local * c.key_size as u64 * 2;
            let batch = p.concurrency.div_ceil(replicas).max(1);
            // Activations of a prefill chunk of the prompt, plus a fixed runtime workspace.
            let workspace = (p.prompt_len.min(8192) as u64)
                * (c.emb_size as u64 * 16 + c.ffn_size as u64 / l.tp as u64 * 8)
                + (1u64 << 30);
            let free = mem - weights as f64 - workspace as f64;
            let kv_tokens = if free > 0.0 {
                (free / kv_tok as f64) as u64
            } else {
                0
            };
            let need_tokens = (batch * (p.prompt_len + p.gen_len)) as u64;
            let fits = free > 0.0 && kv_tokens >= (p.prompt_len + p.gen_len) as u64;
            let shortfall = if fits {
                0
            } else {
                ((weights + workspace + kv_tok * (p.prompt_len + p.gen_len) as u64) as f64 - mem)
                    .max(0.0) as u64
            };
            let mut notes = Vec::new();
            // The batch a replica can hold in its KV cache.
            let b_eff = if kv_tokens < need_tokens {
                let b = (kv_tokens / (p.prompt_len + p.gen_len) as u64).max(1) as usize;
                if fits {
                    notes.push(format!(
                        "KV cache holds {b} of the {batch} sequences per replica; the rest queue"
                    ));
                }
                b.min(batch)
            } else {
                batch
            };
            let ctx_mid = p.prompt_len as f64 + p.gen_len as f64 / 2.0;
            let (itl, bound) = step_time(
                c,
                p.dtype,
                &p.device,
                &l,
                p.gpus_per_node,
                b_eff as f64,
                1.0,
                ctx_mid,
            );
            let (ttft, _) = step_time(
                c,
                p.dtype,
                &p.device,
                &l,
                p.gpus_per_node,
                1.0,
                p.prompt_len as f64,
                p.prompt_len as f64 / 2.0,
            );
            let tps = replicas as f64 * b_eff as f64 / itl;
            let cost = n as f64 * p.device.price_per_hour / (tps * 3600.0) * 1e6;
            let meets = fits
                && p.ttft_slo_ms.is_none_or(|s| ttft * 1e3 <= s)
                && p.itl_slo_ms.is_none_or(|s| itl * 1e3 <= s);
            if l.tp > p.gpus_per_node {
                notes.push(
                    "tensor parallelism crosses nodes: all-reduces go over the network".into(),
                );
            }
            out.push(LayoutPlan {
                tp: l.tp,
                ep: l.ep,
                pp: l.pp,
                replicas,
                fits,
                weight_bytes_per_gpu: weights,
                kv_bytes_per_token_per_gpu: kv_tok,
                workspace_bytes_per_gpu: workspace,
                kv_capacity_tokens: kv_tokens,
                kv_capacity_sequences: kv_tokens / p.context as u64,
                shortfall_bytes_per_gpu: shortfall,
                batch_per_replica: b_eff,
                ttft_ms: ttft * 1e3,
                itl_ms: itl * 1e3,
                output_tokens_per_s: tps,
                cost_per_million_output_tokens: cost,
                meets_slo: meets,
                decode_bound: bound.into(),
                notes,
            });
        }
    }
    out.sort_by(|a, b| {
        (b.meets_slo, b.fits)
            .cmp(&(a.meets_slo, a.fits))
            .then(
                a.cost_per_million_output_tokens
                    .partial_cmp(&b.cost_per_million_output_tokens)
                    .unwrap_or(std::cmp::Ordering::Equal),
            )
            .then(a.shortfall_bytes_per_gpu.cmp(&b.shortfall_bytes_per_gpu))
    });
    Ok(out)
}

/// A few sentences on why the first layout wins and what limits it.
pub fn explain(c: &ModelConfig, p: &PlanInput, plans: &[LayoutPlan]) -> String {
    let Some(best) = plans.first() else {
        return "no layout divides this model over this cluster".into();
    };
    let gb = |b: u64| b as f64 / 1e9;
    let mut s = String::new();
    if !best.fits {
        s += &format!(
            "Nothing fits: the best layout (tp={} ep={} pp={}) is {:.1} GB per device short on {} x {} ({:.0} GB each). ",
            best.tp, best.ep, best.pp, gb(best.shortfall_bytes_per_gpu), p.nodes * p.gpus_per_node, p.device.name, p.device.memory_gb
        );
        let total_w = shard_weight_bytes(c, p.dtype, &ShardSpec::full(c));
        let need = (total_w as f64 / (p.device.memory_gb * 1e9 * p.memory_utilization * 0.85))
            .ceil() as usize;
        s += &format!(
            "The weights alone are {:.0} GB in {:?}; about {need} devices of this kind would hold them with room for KV cache{}.",
            gb(total_w),
            p.dtype,
            if p.dtype == PlanDType::Bf16 || p.dtype == PlanDType::F32 { ", or use int8 (half the bytes)" } else { "" }
        );
        return s;
    }
    s += &format!(
        "tp={} ep={} pp={} with {} replica(s) wins at ${:.2} per million output tokens: {:.1} GB of weights per device leaves room for {} tokens of KV cache ({} full-context sequences). ",
        best.tp, best.ep, best.pp, best.replicas, best.cost_per_million_output_tokens, gb(best.weight_bytes_per_gpu), best.kv_capacity_tokens, best.kv_capacity_sequences
    );
    s += &format!(
        "A decode step of {} sequences takes {:.1} ms and is bound by {}; ",
        best.batch_per_replica, best.itl_ms, best.decode_bound
    );
    s += &format!(
        "prefill of {} tokens takes {:.0} ms. ",
        p.prompt_len, best.ttft_ms
    );
    if let Some(other) = plans.iter().skip(1).find(|x| x.fits) {
        s += &format!(
            "The next fitting layout (tp={} ep={} pp={} x{}) costs ${:.2}.",
            other.tp, other.ep, other.pp, other.replicas, other.cost_per_million_output_tokens
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measured_matmul_curve_slows_calls_with_few_rows() {
        let mut d = Catalog::builtin().get("h100-sxm").unwrap().clone();
        let peak = d.bf16_tflops * 1e12;
        // No curve: the peak whatever the rows.
        assert_eq!(d.matmul_rate(peak, 1.0), peak);
        d.bf16_tflops = 0.1;
        d.gemm_rows = vec![1.0, 8.0, 32.0];
        d.gemm_tflops = vec![0.02, 0.06, 0.1];
        let r = |rows: f64| d.matmul_rate(0.1e12, rows) / 1e12;
        assert!((r(1.0) - 0.02).abs() < 1e-12 && (r(0.5) - 0.02).abs() < 1e-12);
        assert!((r(4.5) - 0.04).abs() < 1e-12, "{}", r(4.5));
        assert!((r(64.0) - 0.1).abs() < 1e-12);
        // Scaled to another dtype's peak (e.g. fp8 at twice the bf16 rate).
        assert!((d.matmul_rate(0.2e12, 8.0) / 1e12 - 0.12).abs() < 1e-12);
        // A prefill whose experts see few rows each takes longer than at the flat peak.
        let c = ModelConfig::preset("small", None).unwrap();
        let l = Layout::new(1, 1, 1);
        let flat = Device {
            gemm_rows: vec![],
            gemm_tflops: vec![],
            ..d.clone()
        };
        let slow = step_time(&c, PlanDType::Bf16, &d, &l, 1, 1.0, 32.0, 32.0).0;
        let fast = step_time(&c, PlanDType::Bf16, &flat, &l, 1, 1.0, 32.0, 32.0).0;
        assert!(slow > 1.2 * fast, "{slow} vs {fast}");
    }

    fn input(dev: &str, gpn: usize, nodes: usize, dt: PlanDType) -> PlanInput {
        PlanInput {
            device: Catalog::builtin().get(dev).unwrap().clone(),
            gpus_per_node: gpn,
            nodes,
            dtype: dt,
            context: 8192,
            prompt_len: 1000,
            gen_len: 200,
            concurrency: 64,
            ttft_slo_ms: None,
            itl_slo_ms: None,
            memory_utilization: 0.9,
        }
    }

    #[test]
    fn grok1_facts() {
        let c = ModelConfig::grok1();
        assert_eq!(c.num_params(), 315_684_820_992);
        let full = ShardSpec::full(&c);
        let int8 = shard_weight_bytes(&c, PlanDType::Int8, &full) as f64 / 1e9;
        let bf16 = shard_weight_bytes(&c, PlanDType::Bf16, &full) as f64 / 1e9;
        assert!((315.0..320.0).contains(&int8), "{int8}");
        assert!((628.0..634.0).contains(&bf16), "{bf16}");
        // 256 KiB of bf16 KV per token for the whole model (tp=1, pp=1).
        let p = plan(&c, &input("h200", 8, 1, PlanDType::Bf16)).unwrap();
        let one = p.iter().find(|x| x.tp == 8 && x.pp == 1).unwrap();
        assert_eq!(one.kv_bytes_per_token_per_gpu * 8, 256 * 1024);
        // bf16 does not fit on 8 x 80 GB; int8 does; bf16 fits on 8 x H200.
        assert!(plan(&c, &input("h100-sxm", 8, 1, PlanDType::Bf16))
            .unwrap()
            .iter()
            .all(|x| !x.fits));
        assert!(plan(&c, &input("h100-sxm", 8, 1, PlanDType::Int8)).unwrap()[0].fits);
        assert!(plan(&c, &input("h200", 8, 1, PlanDType::Bf16)).unwrap()[0].fits);
        // bf16 on two 8 x H100 nodes fits with pipeline stages.
        let two = plan(&c, &input("h100-sxm", 8, 2, PlanDType::Bf16)).unwrap();
        assert!(two[0].fits && two[0].pp * two[0].tp * two[0].replicas == 16);
    }

    #[test]
    fn never_offers_layouts_that_break_divisibility() {
        let c = ModelConfig::grok1();
        for x in plan(&c, &input("h100-sxm", 6, 1, PlanDType::Int8)).unwrap() {
            Layout {
                tp: x.tp,
                ep: x.ep,
                pp: x.pp,
                replicas: x.replicas,
            }
            .validate(&c)
            .unwrap();
            assert_eq!(c.num_q_heads % x.tp, 0);
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let c = ModelConfig::grok1();
        assert!(matches!(
            Catalog::builtin().get("tpu-v5"),
            Err(PlanError::UnknownDevice { .. })
        ));
        assert!(plan(
            &c,
            &PlanInput {
                nodes: 0,
                ..input("h100-sxm", 8, 1, PlanDType::Int8)
            }
        )
        .is_err());
        let e = plan(
            &c,
            &PlanInput {
                context: 9000,
                ..input("h100-sxm", 8, 1, PlanDType::Int8)
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("context 9000"), "{e}");
        assert!(plan(
            &c,
            &PlanInput {
                gpus_per_node: 9,
                ..input("h100-sxm", 8, 1, PlanDType::Int8)
            }
        )
        .is_err());
    }

    #[test]
    fn user_catalog_extends_the_builtin() {
        let mut cat = Catalog::builtin();
        let user = Catalog::parse(
            "[[device]]\nname = \"my-gpu\"\nmemory_gb = 96\nmem_bw_gbs = 4000\nbf16_tflops = 900\nfp8_tflops = 0\nint8_tops = 0\nintra_node_gbs = 400\nintra_node_latency_us = 5\ninter_node_gbs = 50\ninter_node_latency_us = 10\nprice_per_hour = 2.5\nmax_per_node = 8\n",
            "user",
        )
        .unwrap();
        cat.extend(user);
        assert_eq!(cat.get("my-gpu").unwrap().memory_gb, 96.0);
        assert!(Catalog::parse("[[device]]\nname = 3", "bad").is_err());
    }
}

/// The roofline step-time model of one replica, for the simulator and the validation.
pub struct StepModel<'a> {
    pub model: &'a ModelConfig,
    pub dtype: PlanDType,
    pub device: &'a Device,
    pub layout: Layout,
    pub gpus_per_node: usize,
}

impl StepModel<'_> {
    /// Seconds for one step running `tokens` new tokens over `seqs` sequences whose KV caches
    /// hold about `ctx` positions each.
    pub fn time(&self, seqs: f64, tokens: f64, ctx: f64) -> f64 {
        let seqs = seqs.max(1.0);
        step_time(
            self.model,
            self.dtype,
            self.device,
            &self.layout,
            self.gpus_per_node,
            seqs,
            tokens / seqs,
            ctx,
        )
        .0
    }
}

/// A request trace and the scheduler's limits for [`simulate`].
#[derive(Clone, Debug)]
pub struct SimInput {
    /// Poisson arrivals per second (whole cluster).
    pub rate: f64,
    pub requests: usize,
    /// Prompt and output lengths are uniform in `[min, max]`.
    pub prompt_len: (usize, usize),
    pub gen_len: (usize, usize),
    pub max_seqs: usize,
    pub max_batch_tokens: usize,
    pub kv_capacity_tokens: u64,
    pub ttft_slo_ms: f64,
    pub itl_slo_ms: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SimResult {
    pub replicas: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    /// Requests per second that met both objectives.
    pub goodput_rps: f64,
    pub slo_attainment: f64,
    pub output_tokens_per_s: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// Discrete-event simulation of the engine's policy (FCFS admission by KV capacity and
/// running-sequence cap, decode first then chunked prefill under the token budget) on
/// `replicas` identical replicas sharing the arrivals round-robin.
pub fn simulate(m: &StepModel, s: &SimInput, replicas: usize) -> SimResult {
    struct Req {
        arrive: f64,
        prompt: usize,
        gen: usize,
        done_prompt: usize,
        out: usize,
        first: Option<f64>,
        last: f64,
        itl_max: f64,
        itls: Vec<f64>,
    }
    let mut rng = crate::sampling::Rng::new(s.seed);
    let uni = |rng: &mut crate::sampling::Rng, (a, b): (usize, usize)| {
        a + (rng.next_u64() % ((b - a + 1) as u64)) as usize
    };
    let mut t = 0.0;
    let mut per_replica: Vec<Vec<Req>> = (0..replicas).map(|_| Vec::new()).collect();
    for i in 0..s.requests {
        t += -(1.0 - rng.next_f64()).ln() / s.rate;
        let (p, g) = (uni(&mut rng, s.prompt_len), uni(&mut rng, s.gen_len));
        per_replica[i % replicas].push(Req {
            arrive: t,
            prompt: p,
            gen: g,
            done_prompt: 0,
            out: 0,
            first: None,
            last: 0.0,
            itl_max: 0.0,
            itls: vec![],
        });
    }
    let mut all: Vec<Req> = Vec::new();
    let mut end_time: f64 = 0.0;
    for reqs in per_replica {
        let mut queue: std::collections::VecDeque<Req> = reqs.into();
        let mut running: Vec<Req> = Vec::new();
        let mut now = 0.0f64;
        while !queue.is_empty() || !running.is_empty() {
            if running.is_empty() {
                if let Some(r) = queue.front() {
                    now = now.max(r.arrive);
                }
            }
            // Admit.
            let used: u64 = running.iter().map(|r| (r.prompt + r.gen) as u64).sum();
            let mut budget = s.max_batch_tokens;
            let mut tokens = 0usize;
            for r in running.iter() {
                let n = if r.done_prompt < r.prompt {
                    (r.prompt - r.done_prompt).min(budget)
                } else {
                    1.min(budget)
                };
                budget -= n;
                tokens += n;
            }
            let mut used = used;
            while let Some(r) = queue.front() {
                if r.arrive > now
                    || running.len() >= s.max_seqs
                    || budget == 0
                    || used + (r.prompt + r.gen) as u64 > s.kv_capacity_tokens
                {
                    break;
                }
                let r = queue.pop_front().expect("front");
                used += (r.prompt + r.gen) as u64;
                let n = r.prompt.min(budget);
                budget -= n;
                tokens += n;
                running.push(r);
            }
            if running.is_empty() {
                // Waiting for the next arrival.
                if let Some(r) = queue.front() {
                    now = now.max(r.arrive);
                }
                continue;
            }
            let ctx = running
                .iter()
                .map(|r| (r.done_prompt + r.out) as f64)
                .sum::<f64>()
                / running.len() as f64;
            let dt = m.time(running.len() as f64, tokens.max(1) as f64, ctx.max(1.0));
            now += dt;
            // Apply: same order and budget as above.
            let mut budget = s.max_batch_tokens;
            let mut finished = vec![];
            for (i, r) in running.iter_mut().enumerate() {
                if budget == 0 {
                    break;
                }
                if r.done_prompt < r.prompt {
                    let n = (r.prompt - r.done_prompt).min(budget);
                    r.done_prompt += n;
                    budget -= n;
                    if r.done_prompt < r.prompt {
                        continue;
                    }
                } else {
                    budget -= 1;
                }
                // A token is sampled.
                r.out += 1;
                match r.first {
                    None => r.first = Some(now),
                    Some(_) => {
                        let d = now - r.last;
                        r.itls.push(d);
                        r.itl_max = r.itl_max.max(d);
                    }
                }
                r.last = now;
                if r.out >= r.gen {
                    finished.push(i);
                }
            }
            for i in finished.into_iter().rev() {
                all.push(running.remove(i));
            }
        }
        end_time = end_time.max(now);
    }
    let mut ttft: Vec<f64> = all
        .iter()
        .map(|r| r.first.unwrap_or(r.last) - r.arrive)
        .collect();
    let mut itl: Vec<f64> = all.iter().flat_map(|r| r.itls.iter().copied()).collect();
    let good = all
        .iter()
        .filter(|r| {
            (r.first.unwrap_or(r.last) - r.arrive) * 1e3 <= s.ttft_slo_ms
                && r.itl_max * 1e3 <= s.itl_slo_ms
        })
        .count();
    let out_tokens: usize = all.iter().map(|r| r.out).sum();
    SimResult {
        replicas,
        ttft_p50_ms: pct(&mut ttft, 50.0) * 1e3,
        ttft_p99_ms: pct(&mut ttft, 99.0) * 1e3,
        itl_p50_ms: pct(&mut itl, 50.0) * 1e3,
        itl_p99_ms: pct(&mut itl, 99.0) * 1e3,
        goodput_rps: good as f64 / end_time.max(1e-9),
        slo_attainment: good as f64 / all.len().max(1) as f64,
        output_tokens_per_s: out_tokens as f64 / end_time.max(1e-9),
    }
}

#[cfg(test)]
mod sim_tests {
    use super::*;

    #[test]
    fn more_load_means_more_latency_and_replicas_help() {
        let c = ModelConfig::grok1();
        let dev = Catalog::builtin().get("h100-sxm").unwrap().clone();
        let m = StepModel {
            model: &c,
            dtype: PlanDType::Int8,
            device: &dev,
            layout: Layout::new(8, 8, 1),
            gpus_per_node: 8,
        };
        let base = SimInput {
            rate: 2.0,
            requests: 300,
            prompt_len: (200, 1000),
            gen_len: (50, 200),
            max_seqs: 64,
            max_batch_tokens: 2048,
            kv_capacity_tokens: 800_000,
            ttft_slo_ms: 1000.0,
            itl_slo_ms: 100.0,
            seed: 1,
        };
        let light = simulate(&m, &base, 1);
        let heavy = simulate(
            &m,
            &SimInput {
                rate: 40.0,
                ..base.clone()
            },
            1,
        );
        assert!(heavy.ttft_p99_ms > light.ttft_p99_ms, "{heavy:?} {light:?}");
        assert!(heavy.itl_p50_ms >= light.itl_p50_ms);
        let two = simulate(
            &m,
            &SimInput {
                rate: 40.0,
                ..base.clone()
            },
            2,
        );
        assert!(two.ttft_p99_ms < heavy.ttft_p99_ms);
        assert!(light.slo_attainment > 0.9, "{light:?}");
        // Deterministic for a seed.
        assert_eq!(
            format!("{:?}", simulate(&m, &base, 1)),
            format!("{light:?}")
        );
    }
}
