//! The Grok-1 forward pass with the OFFICIAL semantics of xai-org/grok-1 `model.py`
//! (GROK1_SPEC.md §3), on the CPU backend, over a paged KV cache.
//!
//! Semantics kept exactly (and not the ports' deviations of §9): embeddings ×
//! `embedding_multiplier_scale`; pre- and post-norms around attention and MoE with the stored
//! gain used as is; half-split RoPE with the phase in f64; the attention multiplier on the
//! logits only, then the soft-cap `cap·tanh(s/cap)`, then the mask with -1e30 (so a query whose
//! keys are all masked attends uniformly to every key of the pass); token ids `<= pad_token_id`
//! masked as keys; router softmax over all experts with no cap, top-k with ties to the lower
//! index, raw (not renormalised) gates; GELU (tanh form) on `linear`, times `linear_v`, then
//! `linear_1`; tied output embedding × `output_multiplier_scale`.
//!
//! A [`Model`] may hold a shard only ([`ShardSpec`]): a range of layers (pipeline stage), a
//! range of query/KV heads and a set of expert slices (tensor/expert parallelism). The partial
//! attention output and MoE output are summed over the tensor-parallel group by the
//! [`Communicator`] passed to [`Model::forward_layers`].

mod attention;
pub mod device;
mod error;
mod kv;
mod load;
pub mod names;

pub use attention::Heads;
pub use device::{Cpu, Device, MoeShape, RoutingStats};
pub use error::ModelError;
pub use kv::{
    kv_block_bytes, kv_blocks_to_allocate, BlockAllocator, DeviceMemory, KvCache, KvSizing,
    DEFAULT_CPU_KV_BLOCKS, DEFAULT_KV_MEMORY_FRACTION,
};

use crate::collective::Communicator;
use crate::config::ModelConfig;
use std::ops::Range;

/// The part of the model one process holds.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardSpec {
    pub layers: Range<usize>,
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    /// Local experts: (expert index, slice of its FFN width).
    pub experts: Vec<(usize, Range<usize>)>,
    /// Holds the embedding for the input lookup (first pipeline stage).
    pub embed: bool,
    /// Holds the final norm and output matrix (last pipeline stage).
    pub logits: bool,
}

impl ShardSpec {
    pub fn full(c: &ModelConfig) -> Self {
        Self {
            layers: 0..c.num_layers,
            q_heads: 0..c.num_q_heads,
            kv_heads: 0..c.num_kv_heads,
            experts: (0..c.num_experts).map(|e| (e, 0..c.ffn_size)).collect(),
            embed: true,
            logits: true,
        }
    }

    pub fn check(&self, c: &ModelConfig) -> Result<(), ModelError> {
        let bad = |s: String| Err(ModelError::Shard(s));
        if self.layers.end > c.num_layers || self.layers.is_empty() {
            return bad(format!(
                "layers {:?} not inside 0..{}",
                self.layers, c.num_layers
            ));
        }
        if self.q_heads.end > c.num_q_heads || self.q_heads.is_empty() {
            return bad(format!(
                "query heads {:?} not inside 0..{}",
                self.q_heads, c.num_q_heads
            ));
        }
        let g = c.group_size();
        let need = self.q_heads.start / g..(self.q_heads.end - 1) / g + 1;
        if self.kv_heads.start > need.start
            || self.kv_heads.end < need.end
            || self.kv_heads.end > c.num_kv_heads
        {
            return bad(format!(
                "kv heads {:?} do not cover the kv heads {need:?} of query heads {:?}",
                self.kv_heads, self.q_heads
            ));
        }
        for (e, f) in &self.experts {
            if *e >= c.num_experts || f.end > c.ffn_size || f.is_empty() {
                return bad(format!("expert {e} slice {f:?} invalid"));
            }
        }
        Ok(())
    }
}

/// One expert's slice: `linear`/`linear_v` rows and `linear_1` columns of its FFN range.
pub struct Expert<D: Device = Cpu> {
    pub index: usize,
    pub linear: D::Lin,
    pub linear_v: D::Lin,
    pub linear_1: D::Lin,
}

pub struct Layer<D: Device = Cpu> {
    pub index: usize,
    pub pre_attn_norm: D::Vector,
    pub post_attn_norm: D::Vector,
    pub pre_moe_norm: D::Vector,
    pub post_moe_norm: D::Vector,
    pub q: D::Lin,
    pub k: D::Lin,
    pub v: D::Lin,
    pub o: D::Lin,
    /// `[num_experts, emb_size]`, f32 (the reference keeps the router in fp32).
    pub router: D::Matrix,
    pub experts: Vec<Expert<D>>,
}

/// A model shard on a device (the CPU by default): its weights, and the forward pass written
/// once over the device's operations ([`Device`]).
pub struct Model<D: Device = Cpu> {
    pub config: ModelConfig,
    pub shard: ShardSpec,
    /// The device the weights live on and the pass runs on.
    pub dev: D,
    /// `[vocab, emb]`: input lookup and (tied) output matrix.
    pub embed: Option<D::Lin>,
    pub final_norm: Option<D::Vector>,
    pub layers: Vec<Layer<D>>,
    /// Tokens routed to each expert since the last [`Model::take_expert_counts`],
    /// `[local layer, expert]`.
    pub expert_counts: std::sync::Mutex<Vec<u64>>,
    /// Token rows this shard's experts computed since the last
    /// [`Model::take_expert_served`], per expert (summed over the layers).
    pub expert_served: std::sync::Mutex<Vec<u64>>,
    /// Data-parallel attention: the communicator passed to the forward pass is the group of
    /// ranks that hold the experts, and this says which ranks hold each expert. Attention is
    /// not summed over that group (every rank holds every head and runs its own sequences);
    /// the MoE sends each row to a rank holding each of its experts and combines what comes
    /// back ([`Model::forward_layers`]).
    pub dispatch: Option<ExpertDispatch>,
}

/// Where the experts are, for data-parallel attention: `ranks[e]` lists the ranks of the
/// expert group holding expert `e` (at least one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertDispatch {
    pub ranks: Vec<Vec<usize>>,
}

/// Which logits a sequence wants from a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WantLogits {
    None,
    Last,
    All,
}

/// One sequence's part of a batched forward pass.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// The new tokens of this pass, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [u32],
    pub start_pos: usize,
    /// KV blocks covering positions `0..start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    pub want: WantLogits,
}

impl KvCache {
    /// A cache of the sizes the caller chose. Panics where [`KvCache::try_new`] errs.
    pub fn new(model: &Model, num_blocks: usize, block_size: usize) -> Self {
        Self::try_new(model, num_blocks, block_size).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cache of `num_blocks` blocks of `block_size` slots for the layers and KV heads
    /// `model` holds, or an error when the sizes (a worker takes them from its `LoadRequest`)
    /// overflow or the memory cannot be had. The memory is zeroed lazily by the allocator, so
    /// an unused cache costs no resident memory.
    pub fn try_new(
        model: &Model,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let nkv = model.shard.kv_heads.len();
        KvCache::zeroed(
            nkv,
            model.config.key_size,
            model.layers.len(),
            num_blocks,
            block_size,
        )
    }
}

/// Rows of `h` whose logits the batch asked for, in batch order.
pub fn logit_rows(seqs: &[SeqInput]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut r = 0;
    for s in seqs {
        match s.want {
            WantLogits::None => {}
            WantLogits::Last => out.push(r + s.tokens.len() - 1),
            WantLogits::All => out.extend(r..r + s.tokens.len()),
        }
        r += s.tokens.len();
    }
    out
}

/// Per-pass bookkeeping derived from the batch.
struct Pass {
    /// Row range of each sequence in the flattened batch.
    rows: Vec<Range<usize>>,
    positions: Vec<usize>,
}

impl<D: Device> Model<D> {
    pub fn embed_layer(&self) -> Result<&D::Lin, ModelError> {
        self.embed
            .as_ref()
            .ok_or(ModelError::NotInShard("embedding"))
    }

    /// Validates a batch against the vocabulary, the context length and the cache.
    pub fn check_batch(&self, seqs: &[SeqInput], kv: &D::Kv) -> Result<(), ModelError> {
        let c = &self.config;
        let (num_blocks, block_size) = self.dev.kv_geometry(kv);
        for s in seqs {
            if s.tokens.is_empty() {
                return Err(ModelError::Empty);
            }
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(ModelError::TokenOutOfVocab {
                        id: t,
                        pos: s.start_pos.saturating_add(i),
                        vocab: c.vocab_size,
                    });
                }
            }
            let end = s.start_pos.saturating_add(s.tokens.len());
            if end > c.max_position_embeddings {
                return Err(ModelError::ContextOverflow {
                    len: end,
                    max: c.max_position_embeddings,
                });
            }
            if s.block_table.len().saturating_mul(block_size) < end {
                return Err(ModelError::Kv(format!(
                    "block table of {} blocks cannot hold {end} positions",
                    s.block_table.len()
                )));
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                return Err(ModelError::Kv(format!(
                    "block {b} outside the cache of {num_blocks} blocks"
                )));
            }
        }
        Ok(())
    }

    /// Input hidden states `[T, emb]` for the concatenated tokens of the batch.
    pub fn embed_tokens(&self, seqs: &[SeqInput]) -> Result<D::Buf, ModelError> {
        let e = self.embed_layer()?;
        let toks: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        self.dev
            .embed(e, &toks, self.config.embedding_multiplier_scale as f32)
    }

    fn pass(seqs: &[SeqInput]) -> Pass {
        let mut rows = Vec::with_capacity(seqs.len());
        let mut positions = Vec::new();
        let mut r = 0;
        for s in seqs {
            rows.push(r..r + s.tokens.len());
            positions.extend(s.start_pos..s.start_pos + s.tokens.len());
            r += s.tokens.len();
        }
        Pass { rows, positions }
    }

    /// The cache slot of each row of the pass.
    fn slots(&self, seqs: &[SeqInput], kv: &D::Kv) -> Vec<usize> {
        let (_, bs) = self.dev.kv_geometry(kv);
        seqs.iter()
            .flat_map(|s| {
                (s.start_pos..s.start_pos + s.tokens.len())
                    .map(move |p| s.block_table[p / bs] as usize * bs + p % bs)
            })
            .collect()
    }

    /// Runs this shard's layers on `h` (`[T, emb]`, updated in place), writing the new keys
    /// and values into `kv`.
    pub fn forward_layers(
        &self,
        h: &mut D::Buf,
        seqs: &[SeqInput],
        kv: &mut D::Kv,
        tp: &dyn Communicator,
    ) -> Result<(), ModelError> {
        self.check_batch(seqs, kv)?;
        let pass = Self::pass(seqs);
        let pad = self.config.pad_token_id;
        let slots = self.slots(seqs, kv);
        let visible: Vec<bool> = seqs
            .iter()
            .flat_map(|s| s.tokens.iter().map(|&t| t > pad))
            .collect();
        self.dev.kv_visible(kv, &slots, &visible)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let _span = tracing::trace_span!("layer", layer = layer.index).entered();
            self.attention_block(layer, li, h, seqs, &pass, &slots, kv, tp)?;
            self.moe_block(layer, h, tp)?;
        }
        Ok(())
    }

    /// `out` normed by `gain` (a new buffer of `x`'s size).
    fn normed(&self, x: &D::Buf, gain: &D::Vector) -> Result<D::Buf, ModelError> {
        let mut out = self.dev.scratch(self.dev.len(x))?;
        self.dev
            .rms_norm(x, gain, self.config.rms_norm_eps, &mut out)?;
        Ok(out)
    }

    /// Sums `[rows, d]` over the tensor-parallel group (see [`all_reduce_rows`]).
    fn all_reduce(
        &self,
        tp: &dyn Communicator,
        buf: &mut D::Buf,
        d: usize,
    ) -> Result<(), ModelError> {
        if tp.world_size() <= 1 {
            return Ok(());
        }
        self.dev.all_reduce(tp, buf, d)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        l: &Layer<D>,
        li: usize,
        h: &mut D::Buf,
        seqs: &[SeqInput],
        pass: &Pass,
        slots: &[usize],
        kv: &mut D::Kv,
        tp: &dyn Communicator,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let dev = &self.dev;
        let (d, ks) = (c.emb_size, c.key_size);
        let t = dev.len(h) / d;
        if t == 0 {
            // A data-parallel attention rank with no sequence in this step: it still serves
            // its experts in the MoE.
            return Ok(());
        }
        let nq = self.shard.q_heads.len();
        let nkv = self.shard.kv_heads.len();
        let xn = self.normed(h, &l.pre_attn_norm)?;
        let mut q = dev.scratch(t * nq * ks)?;
        let mut k = dev.scratch(t * nkv * ks)?;
        let mut v = dev.scratch(t * nkv * ks)?;
        dev.matmul(&l.q, &xn, t, &mut q)?;
        dev.matmul(&l.k, &xn, t, &mut k)?;
        dev.matmul(&l.v, &xn, t, &mut v)?;
        dev.rope(&mut q, nq, ks, &pass.positions, c.rope_theta)?;
        dev.rope(&mut k, nkv, ks, &pass.positions, c.rope_theta)?;
        // Keys are cached after RoPE.
        dev.kv_write(kv, li, slots, &k, &v)?;
        let heads = attention::Heads {
            ks,
            nq,
            nkv,
            g: c.group_size(),
            q0: self.shard.q_heads.start,
            kv0: self.shard.kv_heads.start,
            mult: c.attn_output_multiplier as f32,
            cap: c.max_attn_value as f32,
        };
        let o = dev.attend(&q, seqs, &pass.rows, &pass.positions, kv, li, &heads)?;
        let mut a = dev.scratch(t * d)?;
        dev.matmul(&l.o, &o, t, &mut a)?;
        if self.dispatch.is_none() {
            self.all_reduce(tp, &mut a, d)?;
        }
        let a = self.normed(&a, &l.post_attn_norm)?;
        dev.add_assign(h, &a)
    }

    /// Router probabilities and the top-k choice of each row: `(expert, gate)` pairs.
    pub fn route(&self, l: &Layer<D>, xn: &D::Buf) -> Result<Vec<Vec<(usize, f32)>>, ModelError> {
        let c = &self.config;
        self.dev.route(
            &l.router,
            xn,
            c.num_experts,
            c.num_selected_experts,
            c.emb_size,
        )
    }

    fn moe_block(
        &self,
        l: &Layer<D>,
        h: &mut D::Buf,
        tp: &dyn Communicator,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let d = c.emb_size;
        let xn = self.normed(h, &l.pre_moe_norm)?;
        let li = l.index - self.shard.layers.start;
        let on_device = match self.dispatch {
            Some(_) => None,
            None => self.dev.moe_routed(
                &l.router,
                &l.experts,
                &xn,
                device::MoeShape {
                    rows: self.dev.len(&xn) / d.max(1),
                    emb: d,
                    experts: c.num_experts,
                    k: c.num_selected_experts,
                    layer: li,
                    layers: self.layers.len(),
                },
            )?,
        };
        let mut m = match on_device {
            Some(m) => m,
            None => {
                let routes = self.route(l, &xn)?;
                {
                    let ne = c.num_experts;
                    let mut counts = self.expert_counts.lock().unwrap_or_else(|p| p.into_inner());
                    for sel in &routes {
                        for (e, _) in sel {
                            counts[li * ne + e] += 1;
                        }
                    }
                }
                match &self.dispatch {
                    Some(dp) => self.moe_dispatched(l, &xn, &routes, tp, dp)?,
                    None => self.moe_local(l, &xn, &routes)?,
                }
            }
        };
        if self.dispatch.is_none() {
            self.all_reduce(tp, &mut m, d)?;
        }
        let m = self.normed(&m, &l.post_moe_norm)?;
        self.dev.add_assign(h, &m)
    }

    /// One expert slice on `xs` (`[n, emb]`): `linear_1(gelu(linear(x)) · linear_v(x))`.
    fn expert_ffn(&self, ex: &Expert<D>, xs: &D::Buf, n: usize) -> Result<D::Buf, ModelError> {
        let dev = &self.dev;
        let d = self.config.emb_size;
        let f = dev.out_features(&ex.linear);
        let mut a = dev.scratch(n * f)?;
        let mut b = dev.scratch(n * f)?;
        dev.matmul(&ex.linear, xs, n, &mut a)?;
        dev.matmul(&ex.linear_v, xs, n, &mut b)?;
        dev.gelu_gate(&mut a, &b)?;
        let mut y = dev.scratch(n * d)?;
        dev.matmul(&ex.linear_1, &a, n, &mut y)?;
        Ok(y)
    }

    /// The local experts' gated outputs summed per row (`[rows, emb]`): for each expert in
    /// index order, `m[row] += gate · expert(xn[row])` over the rows that chose it.
    fn moe_local(
        &self,
        l: &Layer<D>,
        xn: &D::Buf,
        routes: &[Vec<(usize, f32)>],
    ) -> Result<D::Buf, ModelError> {
        let d = self.config.emb_size;
        let t = routes.len();
        let mut m = self.dev.zeros(t * d)?;
        for ex in &l.experts {
            let (rows, gates): (Vec<usize>, Vec<f32>) = routes
                .iter()
                .enumerate()
                .filter_map(|(r, sel)| {
                    sel.iter()
                        .find(|(e, _)| *e == ex.index)
                        .map(|(_, g)| (r, *g))
                })
                .unzip();
            if rows.is_empty() {
                continue;
            }
            self.served(ex.index, rows.len());
            let xs = self.dev.gather_rows(xn, &rows, d)?;
            let y = self.expert_ffn(ex, &xs, rows.len())?;
            self.dev.scatter_add_rows(&mut m, &rows, &gates, &y, d)?;
        }
        Ok(m)
    }

    /// The MoE of data-parallel attention: each (row, expert) choice goes to one rank holding
    /// the expert (the copy this rank has sent the fewest rows to in this layer, itself first
    /// on a tie), by all-to-all; the ranks run their experts on what they received and send
    /// the outputs back by a second all-to-all; each row then sums its gated outputs in
    /// expert order, the order [`Model::moe_local`] uses, so a row's result has the same bits
    /// as in one process (the kernels are batch-invariant). A rank with no rows still takes
    /// part in every exchange. The exchanges go through the host.
    fn moe_dispatched(
        &self,
        l: &Layer<D>,
        xn: &D::Buf,
        routes: &[Vec<(usize, f32)>],
        comm: &dyn Communicator,
        dp: &ExpertDispatch,
    ) -> Result<D::Buf, ModelError> {
        let d = self.config.emb_size;
        let (w, me) = (comm.world_size(), comm.rank());
        let t = routes.len();
        // Choices per destination rank, in row order: (row, expert, gate).
        let mut dest: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); w];
        for (r, sel) in routes.iter().enumerate() {
            for &(e, g) in sel {
                let to = dp
                    .ranks
                    .get(e)
                    .and_then(|c| {
                        c.iter()
                            .copied()
                            .filter(|&x| x < w)
                            .min_by_key(|&x| (dest[x].len(), x != me, x))
                    })
                    .ok_or_else(|| {
                        ModelError::Shard(format!("expert {e} has no rank in a group of {w}"))
                    })?;
                dest[to].push((r, e, g));
            }
        }
        // Row counts first: each rank learns how many rows it receives from each.
        let ones = vec![1usize; w];
        let sent: Vec<f32> = dest.iter().map(|v| v.len() as f32).collect();
        let mut got = vec![0f32; w];
        comm.all_to_all_v(&sent, &ones, &mut got, &ones)?;
        let mut recv_rows = Vec::with_capacity(w);
        for (i, &x) in got.iter().enumerate() {
            if !(x >= 0.0 && x <= (1u32 << 24) as f32 && x.fract() == 0.0) {
                return Err(ModelError::Shard(format!(
                    "rank {i} announced {x} rows for the experts of rank {me}"
                )));
            }
            recv_rows.push(x as usize);
        }
        // Each row travels as its expert's index, then its normed hidden state.
        let xh = self.dev.download(xn)?;
        let stride = d + 1;
        let send_rows: Vec<usize> = dest.iter().map(Vec::len).collect();
        let mut send = Vec::with_capacity(send_rows.iter().sum::<usize>() * stride);
        for &(r, e, _) in dest.iter().flatten() {
            send.push(e as f32);
            send.extend_from_slice(&xh[r * d..(r + 1) * d]);
        }
        let n_in: usize = recv_rows.iter().sum();
        let mut recv = vec![0f32; n_in * stride];
        let scale = |v: &[usize], s: usize| v.iter().map(|n| n * s).collect::<Vec<_>>();
        comm.all_to_all_v(
            &send,
            &scale(&send_rows, stride),
            &mut recv,
            &scale(&recv_rows, stride),
        )?;
        let want: Vec<usize> = recv.chunks_exact(stride).map(|c| c[0] as usize).collect();
        if let Some(e) = want
            .iter()
            .find(|&&e| !l.experts.iter().any(|x| x.index == e))
        {
            return Err(ModelError::Shard(format!(
                "rank {me} received rows for expert {e}, which it does not hold"
            )));
        }
        let mut out = vec![0f32; n_in * d];
        for ex in &l.experts {
            let idx: Vec<usize> = (0..n_in).filter(|&i| want[i] == ex.index).collect();
            if idx.is_empty() {
                continue;
            }
            self.served(ex.index, idx.len());
            let mut xs = Vec::with_capacity(idx.len() * d);
            for &i in &idx {
                xs.extend_from_slice(&recv[i * stride + 1..(i + 1) * stride]);
            }
            let xs = self.dev.upload(xs)?;
            let y = self.dev.download(&self.expert_ffn(ex, &xs, idx.len())?)?;
            for (j, &i) in idx.iter().enumerate() {
                out[i * d..(i + 1) * d].copy_from_slice(&y[j * d..(j + 1) * d]);
            }
        }
        let mut back = vec![0f32; send_rows.iter().sum::<usize>() * d];
        comm.all_to_all_v(
            &out,
            &scale(&recv_rows, d),
            &mut back,
            &scale(&send_rows, d),
        )?;
        // Each row's outputs, then summed in expert order.
        let mut parts: Vec<Vec<(usize, f32, usize)>> = vec![Vec::new(); t];
        for (o, &(r, e, g)) in dest.iter().flatten().enumerate() {
            parts[r].push((e, g, o));
        }
        let mut m = vec![0f32; t * d];
        for (r, p) in parts.iter_mut().enumerate() {
            p.sort_by_key(|x| x.0);
            for &(_, gate, o) in p.iter() {
                for (dst, src) in m[r * d..(r + 1) * d]
                    .iter_mut()
                    .zip(&back[o * d..(o + 1) * d])
                {
                    *dst += gate * src;
                }
            }
        }
        self.dev.upload(m)
    }

    /// Adds what the device counted ([`Device::take_routing_stats`]) to the host's counts.
    /// Metrics only: a failure to read them is logged, and the pass's own error (if the device
    /// is broken) comes from the next operation.
    fn pull_device_stats(&self) {
        match self.dev.take_routing_stats() {
            Ok(Some(RoutingStats { routed, served })) => {
                let add = |m: &std::sync::Mutex<Vec<u64>>, v: &[u64]| {
                    let mut c = m.lock().unwrap_or_else(|p| p.into_inner());
                    for (a, b) in c.iter_mut().zip(v) {
                        *a += b;
                    }
                };
                add(&self.expert_counts, &routed);
                add(&self.expert_served, &served);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "per-expert counts of the device not read"),
        }
    }

    /// Returns and resets the rows this shard's experts computed, per expert.
    pub fn take_expert_served(&self) -> Vec<u64> {
        self.pull_device_stats();
        let mut c = self.expert_served.lock().unwrap_or_else(|p| p.into_inner());
        let out = c.clone();
        c.iter_mut().for_each(|v| *v = 0);
        out
    }

    fn served(&self, expert: usize, rows: usize) {
        let mut c = self.expert_served.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = c.get_mut(expert) {
            *v += rows as u64;
        }
    }

    /// Returns and resets the routed-token counts, `[local layer, expert]`.
    pub fn take_expert_counts(&self) -> Vec<u64> {
        self.pull_device_stats();
        let mut c = self.expert_counts.lock().unwrap_or_else(|p| p.into_inner());
        let out = c.clone();
        c.iter_mut().for_each(|v| *v = 0);
        out
    }

    /// Final norm and tied output projection of the given rows: `[rows.len(), vocab]`, on the
    /// host.
    pub fn logits(&self, h: &D::Buf, rows: &[usize]) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let dev = &self.dev;
        let e = self.embed_layer()?;
        let g = self
            .final_norm
            .as_ref()
            .ok_or(ModelError::NotInShard("final norm"))?;
        let sel = dev.gather_rows(h, rows, c.emb_size)?;
        let xn = self.normed(&sel, g)?;
        let mut out = dev.zeros(rows.len() * c.vocab_size)?;
        dev.matmul(e, &xn, rows.len(), &mut out)?;
        dev.scale(&mut out, c.output_multiplier_scale as f32)?;
        dev.download(&out)
    }

    /// A whole forward pass on a model that holds every layer: embed, layers, logits.
    pub fn forward(
        &self,
        seqs: &[SeqInput],
        kv: &mut D::Kv,
        tp: &dyn Communicator,
    ) -> Result<Vec<f32>, ModelError> {
        self.check_batch(seqs, kv)?;
        let mut h = self.embed_tokens(seqs)?;
        self.forward_layers(&mut h, seqs, kv, tp)?;
        let rows = logit_rows(seqs);
        self.logits(&h, &rows)
    }
}

impl Model<Cpu> {
    /// Bytes of weights one decoded token reads: attention, router, the selected experts'
    /// slices (on average), the embedding row and the output matrix.
    pub fn active_weight_bytes_per_token(&self) -> f64 {
        let c = &self.config;
        let mut b = 0f64;
        for l in &self.layers {
            b +=
                (l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + l.router.len() * 4) as f64;
            let ex: usize = l
                .experts
                .iter()
                .map(|e| e.linear.bytes() + e.linear_v.bytes() + e.linear_1.bytes())
                .sum();
            b += ex as f64 * c.num_selected_experts as f64 / c.num_experts as f64;
            b += 16.0 * c.emb_size as f64;
        }
        if self.shard.logits {
            if let Some(e) = &self.embed {
                b += e.bytes() as f64;
            }
        }
        b
    }

    /// Bytes of all weights this shard holds in memory (embedding, norms, router, matrices with
    /// their int8 scales as f32): what the capacity planner's accounting must reproduce.
    pub fn weight_bytes(&self) -> usize {
        let mut b = self.embed.as_ref().map_or(0, |e| e.bytes());
        b += self.final_norm.as_ref().map_or(0, |n| 4 * n.len());
        for l in &self.layers {
            b += 4
                * (l.pre_attn_norm.len()
                    + l.post_attn_norm.len()
                    + l.pre_moe_norm.len()
                    + l.post_moe_norm.len());
            b += l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + l.router.len() * 4;
            b += l
                .experts
                .iter()
                .map(|e| e.linear.bytes() + e.linear_v.bytes() + e.linear_1.bytes())
                .sum::<usize>();
        }
        b
    }
}

/// Sums `[rows, d]` over the tensor-parallel group so that each element's summation order
/// depends only on its column, not on the number of rows: the buffer is laid out column-chunk
/// major, so the ring's chunk `c` (`[c·len/w, (c+1)·len/w)`) is exactly columns
/// `[c·d/w, (c+1)·d/w)` of every row. This keeps a sequence's logits independent of the batch
/// for any tp (for tp <= 2 any order is exact anyway).
pub(crate) fn all_reduce_rows(
    tp: &dyn Communicator,
    buf: &mut [f32],
    d: usize,
) -> Result<(), ModelError> {
    let w = tp.world_size();
    if w <= 2 || !d.is_multiple_of(w) {
        tp.all_reduce_sum(buf)?;
        return Ok(());
    }
    let rows = buf.len() / d;
    let cw = d / w;
    let mut t = vec![0f32; buf.len()];
    for r in 0..rows {
        for c in 0..w {
            let src = &buf[r * d + c * cw..r * d + (c + 1) * cw];
            t[(c * rows + r) * cw..(c * rows + r + 1) * cw].copy_from_slice(src);
        }
    }
    tp.all_reduce_sum(&mut t)?;
    for r in 0..rows {
        for c in 0..w {
            buf[r * d + c * cw..r * d + (c + 1) * cw]
                .copy_from_slice(&t[(c * rows + r) * cw..(c * rows + r + 1) * cw]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::checkpoint::Checkpoint;

    fn tiny() -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let c = ModelConfig::preset("tiny", None).unwrap();
        crate::formats::genmodel::generate(
            &c,
            crate::formats::genmodel::GenDType::F32,
            1,
            dir.path(),
            1 << 30,
            |_, _| {},
        )
        .unwrap();
        let m = Model::load(&Checkpoint::open(dir.path()).unwrap()).unwrap();
        (dir, m)
    }

    #[test]
    fn kv_cache_sizes_from_a_request_are_checked() {
        let (_dir, m) = tiny();
        assert!(KvCache::try_new(&m, 4, 16).is_ok());
        // u32::MAX blocks of u32::MAX slots: the product overflowed (a panic, or a tiny cache
        // that later indexing ran past).
        for (blocks, bs) in [
            (u32::MAX as usize, u32::MAX as usize),
            (1 << 40, 1 << 20),
            (1, 0),
        ] {
            let e = KvCache::try_new(&m, blocks, bs)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.starts_with("kv cache: "), "{e}");
        }
    }

    #[test]
    fn positions_near_the_end_of_usize_are_a_context_error() {
        let (_dir, m) = tiny();
        let kv = KvCache::new(&m, 2, 4);
        let table = [0u32, 1];
        // start_pos + len overflowed (a panic in debug builds; in release a wrapped, small end
        // passed the checks).
        let e = m
            .check_batch(
                &[SeqInput {
                    tokens: &[1, 2],
                    start_pos: usize::MAX,
                    block_table: &table,
                    want: WantLogits::Last,
                }],
                &kv,
            )
            .unwrap_err();
        assert!(matches!(e, ModelError::ContextOverflow { .. }), "{e}");
        let e = m
            .check_batch(
                &[SeqInput {
                    tokens: &[1, 100_000],
                    start_pos: usize::MAX - 1,
                    block_table: &table,
                    want: WantLogits::Last,
                }],
                &kv,
            )
            .unwrap_err();
        assert!(matches!(e, ModelError::TokenOutOfVocab { .. }), "{e}");
    }
}

#[cfg(test)]
mod dp_tests {
    use super::*;
    use crate::collective::local_group;
    use crate::formats::checkpoint::Checkpoint;
    use crate::sharding::Layout;

    /// Prefill of every prompt, then one decode token each: the logits of both passes.
    fn run(m: &Model, prompts: &[Vec<u32>], comm: &dyn Communicator) -> Vec<Vec<f32>> {
        let bs = 8;
        let per = 8;
        let mut kv = KvCache::new(m, per * prompts.len().max(1), bs);
        let tables: Vec<Vec<u32>> = (0..prompts.len())
            .map(|i| ((i * per) as u32..((i + 1) * per) as u32).collect())
            .collect();
        let inputs: Vec<SeqInput> = prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqInput {
                tokens: p,
                start_pos: 0,
                block_table: t,
                want: WantLogits::All,
            })
            .collect();
        let mut h = m.embed_tokens(&inputs).unwrap();
        m.forward_layers(&mut h, &inputs, &mut kv, comm).unwrap();
        let a = m.logits(&h, &logit_rows(&inputs)).unwrap();
        let next: Vec<[u32; 1]> = prompts.iter().map(|p| [p[0] ^ 5]).collect();
        let inputs: Vec<SeqInput> = prompts
            .iter()
            .zip(&tables)
            .zip(&next)
            .map(|((p, t), n)| SeqInput {
                tokens: n,
                start_pos: p.len(),
                block_table: t,
                want: WantLogits::Last,
            })
            .collect();
        let mut h = m.embed_tokens(&inputs).unwrap();
        m.forward_layers(&mut h, &inputs, &mut kv, comm).unwrap();
        let b = m.logits(&h, &logit_rows(&inputs)).unwrap();
        vec![a, b]
    }

    /// A random `tiny8` checkpoint in bf16 (seed `seed`) in a temporary directory.
    fn tiny8(seed: u64) -> (tempfile::TempDir, ModelConfig) {
        let dir = tempfile::tempdir().unwrap();
        let c = ModelConfig::preset("tiny8", None).unwrap();
        let bf16 = crate::formats::genmodel::GenDType::Bf16;
        crate::formats::genmodel::generate(&c, bf16, seed, dir.path(), 1 << 30, |_, _| {}).unwrap();
        (dir, c)
    }

    /// Weights copied into the process's own (huge) pages give the same bits, and the shard
    /// no longer reads the checkpoint's file.
    #[test]
    fn resident_weights_give_the_same_logits_and_no_longer_read_the_file() {
        let (dir, _) = tiny8(4);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let mut m = Model::load(&ck).unwrap();
        let prompts = vec![vec![3u32, 14, 15, 92, 65]];
        let before = run(&m, &prompts, &crate::collective::SingleRank);
        m.make_resident().unwrap();
        drop(ck);
        // Releasing pages leaves the process's own copy alone (it would read zeros).
        for l in &m.layers {
            for lin in [&l.q, &l.k, &l.v, &l.o] {
                lin.release_pages();
            }
            for e in &l.experts {
                e.linear.release_pages();
                e.linear_1.release_pages();
            }
        }
        // The file's bytes change under the model: a shard still reading its mapping would
        // see zeros.
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                let n = std::fs::metadata(&p).unwrap().len() as usize;
                std::fs::write(&p, vec![0u8; n]).unwrap();
            }
        }
        let after = run(&m, &prompts, &crate::collective::SingleRank);
        let bits = |v: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
            v.iter()
                .map(|r| r.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&before), bits(&after));
        assert!(before.iter().flatten().all(|x| x.is_finite()));
    }

    /// Data-parallel attention with experts dispatched by all-to-all gives the bits of one
    /// process, whichever rank a sequence runs on, with one or two copies of each expert, and
    /// with ranks that have no sequence in a step.
    #[test]
    fn dp_attention_with_dispatched_experts_matches_one_process() {
        let (dir, c) = tiny8(3);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let one = Model::load(&ck).unwrap();
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|i| {
                (0..(5 + 7 * i))
                    .map(|j| ((j * 31 + i * 7 + 3) % 500) as u32 + 1)
                    .collect()
            })
            .collect();
        let v = c.vocab_size;
        // Each sequence alone in one process: (prefill rows, decode row).
        let want: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|p| {
                run(
                    &one,
                    std::slice::from_ref(p),
                    &crate::collective::SingleRank,
                )
            })
            .collect();
        for (ep, copies) in [(2, 1), (2, 2), (3, 2), (4, 1), (4, 3)] {
            let layout = Layout::dp_attention(ep, copies);
            layout.validate(&c).unwrap();
            let comms = local_group(ep);
            let got: Vec<(usize, Vec<Vec<f32>>)> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter()
                    .enumerate()
                    .map(|(r, comm)| {
                        let (ck, prompts, c) = (&ck, &prompts, &c);
                        s.spawn(move || {
                            let mut m = Model::load_shard(ck, &layout.shard(c, r)).unwrap();
                            m.dispatch = Some(ExpertDispatch {
                                ranks: layout.expert_ranks(c),
                            });
                            let mine: Vec<Vec<u32>> = prompts
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| i % ep == r)
                                .map(|(_, p)| p.clone())
                                .collect();
                            (r, run(&m, &mine, comm))
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, out) in got {
                let mut off = [0usize; 2];
                for (i, p) in prompts.iter().enumerate().filter(|(i, _)| i % ep == r) {
                    for pass in 0..2 {
                        let n = if pass == 0 { p.len() } else { 1 };
                        let rows = &out[pass][off[pass] * v..(off[pass] + n) * v];
                        assert!(rows.iter().all(|x| x.is_finite()));
                        assert!(
                            rows == &want[i][pass][..],
                            "ep {ep} copies {copies}: sequence {i} on rank {r}, pass {pass} differs"
                        );
                        off[pass] += n;
                    }
                }
            }
        }
    }

    /// A shard whose experts change ([`Model::set_experts`]: some kept, some loaded, some
    /// dropped) computes what a shard loaded with those experts does, under the new placement.
    #[test]
    fn a_new_placement_loaded_in_place_matches_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let c = ModelConfig::preset("tiny8", None).unwrap();
        crate::formats::genmodel::generate(
            &c,
            crate::formats::genmodel::GenDType::Int8,
            4,
            dir.path(),
            1 << 30,
            |_, _| {},
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let one = Model::load(&ck).unwrap();
        let prompts: Vec<Vec<u32>> = vec![vec![3, 9, 27, 81, 243], vec![5, 6, 7]];
        let want: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|p| {
                run(
                    &one,
                    std::slice::from_ref(p),
                    &crate::collective::SingleRank,
                )
            })
            .collect();
        let layout = Layout::dp_attention(2, 1);
        // Every expert on rank 0, the odd ones on rank 1 as well.
        let placement: Vec<Vec<usize>> = (0..8)
            .map(|e| if e % 2 == 1 { vec![0, 1] } else { vec![0] })
            .collect();
        layout.check_placement(&c, &placement).unwrap();
        let comms = local_group(2);
        let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .enumerate()
                .map(|(r, comm)| {
                    let (ck, prompts, c, placement) = (&ck, &prompts, &c, &placement);
                    s.spawn(move || {
                        let mut m = Model::load_shard(ck, &layout.shard(c, r)).unwrap();
                        let before: Vec<usize> = m.shard.experts.iter().map(|x| x.0).collect();
                        let target = layout.shard_placed(c, r, placement);
                        let loaded = m.set_experts(ck, &target.experts).unwrap();
                        let kept = target
                            .experts
                            .iter()
                            .filter(|x| before.contains(&x.0))
                            .count();
                        assert_eq!(loaded, target.experts.len() - kept);
                        assert!(m
                            .layers
                            .iter()
                            .all(|l| l.experts.len() == target.experts.len()));
                        m.dispatch = Some(ExpertDispatch {
                            ranks: placement.clone(),
                        });
                        run(&m, std::slice::from_ref(&prompts[r]), comm)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, out) in got.iter().enumerate() {
            assert!(out[0] == want[r][0] && out[1] == want[r][1], "rank {r}");
        }
        // A failed load changes nothing.
        let mut m = Model::load_shard(&ck, &layout.shard(&c, 0)).unwrap();
        let before = m.shard.clone();
        assert!(m.set_experts(&ck, &[(9, 0..c.ffn_size)]).is_err());
        assert_eq!(m.shard, before);
    }
}
