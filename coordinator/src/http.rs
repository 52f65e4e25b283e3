//! The HTTP API of the coordinator (axum): OpenAI-compatible completions and chat completions,
//! `/v1/models`, `/health`, `/ready` and Prometheus `/metrics`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200 `ok` while the process runs (liveness) |
//! | `GET /ready` | 200 once every shard is loaded, else 503; a JSON body with the state |
//! | `GET /metrics` | the Prometheus text exposition (`text/plain; version=0.0.4`) |
//! | `GET /v1/models` | the one served model (`--served-model-name`, default the model directory's name) |
//! | `POST /v1/completions` | OpenAI completions, streaming (SSE) or not |
//! | `POST /v1/chat/completions` | OpenAI chat completions over the chat template below |
//!
//! Requests follow OpenAI's schemas. Besides OpenAI's fields, `top_k` (0 = off),
//! `stop_token_ids`, `ignore_eos` and `return_token_ids` (each choice, and each streamed
//! chunk, gets the generated `token_ids`) are accepted; unknown fields are ignored. Defaults
//! are OpenAI's: `temperature` 1, `top_p` 1, `max_tokens` 16 for completions and, for chat,
//! as many as the context (and KV cache) leave after the prompt. Only `n = 1` is served.
//! Prompts are a string, a list of one string, a list of token ids or a list of one list of
//! token ids; text needs the cluster's tokenizer.
//!
//! Every job is built by [`crate::server::build_job`] (the same validation as gRPC) and
//! queued by [`crate::server::submit`]. Errors use OpenAI's body
//! `{"error": {"message", "type", "param", "code"}}`; gRPC codes map to HTTP statuses:
//! INVALID_ARGUMENT / FAILED_PRECONDITION 400, RESOURCE_EXHAUSTED 429 (a full queue),
//! UNAVAILABLE 503 (not serving), UNAUTHENTICATED 401, anything else 500. An error after a
//! stream has started is sent as one SSE event `data: {"error": {...}}` that ends the stream.
//! A client that goes away drops the request's event receiver, which the engine notices
//! and frees the sequence.

use crate::engine::{FinishReason, GenEvent, RequestParams, TokenEvent};
use crate::server::{build_job, submit, ApiError, PromptInput, Shared};
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use grok_shared::sampling::SamplingParams;
use grok_shared::sync::lock;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver as Receiver;

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

struct App {
    shared: Arc<Shared>,
    /// Unix time the API started (the model's `created`).
    created: u64,
}

type AppState = State<Arc<App>>;

pub fn router(shared: Arc<Shared>) -> Router {
    let app = Arc::new(App {
        shared,
        created: now(),
    });
    // The API needs the bearer token when one is configured; the probes and metrics stay open.
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_token,
        ));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(api)
        // Set on purpose (axum's default is 2 MB): a body over it gets 413 before parsing.
        .layer(axum::extract::DefaultBodyLimit::max(
            grok_proto::limits::MAX_HTTP_BODY_BYTES,
        ))
        .fallback(|| async {
            HttpError::new(
                StatusCode::NOT_FOUND,
                "no such route; see /v1/models, /v1/completions, /v1/chat/completions",
                None,
            )
        })
        .with_state(app)
}

async fn require_token(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(t) = &app.shared.cfg.api_token {
        let h = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !grok_proto::auth::bearer_matches(t, h) {
            return HttpError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>`",
                None,
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A unique, unpredictable-looking id: `{prefix}-{24 hex digits}`.
fn new_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let r = grok_shared::sampling::Rng::new(nanos ^ n.rotate_left(40) ^ std::process::id() as u64)
        .next_u64();
    format!("{prefix}-{r:016x}{:08x}", n as u32)
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error answered with OpenAI's error body.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    message: String,
    param: Option<String>,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status,
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, Some(param))
    }

    fn from_status(s: &tonic::Status) -> Self {
        Self::new(http_status(s.code()), s.message(), None)
    }

    /// `rename` maps build_job's field names to the ones this request used.
    fn from_api(e: ApiError, rename: &dyn Fn(&'static str) -> &'static str) -> Self {
        let param = e.field.map(rename);
        let message = match param {
            Some(p) => format!("{p}: {}", e.message),
            None => e.message,
        };
        Self::new(http_status(e.code), message, param)
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": error_type(self.status),
            "param": self.param,
            "code": Value::Null,
        }})
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_type(s: StatusCode) -> &'static str {
    match s.as_u16() {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies

/// A JSON object body. Malformed bodies are answered with OpenAI's error schema (whatever the
/// content type, so `curl -d` works too).
struct JsonBody(Map<String, Value>);

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
struct Fields(Map<String, Value>);

impl Fields {
    /// The field as `T`; absent and `null` are `None`.
    fn take<T: DeserializeOwned>(&mut self, name: &'static str) -> Result<Option<T>, HttpError> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| HttpError::invalid(name, format!("{name}: {e}"))),
        }
    }

    /// Like `take`, with `what` describing the accepted forms when the value fits none.
    fn take_as<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
        what: &str,
    ) -> Result<Option<T>, HttpError> {
        self.take(name)
            .map_err(|_| HttpError::invalid(name, format!("{name} must be {what}")))
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Integer {
    U(u64),
    I(i64),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CompletionLogprobs {
    N(u32),
    Flag(bool),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<ChatContent>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ChatContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// What completions and chat share.
struct Common {
    max_tokens: Option<usize>,
    /// The name the request used for `max_tokens`.
    max_tokens_name: &'static str,
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_ids: Vec<u32>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    token_ids: bool,
}

fn common(f: &mut Fields, app: &App) -> Result<Common, HttpError> {
    let served = &app.shared.cfg.served_model_name;
    if let Some(m) = f.take::<String>("model")? {
        if &m != served {
            return Err(HttpError::invalid(
                "model",
                format!("model: `{m}` is not served here; this server serves `{served}`"),
            ));
        }
    }
    if let Some(n) = f.take::<u64>("n")? {
        if n != 1 {
            return Err(HttpError::invalid(
                "n",
                format!("n: only one choice per request is supported (n = 1), got {n}"),
            ));
        }
    }
    if f.take::<u64>("best_of")?.is_some_and(|b| b != 1) {
        return Err(HttpError::invalid(
            "best_of",
            "best_of: only best_of = 1 is supported",
        ));
    }
    let (max_tokens, max_tokens_name) = match f.take::<usize>("max_completion_tokens")? {
        Some(m) => (Some(m), "max_completion_tokens"),
        None => (f.take::<usize>("max_tokens")?, "max_tokens"),
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
    })
}

impl Common {
    fn params(&self, max_tokens: usize, top_logprobs: u32) -> RequestParams {
        RequestParams {
            max_tokens,
            sampling: self.sampling.clone(),
            stop_ids: self.stop_ids.clone(),
            stop_strings: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            top_logprobs,
            prompt_logits: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plain routes

async fn ready(State(app): AppState) -> Response {
    let (state, detail) = lock(&app.shared.state).clone();
    let code = if state == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"state": state, "detail": detail}))).into_response()
}

async fn metrics(State(app): AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.shared.metrics.render(),
    )
        .into_response()
}

fn model_card(app: &App) -> Value {
    json!({
        "id": app.shared.cfg.served_model_name,
        "object": "model",
        "created": app.created,
        "owned_by": "grok-cluster",
        "max_model_len": app.shared.model.max_position_embeddings,
    })
}

async fn models(State(app): AppState) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&app)]}))
}

async fn model(State(app): AppState, Path(id): Path<String>) -> Response {
    if id == app.shared.cfg.served_model_name {
        Json(model_card(&app)).into_response()
    } else {
        HttpError::new(
            StatusCode::NOT_FOUND,
            format!("model `{id}` is not served here"),
            Some("model"),
        )
        .into_response()
    }
}

// ---------------------------------------------------------------------------------------------
// Completions and chat completions

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completion,
    Chat,
}

/// How a request's answer is written.
struct Answer {
    api: Api,
    id: String,
    created: u64,
    model: String,
    /// Return logprobs with this many top alternatives.
    logprobs: Option<u32>,
    token_ids: bool,
    include_usage: bool,
    shared: Arc<Shared>,
}

/// The W3C `traceparent` header of a request, if any.
fn traceparent(h: &axum::http::HeaderMap) -> Option<String> {
    h.get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn completions(
    State(app): AppState,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody,
) -> Response {
    respond(completion_request(&app, body, traceparent(&headers))).await
}

async fn chat_completions(
    State(app): AppState,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody,
) -> Response {
    respond(chat_request(&app, body, traceparent(&headers))).await
}

/// A validated request: the receiver of its events, how to answer, and whether to stream.
type Started = Result<(Receiver<GenEvent>, Answer, bool), HttpError>;

async fn respond(r: Started) -> Response {
    let (rx, answer, stream) = match r {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if stream {
        sse(rx, answer)
    } else {
        match collect(rx).await {
            Ok(c) => Json(answer.full(c)).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// Builds the job through `build_job` (counting a refusal as `rejected`) and queues it.
fn start(
    app: &App,
    prompt: PromptInput,
    params: RequestParams,
    rename: &dyn Fn(&'static str) -> &'static str,
    traceparent: Option<&str>,
) -> Result<Receiver<GenEvent>, HttpError> {
    let s = &app.shared;
    let (job, rx) = build_job(s, prompt, params, traceparent).map_err(|e| {
        s.metrics.request_done("rejected");
        HttpError::from_api(e, rename)
    })?;
    submit(s, job).map_err(|e| HttpError::from_status(&e))?;
    Ok(rx)
}

fn rejected<T>(app: &App, r: Result<T, HttpError>) -> Result<T, HttpError> {
    if r.is_err() {
        app.shared.metrics.request_done("rejected");
    }
    r
}

/// The prompt of a completion request.
fn completion_prompt(f: &mut Fields) -> Result<PromptInput, HttpError> {
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

type CompletionParts = (Common, PromptInput, Option<u32>);

fn parse_completion(app: &App, body: Map<String, Value>) -> Result<CompletionParts, HttpError> {
    let mut f = Fields(body);
    let c = common(&mut f, app)?;
    let prompt = completion_prompt(&mut f)?;
    if f.take::<bool>("echo")?.unwrap_or(false) {
        return Err(HttpError::invalid(
            "echo",
            "echo: returning the prompt is not supported",
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
    Ok((c, prompt, logprobs))
}

fn completion_request(app: &App, body: Map<String, Value>, tp: Option<String>) -> Started {
    let (c, prompt, logprobs) = rejected(app, parse_completion(app, body))?;
    let params = c.params(c.max_tokens.unwrap_or(16), logprobs.unwrap_or(0));
    let mt = c.max_tokens_name;
    let rename = |f: &'static str| if f == "max_tokens" { mt } else { f };
    let rx = start(app, prompt, params, &rename, tp.as_deref())?;
    Ok((
        rx,
        Answer {
            api: Api::Completion,
            id: new_id("cmpl"),
            created: now(),
            model: app.shared.cfg.served_model_name.clone(),
            logprobs,
            token_ids: c.token_ids,
            include_usage: c.include_usage,
            shared: app.shared.clone(),
        },
        c.stream,
    ))
}

/// The conversation as (Role, content) turns.
fn chat_turns(f: &mut Fields) -> Result<Vec<(String, String)>, HttpError> {
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

type ChatParts = (Common, String, Option<u32>);

fn parse_chat(app: &App, body: Map<String, Value>) -> Result<ChatParts, HttpError> {
    let mut f = Fields(body);
    let c = common(&mut f, app)?;
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
    Ok((c, chat_prompt(&turns), logprobs))
}

fn chat_request(app: &App, body: Map<String, Value>, tp: Option<String>) -> Started {
    let (mut c, text, logprobs) = rejected(app, parse_chat(app, body))?;
    c.stop.extend(CHAT_STOP.iter().map(|s| s.to_string()));
    // The default length needs the prompt's length: tokenize here when the cluster can.
    let s = &app.shared;
    let (prompt, max_tokens) = match &s.tokenizer {
        Some(tok) => {
            let ids = rejected(
                app,
                tok.encode(&text)
                    .map_err(|e| HttpError::invalid("messages", format!("messages: {e}"))),
            )?;
            let room = s
                .model
                .max_position_embeddings
                .min(s.cfg.kv_blocks * s.cfg.block_size);
            let mt = c
                .max_tokens
                .unwrap_or_else(|| room.saturating_sub(ids.len()).max(1));
            (PromptInput::Ids(ids), mt)
        }
        // build_job refuses text without a tokenizer.
        None => (PromptInput::Text(text), c.max_tokens.unwrap_or(1)),
    };
    let params = c.params(max_tokens, logprobs.unwrap_or(0));
    let mt = c.max_tokens_name;
    let rename = |f: &'static str| match f {
        "prompt" => "messages",
        "max_tokens" => mt,
        "logprobs" => "top_logprobs",
        f => f,
    };
    let rx = start(app, prompt, params, &rename, tp.as_deref())?;
    Ok((
        rx,
        Answer {
            api: Api::Chat,
            id: new_id("chatcmpl"),
            created: now(),
            model: s.cfg.served_model_name.clone(),
            logprobs,
            token_ids: c.token_ids,
            include_usage: c.include_usage,
            shared: s.clone(),
        },
        c.stream,
    ))
}

/// Everything a finished request produced.
struct Collected {
    text: String,
    tokens: Vec<TokenEvent>,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut rx: Receiver<GenEvent>) -> Result<Collected, HttpError> {
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

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextLength => "length",
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

impl Answer {
    /// A token's text on its own (the id when the cluster has no tokenizer).
    fn token_str(&self, id: u32) -> String {
        self.shared
            .tokenizer
            .as_ref()
            .and_then(|t| t.decode(&[id]).ok())
            .unwrap_or_else(|| id.to_string())
    }

    /// The `logprobs` of a choice covering `tokens`; `offset` is the completion text's
    /// length (in characters) before them, advanced past them.
    fn logprobs(&self, tokens: &[TokenEvent], offset: &mut usize) -> Value {
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

    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One choice; `text` is `None` for a chat chunk without content.
    fn choice(
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

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
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
    fn full(&self, c: Collected) -> Value {
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
struct Streamer {
    rx: Receiver<GenEvent>,
    answer: Answer,
    started: bool,
    finished: bool,
    /// Chat: leading whitespace of the reply is still being dropped.
    strip: bool,
    offset: usize,
}

fn data(v: &Value) -> Event {
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

fn sse(rx: Receiver<GenEvent>, answer: Answer) -> Response {
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
