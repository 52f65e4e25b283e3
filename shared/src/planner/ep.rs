//! Data-parallel attention with expert parallelism, as the planner sees it: `E` ranks, each
//! running attention for its share of the sequences with the whole attention weights (and the
//! embedding, for its own sequences' tokens and logits), and holding copies of some experts
//! (`K` copies of each, placed round-robin, so the copies of an expert sit on distinct ranks).
//! The MoE block sends each token's hidden state to a rank holding each of its experts (the
//! least-loaded copy) and the results back: two all-to-alls per layer.
//!
//! A step ends when the slowest rank ends (the all-to-alls synchronise them): its attention
//! for `B / E` sequences, the expert copies it holds with their share of the routed tokens,
//! the all-to-alls. Losing a rank: its sequences move to the others, each expert's tokens go
//! to its live copies; an expert with no copy left stops the replica (never wrong results).

use super::catalog::{Device, PlanDType, PlanError};
use super::collective;
use super::step::StepBreakdown;
use crate::config::ModelConfig;
use serde::Serialize;

/// What to plan.
#[derive(Clone, Debug)]
pub struct EpInput {
    pub device: Device,
    pub dtype: PlanDType,
    pub ranks: usize,
    pub copies: usize,
    pub gpus_per_node: usize,
    /// Sequences in flight on the replica.
    pub sequences: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub memory_utilization: f64,
}

/// The layout on `ranks` ranks (all, or all but the lost one).
#[derive(Clone, Debug, Serialize)]
pub struct EpState {
    pub ranks: usize,
    /// Serving (every expert has a live copy); else why not.
    pub serving: bool,
    pub why_not: Option<String>,
    /// The most routed tokens any rank's experts take per layer, against a perfect spread.
    pub expert_load_imbalance: f64,
    pub sequences_per_rank: f64,
    pub decode_step: StepBreakdown,
    pub itl_ms: f64,
    pub output_tokens_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EpPlan {
    pub ranks: usize,
    pub copies: usize,
    /// Expert copies per layer on the fullest rank.
    pub experts_per_rank: usize,
    pub weight_bytes_per_gpu: u64,
    pub kv_bytes_per_token_per_gpu: u64,
    pub kv_capacity_tokens_per_gpu: u64,
    pub fits: bool,
    pub shortfall_bytes_per_gpu: u64,
    /// Bytes one rank sends per layer in each all-to-all (dispatch; the combine is the same).
    pub all_to_all_bytes_per_rank: f64,
    pub before: EpState,
    /// After the loss of rank 0 (the most loaded when the placement is uneven).
    pub after_loss: EpState,
}

/// Which ranks hold expert `e` (copy `j` on rank `(e * copies + j) % ranks`).
pub fn placement(experts: usize, copies: usize, ranks: usize) -> Vec<Vec<usize>> {
    (0..experts)
        .map(|e| (0..copies).map(|j| (e * copies + j) % ranks).collect())
        .collect()
}

/// Checks a placement request, naming the rule it breaks.
pub fn check(c: &ModelConfig, ranks: usize, copies: usize) -> Result<(), PlanError> {
    let bad = |m: String| Err(PlanError::Input(m));
    if ranks < 2 {
        return bad(format!(
            "expert parallelism needs at least 2 ranks, got {ranks}"
        ));
    }
    if copies == 0 {
        return bad("every expert needs at least one copy (--expert-copies >= 1)".into());
    }
    if copies > ranks {
        return bad(format!(
            "{copies} copies of an expert need {copies} distinct ranks; there are {ranks}"
        ));
    }
    if c.num_experts * copies < ranks {
        return bad(format!(
            "{} experts x {copies} copies leave some of the {ranks} ranks without an expert",
            c.num_experts
        ));
    }
    Ok(())
}

/// Plans the layout and its state after losing one rank.
pub fn plan(c: &ModelConfig, p: &EpInput) -> Result<EpPlan, PlanError> {
    check(c, p.ranks, p.copies)?;
    if p.sequences == 0 || p.prompt_len + p.gen_len == 0 {
        return Err(PlanError::Input(
            "sequences and prompt + output tokens must be positive".into(),
        ));
    }
    let d = c.emb_size as f64;
    let wb = p.dtype.matrix_bytes() as f64;
    let layers = c.num_layers as f64;
    let place = placement(c.num_experts, p.copies, p.ranks);
    let per_rank: Vec<usize> = (0..p.ranks)
        .map(|r| place.iter().filter(|cs| cs.contains(&r)).count())
        .collect();
    let fullest = per_rank.iter().copied().max().unwrap_or(0);
    // Weights of a rank: attention (whole), norms, router, embedding (bf16: the release keeps
    // it so), and its expert copies, in every layer.
    let attn = 2.0 * d * c.q_size() as f64 + 2.0 * d * c.kv_size() as f64;
    let expert = 3.0 * d * c.ffn_size as f64;
    let weights = layers * (attn * wb + 4.0 * 4.0 * d + 4.0 * c.num_experts as f64 * d)
        + c.vocab_size as f64 * d * p.dtype.embed_bytes() as f64
        + layers * fullest as f64 * expert * wb;
    let kv_tok = layers * 2.0 * c.kv_size() as f64 * 2.0;
    let mem = p.device.memory_gb * 1e9 * p.memory_utilization;
    let workspace = (1u64 << 30) as f64;
    let free = mem - weights - workspace;
    let kv_tokens = (free / kv_tok).max(0.0);
    let seq_tokens = (p.prompt_len + p.gen_len) as f64;
    let fits = kv_tokens >= seq_tokens;
    let shortfall = if fits {
        0.0
    } else {
        (weights + workspace + kv_tok * seq_tokens - mem).max(0.0)
    };
    let ctx = p.prompt_len as f64 + p.gen_len as f64 / 2.0;
    let state = |alive: &[usize]| state(c, p, &place, alive, ctx);
    let all: Vec<usize> = (0..p.ranks).collect();
    let before = state(&all);
    let after_loss = state(&all[1..]);
    let b = p.sequences as f64 / p.ranks as f64;
    Ok(EpPlan {
        ranks: p.ranks,
        copies: p.copies,
        experts_per_rank: fullest,
        weight_bytes_per_gpu: weights as u64,
        kv_bytes_per_token_per_gpu: kv_tok as u64,
        kv_capacity_tokens_per_gpu: kv_tokens as u64,
        fits,
        shortfall_bytes_per_gpu: shortfall as u64,
        all_to_all_bytes_per_rank: b * c.num_selected_experts as f64 * d * 2.0,
        before,
        after_loss,
    })
}

/// The decode step on the ranks `alive`.
fn state(c: &ModelConfig, p: &EpInput, place: &[Vec<usize>], alive: &[usize], ctx: f64) -> EpState {
    let e = alive.len();
    let lost: Vec<usize> = place
        .iter()
        .enumerate()
        .filter(|(_, cs)| !cs.iter().any(|r| alive.contains(r)))
        .map(|(x, _)| x)
        .collect();
    let b = p.sequences as f64 / e as f64;
    let d = c.emb_size as f64;
    let k = c.num_selected_experts as f64;
    let ne = c.num_experts as f64;
    let wb = p.dtype.matrix_bytes() as f64;
    let dev = &p.device;
    let bw = dev.mem_bw_gbs * 1e9;
    let wbw = bw * p.dtype.stream_efficiency(dev);
    let peak = p.dtype.peak(dev);
    // Routed (token, expert) pairs per layer, each expert's split over its live copies.
    let pairs = p.sequences as f64 * k;
    let mut load = vec![0f64; p.ranks];
    let mut touched = vec![0f64; p.ranks];
    for cs in place {
        let live: Vec<usize> = cs.iter().copied().filter(|r| alive.contains(r)).collect();
        if live.is_empty() {
            continue;
        }
        let tokens = pairs / ne / live.len() as f64;
        for &r in &live {
            load[r] += tokens;
            // The copy streams its weights when any token reaches it.
            touched[r] += 1.0 - (-tokens).exp();
        }
    }
    let fair = pairs / e as f64;
    let (slow, max_load) = alive
        .iter()
        .map(|&r| (r, load[r]))
        .fold((alive[0], 0.0), |a, x| if x.1 > a.1 { x } else { a });
    let attn = 2.0 * d * c.q_size() as f64 + 2.0 * d * c.kv_size() as f64;
    let expert = 3.0 * d * c.ffn_size as f64;
    let layers = c.num_layers as f64;
    let t_attn = (attn * wb / wbw).max(2.0 * b * attn / dev.matmul_rate(peak, b));
    let kv_per_tok_layer = 2.0 * c.kv_size() as f64 * 2.0;
    let t_kv = b * ctx * kv_per_tok_layer / bw
        + 4.0 * b * ctx * c.q_size() as f64 / dev.matmul_rate(peak, b.max(1.0));
    let rows = (max_load / touched[slow].max(1e-9)).max(1.0);
    let t_exp =
        touched[slow] * (expert * wb / wbw).max(2.0 * rows * expert / dev.matmul_rate(peak, rows));
    let a2a_bytes = b * k * d * 2.0;
    let inter = e > p.gpus_per_node;
    let a2a = collective::all_to_all(dev, e, a2a_bytes, inter).times(2.0 * layers);
    let out = c.vocab_size as f64 * d * p.dtype.embed_bytes() as f64;
    let t_out = (out / (bw * PlanDType::Bf16.stream_efficiency(dev)))
        .max(2.0 * b * c.vocab_size as f64 * d / dev.matmul_rate(peak, b.max(1.0)));
    let t_sample = b * c.vocab_size as f64 * dev.sample_ns_per_logit * 1e-9;
    let calls = layers * (5.0 + 3.0 * touched[slow]) + 1.0;
    let overhead = calls * dev.launch_overhead_us * 1e-6;
    let weights = layers * (t_attn + t_exp) + t_out;
    let kv = layers * t_kv;
    let coll = a2a.seconds;
    let total = weights + kv + coll + t_sample + overhead;
    let bound = if coll > weights + kv {
        "links"
    } else {
        "memory bandwidth"
    };
    let serving = lost.is_empty();
    EpState {
        ranks: e,
        serving,
        why_not: (!serving).then(|| {
            format!(
                "experts {lost:?} have no live copy: the replica stops admitting (with --expert-copies 2 or more every expert survives the loss of a rank)"
            )
        }),
        expert_load_imbalance: max_load / fair.max(1e-9),
        sequences_per_rank: b,
        decode_step: StepBreakdown {
            weights,
            kv,
            collectives: vec![a2a],
            collectives_total: coll,
            sampling: t_sample,
            overhead,
            total,
            bound,
        },
        itl_ms: total * 1e3,
        output_tokens_per_s: if serving {
            p.sequences as f64 / total
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Catalog;

    fn input(dev: &str, ranks: usize, copies: usize, seqs: usize) -> EpInput {
        EpInput {
            device: Catalog::builtin().get(dev).unwrap().clone(),
            dtype: PlanDType::Int8,
            ranks,
            copies,
            gpus_per_node: 8,
            sequences: seqs,
            prompt_len: 1000,
            gen_len: 200,
            memory_utilization: 0.9,
        }
    }

    #[test]
    fn copies_sit_on_distinct_ranks_and_bad_placements_are_refused() {
        let p = placement(8, 2, 8);
        for cs in &p {
            assert_eq!(cs.len(), 2);
            assert_ne!(cs[0], cs[1]);
        }
        let per: Vec<usize> = (0..8)
            .map(|r| p.iter().filter(|cs| cs.contains(&r)).count())
            .collect();
        assert_eq!(per, vec![2; 8]);
        let c = ModelConfig::grok1();
        for (ranks, copies, rule) in [
            (1, 1, "at least 2 ranks"),
            (8, 0, "at least one copy"),
            (4, 5, "distinct ranks"),
            (16, 1, "without an expert"),
        ] {
            let e = check(&c, ranks, copies).unwrap_err().to_string();
            assert!(e.contains(rule), "{ranks} {copies}: {e}");
        }
    }

    /// Grok-1 int8 on 8 x H200 with every expert twice: fits (about 84 GB of weights a GPU),
    /// keeps serving after a loss at a lower throughput; with one copy it stops.
    #[test]
    fn grok1_on_8_h200_with_two_copies_survives_a_loss() {
        let c = ModelConfig::grok1();
        let two = plan(&c, &input("h200", 8, 2, 256)).unwrap();
        assert!(two.fits, "{two:?}");
        let gb = two.weight_bytes_per_gpu as f64 / 1e9;
        assert!((80.0..90.0).contains(&gb), "{gb} GB");
        assert_eq!(two.experts_per_rank, 2);
        assert!(two.before.serving && two.after_loss.serving);
        assert!(two.after_loss.output_tokens_per_s < two.before.output_tokens_per_s);
        assert!(two.after_loss.expert_load_imbalance > two.before.expert_load_imbalance);
        assert!((two.before.expert_load_imbalance - 1.0).abs() < 1e-9);
        let one = plan(&c, &input("h200", 8, 1, 256)).unwrap();
        assert!(one.before.serving && !one.after_loss.serving);
        assert!(one
            .after_loss
            .why_not
            .as_ref()
            .unwrap()
            .contains("no live copy"));
        assert!(one.weight_bytes_per_gpu < two.weight_bytes_per_gpu);
        // Every expert on every rank does not fit on 80 GB.
        let all = plan(&c, &input("h100-sxm", 8, 8, 64)).unwrap();
        assert!(!all.fits && all.shortfall_bytes_per_gpu > 0);
    }
}
