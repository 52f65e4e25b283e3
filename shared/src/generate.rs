//! Single-process generation: prefill the prompt, then decode token by token over the paged KV
//! cache, sampling with the request's parameters.

use crate::collective::SingleRank;
use crate::model::{BlockAllocator, KvCache, Model, ModelError, SeqInput, WantLogits};
use crate::sampling::{sample, Rng, SamplingParams};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop when the model emits `eos_token_id`.
    pub stop_at_eos: bool,
    /// Return the logits of every prompt position (from one full forward pass).
    pub prompt_logits: bool,
    pub block_size: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            sampling: SamplingParams::default(),
            stop_at_eos: true,
            prompt_logits: false,
            block_size: 16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// End-of-sequence token sampled.
    Stop,
    /// The context window is full.
    Context,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Context => "context_length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// `[prompt_len, vocab]` when asked for.
    pub prompt_logits: Option<Vec<f32>>,
    pub finish: FinishReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt`; `on_token` sees each one.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateOutput, ModelError> {
    let c = &model.config;
    if prompt.is_empty() {
        return Err(ModelError::Empty);
    }
    if prompt.len() > c.max_position_embeddings {
        return Err(ModelError::ContextOverflow {
            len: prompt.len(),
            max: c.max_position_embeddings,
        });
    }
    for (pos, &id) in prompt.iter().enumerate() {
        if id as usize >= c.vocab_size {
            return Err(ModelError::TokenOutOfVocab {
                id,
                pos,
                vocab: c.vocab_size,
            });
        }
    }
    let total = (prompt.len() + opts.max_new_tokens).min(c.max_position_embeddings);
    let bs = opts.block_size.max(1);
    let nblocks = total.div_ceil(bs);
    let mut kv = KvCache::new(model, nblocks, bs);
    let mut alloc = BlockAllocator::new(nblocks);
    let mut table = Vec::new();
    alloc.ensure(&mut table, prompt.len(), bs)?;
    let t0 = Instant::now();
    let want = if opts.prompt_logits {
        WantLogits::All
    } else {
        WantLogits::Last
    };
    let seq = [SeqInput {
        tokens: prompt,
        start_pos: 0,
        block_table: &table,
        want,
    }];
    let kvr = &mut kv;
    let logits = crate::threads::on_pool(|| model.forward(&seq, kvr, &SingleRank))?;
    let v = c.vocab_size;
    let last = logits[logits.len() - v..].to_vec();
    let prompt_logits = opts.prompt_logits.then_some(logits);
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut ids = Vec::new();
    let mut logprobs = Vec::new();
    let mut row = last;
    let mut finish = FinishReason::Length;
    let mut pos = prompt.len();
    while ids.len() < opts.max_new_tokens {
        let mut rng = Rng::for_token(opts.sampling.seed, pos);
        let s = sample(&row, &opts.sampling, &mut rng);
        ids.push(s.id);
        logprobs.push(s.logprob);
        on_token(s.id);
        if opts.stop_at_eos && s.id == c.eos_token_id {
            finish = FinishReason::Stop;
            break;
        }
        if ids.len() == opts.max_new_tokens {
            break;
        }
        if pos + 1 > c.max_position_embeddings {
            finish = FinishReason::Context;
            break;
        }
        alloc.ensure(&mut table, pos + 1, bs)?;
        let id = [s.id];
        let seq = [SeqInput {
            tokens: &id,
            start_pos: pos,
            block_table: &table,
            want: WantLogits::Last,
        }];
        // On a worker of the compute pool: its matmuls split without waking a thread from
        // outside the pool for each one.
        let kvr = &mut kv;
        row = crate::threads::on_pool(|| model.forward(&seq, kvr, &SingleRank))?;
        pos += 1;
    }
    Ok(GenerateOutput {
        ids,
        logprobs,
        prompt_logits,
        finish,
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}
