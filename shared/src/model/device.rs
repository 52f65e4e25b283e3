//! The operations the forward pass is written in ([`Device`]), and their CPU implementation
//! ([`Cpu`]). The pass itself (`model/mod.rs`: sharding, the collectives' call sites, the
//! pad-mask rules, the MoE's routing and dispatch) exists once, over any device; a device
//! supplies buffers, weights and a paged KV cache of its own and the kernels below.
//!
//! Activations are row-major `[rows, width]` f32 buffers. Routing choices come back to the
//! host (the MoE groups rows by expert there), unless the device runs a layer's MoE with its
//! routing kept on the device ([`Device::moe_routed`], CUDA decode passes). The
//! tensor-parallel all-reduce and the pipeline's send and receive are device operations ([`Device::all_reduce`], [`Device::send`],
//! [`Device::recv`]): by default staged through the host to any communicator; the CUDA device
//! hands its buffers to NCCL directly when the communicator is NCCL.

use super::attention::{self, Heads};
use super::{KvCache, ModelError, SeqInput};
use crate::backend::cpu::{rms_norm, rope, Linear};
use crate::backend::simd::gelu_gate;
use crate::collective::Communicator;
use rayon::prelude::*;
use std::ops::Range;

/// Per-expert counts a device gathered ([`Device::take_routing_stats`]).
pub struct RoutingStats {
    /// Tokens routed to each expert, `[local layer, expert]`.
    pub routed: Vec<u64>,
    /// Rows this shard's experts computed, `[expert]`.
    pub served: Vec<u64>,
}

/// One MoE layer's sizes for [`Device::moe_routed`].
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    /// Rows of the pass.
    pub rows: usize,
    pub emb: usize,
    /// Experts of the model, and how many each row chooses.
    pub experts: usize,
    pub k: usize,
    /// The layer's index among this shard's layers, and their number.
    pub layer: usize,
    pub layers: usize,
}

/// A device the forward pass runs on.
pub trait Device: Send + Sync {
    /// Activations, `[rows, width]` f32.
    type Buf: Send + Sync;
    /// A weight matrix `[out, in]` (f32, bf16 or int8 with scales).
    type Lin: Send + Sync;
    /// An f32 vector (norm gains).
    type Vector: Send + Sync;
    /// An f32 matrix (the router, `[experts, emb]`).
    type Matrix: Send + Sync;
    /// This shard's paged KV cache: keys (after RoPE) and values per layer and slot, and a
    /// visibility flag per slot (token id > pad).
    type Kv: Send;

    /// Elements in a buffer.
    fn len(&self, b: &Self::Buf) -> usize;
    /// A zeroed buffer of `n` elements.
    fn zeros(&self, n: usize) -> Result<Self::Buf, ModelError>;
    /// A buffer of `n` elements for an operation that writes every one of them before any is
    /// read (a matrix product's or a norm's output): no zeroing where the device can skip it.
    fn scratch(&self, n: usize) -> Result<Self::Buf, ModelError> {
        self.zeros(n)
    }
    /// A buffer holding `x`.
    fn upload(&self, x: Vec<f32>) -> Result<Self::Buf, ModelError>;
    /// A buffer's contents on the host.
    fn download(&self, b: &Self::Buf) -> Result<Vec<f32>, ModelError>;
    /// Runs `f` on the buffer's contents as a host slice (staged through the host where the
    /// device's memory is not the host's), keeping what `f` wrote.
    fn with_host<R>(
        &self,
        b: &mut Self::Buf,
        f: impl FnOnce(&mut [f32]) -> R,
    ) -> Result<R, ModelError>;

    /// Output features of a weight matrix.
    fn out_features(&self, w: &Self::Lin) -> usize;
    /// Rows `tokens` of the embedding `e`, times `mult`: `[tokens, emb]`.
    fn embed(&self, e: &Self::Lin, tokens: &[u32], mult: f32) -> Result<Self::Buf, ModelError>;
    /// `out = x / rms(x) * gain` per row of `gain.len()` elements.
    fn rms_norm(
        &self,
        x: &Self::Buf,
        gain: &Self::Vector,
        eps: f64,
        out: &mut Self::Buf,
    ) -> Result<(), ModelError>;
    /// `out[rows, out_features] = x[rows, in_features] · wᵀ`, each row with the arithmetic it
    /// has alone (batch invariance).
    fn matmul(
        &self,
        w: &Self::Lin,
        x: &Self::Buf,
        rows: usize,
        out: &mut Self::Buf,
    ) -> Result<(), ModelError>;
    /// Half-split RoPE of `[rows, heads, key_size]` at the rows' positions.
    fn rope(
        &self,
        x: &mut Self::Buf,
        heads: usize,
        key_size: usize,
        positions: &[usize],
        theta: f64,
    ) -> Result<(), ModelError>;
    /// `(blocks, slots per block)` of a KV cache.
    fn kv_geometry(&self, kv: &Self::Kv) -> (usize, usize);
    /// Sets the visibility flag of each of `slots`.
    fn kv_visible(
        &self,
        kv: &mut Self::Kv,
        slots: &[usize],
        visible: &[bool],
    ) -> Result<(), ModelError>;
    /// Writes row `i` of `k` and `v` (`[rows, kv_heads · key_size]`) to slot `slots[i]` of
    /// layer `layer`.
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        slots: &[usize],
        k: &Self::Buf,
        v: &Self::Buf,
    ) -> Result<(), ModelError>;
    /// Causal attention of the pass's queries `q` (`[rows, nq, ks]`, after RoPE) over the
    /// keys and values of layer `layer` (the official semantics: soft-capped scores, keys of
    /// pad tokens masked, a query whose keys are all masked attending uniformly to every key
    /// of the pass): `[rows, nq, ks]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Self::Buf,
        seqs: &[SeqInput],
        rows: &[Range<usize>],
        positions: &[usize],
        kv: &Self::Kv,
        layer: usize,
        heads: &Heads,
    ) -> Result<Self::Buf, ModelError>;
    /// `h += a`.
    fn add_assign(&self, h: &mut Self::Buf, a: &Self::Buf) -> Result<(), ModelError>;
    /// Router softmax over all experts and the top-`k` (ties to the lower index, gates not
    /// renormalised) of each row of `xn` (`[rows, emb]`).
    fn route(
        &self,
        router: &Self::Matrix,
        xn: &Self::Buf,
        experts: usize,
        k: usize,
        emb: usize,
    ) -> Result<Vec<Vec<(usize, f32)>>, ModelError>;
    /// Rows `rows` of `x` (`[_, d]`): `[rows.len(), d]`.
    fn gather_rows(&self, x: &Self::Buf, rows: &[usize], d: usize)
        -> Result<Self::Buf, ModelError>;
    /// `a = gelu(a) · b` (the tanh GELU).
    fn gelu_gate(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<(), ModelError>;
    /// `m[rows[i]] += gates[i] · y[i]` for each row `i` of `y` (`[rows.len(), d]`), in order.
    fn scatter_add_rows(
        &self,
        m: &mut Self::Buf,
        rows: &[usize],
        gates: &[f32],
        y: &Self::Buf,
        d: usize,
    ) -> Result<(), ModelError>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<(), ModelError>;

    /// The MoE of one layer over this shard's `experts` (in their order) with the routing kept
    /// on the device: the gated sums `[rows, emb]` of the experts each row chose, or None where
    /// this device or this pass takes the host path (`Model::moe_local`, which it must equal).
    /// Counts the routed and served rows for [`Device::take_routing_stats`].
    fn moe_routed(
        &self,
        router: &Self::Matrix,
        experts: &[super::Expert<Self>],
        xn: &Self::Buf,
        shape: MoeShape,
    ) -> Result<Option<Self::Buf>, ModelError>
    where
        Self: Sized,
    {
        let _ = (router, experts, xn, shape);
        Ok(None)
    }
    /// Routed tokens (`[local layer, expert]`) and served rows (`[expert]`) that
    /// [`Device::moe_routed`] counted since the last call (None: it counted none).
    fn take_routing_stats(&self) -> Result<Option<RoutingStats>, ModelError> {
        Ok(None)
    }

    /// Sums `buf` (`[rows, d]`) over the tensor-parallel group `tp`. By default through the
    /// host, in the batch-invariant order of [`super::all_reduce_rows`]; a device whose buffers
    /// the communicator reaches directly (NCCL) overrides it.
    fn all_reduce(
        &self,
        tp: &dyn Communicator,
        buf: &mut Self::Buf,
        d: usize,
    ) -> Result<(), ModelError> {
        self.with_host(buf, |b| super::all_reduce_rows(tp, b, d))?
    }
    /// Sends `buf` to rank `peer` of `comm` (pipeline stages), through the host by default.
    fn send(
        &self,
        comm: &dyn Communicator,
        buf: &Self::Buf,
        peer: usize,
    ) -> Result<(), ModelError> {
        let v = self.download(buf)?;
        comm.send(&v, peer)?;
        Ok(())
    }
    /// Receives `n` elements from rank `peer` of `comm`, through the host by default.
    fn recv(
        &self,
        comm: &dyn Communicator,
        n: usize,
        peer: usize,
    ) -> Result<Self::Buf, ModelError> {
        let mut v = vec![0f32; n];
        comm.recv(&mut v, peer)?;
        self.upload(v)
    }
}

/// The host CPU: buffers are `Vec<f32>`, weights [`Linear`], kernels `backend::cpu` and
/// `backend::simd` on the process's rayon pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Device for Cpu {
    type Buf = Vec<f32>;
    type Lin = Linear;
    type Vector = Vec<f32>;
    type Matrix = Vec<f32>;
    type Kv = KvCache;

    fn len(&self, b: &Vec<f32>) -> usize {
        b.len()
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>, ModelError> {
        Ok(vec![0f32; n])
    }

    fn upload(&self, x: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        Ok(x)
    }

    fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>, ModelError> {
        Ok(b.clone())
    }

    fn with_host<R>(
        &self,
        b: &mut Vec<f32>,
        f: impl FnOnce(&mut [f32]) -> R,
    ) -> Result<R, ModelError> {
        Ok(f(b))
    }

    fn out_features(&self, w: &Linear) -> usize {
        w.out_features
    }

    fn embed(&self, e: &Linear, tokens: &[u32], mult: f32) -> Result<Vec<f32>, ModelError> {
        let d = e.in_features;
        let mut h = vec![0f32; tokens.len() * d];
        h.par_chunks_mut(d)
            .zip(tokens.par_iter())
            .for_each(|(row, &t)| {
                e.row_f32(t as usize, row);
                for v in row.iter_mut() {
                    *v *= mult;
                }
            });
        Ok(h)
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        gain: &Vec<f32>,
        eps: f64,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        rms_norm(x, gain, eps, out);
        Ok(())
    }

    fn matmul(
        &self,
        w: &Linear,
        x: &Vec<f32>,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        w.matmul(x, rows, out);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        key_size: usize,
        positions: &[usize],
        theta: f64,
    ) -> Result<(), ModelError> {
        rope(x, heads, key_size, positions, theta);
        Ok(())
    }

    fn kv_geometry(&self, kv: &KvCache) -> (usize, usize) {
        (kv.num_blocks, kv.block_size)
    }

    fn kv_visible(
        &self,
        kv: &mut KvCache,
        slots: &[usize],
        visible: &[bool],
    ) -> Result<(), ModelError> {
        for (&s, &v) in slots.iter().zip(visible) {
            kv.visible[s] = v;
        }
        Ok(())
    }

    fn kv_write(
        &self,
        kv: &mut KvCache,
        layer: usize,
        slots: &[usize],
        k: &Vec<f32>,
        v: &Vec<f32>,
    ) -> Result<(), ModelError> {
        let w = kv.num_kv_heads * kv.key_size;
        for (row, &slot) in slots.iter().enumerate() {
            let dst = slot * w..(slot + 1) * w;
            kv.k[layer][dst.clone()].copy_from_slice(&k[row * w..(row + 1) * w]);
            kv.v[layer][dst].copy_from_slice(&v[row * w..(row + 1) * w]);
        }
        Ok(())
    }

    fn attend(
        &self,
        q: &Vec<f32>,
        seqs: &[SeqInput],
        rows: &[Range<usize>],
        positions: &[usize],
        kv: &KvCache,
        layer: usize,
        heads: &Heads,
    ) -> Result<Vec<f32>, ModelError> {
        Ok(attention::attend(
            q, seqs, rows, positions, kv, layer, heads,
        ))
    }

    fn add_assign(&self, h: &mut Vec<f32>, a: &Vec<f32>) -> Result<(), ModelError> {
        for (x, y) in h.iter_mut().zip(a) {
            *x += y;
        }
        Ok(())
    }

    fn route(
        &self,
        router: &Vec<f32>,
        xn: &Vec<f32>,
        ne: usize,
        k: usize,
        d: usize,
    ) -> Result<Vec<Vec<(usize, f32)>>, ModelError> {
        Ok(xn
            .par_chunks(d)
            .map(|x| {
                let logits: Vec<f64> = (0..ne)
                    .map(|e| {
                        let w = &router[e * d..(e + 1) * d];
                        w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = logits.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = ex.iter().sum();
                let probs: Vec<f32> = ex.iter().map(|v| (v / sum) as f32).collect();
                let mut idx: Vec<usize> = (0..ne).collect();
                // Stable sort: ties keep the lower index first, like jax.lax.top_k.
                idx.sort_by(|&a, &b| {
                    probs[b]
                        .partial_cmp(&probs[a])
                        .unwrap_or(std::cmp::Ordering::Equal)
                });
                idx[..k].iter().map(|&e| (e, probs[e])).collect()
            })
            .collect())
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &[usize], d: usize) -> Result<Vec<f32>, ModelError> {
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            out.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        Ok(out)
    }

    fn gelu_gate(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<(), ModelError> {
        gelu_gate(a, b);
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        m: &mut Vec<f32>,
        rows: &[usize],
        gates: &[f32],
        y: &Vec<f32>,
        d: usize,
    ) -> Result<(), ModelError> {
        for (i, (&r, &gate)) in rows.iter().zip(gates).enumerate() {
            for (dst, src) in m[r * d..(r + 1) * d].iter_mut().zip(&y[i * d..(i + 1) * d]) {
                *dst += gate * src;
            }
        }
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<(), ModelError> {
        x.par_iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
}
