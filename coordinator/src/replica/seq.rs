//! A request inside a replica: its tokens so far and what its output needs (detokenizer
//! state, held-back text, delivered prompt-logit rows, faults survived). Its place in the KV
//! cache is the scheduler's.

use super::scheduler::Tokens;
use crate::request::Job;
use grok_shared::tokenizer::StreamDecoder;
use std::time::Instant;

pub struct Seq {
    pub job: Job,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub generated: usize,
    pub decoder: StreamDecoder,
    /// Decoded text not yet released (a stop string may be forming).
    pub held: String,
    pub last_token: Option<Instant>,
    /// Prompt logits rows already delivered (rows are sent as their prefill chunks complete,
    /// each once, whatever preemption or recovery recomputes).
    pub logit_rows_sent: usize,
    /// Replica faults (a lost worker, a failed step) this sequence was running through.
    pub faults: u32,
    /// The next prompt position whose score is to be delivered (from 1; each once).
    pub score_next: usize,
    /// Prompt tokens its first admission took from the prefix cache.
    pub cached_tokens: usize,
}

impl Seq {
    pub fn new(job: Job) -> Self {
        let tokens = job.prompt.clone();
        Seq {
            prompt_len: tokens.len(),
            tokens,
            job,
            generated: 0,
            decoder: StreamDecoder::default(),
            held: String::new(),
            last_token: None,
            logit_rows_sent: 0,
            faults: 0,
            score_next: 1,
            cached_tokens: 0,
        }
    }
}

impl Tokens for Seq {
    fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Not when the request wants its prompt's rows (logits or scores: cached positions are
    /// not recomputed), nor with penalties (the sampling rank counts the tokens it is given).
    fn may_reuse(&self) -> bool {
        let p = &self.job.params;
        !p.prompt_logits && p.prompt_logprobs.is_none() && !p.penalties.is_active()
    }
}

/// A request waiting for a recovering replica (none was serving when its own faulted).
pub struct Parked {
    pub seq: Box<Seq>,
    /// It ends with a retryable UNAVAILABLE if no replica serves by then.
    pub until: Instant,
    /// The fault it waits out.
    pub why: String,
}
