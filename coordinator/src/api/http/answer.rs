//! Writing the answer: a whole OpenAI completion or chat completion, or its SSE stream.

use super::errors::HttpError;
use crate::cluster::Cluster;
use crate::request::{FinishReason, GenEvent, PromptScore, TokenEvent};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver as Receiver;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Completion,
    Chat,
}

/// How a request's answer is written.
pub(crate) struct Answer {
    pub(crate) api: Api,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    /// Return logprobs with this many top alternatives.
    pub(crate) logprobs: Option<u32>,
    pub(crate) token_ids: bool,
    pub(crate) include_usage: bool,
    pub(crate) shared: Arc<Cluster>,
    /// Choices returned.
    pub(crate) n: usize,
    /// `echo`: the prompt's text and ids, returned before each completion.
    pub(crate) echo: Option<(String, Vec<u32>)>,
}

/// Everything a finished request produced.
pub(crate) struct Collected {
    pub(crate) text: String,
    pub(crate) tokens: Vec<TokenEvent>,
    pub(crate) reason: FinishReason,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) cached_tokens: usize,
    /// The prompt's scores, when asked for (`echo` with `logprobs`).
    pub(crate) scores: Vec<PromptScore>,
}

pub(crate) async fn collect(mut rx: Receiver<GenEvent>) -> Result<Collected, HttpError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut scores = Vec::new();
    loop {
        match rx.recv().await {
            Some(GenEvent::PromptScores(s)) => scores.extend(s),
            Some(GenEvent::Token(t)) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Some(GenEvent::Done {
                reason,
                text: rest,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            }) => {
                text.push_str(&rest);
                return Ok(Collected {
                    text,
                    tokens,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    scores,
                });
            }
            Some(GenEvent::Error(s)) => return Err(HttpError::from_status(&s)),
            // The HTTP API never asks for prompt logits.
            Some(GenEvent::PromptLogits(_)) => {}
            None => {
                return Err(HttpError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine ended the request without an answer",
                    None,
                ))
            }
        }
    }
}

pub(crate) fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Context => "length",
    }
}

pub(crate) fn usage(prompt_tokens: usize, completion_tokens: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

impl Answer {
    /// A token's text on its own (the id when the cluster has no tokenizer).
    pub(crate) fn token_str(&self, id: u32) -> String {
        self.shared
            .tokenizer
            .as_ref()
            .and_then(|t| t.decode(&[id]).ok())
            .unwrap_or_else(|| id.to_string())
    }

    /// The `logprobs` of a choice covering `tokens`; `offset` is the completion text's
    /// length (in characters) before them, advanced past them.
    pub(crate) fn logprobs(&self, tokens: &[TokenEvent], offset: &mut usize) -> Value {
        let Some(_) = self.logprobs else {
            return Value::Null;
        };
        match self.api {
            Api::Completion => {
                let mut strs = Vec::new();
                let mut lps = Vec::new();
                let mut tops = Vec::new();
                let mut offs = Vec::new();
                for t in tokens {
                    let s = self.token_str(t.id);
                    offs.push(*offset);
                    *offset += s.chars().count();
                    strs.push(s);
                    lps.push(t.logprob);
                    let top: Map<String, Value> = t
                        .top
                        .iter()
                        .map(|&(id, lp)| (self.token_str(id), json!(lp)))
                        .collect();
                    tops.push(Value::Object(top));
                }
                json!({
                    "tokens": strs,
                    "token_logprobs": lps,
                    "top_logprobs": tops,
                    "text_offset": offs,
                })
            }
            Api::Chat => {
                let entry = |id: u32, lp: f32| {
                    let s = self.token_str(id);
                    json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.id, t.logprob);
                        e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }

    pub(crate) fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One choice; `text` is `None` for a chat chunk without content.
    pub(crate) fn choice(
        &self,
        index: usize,
        chunk: bool,
        text: Option<&str>,
        tokens: &[TokenEvent],
        offset: &mut usize,
        reason: Option<FinishReason>,
    ) -> Value {
        let mut c = json!({ "index": index });
        match (self.api, chunk) {
            (Api::Completion, _) => c["text"] = json!(text.unwrap_or("")),
            (Api::Chat, false) => {
                c["message"] = json!({"role": "assistant", "content": text.unwrap_or("")})
            }
            (Api::Chat, true) => {
                c["delta"] = match text {
                    Some(t) => json!({ "content": t }),
                    None => json!({}),
                }
            }
        }
        c["logprobs"] = if tokens.is_empty() && chunk {
            Value::Null
        } else {
            self.logprobs(tokens, offset)
        };
        c["finish_reason"] = json!(reason.map(finish_reason));
        if self.token_ids {
            c["token_ids"] = tokens.iter().map(|t| t.id).collect();
        }
        c
    }

    /// A completion choice with `echo`: the prompt's text first, and with logprobs its tokens
    /// first (the first with no score, as vLLM returns them).
    fn echoed(
        &self,
        index: usize,
        prompt_text: &str,
        prompt_ids: &[u32],
        c: &Collected,
        text: &str,
    ) -> Value {
        let mut offset = prompt_text.chars().count();
        let mut ch = self.choice(
            index,
            false,
            Some(text),
            &c.tokens,
            &mut offset,
            Some(c.reason),
        );
        ch["text"] = json!(format!("{prompt_text}{text}"));
        if self.logprobs.is_some() {
            let lp = &mut ch["logprobs"];
            let (mut strs, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
            let mut at = 0;
            for (pos, &id) in prompt_ids.iter().enumerate() {
                let s = self.token_str(id);
                offs.push(json!(at));
                at += s.chars().count();
                strs.push(json!(s));
                match c.scores.iter().find(|x| x.position == pos) {
                    Some(x) => {
                        lps.push(json!(x.logprob));
                        let top: Map<String, Value> = x
                            .top
                            .iter()
                            .map(|&(id, lp)| (self.token_str(id), json!(lp)))
                            .collect();
                        tops.push(Value::Object(top));
                    }
                    None => {
                        lps.push(Value::Null);
                        tops.push(Value::Null);
                    }
                }
            }
            for (key, head) in [
                ("tokens", strs),
                ("token_logprobs", lps),
                ("top_logprobs", tops),
                ("text_offset", offs),
            ] {
                let rest = lp[key].as_array().cloned().unwrap_or_default();
                lp[key] = Value::Array(head.into_iter().chain(rest).collect());
            }
        }
        ch
    }

    pub(crate) fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if chunk && self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The whole (non-streaming) answer: the `n` choices, the most likely ones (by cumulative
    /// log-probability) when more sequences were generated (`best_of`). Usage counts every
    /// sequence generated.
    pub(crate) fn full(&self, mut all: Vec<Collected>) -> Value {
        let prompt_tokens = all.first().map_or(0, |c| c.prompt_tokens);
        let cached = all.first().map_or(0, |c| c.cached_tokens);
        let completion_tokens = all.iter().map(|c| c.completion_tokens).sum();
        if all.len() > self.n {
            let score = |c: &Collected| c.tokens.iter().map(|t| t.logprob as f64).sum::<f64>();
            // Stable: equal scores keep the seed order.
            all.sort_by(|a, b| {
                score(b)
                    .partial_cmp(&score(a))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            all.truncate(self.n);
        }
        let choices = all
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let text = match self.api {
                    Api::Chat => c.text.trim_start(),
                    Api::Completion => c.text.as_str(),
                };
                match &self.echo {
                    None => self.choice(i, false, Some(text), &c.tokens, &mut 0, Some(c.reason)),
                    Some((prompt_text, prompt_ids)) => {
                        self.echoed(i, prompt_text, prompt_ids, c, text)
                    }
                }
            })
            .collect();
        let mut v = self.envelope(false, choices);
        v["usage"] = usage(prompt_tokens, completion_tokens, cached);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// The state of one choice's SSE events. It owns the sequence's receiver: when the client goes
/// away, axum drops the stream, the receiver with it, and the engine ends the sequence.
pub(crate) struct Streamer {
    pub(crate) rx: Receiver<GenEvent>,
    pub(crate) answer: Arc<Answer>,
    pub(crate) index: usize,
    pub(crate) started: bool,
    pub(crate) finished: bool,
    /// Chat: leading whitespace of the reply is still being dropped.
    pub(crate) strip: bool,
    pub(crate) offset: usize,
    /// What every choice's stream adds up at its end: (prompt tokens, completion tokens, an
    /// error ended one, cached prompt tokens).
    pub(crate) totals: Arc<std::sync::Mutex<(usize, usize, bool, usize)>>,
}

pub(crate) fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl Streamer {
    /// The next events of this choice; `None` ends it.
    async fn next(&mut self) -> Option<Vec<Event>> {
        if self.finished {
            return None;
        }
        let a = self.answer.clone();
        let i = self.index;
        if !self.started {
            self.started = true;
            if a.api == Api::Chat {
                let mut c = a.choice(i, true, None, &[], &mut self.offset, None);
                c["delta"] = json!({"role": "assistant"});
                return Some(vec![data(&a.envelope(true, vec![c]))]);
            }
        }
        let ev = self.rx.recv().await;
        // Chat text: `None` for a chunk without content.
        let text = |strip: &mut bool, t: &str| -> Option<String> {
            let t = if *strip { t.trim_start() } else { t };
            if !t.is_empty() {
                *strip = false;
            }
            (a.api == Api::Completion || !t.is_empty()).then(|| t.to_string())
        };
        match ev {
            Some(GenEvent::PromptLogits(_) | GenEvent::PromptScores(_)) => Some(vec![]),
            Some(GenEvent::Token(t)) => {
                let s = text(&mut self.strip, &t.text);
                if s.as_deref().is_none_or(str::is_empty) && a.logprobs.is_none() && !a.token_ids {
                    return Some(vec![]);
                }
                let c = a.choice(i, true, s.as_deref(), &[t], &mut self.offset, None);
                Some(vec![data(&a.envelope(true, vec![c]))])
            }
            Some(GenEvent::Done {
                reason,
                text: rest,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            }) => {
                self.finished = true;
                {
                    let mut t = grok_shared::sync::lock(&self.totals);
                    t.0 = prompt_tokens;
                    t.1 += completion_tokens;
                    if self.index == 0 {
                        t.3 = cached_tokens;
                    }
                }
                let s = text(&mut self.strip, &rest);
                let c = a.choice(i, true, s.as_deref(), &[], &mut self.offset, Some(reason));
                Some(vec![data(&a.envelope(true, vec![c]))])
            }
            Some(GenEvent::Error(s)) => {
                self.finished = true;
                grok_shared::sync::lock(&self.totals).2 = true;
                Some(vec![data(&HttpError::from_status(&s).body())])
            }
            None => {
                self.finished = true;
                grok_shared::sync::lock(&self.totals).2 = true;
                let e = HttpError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine ended the request without an answer",
                    None,
                );
                Some(vec![data(&e.body())])
            }
        }
    }
}

/// The SSE answer: every choice's chunks as they come (each carries its `index`), then the
/// usage (when asked for) and `[DONE]` once all have ended; an error ends the stream without
/// `[DONE]`.
pub(crate) fn sse(rxs: Vec<Receiver<GenEvent>>, answer: Answer) -> Response {
    let answer = Arc::new(answer);
    let totals = Arc::new(std::sync::Mutex::new((0, 0, false, 0)));
    let choices: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(index, rx)| {
            let st = Streamer {
                rx,
                strip: answer.api == Api::Chat,
                answer: answer.clone(),
                index,
                started: false,
                finished: false,
                offset: 0,
                totals: totals.clone(),
            };
            futures_util::stream::unfold(st, |mut st| async move {
                let evs = st.next().await?;
                Some((evs, st))
            })
            .boxed()
        })
        .collect();
    let tail = futures_util::stream::once(async move {
        let (prompt_tokens, completion_tokens, failed, cached) = *grok_shared::sync::lock(&totals);
        let mut out = Vec::new();
        if !failed {
            if answer.include_usage {
                let mut u = answer.envelope(true, vec![]);
                u["usage"] = usage(prompt_tokens, completion_tokens, cached);
                out.push(data(&u));
            }
            out.push(Event::default().data("[DONE]"));
        }
        out
    });
    let events = futures_util::stream::select_all(choices)
        .chain(tail)
        .flat_map(|evs| futures_util::stream::iter(evs.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
