//! What a sampled token does to its request: stop rules (EOS, stop ids, length, context),
//! detokenization, the hold-back of text that may start a stop string, and the prompt-logit
//! rows a request asked for. Pure: the step loop sends the events.

use super::seq::Seq;
use crate::request::{FinishReason, GenEvent, PromptScore, RequestParams, TokenEvent};
use grok_shared::tokenizer::Tokenizer;

/// What the output rules need of the model.
pub struct OutputRules<'a> {
    pub eos: u32,
    pub max_positions: usize,
    pub tokenizer: Option<&'a Tokenizer>,
}

impl OutputRules<'_> {
    /// Appends sampled `token` to `s`: the event for its client (its text may be held back)
    /// and the reason the request ends, if it does.
    pub fn on_token(
        &self,
        s: &mut Seq,
        token: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
    ) -> (TokenEvent, Option<FinishReason>) {
        let mut ev = TokenEvent {
            id: token,
            logprob,
            top,
            ..Default::default()
        };
        s.tokens.push(token);
        s.generated += 1;
        let p = &s.job.params;
        let mut reason = stop_reason(
            p,
            token,
            self.eos,
            s.generated,
            s.tokens.len(),
            self.max_positions,
        );
        if let Some(tok) = self.tokenizer {
            // A stop token's own text is not part of the output.
            if reason != Some(FinishReason::Stop) {
                s.held
                    .push_str(&s.decoder.push(tok, token).unwrap_or_default());
            }
            if let Some(pos) = p
                .stop_strings
                .iter()
                .filter_map(|st| s.held.find(st.as_str()))
                .min()
            {
                s.held.truncate(pos);
                reason = Some(FinishReason::Stop);
            }
            if reason.is_none() {
                ev.text = release(&mut s.held, p);
            }
        }
        (ev, reason)
    }
}

/// Why a request ends after its `generated`-th token (`len` tokens in all), if it does.
fn stop_reason(
    p: &RequestParams,
    token: u32,
    eos: u32,
    generated: usize,
    len: usize,
    max_positions: usize,
) -> Option<FinishReason> {
    if (!p.ignore_eos && token == eos) || p.stop_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if generated >= p.max_tokens {
        Some(FinishReason::Length)
    } else if len >= max_positions {
        Some(FinishReason::Context)
    } else {
        None
    }
}

/// Takes the text that can no longer be the start of a stop string out of `held`.
fn release(held: &mut String, p: &RequestParams) -> String {
    let keep = p
        .stop_strings
        .iter()
        .map(|x| x.len())
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    let mut cut = held.len().saturating_sub(keep);
    while !held.is_char_boundary(cut) {
        cut -= 1;
    }
    held.drain(..cut).collect()
}

/// The event that ends a request that finished for `reason` (with any text still held).
pub fn done(s: &mut Seq, reason: FinishReason) -> GenEvent {
    GenEvent::Done {
        reason,
        text: std::mem::take(&mut s.held),
        prompt_tokens: s.prompt_len,
        completion_tokens: s.generated,
        cached_tokens: s.cached_tokens,
    }
}

/// Whether a step computing positions `start..start + n` of `s` must return their logits:
/// the request asked for prompt logits and some of these prompt rows were not delivered.
pub fn wants_prompt_logits(s: &Seq, start: usize, n: usize) -> bool {
    s.job.params.prompt_logits && start < s.prompt_len && start + n > s.logit_rows_sent
}

/// Whether a step computing positions `start..start + n` of `s` must score prompt tokens: the
/// request asked for prompt scores and the step's rows predict some not delivered yet.
pub fn wants_prompt_scores(s: &Seq, start: usize, n: usize) -> bool {
    s.job.params.prompt_logprobs.is_some()
        && start + n >= s.score_next
        && s.score_next < s.prompt_len
}

/// Delivers the scores of `scores` (a step's, for this sequence) not delivered yet, in order.
pub fn deliver_prompt_scores(s: &mut Seq, scores: impl Iterator<Item = PromptScore>) {
    let fresh: Vec<PromptScore> = scores
        .filter(|x| x.position >= s.score_next && x.position < s.prompt_len)
        .collect();
    if let Some(last) = fresh.last() {
        s.score_next = last.position + 1;
        let _ = s.job.tx.send(GenEvent::PromptScores(fresh));
    }
}

/// Delivers the prompt rows of `rows` (the logits of positions `start..`, `vocab` each) not
/// delivered yet, in events of whole rows under the message limit.
pub fn deliver_prompt_logits(s: &mut Seq, rows: &[f32], start: usize, vocab: usize) {
    let n = rows.len() / vocab.max(1);
    let (from, to) = (s.logit_rows_sent.max(start), (start + n).min(s.prompt_len));
    if from < to {
        let per = grok_proto::limits::rows_per_chunk(vocab) * vocab;
        for c in rows[(from - start) * vocab..(to - start) * vocab].chunks(per) {
            let _ = s.job.tx.send(GenEvent::PromptLogits(c.to_vec()));
        }
        s.logit_rows_sent = to;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grok_shared::sampling::SamplingParams;

    fn seq(
        max_tokens: usize,
        stop_ids: Vec<u32>,
        prompt_logits: bool,
    ) -> (Seq, tokio::sync::mpsc::UnboundedReceiver<GenEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = crate::request::Job {
            prompt: vec![1, 2, 3],
            params: RequestParams {
                max_tokens,
                sampling: SamplingParams::default(),
                stop_ids,
                stop_strings: vec![],
                ignore_eos: false,
                top_logprobs: 0,
                prompt_logits,
                penalties: Default::default(),
                prompt_logprobs: None,
                constraint: None,
            },
            tx,
            arrived: std::time::Instant::now(),
            span: tracing::Span::none(),
        };
        (Seq::new(job), rx)
    }

    #[test]
    fn stop_rules_in_order() {
        let rules = OutputRules {
            eos: 2,
            max_positions: 8,
            tokenizer: None,
        };
        let (mut s, _rx) = seq(3, vec![9], false);
        assert_eq!(rules.on_token(&mut s, 5, -0.5, vec![]).1, None);
        assert_eq!(
            rules.on_token(&mut s, 9, -0.5, vec![]).1,
            Some(FinishReason::Stop)
        );
        let (mut s, _rx) = seq(2, vec![], false);
        rules.on_token(&mut s, 5, 0.0, vec![]);
        assert_eq!(
            rules.on_token(&mut s, 2, 0.0, vec![]).1,
            Some(FinishReason::Stop)
        );
        let (mut s, _rx) = seq(2, vec![], false);
        rules.on_token(&mut s, 5, 0.0, vec![]);
        assert_eq!(
            rules.on_token(&mut s, 6, 0.0, vec![]).1,
            Some(FinishReason::Length)
        );
        let (mut s, _rx) = seq(100, vec![], false);
        for _ in 0..4 {
            assert_eq!(rules.on_token(&mut s, 5, 0.0, vec![]).1, None);
        }
        assert_eq!(
            rules.on_token(&mut s, 5, 0.0, vec![]).1,
            Some(FinishReason::Context)
        );
        assert_eq!(s.tokens.len(), 8);
        assert!(matches!(
            done(&mut s, FinishReason::Context),
            GenEvent::Done {
                completion_tokens: 5,
                prompt_tokens: 3,
                ..
            }
        ));
    }

    #[test]
    fn held_text_keeps_what_may_start_a_stop_string() {
        let mut p = seq(1, vec![], false).0.job.params;
        p.stop_strings = vec!["\nUser:".into()];
        let mut held = "abc\nUs".to_string();
        assert_eq!(release(&mut held, &p), "a");
        assert_eq!(held, "bc\nUs");
        let mut held = "é".repeat(4);
        let out = release(&mut held, &p);
        assert_eq!(out.len() + held.len(), 8);
        assert!(out.is_empty() || out == "é");
    }

    #[test]
    fn prompt_rows_are_delivered_once() {
        let (mut s, mut rx) = seq(4, vec![], true);
        let vocab = 4;
        assert!(wants_prompt_logits(&s, 0, 2));
        deliver_prompt_logits(&mut s, &[0.5; 8], 0, vocab);
        assert_eq!(s.logit_rows_sent, 2);
        // Recomputed after a preemption: rows 0..2 are not sent again, row 2 is.
        assert!(wants_prompt_logits(&s, 0, 3));
        deliver_prompt_logits(&mut s, &[1.0; 12], 0, vocab);
        assert_eq!(s.logit_rows_sent, 3);
        assert!(!wants_prompt_logits(&s, 0, 3));
        let mut got = Vec::new();
        while let Ok(GenEvent::PromptLogits(r)) = rx.try_recv() {
            got.extend(r);
        }
        assert_eq!(got, [vec![0.5; 8], vec![1.0; 4]].concat());
    }
}
