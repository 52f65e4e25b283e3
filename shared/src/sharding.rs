//! Layout math: how one replica of the model is split over `pp` pipeline stages of `tp` ranks,
//! with the `tp` ranks of a stage forming `ep` expert groups (DESIGN.md "Parallelism").
//!
//! Rank numbering inside a replica: `rank = stage * tp + tp_rank`.
//! - Attention: query heads split evenly over the tp ranks; KV heads split too when `tp` divides
//!   them, replicated (each rank keeps the one its query heads use) when `tp` is a multiple of them.
//! - Experts: expert group `g = tp_rank / (tp / ep)` owns experts `[g·E/ep, (g+1)·E/ep)`, each
//!   sliced over the `tp/ep` ranks of the group along the FFN width.
//! - Layers: contiguous ranges, the first `L mod pp` stages one layer longer.
//!
//! [`Layout::validate`] runs before any weight is read, and its error names the broken rule and
//! lists layouts that would work for this model and worker count.

use crate::config::ModelConfig;
use crate::model::ShardSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub tp: usize,
    pub ep: usize,
    pub pp: usize,
    pub replicas: usize,
    /// Data-parallel attention with expert parallelism: the `ep` ranks (`tp == ep`, one
    /// stage) each run attention for their own sequences over their own KV cache with every
    /// head, and hold whole experts; the MoE dispatches rows to their experts' ranks and
    /// combines them by all-to-all.
    pub dp_attention: bool,
    /// Copies of each expert over the ranks (data-parallel attention only; 1 otherwise).
    pub expert_copies: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("layout tp={tp} ep={ep} pp={pp} is not valid for this model: {rule}{}", suggestions_text(.tp.saturating_mul(*.pp), .suggestions))]
pub struct LayoutError {
    pub tp: usize,
    pub ep: usize,
    pub pp: usize,
    pub rule: String,
    pub suggestions: Vec<Layout>,
}

fn suggestions_text(workers: usize, s: &[Layout]) -> String {
    if s.is_empty() {
        format!("; no layout of this model uses exactly {workers} workers")
    } else {
        let v: Vec<String> = s
            .iter()
            .map(|l| format!("tp={} ep={} pp={}", l.tp, l.ep, l.pp))
            .collect();
        format!(
            "; layouts that work with {workers} workers: {}",
            v.join(", ")
        )
    }
}

/// The largest worker count [`Layout::candidates`] searches.
pub const MAX_SUGGESTED_WORKERS: usize = 1 << 16;

/// Where one rank sits in the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankPlace {
    pub rank: usize,
    pub stage: usize,
    pub tp_rank: usize,
}

impl Layout {
    pub fn new(tp: usize, ep: usize, pp: usize) -> Self {
        Self {
            tp,
            ep,
            pp,
            replicas: 1,
            dp_attention: false,
            expert_copies: 1,
        }
    }

    /// Data-parallel attention over `ep` ranks with `copies` copies of each expert.
    pub fn dp_attention(ep: usize, copies: usize) -> Self {
        Self {
            tp: ep,
            ep,
            pp: 1,
            replicas: 1,
            dp_attention: true,
            expert_copies: copies,
        }
    }

    /// The ranks holding each expert (data-parallel attention): copy `j` of expert `x` on
    /// rank `(x + j·⌊ep/K⌋) mod ep`, so the `K <= ep` copies of an expert sit on distinct
    /// ranks spread over the group (two ranks side by side never hold all copies of the same
    /// experts), and the ranks hold the same number of experts, give or take one.
    pub fn expert_ranks(&self, c: &ModelConfig) -> Vec<Vec<usize>> {
        let (k, e) = (self.expert_copies.clamp(1, self.ep.max(1)), self.ep.max(1));
        (0..c.num_experts)
            .map(|x| (0..k).map(|j| (x + j * (e / k)) % e).collect())
            .collect()
    }

    /// Workers per replica.
    pub fn world_size(&self) -> usize {
        self.tp.saturating_mul(self.pp)
    }

    pub fn place(&self, rank: usize) -> RankPlace {
        RankPlace {
            rank,
            stage: rank / self.tp,
            tp_rank: rank % self.tp,
        }
    }

    fn rule(&self, c: &ModelConfig) -> Option<String> {
        let (tp, ep, pp) = (self.tp, self.ep, self.pp);
        if tp == 0 || ep == 0 || pp == 0 || self.replicas == 0 {
            return Some("tp, ep, pp and replicas must be at least 1".into());
        }
        if self.dp_attention {
            return self.dp_rule(c);
        }
        if self.expert_copies != 1 {
            return Some(format!(
                "expert copies ({}) need data-parallel attention (--dp-attention): with tensor parallelism every expert is held once",
                self.expert_copies
            ));
        }
        if pp > c.num_layers {
            return Some(format!(
                "pp ({pp}) exceeds the number of layers ({})",
                c.num_layers
            ));
        }
        if !c.num_q_heads.is_multiple_of(tp) {
            return Some(format!(
                "tp ({tp}) must divide the {} query heads",
                c.num_q_heads
            ));
        }
        if !(c.num_kv_heads.is_multiple_of(tp) || tp.is_multiple_of(c.num_kv_heads)) {
            return Some(format!(
                "tp ({tp}) must divide the {} KV heads or be a multiple of them (KV heads are then replicated)",
                c.num_kv_heads
            ));
        }
        if !tp.is_multiple_of(ep) {
            return Some(format!(
                "ep ({ep}) must divide tp ({tp}): the tp ranks of a stage form the expert groups"
            ));
        }
        if !c.num_experts.is_multiple_of(ep) {
            return Some(format!(
                "ep ({ep}) must divide the {} experts",
                c.num_experts
            ));
        }
        let slices = tp / ep;
        if !c.ffn_size.is_multiple_of(slices) {
            return Some(format!(
                "tp/ep ({slices}) must divide the expert FFN width ({}): each expert is sliced over its group",
                c.ffn_size
            ));
        }
        None
    }

    /// Checks a placement of the experts on the ep ranks (data-parallel attention): one
    /// entry per expert, each naming at least one rank and no rank twice, every rank inside
    /// the group and holding at least one expert. The error names the broken rule.
    pub fn check_placement(&self, c: &ModelConfig, p: &[Vec<usize>]) -> Result<(), String> {
        let ep = self.ep;
        if p.len() != c.num_experts {
            return Err(format!(
                "the placement names {} experts; the model has {}",
                p.len(),
                c.num_experts
            ));
        }
        for (e, ranks) in p.iter().enumerate() {
            if ranks.is_empty() {
                return Err(format!("expert {e} has no copy"));
            }
            if let Some(r) = ranks.iter().find(|&&r| r >= ep) {
                return Err(format!(
                    "expert {e} is placed on rank {r}, outside the {ep} ep ranks"
                ));
            }
            let mut d = ranks.clone();
            d.sort_unstable();
            d.dedup();
            if d.len() != ranks.len() {
                return Err(format!(
                    "expert {e} is placed twice on one rank ({ranks:?}): copies sit on distinct ranks"
                ));
            }
        }
        if let Some(r) = (0..ep).find(|r| !p.iter().any(|x| x.contains(r))) {
            return Err(format!(
                "rank {r} of the {ep} ranks holds no expert ({} experts, {} copies in all)",
                c.num_experts,
                p.iter().map(Vec::len).sum::<usize>()
            ));
        }
        Ok(())
    }

    /// The shard of `rank` under an explicit placement of the experts (data-parallel
    /// attention): every head, and whole copies of the experts placed on it.
    pub fn shard_placed(&self, c: &ModelConfig, rank: usize, p: &[Vec<usize>]) -> ShardSpec {
        let mut s = ShardSpec::full(c);
        s.experts
            .retain(|(e, _)| p.get(*e).is_some_and(|r| r.contains(&rank)));
        s
    }

    fn dp_rule(&self, c: &ModelConfig) -> Option<String> {
        let (tp, ep, pp, k) = (self.tp, self.ep, self.pp, self.expert_copies);
        if pp != 1 {
            return Some(format!(
                "data-parallel attention runs in one pipeline stage (pp 1, not {pp})"
            ));
        }
        if tp != ep {
            return Some(format!(
                "with data-parallel attention the replica's workers are its ep ranks: tp ({tp}) must equal ep ({ep})"
            ));
        }
        if ep < 2 {
            return Some("data-parallel attention needs at least 2 ep ranks".into());
        }
        if k == 0 {
            return Some("every expert needs at least one copy (expert copies 0)".into());
        }
        if k > ep {
            return Some(format!(
                "expert copies ({k}) exceed the ep ranks ({ep}): the copies of an expert sit on distinct ranks"
            ));
        }
        let held = self.expert_ranks(c);
        if let Some(r) = (0..ep).find(|r| !held.iter().any(|x| x.contains(r))) {
            return Some(format!(
                "{} experts × {k} copies leave rank {r} of the {ep} ranks without an expert",
                c.num_experts
            ));
        }
        None
    }
}

/// Where the experts are (data-parallel attention): `placement[e]` lists the ranks holding a
/// copy of expert `e`.
pub type Placement = Vec<Vec<usize>>;

/// The placement inside a group of the live ranks only (data-parallel attention after the
/// loss of ranks): `live` lists the replica's ranks that serve, in group order, and expert `e`
/// goes to the group indices of its copies among them. An error names the first expert with
/// no live copy.
pub fn live_placement(p: &[Vec<usize>], live: &[usize]) -> Result<Placement, String> {
    p.iter()
        .enumerate()
        .map(|(e, copies)| {
            let v: Vec<usize> = copies
                .iter()
                .filter_map(|r| live.iter().position(|x| x == r))
                .collect();
            if v.is_empty() {
                Err(format!(
                    "expert {e} has no copy left: its ranks {copies:?} are all lost"
                ))
            } else {
                Ok(v)
            }
        })
        .collect()
}

impl Layout {
    /// All valid layouts with `workers` ranks per replica (none past [`MAX_SUGGESTED_WORKERS`]:
    /// the search is quadratic, and a layout read from a request must not stall its check).
    pub fn candidates(c: &ModelConfig, workers: usize) -> Vec<Layout> {
        let mut out = Vec::new();
        if workers > MAX_SUGGESTED_WORKERS {
            return out;
        }
        for pp in 1..=workers.min(c.num_layers) {
            if !workers.is_multiple_of(pp) {
                continue;
            }
            let tp = workers / pp;
            if !c.num_q_heads.is_multiple_of(tp) {
                continue;
            }
            for ep in 1..=tp {
                let l = Layout::new(tp, ep, pp);
                if tp.is_multiple_of(ep) && l.rule(c).is_none() {
                    out.push(l);
                }
            }
        }
        out
    }

    /// Checks every divisibility rule of DESIGN.md against the model.
    pub fn validate(&self, c: &ModelConfig) -> Result<(), LayoutError> {
        match self.rule(c) {
            None => Ok(()),
            Some(rule) => Err(LayoutError {
                tp: self.tp,
                ep: self.ep,
                pp: self.pp,
                rule,
                suggestions: Self::candidates(c, self.world_size().max(1)),
            }),
        }
    }

    /// Layers of a pipeline stage: see [`stage_bounds`].
    pub fn stage_layers(&self, c: &ModelConfig, stage: usize) -> std::ops::Range<usize> {
        let b = stage_bounds(c, self.pp);
        let stage = stage.min(b.len() - 2);
        b[stage]..b[stage + 1]
    }

    /// The shard of `rank` (validate first).
    pub fn shard(&self, c: &ModelConfig, rank: usize) -> ShardSpec {
        let p = self.place(rank);
        if self.dp_attention {
            return self.shard_placed(c, rank, &self.expert_ranks(c));
        }
        let (tp, ep) = (self.tp, self.ep);
        let qh = c.num_q_heads / tp;
        let q_heads = p.tp_rank * qh..(p.tp_rank + 1) * qh;
        let kv_heads = if c.num_kv_heads.is_multiple_of(tp) {
            let k = c.num_kv_heads / tp;
            p.tp_rank * k..(p.tp_rank + 1) * k
        } else {
            let g = c.group_size();
            q_heads.start / g..(q_heads.end - 1) / g + 1
        };
        let slices = tp / ep;
        let group = p.tp_rank / slices;
        let slice = p.tp_rank % slices;
        let per = c.num_experts / ep;
        let f = c.ffn_size / slices;
        let experts = (group * per..(group + 1) * per)
            .map(|e| (e, slice * f..(slice + 1) * f))
            .collect();
        ShardSpec {
            layers: self.stage_layers(c, p.stage),
            q_heads,
            kv_heads,
            experts,
            embed: p.stage == 0,
            logits: p.stage == self.pp - 1 && p.tp_rank == 0,
        }
    }
}

/// Where the pipeline stages start: `pp + 1` increasing bounds from 0 to the number of layers,
/// every stage at least one layer. With steps in flight the slowest stage sets the pace, so the
/// split balances the work per token: a layer costs its active parameters (attention, router,
/// the selected experts), and the last stage also runs the output projection (`vocab x d`, as
/// much as several layers of a small model). The split minimises the largest stage, then the
/// spread (sum of squares); ties give earlier stages more layers. With no output cost this is
/// the even split, extra layers first (Grok-1's 64 layers split evenly for any pp that divides
/// them: its output projection is 0.6 of a layer).
pub fn stage_bounds(c: &ModelConfig, pp: usize) -> Vec<usize> {
    let l = c.num_layers.max(1);
    let pp = pp.clamp(1, l);
    let d = c.emb_size as u128;
    let layer = 2 * d * (c.q_size() as u128 + c.kv_size() as u128)
        + d * c.num_experts as u128
        + c.num_selected_experts as u128 * 3 * d * c.ffn_size as u128;
    let layer = layer.max(1);
    let out = c.vocab_size as u128 * d;
    let cost = |from: usize, to: usize| (to - from) as u128 * layer + if to == l { out } else { 0 };
    // The smallest possible largest stage: by bisection on it, a greedy check that stages
    // fit (layers are contiguous and every stage needs one).
    let fits = |cap: u128| -> bool {
        let (mut start, mut stages) = (0, 0);
        while start < l {
            stages += 1;
            if stages > pp {
                return false;
            }
            // The longest run from `start` within `cap`, leaving a layer for each later stage.
            let max_end = l - (pp - stages);
            let mut end = start;
            while end < max_end && cost(start, end + 1) <= cap {
                end += 1;
            }
            if end == start {
                return false;
            }
            start = end;
        }
        true
    };
    let (mut lo, mut hi) = (0u128, cost(0, l));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let cap = lo;
    // Among the splits within `cap`: the least sum of squares, ties to larger earlier stages.
    // best[s][i]: (sum of squares, previous bound) of the first `i` layers in `s` stages.
    let inf = u128::MAX;
    let mut best = vec![vec![(inf, 0usize); l + 1]; pp + 1];
    best[0][0] = (0, 0);
    for st in 1..=pp {
        for i in st..=l {
            for j in (st - 1..i).rev() {
                let (prev, _) = best[st - 1][j];
                let c = cost(j, i);
                if prev == inf || c > cap {
                    continue;
                }
                // Costs are at most ~1e11 (Grok-1): squares stay far inside u128.
                let v = prev.saturating_add(c.saturating_mul(c));
                if v < best[st][i].0 {
                    best[st][i] = (v, j);
                }
            }
        }
    }
    let mut bounds = vec![l; pp + 1];
    let mut i = l;
    for st in (1..=pp).rev() {
        bounds[st] = i;
        i = best[st][i].1;
    }
    bounds[0] = 0;
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_balance_the_work_per_token() {
        let grok = ModelConfig::grok1();
        // Grok-1: the output projection is 0.6 of a layer; splits stay even.
        assert_eq!(stage_bounds(&grok, 1), vec![0, 64]);
        assert_eq!(stage_bounds(&grok, 2), vec![0, 32, 64]);
        assert_eq!(stage_bounds(&grok, 4), vec![0, 16, 32, 48, 64]);
        assert_eq!(stage_bounds(&grok, 3), vec![0, 22, 43, 64]);
        // `small`: the output projection (131072 x 1024) weighs about six layers, so the last
        // stage keeps one layer at pp 2.
        let small = ModelConfig::preset("small", None).unwrap();
        assert_eq!(stage_bounds(&small, 2), vec![0, 7, 8]);
        // Any model and pp: contiguous, every stage at least one layer, all layers covered.
        for name in ["tiny", "tiny8", "small"] {
            for layers in 1..=12 {
                let c = ModelConfig::preset(name, Some(layers)).unwrap();
                for pp in 1..=layers {
                    let b = stage_bounds(&c, pp);
                    assert_eq!(b.len(), pp + 1);
                    assert_eq!((b[0], b[pp]), (0, layers));
                    assert!(
                        b.windows(2).all(|w| w[0] < w[1]),
                        "{name} {layers} {pp}: {b:?}"
                    );
                    let l = Layout::new(1, 1, pp);
                    let got: Vec<usize> = (0..pp).flat_map(|s| l.stage_layers(&c, s)).collect();
                    assert_eq!(got, (0..layers).collect::<Vec<_>>());
                }
            }
        }
    }

    #[test]
    fn grok1_layouts() {
        let c = ModelConfig::grok1();
        Layout::new(8, 8, 1).validate(&c).unwrap();
        Layout::new(8, 1, 2).validate(&c).unwrap();
        Layout::new(16, 8, 1).validate(&c).unwrap();
        let e = Layout::new(5, 1, 1).validate(&c).unwrap_err().to_string();
        assert!(e.contains("tp (5) must divide the 48 query heads"), "{e}");
        assert!(
            e.contains("layouts that work with 5 workers: tp=1 ep=1 pp=5"),
            "{e}"
        );
        let e = Layout::new(8, 3, 1).validate(&c).unwrap_err().to_string();
        assert!(e.contains("ep (3) must divide tp (8)"), "{e}");
        let e = Layout::new(1, 1, 65).validate(&c).unwrap_err().to_string();
        assert!(e.contains("exceeds the number of layers"), "{e}");
    }

    #[test]
    fn absurd_layouts_are_refused_at_once() {
        let c = ModelConfig::grok1();
        // pp = 2^32 - 1 (a LoadRequest's u32): the suggestion search looped over every pp and
        // tp dividing 2^32 - 1 workers, for minutes.
        let t = std::time::Instant::now();
        for l in [
            Layout::new(1, 1, u32::MAX as usize),
            Layout::new(u32::MAX as usize, 1, u32::MAX as usize),
            Layout::new(usize::MAX, 1, usize::MAX),
            Layout::new(0, 0, 0),
        ] {
            let e = l.validate(&c).unwrap_err().to_string();
            assert!(e.contains("is not valid for this model"), "{e}");
        }
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
        // A searchable count still gets its suggestions.
        let e = Layout::new(5, 1, 1).validate(&c).unwrap_err().to_string();
        assert!(e.contains("tp=1 ep=1 pp=5"), "{e}");
    }

    #[test]
    fn shards_cover_the_model_exactly_once() {
        let c = ModelConfig::grok1();
        for l in [
            Layout::new(8, 8, 1),
            Layout::new(16, 4, 1),
            Layout::new(4, 2, 3),
            Layout::new(2, 1, 64),
        ] {
            l.validate(&c).unwrap();
            let mut layer_owner = vec![0usize; c.num_layers];
            let mut expert_cover = vec![0usize; c.num_experts];
            for r in 0..l.world_size() {
                let s = l.shard(&c, r);
                s.check(&c).unwrap();
                let p = l.place(r);
                if p.tp_rank == 0 {
                    for i in s.layers.clone() {
                        layer_owner[i] += 1;
                    }
                }
                if p.stage == 0 {
                    for (e, f) in &s.experts {
                        expert_cover[*e] += f.len();
                    }
                }
            }
            assert!(layer_owner.iter().all(|&n| n == 1), "{l:?}");
            assert!(expert_cover.iter().all(|&n| n == c.ffn_size), "{l:?}");
        }
    }

    #[test]
    fn data_parallel_attention_layouts_and_their_placements() {
        let c = ModelConfig::preset("tiny8", None).unwrap();
        for (ep, k) in [
            (2, 1),
            (2, 2),
            (3, 2),
            (4, 1),
            (4, 2),
            (4, 3),
            (8, 1),
            (8, 2),
        ] {
            let l = Layout::dp_attention(ep, k);
            l.validate(&c).unwrap();
            let ranks = l.expert_ranks(&c);
            let mut per = vec![0usize; ep];
            for (e, r) in ranks.iter().enumerate() {
                let mut d = r.clone();
                d.sort_unstable();
                d.dedup();
                assert_eq!(d.len(), k, "ep {ep} k {k}: expert {e} on {r:?}");
                for &x in r {
                    per[x] += 1;
                }
            }
            let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
            assert!(*lo >= 1 && hi - lo <= 1, "ep {ep} k {k}: {per:?}");
            // Each rank's shard: every head, every layer, its experts whole.
            for r in 0..ep {
                let s = l.shard(&c, r);
                s.check(&c).unwrap();
                assert_eq!(s.q_heads, 0..c.num_q_heads);
                assert!(s.embed && s.logits);
                assert_eq!(s.experts.len(), per[r]);
                assert!(s.experts.iter().all(|(_, f)| *f == (0..c.ffn_size)));
            }
        }
        // With 2 copies on 4 ranks, no two ranks hold the same experts.
        let r = Layout::dp_attention(4, 2).expert_ranks(&c);
        assert_ne!(r[0], r[1]);
        assert!(r.iter().all(|x| x.len() == 2 && x[0] != x[1]));
        let bad = |l: Layout, rule: &str| {
            let e = l.validate(&c).unwrap_err().to_string();
            assert!(e.contains(rule), "{e}");
        };
        bad(
            Layout::dp_attention(4, 5),
            "expert copies (5) exceed the ep ranks (4)",
        );
        bad(Layout::dp_attention(4, 0), "at least one copy");
        bad(Layout::dp_attention(1, 1), "at least 2 ep ranks");
        bad(Layout::dp_attention(16, 1), "without an expert");
        bad(
            Layout {
                tp: 2,
                ..Layout::dp_attention(4, 1)
            },
            "tp (2) must equal ep (4)",
        );
        bad(
            Layout {
                pp: 2,
                ..Layout::dp_attention(2, 1)
            },
            "one pipeline stage",
        );
        bad(
            Layout {
                expert_copies: 2,
                ..Layout::new(2, 2, 1)
            },
            "need data-parallel attention",
        );
    }
}
