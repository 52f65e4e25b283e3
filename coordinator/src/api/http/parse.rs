//! Request bodies: OpenAI's completion and chat schemas, field by field (a type error names
//! its field), and the chat template.

use super::errors::HttpError;
use crate::request::{PromptInput, RequestParams};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use grok_shared::constrain::Grammar;
use grok_shared::sampling::{Penalties, SamplingParams};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The chat template. Grok-1 is a base model with no chat format of its own, so a
/// conversation is rendered as plain text: every message as `"{Role}: {content}\n\n"` with
/// `Role` one of `System`, `User`, `Assistant` (`developer` messages count as `System`), then
/// `"Assistant:"` for the model to continue. Generation stops at [`CHAT_STOP`] besides the
/// request's own stop strings; whitespace at the start of the reply is dropped.
pub fn chat_prompt(messages: &[(String, String)]) -> String {
    let mut p = String::new();
    for (role, content) in messages {
        p.push_str(role);
        p.push_str(": ");
        p.push_str(content);
        p.push_str("\n\n");
    }
    p.push_str("Assistant:");
    p
}

/// Stop strings of every chat request: the model starting the next turn.
pub const CHAT_STOP: [&str; 2] = ["\nUser:", "\nSystem:"];

/// A JSON object body. Malformed bodies are answered with OpenAI's error schema (whatever the
/// content type, so `curl -d` works too).
pub(crate) struct JsonBody(pub(crate) Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            HttpError::new(
                e.status(),
                format!("cannot read the request body: {}", e.body_text()),
                None,
            )
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(JsonBody(m)),
            Ok(_) => Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "the request body must be a JSON object",
                None,
            )),
            Err(e) => Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                format!("the request body is not valid JSON: {e}"),
                None,
            )),
        }
    }
}

/// The fields of a request object, taken one by one so that a type error names its field.
pub(crate) struct Fields(pub(crate) Map<String, Value>);

impl Fields {
    /// The field as `T`; absent and `null` are `None`.
    pub(crate) fn take<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
    ) -> Result<Option<T>, HttpError> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| HttpError::invalid(name, format!("{name}: {e}"))),
        }
    }

    /// Like `take`, with `what` describing the accepted forms when the value fits none.
    pub(crate) fn take_as<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
        what: &str,
    ) -> Result<Option<T>, HttpError> {
        self.take(name)
            .map_err(|_| HttpError::invalid(name, format!("{name} must be {what}")))
    }

    /// Refuses every field not taken yet, unless it cannot change the output: a field the
    /// server does not implement is never silently ignored.
    pub(crate) fn refuse_rest(self) -> Result<(), HttpError> {
        let mut names: Vec<(String, Value)> = self.0.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, v) in names {
            if has_no_effect(&name, &v) {
                continue;
            }
            return Err(HttpError::new(
                axum::http::StatusCode::BAD_REQUEST,
                format!("{name}: this field is not supported by this server (its value would change the output, so it is not ignored)"),
                Some(&name),
            ));
        }
        Ok(())
    }
}

/// Whether a field the server does not implement may be ignored: it names the caller or asks
/// for storage (`user`, `metadata`, `store`, `service_tier`), or its value is the one that
/// changes nothing (plain text, no tools).
fn has_no_effect(name: &str, v: &Value) -> bool {
    let empty = |v: &Value| {
        v.is_null()
            || v.as_array().is_some_and(|a| a.is_empty())
            || v.as_object().is_some_and(|o| o.is_empty())
    };
    match name {
        "user" | "metadata" | "store" | "service_tier" | "parallel_tool_calls" => true,
        "tools" | "functions" => empty(v),
        "tool_choice" | "function_call" => v.is_null() || v.as_str() == Some("none"),
        "modalities" => v.is_null() || v == &serde_json::json!(["text"]),
        _ => false,
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Integer {
    U(u64),
    I(i64),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum CompletionLogprobs {
    N(u32),
    Flag(bool),
}

#[derive(Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: Option<bool>,
}

#[derive(Deserialize)]
pub(crate) struct ChatMessage {
    pub(crate) role: String,
    #[serde(default)]
    pub(crate) content: Option<ChatContent>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum ChatContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) text: Option<String>,
}

/// What completions and chat share.
pub(crate) struct Common {
    pub(crate) max_tokens: Option<usize>,
    /// The name the request used for `max_tokens`.
    pub(crate) max_tokens_name: &'static str,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: Vec<String>,
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) ignore_eos: bool,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) token_ids: bool,
    pub(crate) penalties: Penalties,
    /// Choices returned, and sequences generated to pick them from (the most likely by
    /// cumulative log-probability).
    pub(crate) n: usize,
    pub(crate) best_of: usize,
    pub(crate) constraint: Option<Grammar>,
    /// The field the constraint came in (for errors).
    pub(crate) constraint_name: &'static str,
}

/// The most choices (`n`, `best_of`) one request may ask for.
pub(crate) const MAX_CHOICES: usize = 16;

/// Checks the optional `model` field against the served model's name.
fn check_model(f: &mut Fields, served: &str) -> Result<(), HttpError> {
    if let Some(m) = f.take::<String>("model")? {
        if m != served {
            return Err(HttpError::invalid(
                "model",
                format!("model: `{m}` is not served here; this server serves `{served}`"),
            ));
        }
    }
    Ok(())
}

/// `/tokenize` (vLLM's): the text whose tokens are asked for, a `prompt` or `messages` (a
/// conversation, rendered with the chat template as `/v1/chat/completions` renders it).
pub(crate) fn parse_tokenize(served: &str, body: Map<String, Value>) -> Result<String, HttpError> {
    let mut f = Fields(body);
    check_model(&mut f, served)?;
    let text = if f.0.contains_key("messages") {
        if f.0.contains_key("prompt") {
            return Err(HttpError::invalid(
                "prompt",
                "prompt: give a prompt or messages, not both",
            ));
        }
        chat_prompt(&chat_turns(&mut f)?)
    } else {
        f.take::<String>("prompt")?.ok_or_else(|| {
            HttpError::invalid("prompt", "prompt: the request has no prompt (or messages)")
        })?
    };
    f.refuse_rest()?;
    Ok(text)
}

/// `/detokenize` (vLLM's): the token ids to turn into text.
pub(crate) fn parse_detokenize(
    served: &str,
    body: Map<String, Value>,
) -> Result<Vec<u32>, HttpError> {
    let mut f = Fields(body);
    check_model(&mut f, served)?;
    let ids = f
        .take_as::<Vec<u32>>("tokens", "a list of token ids")?
        .ok_or_else(|| HttpError::invalid("tokens", "tokens: the request has no tokens"))?;
    f.refuse_rest()?;
    Ok(ids)
}

pub(crate) fn common(f: &mut Fields, served: &str) -> Result<Common, HttpError> {
    check_model(f, served)?;
    let n = f.take::<u64>("n")?.unwrap_or(1);
    if !(1..=MAX_CHOICES as u64).contains(&n) {
        return Err(HttpError::invalid(
            "n",
            format!("n: choices per request must be in 1..={MAX_CHOICES}, got {n}"),
        ));
    }
    let best_of = f.take::<u64>("best_of")?.unwrap_or(n);
    if !(n..=MAX_CHOICES as u64).contains(&best_of) {
        return Err(HttpError::invalid(
            "best_of",
            format!("best_of: must be in n..={MAX_CHOICES} (n = {n}), got {best_of}"),
        ));
    }
    // `max_completion_tokens` is OpenAI's newer name of `max_tokens`; it wins when both come.
    let newer = f.take::<usize>("max_completion_tokens")?;
    let older = f.take::<usize>("max_tokens")?;
    let (max_tokens, max_tokens_name) = match newer {
        Some(m) => (Some(m), "max_completion_tokens"),
        None => (older, "max_tokens"),
    };
    // Absurd values stay absurd (build_job refuses them) without overflowing its arithmetic.
    let max_tokens = max_tokens.map(|m| m.min(usize::MAX / 4));
    let temperature = f.take::<f32>("temperature")?.unwrap_or(1.0);
    let top_p = f.take::<f32>("top_p")?.unwrap_or(1.0);
    let top_k = match f.take_as::<Integer>("top_k", "an integer (0 or -1 = off)")? {
        Some(Integer::U(k)) => k as usize,
        _ => 0,
    };
    let seed = match f.take_as::<Integer>("seed", "an integer")? {
        Some(Integer::U(s)) => s,
        Some(Integer::I(s)) => s as u64,
        None => 0,
    };
    let stop = match f.take_as::<StopField>("stop", "a string or a list of strings")? {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    let stop_ids = f.take::<Vec<u32>>("stop_token_ids")?.unwrap_or_default();
    let ignore_eos = f.take::<bool>("ignore_eos")?.unwrap_or(false);
    let stream = f.take::<bool>("stream")?.unwrap_or(false);
    let include_usage = f
        .take::<StreamOptions>("stream_options")?
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let token_ids = f.take::<bool>("return_token_ids")?.unwrap_or(false);
    if stream && best_of > n {
        return Err(HttpError::invalid(
            "best_of",
            "best_of: cannot be streamed (the choices are known only at the end); use n",
        ));
    }
    let penalties = penalties(f)?;
    let (constraint, constraint_name) = constraint(f)?;
    Ok(Common {
        max_tokens,
        max_tokens_name,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        },
        stop,
        stop_ids,
        ignore_eos,
        stream,
        include_usage,
        token_ids,
        penalties,
        n: n as usize,
        best_of: best_of as usize,
        constraint,
        constraint_name,
    })
}

/// Structured output: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) or
/// one of vLLM's `guided_json`, `guided_regex`, `guided_grammar` (llguidance's Lark) and
/// `guided_choice`; with the field it came in. Compiled with the rest of the request
/// (`check_constraint`).
fn constraint(f: &mut Fields) -> Result<(Option<Grammar>, &'static str), HttpError> {
    let mut found: Vec<(Grammar, &'static str)> = Vec::new();
    if let Some(rf) = f.take::<Value>("response_format")? {
        let bad = |m: &str| HttpError::invalid("response_format", format!("response_format: {m}"));
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => found.push((Grammar::JsonObject, "response_format")),
            Some("json_schema") => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| {
                        bad("json_schema needs `json_schema: {\"name\": ..., \"schema\": {...}}`")
                    })?;
                found.push((Grammar::JsonSchema(schema.to_string()), "response_format"));
            }
            Some(t) => {
                return Err(bad(&format!(
                    "type `{t}` is not supported (text, json_object, json_schema)"
                )))
            }
            None => return Err(bad("an object with a `type`")),
        }
    }
    if let Some(j) = f.take::<Value>("guided_json")? {
        let text = match j {
            Value::String(s) => s,
            v => v.to_string(),
        };
        found.push((Grammar::JsonSchema(text), "guided_json"));
    }
    if let Some(r) = f.take_as::<String>("guided_regex", "a regular expression (a string)")? {
        found.push((Grammar::Regex(r), "guided_regex"));
    }
    if let Some(g) = f.take_as::<String>("guided_grammar", "a Lark grammar (a string)")? {
        found.push((Grammar::Lark(g), "guided_grammar"));
    }
    if let Some(c) = f.take_as::<Vec<String>>("guided_choice", "a list of strings")? {
        found.push((Grammar::Choice(c), "guided_choice"));
    }
    match found.len() {
        0 => Ok((None, "response_format")),
        1 => {
            let (g, name) = found.remove(0);
            Ok((Some(g), name))
        }
        _ => Err(HttpError::invalid(
            found[1].1,
            format!(
                "{}: one structured output per request (also given: {})",
                found[1].1, found[0].1
            ),
        )),
    }
}

/// `logit_bias` (OpenAI's: token ids as strings to biases), `presence_penalty`,
/// `frequency_penalty`, `repetition_penalty` and `min_tokens` (vLLM's). Ranges are checked
/// with the rest of the request (`build_job`).
fn penalties(f: &mut Fields) -> Result<Penalties, HttpError> {
    let bias = f
        .take_as::<std::collections::BTreeMap<String, f32>>(
            "logit_bias",
            "an object of token ids (as strings) to biases in [-100, 100]",
        )?
        .unwrap_or_default();
    let mut logit_bias = Vec::with_capacity(bias.len());
    for (k, v) in bias {
        let t = k.trim().parse::<u32>().map_err(|_| {
            HttpError::invalid("logit_bias", format!("logit_bias: `{k}` is not a token id"))
        })?;
        logit_bias.push((t, v));
    }
    logit_bias.sort_by_key(|x| x.0);
    Ok(Penalties {
        logit_bias,
        presence: f.take::<f32>("presence_penalty")?.unwrap_or(0.0),
        frequency: f.take::<f32>("frequency_penalty")?.unwrap_or(0.0),
        repetition: f.take::<f32>("repetition_penalty")?.unwrap_or(1.0),
        min_tokens: f.take::<u32>("min_tokens")?.unwrap_or(0),
        stop_ids: vec![],
    })
}

impl Common {
    pub(crate) fn params(&self, max_tokens: usize, top_logprobs: u32) -> RequestParams {
        RequestParams {
            max_tokens,
            sampling: self.sampling.clone(),
            stop_ids: self.stop_ids.clone(),
            stop_strings: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            top_logprobs,
            prompt_logits: false,
            penalties: self.penalties.clone(),
            prompt_logprobs: None,
            constraint: self.constraint.clone(),
        }
    }
}

/// The prompt of a completion request.
pub(crate) fn completion_prompt(f: &mut Fields) -> Result<PromptInput, HttpError> {
    let one = |n: usize| {
        HttpError::invalid(
            "prompt",
            format!("prompt: one prompt per request is supported, got {n}"),
        )
    };
    Ok(
        match f.take_as::<PromptField>(
            "prompt",
            "a string, a list of one string, a list of token ids or a list of one list of ids",
        )? {
            None => {
                return Err(HttpError::invalid(
                    "prompt",
                    "prompt: the request has no prompt",
                ))
            }
            Some(PromptField::Text(t)) => PromptInput::Text(t),
            Some(PromptField::Ids(ids)) => PromptInput::Ids(ids),
            Some(PromptField::Texts(mut v)) => match v.len() {
                0 => PromptInput::Ids(vec![]),
                1 => PromptInput::Text(v.remove(0)),
                n => return Err(one(n)),
            },
            Some(PromptField::IdLists(mut v)) => match v.len() {
                0 => PromptInput::Ids(vec![]),
                1 => PromptInput::Ids(v.remove(0)),
                n => return Err(one(n)),
            },
        },
    )
}

/// A completion request: what it shares with chat, its prompt, its logprobs, and `echo`.
pub(crate) type CompletionParts = (Common, PromptInput, Option<u32>, bool);

pub(crate) fn parse_completion(
    served: &str,
    body: Map<String, Value>,
) -> Result<CompletionParts, HttpError> {
    let mut f = Fields(body);
    let c = common(&mut f, served)?;
    let prompt = completion_prompt(&mut f)?;
    let echo = f.take::<bool>("echo")?.unwrap_or(false);
    if echo && c.stream {
        return Err(HttpError::invalid(
            "echo",
            "echo: not with stream (use a non-streaming request to score a prompt)",
        ));
    }
    if f.take::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(HttpError::invalid(
            "suffix",
            "suffix: insertion is not supported",
        ));
    }
    let logprobs = match f.take_as::<CompletionLogprobs>(
        "logprobs",
        "an integer (the number of top logprobs per token)",
    )? {
        None | Some(CompletionLogprobs::Flag(false)) => None,
        Some(CompletionLogprobs::Flag(true)) => Some(0),
        Some(CompletionLogprobs::N(n)) => Some(n),
    };
    f.refuse_rest()?;
    Ok((c, prompt, logprobs, echo))
}

/// The conversation as (Role, content) turns.
pub(crate) fn chat_turns(f: &mut Fields) -> Result<Vec<(String, String)>, HttpError> {
    let messages = f
        .take::<Vec<ChatMessage>>("messages")?
        .ok_or_else(|| HttpError::invalid("messages", "messages: the request has no messages"))?;
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "System",
            "user" => "User",
            "assistant" => "Assistant",
            other => {
                return Err(HttpError::invalid(
                    "messages",
                    format!(
                        "messages[{i}]: role `{other}` is not supported (system, user, assistant)"
                    ),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(ChatContent::Text(t)) => t,
            Some(ChatContent::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (k, _) => {
                            return Err(HttpError::invalid(
                                "messages",
                                format!(
                                    "messages[{i}]: only text content parts are supported \
                                     (`{{\"type\": \"text\", \"text\": ...}}`), got type `{k}`"
                                ),
                            ))
                        }
                    }
                }
                s
            }
        };
        turns.push((role.to_string(), content));
    }
    Ok(turns)
}

pub(crate) type ChatParts = (Common, String, Option<u32>);

pub(crate) fn parse_chat(served: &str, body: Map<String, Value>) -> Result<ChatParts, HttpError> {
    let mut f = Fields(body);
    let c = common(&mut f, served)?;
    let turns = chat_turns(&mut f)?;
    let want_logprobs = f.take::<bool>("logprobs")?.unwrap_or(false);
    let top = f.take::<u32>("top_logprobs")?;
    if top.is_some() && !want_logprobs {
        return Err(HttpError::invalid(
            "top_logprobs",
            "top_logprobs: needs `logprobs: true`",
        ));
    }
    let logprobs = want_logprobs.then(|| top.unwrap_or(0));
    f.refuse_rest()?;
    Ok((c, chat_prompt(&turns), logprobs))
}
