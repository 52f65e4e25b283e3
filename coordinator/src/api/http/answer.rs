//! Writing the answer: a whole OpenAI completion or chat completion, or its SSE stream.

use super::errors::HttpError;
use crate::cluster::Cluster;
use crate::request::{FinishReason, GenEvent, TokenEvent};
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
}

/// Everything a finished request produced.
pub(crate) struct Collected {
    pub(crate) text: String,
    pub(crate) tokens: Vec<TokenEvent>,
    pub(crate) reason: FinishReason,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
}

pub(crate) async fn collect(mut rx: Receiver<GenEvent>) -> Result<Collected, HttpError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    loop {
        match rx.recv().await {
            Some(GenEvent::Token(t)) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Some(GenEvent::Done {
                reason,
                text: rest,
                prompt_tokens,
                completion_tokens,
            }) => {
                text.push_str(&rest);
                return Ok(Collected {
                    text,
                    tokens,
                    reason,
                    prompt_tokens,
                    completion_tokens,
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

pub(crate) fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
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
        chunk: bool,
        text: Option<&str>,
        tokens: &[TokenEvent],
        offset: &mut usize,
        reason: Option<FinishReason>,
    ) -> Value {
        let mut c = json!({"index": 0});
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

    /// The whole (non-streaming) answer.
    pub(crate) fn full(&self, c: Collected) -> Value {
        let text = match self.api {
            Api::Chat => c.text.trim_start(),
            Api::Completion => c.text.as_str(),
        };
        let choice = self.choice(false, Some(text), &c.tokens, &mut 0, Some(c.reason));
        let mut v = self.envelope(false, vec![choice]);
        v["usage"] = usage(c.prompt_tokens, c.completion_tokens);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// The state of one SSE stream. It owns the request's receiver: when the client goes away,
/// axum drops the stream, the receiver with it, and the engine ends the sequence.
pub(crate) struct Streamer {
    pub(crate) rx: Receiver<GenEvent>,
    pub(crate) answer: Answer,
    pub(crate) started: bool,
    pub(crate) finished: bool,
    /// Chat: leading whitespace of the reply is still being dropped.
    pub(crate) strip: bool,
    pub(crate) offset: usize,
}

pub(crate) fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl Streamer {
    /// The next events to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Vec<Event>> {
        if self.finished {
            return None;
        }
        let a = &self.answer;
        if !self.started {
            self.started = true;
            if a.api == Api::Chat {
                let mut c = a.choice(true, None, &[], &mut self.offset, None);
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
            Some(GenEvent::PromptLogits(_)) => Some(vec![]),
            Some(GenEvent::Token(t)) => {
                let s = text(&mut self.strip, &t.text);
                if s.as_deref().is_none_or(str::is_empty) && a.logprobs.is_none() && !a.token_ids {
                    return Some(vec![]);
                }
                let c = a.choice(true, s.as_deref(), &[t], &mut self.offset, None);
                Some(vec![data(&a.envelope(true, vec![c]))])
            }
            Some(GenEvent::Done {
                reason,
                text: rest,
                prompt_tokens,
                completion_tokens,
            }) => {
                self.finished = true;
                let s = text(&mut self.strip, &rest);
                let c = a.choice(true, s.as_deref(), &[], &mut self.offset, Some(reason));
                let mut out = vec![data(&a.envelope(true, vec![c]))];
                if a.include_usage {
                    let mut u = a.envelope(true, vec![]);
                    u["usage"] = usage(prompt_tokens, completion_tokens);
                    out.push(data(&u));
                }
                out.push(Event::default().data("[DONE]"));
                Some(out)
            }
            Some(GenEvent::Error(s)) => {
                self.finished = true;
                Some(vec![data(&HttpError::from_status(&s).body())])
            }
            None => {
                self.finished = true;
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

pub(crate) fn sse(rx: Receiver<GenEvent>, answer: Answer) -> Response {
    let st = Streamer {
        rx,
        strip: answer.api == Api::Chat,
        answer,
        started: false,
        finished: false,
        offset: 0,
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        let evs = st.next().await?;
        Some((evs, st))
    })
    .flat_map(|evs| futures_util::stream::iter(evs.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
