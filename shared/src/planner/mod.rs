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
//! and flops are `2 x touched parameters x B` plus attention; a step's stages run one after the
//! other, each boundary costs one send/recv. Decode keeps up to `pp` micro-batches in flight as
//! the engine does ([`Pipelined`]): a token of a sequence takes its micro-batch (`B / pp`
//! sequences) through every stage, the other micro-batches keep the other stages busy, so the
//! replica gives `B` tokens per such pass; fewer sequences than stages leave a bubble; each
//! layer costs two all-reduces of `B x d_model` in bf16 over the tensor-parallel group, timed by
//! [`collective`] as NCCL runs them (the regime NCCL picks by size, from published nccl-tests
//! runs; the project's TCP ring on CPU hosts). Layers' matmuls, attention and collectives do
//! not overlap in the engine (each layer's all-reduce waits for its matmul), and the model adds
//! them. Prefill (TTFT) is the same with `B x prompt_len` rows (compute-bound).
//! [`StepBreakdown`] splits a step into weights, KV, collectives, sampling and fixed overhead.

mod catalog;
pub mod collective;
pub mod ep;
mod sim;
mod step;

pub use catalog::{Catalog, Device, PlanDType, PlanError, BUILTIN_CATALOG};
pub use sim::{simulate, SimInput, SimResult, SLO_DEFINITIONS};
pub use step::{shard_weight_bytes, step_breakdown, Pipelined, StepBreakdown, StepModel};

use crate::config::ModelConfig;
use crate::model::ShardSpec;
use crate::sharding::Layout;
use serde::Serialize;
use step::{pipelined_decode, step_time};

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
    /// Time per output token objective (at steady state, the decode step time).
    pub tpot_slo_ms: Option<f64>,
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
    /// One decode step (one micro-batch through the replica), part by part.
    pub decode_step: StepBreakdown,
    pub notes: Vec<String>,
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
            // Decode as the engine runs it: with pp stages, up to pp micro-batches in flight.
            let dec = pipelined_decode(
                c,
                p.dtype,
                &p.device,
                &l,
                p.gpus_per_node,
                b_eff as f64,
                ctx_mid,
            );
            let (itl, bound) = (dec.itl, dec.bound);
            let micro = (b_eff as f64).min(l.pp as f64).floor().max(1.0);
            let decode_step = step_breakdown(
                c,
                p.dtype,
                &p.device,
                &l,
                p.gpus_per_node,
                b_eff as f64 / micro,
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
                && p.tpot_slo_ms.is_none_or(|s| itl * 1e3 <= s);
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
                decode_step,
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

/// One decode step split into weights, KV, collectives (by algorithm), sampling and fixed
/// overhead, as a small table.
pub fn breakdown_table(b: &StepBreakdown) -> String {
    let ms = |x: f64| x * 1e3;
    let share = |x: f64| 100.0 * x / b.total.max(1e-30);
    let mut t = format!(
        "One decode step: {:.3} ms, bound by {}\n  {:<44} {:>9} {:>6}\n",
        ms(b.total),
        b.bound,
        "part",
        "ms",
        "share"
    );
    let mut row = |name: String, x: f64| {
        t += &format!("  {:<44} {:>9.3} {:>5.1}%\n", name, ms(x), share(x));
    };
    row("weights (stream or multiply)".into(), b.weights);
    row("KV cache (attention)".into(), b.kv);
    for c in &b.collectives {
        row(
            format!(
                "{} x{} of {:.0} KB: {} {}",
                c.op,
                c.count,
                c.bytes / 1e3,
                c.algorithm,
                c.protocol
            ),
            c.seconds,
        );
    }
    row("sampling".into(), b.sampling);
    row("fixed cost per call".into(), b.overhead);
    t
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
    if best.pp > 1 {
        let mb = best.batch_per_replica.min(best.pp).max(1);
        s += &format!(
            "Its {} sequences run as {mb} micro-batch(es) in flight over {} stages (a bubble of {:.0}% of the stages' time); a token takes {:.1} ms and the step is bound by {}; ",
            best.batch_per_replica,
            best.pp,
            100.0 * (1.0 - mb as f64 / best.pp as f64),
            best.itl_ms,
            best.decode_bound
        );
    } else {
        s += &format!(
            "A decode step of {} sequences takes {:.1} ms and is bound by {}; ",
            best.batch_per_replica, best.itl_ms, best.decode_bound
        );
    }
    s += &format!(
        "prefill of {} tokens takes {:.0} ms. ",
        p.prompt_len, best.ttft_ms
    );
    s += &format!("\n\n{}\n", breakdown_table(&best.decode_step));
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

    #[test]
    fn pipelined_decode_fills_the_stages_with_micro_batches() {
        let c = ModelConfig::grok1();
        let dev = Catalog::builtin().get("h100-sxm").unwrap().clone();
        let m = |pp: usize| StepModel {
            model: &c,
            dtype: PlanDType::Int8,
            device: &dev,
            layout: Layout::new(8, 1, pp),
            gpus_per_node: 8,
        };
        // One stage: the plain step.
        let one = m(1).pipelined(16.0, 1000.0);
        assert_eq!(one.itl, m(1).time(16.0, 16.0, 1000.0));
        assert_eq!(one.bubble, 0.0);
        // Two stages, one sequence: one micro-batch, half the stages' time idle.
        let lone = m(2).pipelined(1.0, 1000.0);
        assert_eq!(lone.bubble, 0.5);
        assert_eq!(lone.itl, m(2).time(1.0, 1.0, 1000.0));
        // Two stages, 16 sequences: two micro-batches of 8 in flight, no bubble, and more
        // tokens per second than running all 16 through both stages in one step.
        let full = m(2).pipelined(16.0, 1000.0);
        assert_eq!(full.bubble, 0.0);
        assert_eq!(full.itl, m(2).time(8.0, 8.0, 1000.0));
        let unpipelined = 16.0 / m(2).time(16.0, 16.0, 1000.0);
        assert!(full.tokens_per_s > unpipelined, "{full:?} vs {unpipelined}");
        assert!(full.itl.is_finite() && full.itl > 0.0);
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
            tpot_slo_ms: None,
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
                replicas: x.replicas,
                ..Layout::new(x.tp, x.ep, x.pp)
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
