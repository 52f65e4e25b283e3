//! The Grok-1 forward pass on one CUDA device (tp = 1), reproducing the CPU [`Model`]'s
//! official semantics for ONE sequence over a contiguous device KV cache.
//!
//! - Weights: bf16 or int8 as stored; f32 checkpoint weights are converted to bf16 on upload
//!   ([`CudaModel::converted_f32`] says so). Norm gains and the router stay f32.
//! - Activations and the KV cache are f32 (`[max_len, kv_heads, key_size]` per layer, keys after
//!   RoPE); one visibility flag per position (token id > pad) implements the pad-key masking,
//!   and a query whose keys are all masked attends uniformly to every key of the pass.
//! - Projections use the tensor-core GEMV in passes of at most 64 rows (a prefill of `T` tokens
//!   reads each weight `ceil(T / 64)` times: correct, not yet a GEMM path).
//! - The router runs on the device; its top-2 choices are copied to the host to build each
//!   expert's row list, then rows are gathered, pushed through the expert and scattered back
//!   with their gates on the device.
//! - The embedding lookup is done on the host (the CPU copy of the embedding is kept) and the
//!   hidden rows uploaded; the tied output projection runs on the device.

use super::{CudaBackend, CudaError, CudaSlice, DeviceLinear, DeviceWeights};
use crate::backend::cpu::{Linear, Weights};
use crate::config::ModelConfig;
use crate::formats::checkpoint::Checkpoint;
use crate::model::{Model, ShardSpec};
use crate::sampling::{sample, Rng, SamplingParams};
use half::bf16;

struct CudaExpert {
    index: usize,
    linear: DeviceLinear,
    linear_v: DeviceLinear,
    linear_1: DeviceLinear,
}

/// The KV cache of one sequence, outside the model while another sequence runs.
pub struct CudaSequence {
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    vis: CudaSlice<i32>,
    len: usize,
}

struct CudaLayer {
    pre_attn_norm: CudaSlice<f32>,
    post_attn_norm: CudaSlice<f32>,
    pre_moe_norm: CudaSlice<f32>,
    post_moe_norm: CudaSlice<f32>,
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    o: DeviceLinear,
    router: CudaSlice<f32>,
    experts: Vec<CudaExpert>,
    k_cache: CudaSlice<f32>,
    v_cache: CudaSlice<f32>,
}

/// A whole model (every layer, head and expert) on one device, with the KV cache of one
/// sequence of at most `max_len` positions.
pub struct CudaModel {
    /// The device; the model keeps it open as long as it lives.
    be: std::sync::Arc<CudaBackend>,
    pub config: ModelConfig,
    embed_host: Linear,
    embed: DeviceLinear,
    final_norm: CudaSlice<f32>,
    layers: Vec<CudaLayer>,
    vis: CudaSlice<i32>,
    max_len: usize,
    /// Positions held in the KV cache.
    len: usize,
    /// Whether f32 checkpoint weights were converted to bf16 on upload.
    pub converted_f32: bool,
    /// Bytes of weights on the device.
    pub weight_bytes: usize,
    /// Bytes of weights one decoded token reads (attention, router, 2 of the experts on
    /// average, output matrix), like [`Model::active_weight_bytes_per_token`].
    pub active_bytes_per_token: f64,
    /// Tokens routed to each expert since the last [`CudaModel::take_expert_counts`],
    /// `[layer, expert]`.
    expert_counts: Vec<u64>,
}

pub(crate) fn upload_lin(
    be: &CudaBackend,
    name: &str,
    lin: &Linear,
    converted: &mut bool,
) -> Result<DeviceLinear, CudaError> {
    if let Weights::F32(w) = &lin.w {
        *converted = true;
        let b: Vec<u16> = w
            .as_slice()
            .iter()
            .map(|v| bf16::from_f32(*v).to_bits())
            .collect();
        return Ok(DeviceLinear {
            out_features: lin.out_features,
            in_features: lin.in_features,
            weights: DeviceWeights::Bf16(be.upload(name, &b)?),
        });
    }
    be.upload_linear(name, lin)
}

fn inv(msg: impl Into<String>) -> CudaError {
    CudaError::invalid("cuda model", msg)
}

impl CudaModel {
    /// Loads a whole-model shard (all heads and whole experts; any dtype) with a KV cache of
    /// `max_len` positions (at most the context length).
    pub fn load(
        be: std::sync::Arc<CudaBackend>,
        ckpt: &Checkpoint,
        shard: &ShardSpec,
        max_len: usize,
    ) -> Result<Self, CudaError> {
        let owner = be;
        let be = &*owner;
        let c = ckpt.config.clone();
        let (c_layers, c_experts) = (c.num_layers, c.num_experts);
        let full = ShardSpec::full(&c);
        if shard != &full {
            return Err(inv(
                "only a whole-model shard (all layers, heads and experts, embedding and logits) \
                 runs on CUDA for now",
            ));
        }
        let max_len = max_len.clamp(1, c.max_position_embeddings);
        let cpu = Model::load_shard(ckpt, shard).map_err(|e| inv(format!("load: {e}")))?;
        let active = cpu.active_weight_bytes_per_token();
        let Model {
            embed,
            final_norm,
            layers,
            ..
        } = cpu;
        let embed_host = embed.ok_or_else(|| inv("no embedding"))?;
        let final_norm = final_norm.ok_or_else(|| inv("no final norm"))?;
        let mut conv = false;
        let embed = upload_lin(be, "embedding", &embed_host, &mut conv)?;
        let mut bytes = embed.bytes();
        let nkv = c.num_kv_heads;
        let per = max_len * nkv * c.key_size;
        let mut out = Vec::new();
        for l in layers {
            let i = l.index;
            let nm = |s: &str| format!("layer {i} {s}");
            let mut experts = Vec::new();
            for e in &l.experts {
                let ex = CudaExpert {
                    index: e.index,
                    linear: upload_lin(be, &nm("linear"), &e.linear, &mut conv)?,
                    linear_v: upload_lin(be, &nm("linear_v"), &e.linear_v, &mut conv)?,
                    linear_1: upload_lin(be, &nm("linear_1"), &e.linear_1, &mut conv)?,
                };
                bytes += ex.linear.bytes() + ex.linear_v.bytes() + ex.linear_1.bytes();
                experts.push(ex);
            }
            let cl = CudaLayer {
                pre_attn_norm: be.upload(&nm("norm"), &l.pre_attn_norm)?,
                post_attn_norm: be.upload(&nm("norm"), &l.post_attn_norm)?,
                pre_moe_norm: be.upload(&nm("norm"), &l.pre_moe_norm)?,
                post_moe_norm: be.upload(&nm("norm"), &l.post_moe_norm)?,
                q: upload_lin(be, &nm("q"), &l.q, &mut conv)?,
                k: upload_lin(be, &nm("k"), &l.k, &mut conv)?,
                v: upload_lin(be, &nm("v"), &l.v, &mut conv)?,
                o: upload_lin(be, &nm("o"), &l.o, &mut conv)?,
                router: be.upload(&nm("router"), &l.router)?,
                experts,
                k_cache: be.zeros(&nm("k cache"), per)?,
                v_cache: be.zeros(&nm("v cache"), per)?,
            };
            bytes += cl.q.bytes() + cl.k.bytes() + cl.v.bytes() + cl.o.bytes();
            bytes += 4 * l.router.len();
            out.push(cl);
        }
        Ok(Self {
            be: owner.clone(),
            final_norm: be.upload("final norm", &final_norm)?,
            config: c,
            embed_host,
            embed,
            layers: out,
            vis: be.zeros("visibility flags", max_len)?,
            max_len,
            len: 0,
            converted_f32: conv,
            weight_bytes: bytes,
            active_bytes_per_token: active,
            expert_counts: vec![0; c_layers * c_experts],
        })
    }

    /// Positions held in the KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the cached sequence.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// A fresh KV cache for another sequence (swap it in with [`CudaModel::swap_sequence`]).
    pub fn new_sequence(&self) -> Result<CudaSequence, CudaError> {
        let per = self.max_len * self.config.num_kv_heads * self.config.key_size;
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            k.push(self.be.zeros(&format!("layer {i} k cache"), per)?);
            v.push(self.be.zeros(&format!("layer {i} v cache"), per)?);
        }
        Ok(CudaSequence {
            k,
            v,
            vis: self.be.zeros("visibility flags", self.max_len)?,
            len: 0,
        })
    }

    /// Exchanges the model's current KV cache with `s` (so one model serves many sequences,
    /// each with its own cache).
    pub fn swap_sequence(&mut self, s: &mut CudaSequence) {
        for (l, (k, v)) in self
            .layers
            .iter_mut()
            .zip(s.k.iter_mut().zip(s.v.iter_mut()))
        {
            std::mem::swap(&mut l.k_cache, k);
            std::mem::swap(&mut l.v_cache, v);
        }
        std::mem::swap(&mut self.vis, &mut s.vis);
        std::mem::swap(&mut self.len, &mut s.len);
    }

    /// Returns and resets the routed-token counts, `[layer, expert]`.
    pub fn take_expert_counts(&mut self) -> Vec<u64> {
        let out = self.expert_counts.clone();
        self.expert_counts.iter_mut().for_each(|v| *v = 0);
        out
    }

    /// Positions one sequence's cache holds.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Runs `tokens` at positions `start_pos..` (`start_pos <= len()`: the cache beyond it is
    /// overwritten) and returns the logits of every new token (`want_all_logits`) or of the
    /// last one, `[rows, vocab]`.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        want_all_logits: bool,
    ) -> Result<Vec<f32>, CudaError> {
        let be = &*self.be;
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(inv("empty input: a sequence needs at least one token"));
        }
        if start_pos > self.len {
            return Err(inv(format!(
                "start position {start_pos} beyond the {} cached positions",
                self.len
            )));
        }
        let end = start_pos + t;
        if end > self.max_len {
            return Err(inv(format!(
                "{end} positions exceed the cache of {} positions",
                self.max_len
            )));
        }
        if let Some((i, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= c.vocab_size)
        {
            return Err(inv(format!(
                "token id {id} at position {} is outside the vocabulary ({})",
                start_pos + i,
                c.vocab_size
            )));
        }
        let (d, ks, nq, nkv) = (c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads);
        let (ne, topk) = (c.num_experts, c.num_selected_experts);
        // Embedding on the host.
        let mult = c.embedding_multiplier_scale as f32;
        let mut hh = vec![0f32; t * d];
        for (row, &id) in hh.chunks_mut(d).zip(tokens) {
            self.embed_host.row_f32(id as usize, row);
            row.iter_mut().for_each(|v| *v *= mult);
        }
        let mut h = be.upload("hidden", &hh)?;
        let positions: Vec<u32> = (start_pos as u32..end as u32).collect();
        let pos_d = be.upload("positions", &positions)?;
        let flags: Vec<i32> = tokens
            .iter()
            .map(|&id| i32::from(id > c.pad_token_id))
            .collect();
        {
            let mut dst = self.vis.slice_mut(start_pos..end);
            super::guarded("visibility flags", || {
                be.stream()
                    .memcpy_htod(&flags, &mut dst)
                    .map_err(super::drv("upload visibility flags"))
            })?;
        }
        let mut xn = be.zeros::<f32>("xn", t * d)?;
        let mut a = be.zeros::<f32>("a", t * d)?;
        let mut a2 = be.zeros::<f32>("a2", t * d)?;
        let mut q = be.zeros::<f32>("q", t * nq * ks)?;
        let mut k = be.zeros::<f32>("k", t * nkv * ks)?;
        let mut v = be.zeros::<f32>("v", t * nkv * ks)?;
        let mut o = be.zeros::<f32>("attn out", t * nq * ks)?;
        let mut gates = be.zeros::<f32>("gates", t * topk)?;
        let mut choice = be.zeros::<i32>("experts", t * topk)?;
        let mut probs = be.zeros::<f32>("probs", t * ne)?;
        let eps = c.rms_norm_eps;
        for (li, l) in self.layers.iter_mut().enumerate() {
            be.rms_norm(&h, &l.pre_attn_norm, eps, t, &mut xn)?;
            be.linear_rows(&l.q, &xn, t, &mut q)?;
            be.linear_rows(&l.k, &xn, t, &mut k)?;
            be.linear_rows(&l.v, &xn, t, &mut v)?;
            be.rope(&mut q, t, nq, ks, &pos_d, c.rope_theta)?;
            be.rope(&mut k, t, nkv, ks, &pos_d, c.rope_theta)?;
            let (o0, o1) = (start_pos * nkv * ks, end * nkv * ks);
            super::guarded("kv append", || {
                let mut kd = l.k_cache.slice_mut(o0..o1);
                be.stream()
                    .memcpy_dtod(&k.slice(..t * nkv * ks), &mut kd)
                    .map_err(super::drv("append keys"))?;
                let mut vd = l.v_cache.slice_mut(o0..o1);
                be.stream()
                    .memcpy_dtod(&v.slice(..t * nkv * ks), &mut vd)
                    .map_err(super::drv("append values"))
            })?;
            be.attention_masked(
                &q,
                &l.k_cache,
                &l.v_cache,
                &self.vis,
                (start_pos, t, nq, nkv, ks),
                c.attn_output_multiplier,
                c.max_attn_value,
                &mut o,
            )?;
            be.linear_rows(&l.o, &o, t, &mut a)?;
            be.rms_norm(&a, &l.post_attn_norm, eps, t, &mut a2)?;
            be.add_assign(&mut h, &a2, t * d)?;
            // MoE.
            be.rms_norm(&h, &l.pre_moe_norm, eps, t, &mut xn)?;
            be.router_topk(
                &xn,
                &l.router,
                t,
                d,
                ne,
                topk,
                &mut gates,
                &mut choice,
                &mut probs,
            )?;
            let ch = be.download("router choices", &choice)?;
            let gs = be.download("router gates", &gates)?;
            for &e in &ch {
                if let Some(x) = self.expert_counts.get_mut(li * ne + e as usize) {
                    *x += 1;
                }
            }
            let mut m = be.zeros::<f32>("moe out", t * d)?;
            for ex in &l.experts {
                let mut idx = Vec::new();
                let mut g = Vec::new();
                for r in 0..t {
                    for j in 0..topk {
                        if ch[r * topk + j] as usize == ex.index {
                            idx.push(r as i32);
                            g.push(gs[r * topk + j]);
                        }
                    }
                }
                let n = idx.len();
                if n == 0 {
                    continue;
                }
                let f = ex.linear.out_features;
                let idx_d = be.upload("expert rows", &idx)?;
                let g_d = be.upload("expert gates", &g)?;
                let mut xs = be.zeros::<f32>("expert in", n * d)?;
                be.gather_rows(&xn, &idx_d, n, d, &mut xs)?;
                let mut ea = be.zeros::<f32>("expert a", n * f)?;
                let mut eb = be.zeros::<f32>("expert b", n * f)?;
                be.linear_rows(&ex.linear, &xs, n, &mut ea)?;
                be.linear_rows(&ex.linear_v, &xs, n, &mut eb)?;
                let mut eg = be.zeros::<f32>("expert gelu", n * f)?;
                be.gelu_gate(&ea, &eb, &mut eg, n * f)?;
                let mut ey = be.zeros::<f32>("expert out", n * d)?;
                be.linear_rows(&ex.linear_1, &eg, n, &mut ey)?;
                be.scatter_add_rows(&mut m, &idx_d, &g_d, &ey, n, d)?;
            }
            be.rms_norm(&m, &l.post_moe_norm, eps, t, &mut a2)?;
            be.add_assign(&mut h, &a2, t * d)?;
        }
        // Final norm and tied output projection.
        let rows: Vec<i32> = if want_all_logits {
            (0..t as i32).collect()
        } else {
            vec![t as i32 - 1]
        };
        let nr = rows.len();
        let rows_d = be.upload("logit rows", &rows)?;
        let mut hs = be.zeros::<f32>("logit hidden", nr * d)?;
        be.gather_rows(&h, &rows_d, nr, d, &mut hs)?;
        let mut hn = be.zeros::<f32>("logit norm", nr * d)?;
        be.rms_norm(&hs, &self.final_norm, eps, nr, &mut hn)?;
        let vocab = c.vocab_size;
        let mut logits = be.zeros::<f32>("logits", nr * vocab)?;
        be.linear_rows(&self.embed, &hn, nr, &mut logits)?;
        be.scale(&mut logits, c.output_multiplier_scale as f32, nr * vocab)?;
        let out = be.download("logits", &logits)?;
        self.len = end;
        Ok(out)
    }

    /// Greedy (temperature 0) or seeded sampling on the host with the CPU generator's
    /// per-position random streams ([`Rng::for_token`]); returns the new ids. Stops at
    /// `max_new` tokens, at EOS when `stop_at_eos`, or at the end of the cache.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        params: &SamplingParams,
        stop_at_eos: bool,
    ) -> Result<Vec<u32>, CudaError> {
        self.reset();
        let mut row = self.forward(prompt, 0, false)?;
        let mut pos = prompt.len();
        let mut ids = Vec::new();
        while ids.len() < max_new {
            let mut rng = Rng::for_token(params.seed, pos);
            let s = sample(&row, params, &mut rng);
            ids.push(s.id);
            if (stop_at_eos && s.id == self.config.eos_token_id)
                || ids.len() == max_new
                || pos + 1 > self.max_len
            {
                break;
            }
            row = self.forward(&[s.id], pos, false)?;
            pos += 1;
        }
        Ok(ids)
    }
}
