//! What one replica holds and how long its steps take: the weight bytes of each rank (the
//! loader's own accounting) and the roofline step-time model.

use super::catalog::{Device, PlanDType};
use super::collective::{self, CollectiveCost};
use crate::config::ModelConfig;
use crate::model::ShardSpec;
use crate::sharding::Layout;
use serde::Serialize;

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

/// One step's time split by what it spends it on (seconds; the parts add up to `total`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepBreakdown {
    /// Streaming (or multiplying by) the weights: projections, touched experts, output matrix.
    pub weights: f64,
    /// Attention over the KV cache: reading it and the score arithmetic.
    pub kv: f64,
    /// Collectives, each with the algorithm the model picks for it.
    pub collectives: Vec<CollectiveCost>,
    pub collectives_total: f64,
    /// Sampling on the sampling rank (host time per logit).
    pub sampling: f64,
    /// Fixed cost per kernel launch / matmul call.
    pub overhead: f64,
    pub total: f64,
    /// "memory bandwidth", "compute" or "links".
    pub bound: &'static str,
}

/// Time of one forward step of `rows` new tokens per sequence for `batch` sequences attending to
/// `ctx` positions, and what bounds it.
pub(super) fn step_time(
    c: &ModelConfig,
    dt: PlanDType,
    dev: &Device,
    layout: &Layout,
    gpus_per_node: usize,
    batch: f64,
    rows: f64,
    ctx: f64,
) -> (f64, &'static str) {
    let b = step_breakdown(c, dt, dev, layout, gpus_per_node, batch, rows, ctx);
    (b.total, b.bound)
}

/// [`step_time`], part by part.
pub fn step_breakdown(
    c: &ModelConfig,
    dt: PlanDType,
    dev: &Device,
    layout: &Layout,
    gpus_per_node: usize,
    batch: f64,
    rows: f64,
    ctx: f64,
) -> StepBreakdown {
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
    // Weights stream at the kernels' measured share of the bandwidth.
    let wbw = bw * dt.stream_efficiency(dev);
    let t_attn_call =
        (attn_params * wb / wbw).max(2.0 * tokens * attn_params / dev.matmul_rate(peak, tokens));
    let t_expert_call = (expert_params * wb / wbw)
        .max(2.0 * expert_rows * expert_params / dev.matmul_rate(peak, expert_rows));
    let t_core = 4.0 * tokens * ctx * (c.q_size() as f64 / tp) / dev.matmul_rate(peak, tokens);
    let t_kv_layer = t_core + batch * ctx * kv_per_token_layer / bw;
    let t_w_layer = t_attn_call + touched_experts * t_expert_call;
    // The calls one after the other, or the whole layer's bytes / FLOPs at the roofline,
    // whichever is slower (the difference counts as weights: it is their streaming or math).
    let t_calls_layers = layers_per_stage * (t_w_layer + t_kv_layer);
    let floor = t_mem.max(t_cmp);
    let w_layers = layers_per_stage * t_w_layer + (floor - t_calls_layers).max(0.0);
    let kv_layers = layers_per_stage * t_kv_layer;
    // Output projection on the sampling rank.
    let out_bytes = c.vocab_size as f64 * d * dt.embed_bytes() as f64;
    let t_out_w = (out_bytes / (bw * PlanDType::Bf16.stream_efficiency(dev)))
        .max(2.0 * batch * c.vocab_size as f64 * d / dev.matmul_rate(peak, batch));
    let t_sample = batch * c.vocab_size as f64 * dev.sample_ns_per_logit * 1e-9;
    // Collectives: two all-reduces per layer over tp, one send/recv per stage boundary.
    let mut collectives = Vec::new();
    let ar_bytes = tokens * d * 2.0;
    if layout.tp > 1 {
        let one = collective::all_reduce(dev, layout.tp, ar_bytes, layout.tp > gpus_per_node);
        collectives.push(one.times(2.0 * c.num_layers as f64));
    }
    if layout.pp > 1 {
        let one = collective::send_recv(dev, ar_bytes, layout.tp * layout.pp > gpus_per_node);
        collectives.push(one.times(pp - 1.0));
    }
    let t_coll: f64 = collectives.iter().map(|x| x.seconds).sum();
    // Fixed cost per matmul call: q, k, v, o, router, and three per touched expert.
    let calls = layers_per_stage * (5.0 + 3.0 * touched_experts) + 1.0;
    let t_calls = pp * calls * dev.launch_overhead_us * 1e-6;
    let weights = pp * w_layers + t_out_w;
    let kv = pp * kv_layers;
    let t_compute = weights + kv + t_sample + t_calls;
    let bound = if t_coll > t_compute {
        "links"
    } else if t_cmp > t_mem {
        "compute"
    } else {
        "memory bandwidth"
    };
    StepBreakdown {
        weights,
        kv,
        collectives,
        collectives_total: t_coll,
        sampling: t_sample,
        overhead: t_calls,
        total: t_compute + t_coll,
        bound,
    }
}

/// Decode with pipeline parallelism as the engine runs it: `seqs` sequences in up to `pp`
/// micro-batches, one step in flight per stage. A sequence's micro-batch goes through every
/// stage once per token (stages one after the other), while the other micro-batches keep the
/// other stages busy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pipelined {
    /// Seconds between two tokens of a sequence.
    pub itl: f64,
    /// Output tokens per second of the replica.
    pub tokens_per_s: f64,
    /// Share of the stages' time idle: fewer micro-batches than stages.
    pub bubble: f64,
    /// What bounds a stage's step.
    pub bound: &'static str,
}

/// [`Pipelined`] decode of `seqs` sequences at context `ctx`.
pub(super) fn pipelined_decode(
    c: &ModelConfig,
    dt: PlanDType,
    dev: &Device,
    layout: &Layout,
    gpus_per_node: usize,
    seqs: f64,
    ctx: f64,
) -> Pipelined {
    let pp = layout.pp.max(1) as f64;
    let seqs = seqs.max(1.0);
    let micro_batches = seqs.min(pp).floor().max(1.0);
    let (itl, bound) = step_time(
        c,
        dt,
        dev,
        layout,
        gpus_per_node,
        seqs / micro_batches,
        1.0,
        ctx,
    );
    Pipelined {
        itl,
        tokens_per_s: seqs / itl,
        bubble: 1.0 - micro_batches / pp,
        bound,
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

    /// Decode of `seqs` sequences at context `ctx` with up to `pp` steps in flight.
    pub fn pipelined(&self, seqs: f64, ctx: f64) -> Pipelined {
        pipelined_decode(
            self.model,
            self.dtype,
            self.device,
            &self.layout,
            self.gpus_per_node,
            seqs,
            ctx,
        )
    }
}
