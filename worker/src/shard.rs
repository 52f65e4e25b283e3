//! The worker's shard on its device: the model and its paged KV cache on the CPU or on a
//! CUDA GPU, and a step's part of the forward pass over either. The pass is the one of
//! `grok_shared::model` (the same sharding, collectives and masks on both devices); hidden
//! states cross pipeline stages and the all-reduces in device memory over NCCL, through the
//! host over TCP.

use crate::comm::{Comm, NcclStream};
use grok_shared::collective::Communicator;
use grok_shared::model::{logit_rows, Cpu, Device, KvCache, Model, ModelError, SeqInput};

/// A model shard and its KV cache, on the device the worker was started with.
// One per loaded worker, never moved in a loop: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Shard {
    Cpu {
        model: Model<Cpu>,
        kv: KvCache,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        model: Model<grok_shared::backend::cuda::Cuda>,
        kv: grok_shared::backend::cuda::CudaKv,
    },
}

/// Evaluates `$body` with `$m` bound to the shard's model and `$kv` to its KV cache, on
/// whichever device holds them.
macro_rules! with_shard {
    ($s:expr, |$m:ident, $kv:ident| $body:expr) => {
        match $s {
            $crate::shard::Shard::Cpu { model: $m, kv: $kv } => $body,
            #[cfg(feature = "cuda")]
            $crate::shard::Shard::Cuda { model: $m, kv: $kv } => $body,
        }
    };
}
pub(crate) use with_shard;

impl Shard {
    /// Bytes of weights the shard holds (in device memory for a GPU).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Shard::Cpu { model, .. } => model.weight_bytes(),
            #[cfg(feature = "cuda")]
            Shard::Cuda { model, .. } => model.device_weight_bytes(),
        }
    }

    /// Bytes of the KV cache (in device memory for a GPU).
    pub fn kv_bytes(&self) -> usize {
        match self {
            Shard::Cpu { kv, .. } => kv.bytes(),
            #[cfg(feature = "cuda")]
            Shard::Cuda { kv, .. } => kv.bytes(),
        }
    }

    /// The stream NCCL would join on (a GPU shard's device stream).
    pub fn nccl_stream(&self) -> Option<NcclStream> {
        match self {
            Shard::Cpu { .. } => None,
            #[cfg(feature = "cuda")]
            Shard::Cuda { model, .. } => Some(model.dev.be.stream().clone()),
        }
    }

    /// KV blocks of the cache.
    pub fn kv_blocks(&self) -> usize {
        with_shard!(self, |m, kv| m.dev.kv_geometry(kv).0)
    }
}

/// Where a rank's hidden states come from and go in a step.
pub struct Route<'a> {
    /// The rank of the stage before (None: this stage embeds the tokens).
    pub prev: Option<usize>,
    /// The rank of the stage after (None: the last stage).
    pub next: Option<usize>,
    /// This rank computes logits (the sampling rank).
    pub samples: bool,
    pub world: &'a Comm,
    pub tp: &'a Comm,
}

/// What a step's pass gives back on this rank.
#[derive(Default)]
pub struct PassOut {
    /// Logits of the rows the batch asked for (the sampling rank only; None: none).
    pub logits: Option<Vec<f32>>,
    /// Routed tokens per (local layer, expert) and rows computed per expert.
    pub counts: Vec<u64>,
    pub served: Vec<u64>,
    pub first_layer: usize,
}

/// This rank's part of a step: embed (or receive the hidden states), run its layers, send
/// them on or compute the logits.
pub fn run_pass<D: Device>(
    m: &Model<D>,
    kv: &mut D::Kv,
    inputs: &[SeqInput],
    r: &Route,
) -> Result<PassOut, ModelError> {
    let d = m.config.emb_size;
    let rows: usize = inputs.iter().map(|s| s.tokens.len()).sum();
    let mut h = match r.prev {
        None => m.embed_tokens(inputs)?,
        Some(prev) => m.dev.recv(r.world, rows * d, prev)?,
    };
    m.forward_layers(&mut h, inputs, kv, r.tp as &dyn Communicator)?;
    let mut out = PassOut {
        logits: None,
        counts: m.take_expert_counts(),
        served: m.take_expert_served(),
        first_layer: m.shard.layers.start,
    };
    if let Some(next) = r.next {
        m.dev.send(r.world, &h, next)?;
        return Ok(out);
    }
    if !r.samples {
        return Ok(out);
    }
    let lrows = logit_rows(inputs);
    if !lrows.is_empty() {
        out.logits = Some(m.logits(&h, &lrows)?);
    }
    Ok(out)
}
