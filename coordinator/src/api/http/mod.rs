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
//! | `POST /tokenize`, `POST /detokenize` | vLLM's: text (or a conversation) to the ids generation sees, and ids to text |
//!
//! Requests follow OpenAI's schemas. Besides OpenAI's fields, `top_k` (0 = off),
//! `stop_token_ids`, `ignore_eos`, `return_token_ids` (each choice, and each streamed chunk,
//! gets the generated `token_ids`) and vLLM's `repetition_penalty` and `min_tokens` are
//! accepted; `logit_bias`, `presence_penalty` and `frequency_penalty` have OpenAI's meanings. A
//! field the server does not implement is refused with 400 naming it, unless its value cannot
//! change the output (`user`, `metadata`, `response_format` text, no tools). Defaults
//! are OpenAI's: `temperature` 1, `top_p` 1, `max_tokens` 16 for completions and, for chat,
//! as many as the context (and KV cache) leave after the prompt. `n` (and `best_of`, the
//! most likely `n` of that many by cumulative log-probability) up to 16: choice `i` samples
//! with seed `seed + i`, so choice 0 is the `n = 1` output; streamed chunks carry the index.
//! `echo` returns the prompt before the completion; with `logprobs`, the prompt's tokens come
//! scored (null for the first), and `max_tokens` may be 0 (not streamed).
//! Prompts are a string, a list of one string, a list of token ids or a list of one list of
//! token ids; text needs the cluster's tokenizer.
//!
//! Every job is built by [`crate::request::build_job`] (the same validation as gRPC) and
//! queued by [`crate::router::submit`]. Errors use OpenAI's body
//! `{"error": {"message", "type", "param", "code"}}`; gRPC codes map to HTTP statuses:
//! INVALID_ARGUMENT / FAILED_PRECONDITION 400, RESOURCE_EXHAUSTED 429 (a full queue),
//! UNAVAILABLE 503 (not serving), UNAUTHENTICATED 401, anything else 500. An error after a
//! stream has started is sent as one SSE event `data: {"error": {...}}` that ends the stream.
//! A client that goes away drops the request's event receiver, which the engine notices
//! and frees the sequence.

mod answer;
mod errors;
mod parse;

pub use parse::{chat_prompt, CHAT_STOP};

use crate::cluster::Cluster;
use crate::request::{build_job, GenEvent, PromptInput, RequestParams};
use crate::router;
use answer::{collect, sse, Answer, Api};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use errors::HttpError;
use grok_shared::sync::lock;
use parse::{
    parse_chat, parse_completion, parse_detokenize, parse_tokenize, JsonBody, CHAT_STOP as STOP,
};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver as Receiver;

struct App {
    shared: Arc<Cluster>,
    /// Unix time the API started (the model's `created`).
    created: u64,
}

type AppState = State<Arc<App>>;

pub fn router(shared: Arc<Cluster>) -> Router {
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
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
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
// Plain routes

async fn ready(State(app): AppState) -> Response {
    let (state, detail) = lock(&app.shared.state).clone();
    let state = state.as_str();
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

/// `POST /tokenize` (as vLLM names it): `{"prompt": TEXT}` or `{"messages": [...]}` →
/// `{"count", "max_model_len", "tokens"}`, the ids generation would see.
async fn tokenize(State(app): AppState, JsonBody(body): JsonBody) -> Response {
    let s = &app.shared;
    let r = parse_tokenize(&s.cfg.served_model_name, body).and_then(|text| {
        let tok = tokenizer(&app)?;
        let ids = tok
            .encode(&text)
            .map_err(|e| HttpError::invalid("prompt", format!("prompt: {e}")))?;
        Ok(json!({
            "count": ids.len(),
            "max_model_len": s.model.max_position_embeddings,
            "tokens": ids,
        }))
    });
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /detokenize` (as vLLM names it): `{"tokens": [ids]}` → `{"prompt": TEXT}`.
async fn detokenize(State(app): AppState, JsonBody(body): JsonBody) -> Response {
    let s = &app.shared;
    let vocab = s.model.vocab_size;
    let r = parse_detokenize(&s.cfg.served_model_name, body).and_then(|ids| {
        if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(HttpError::invalid(
                "tokens",
                format!(
                    "tokens: id {id} at position {pos} is outside the vocabulary (size {vocab})"
                ),
            ));
        }
        let text = tokenizer(&app)?
            .decode(&ids)
            .map_err(|e| HttpError::invalid("tokens", format!("tokens: {e}")))?;
        Ok(json!({ "prompt": text }))
    });
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The cluster's tokenizer, or the error a request that needs one gets.
fn tokenizer(app: &App) -> Result<&grok_shared::tokenizer::Tokenizer, HttpError> {
    app.shared.tokenizer.as_ref().ok_or_else(|| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "this cluster has no tokenizer: start it with --tokenizer",
            None,
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Completions and chat completions

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
    let tp = traceparent(&headers);
    respond(off_the_executor(move || completion_request(&app, body, tp)).await).await
}

async fn chat_completions(
    State(app): AppState,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody,
) -> Response {
    let tp = traceparent(&headers);
    respond(off_the_executor(move || chat_request(&app, body, tp)).await).await
}

/// Runs a request's validation (tokenizing its prompt, compiling its grammar: milliseconds for
/// large ones, and the first grammar waits for the vocabulary) on the blocking pool, so that no
/// async worker thread stalls on it.
async fn off_the_executor(f: impl FnOnce() -> Started + Send + 'static) -> Started {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(HttpError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("request validation failed: {e}"),
            None,
        ))
    })
}

/// A validated request: the receivers of its sequences' events, how to answer, and whether
/// to stream.
type Started = Result<(Vec<Receiver<GenEvent>>, Answer, bool), HttpError>;

async fn respond(r: Started) -> Response {
    let (rxs, answer, stream) = match r {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if stream {
        sse(rxs, answer)
    } else {
        let all = futures_util::future::join_all(rxs.into_iter().map(collect)).await;
        match all.into_iter().collect::<Result<Vec<_>, _>>() {
            Ok(c) => Json(answer.full(c)).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// Builds the jobs of a request's `k` sequences through `build_job` (counting a refusal as
/// `rejected`) and queues them. Sequence `i` samples with seed `seed + i` (wrapping), so the
/// first is the request's output with `n = 1`. The others are queued once the first's prompt
/// is computed (its first event), so that they take its blocks from the prefix cache instead of
/// computing the prompt again; one that cannot be queued ends with its error.
fn start(
    app: &App,
    prompt: PromptInput,
    params: RequestParams,
    k: usize,
    rename: &dyn Fn(&'static str) -> &'static str,
    traceparent: Option<&str>,
) -> Result<Vec<Receiver<GenEvent>>, HttpError> {
    let s = &app.shared;
    crate::request::check_constraint(s, &params).map_err(|e| {
        s.metrics.request_done("rejected");
        HttpError::from_api(e, rename)
    })?;
    let mut jobs = Vec::with_capacity(k);
    let mut rxs = Vec::with_capacity(k);
    for i in 0..k.max(1) {
        let mut p = params.clone();
        p.sampling.seed = p.sampling.seed.wrapping_add(i as u64);
        let (job, rx) = build_job(
            &s.model,
            s.tokenizer.as_ref(),
            s.kv_tokens(),
            prompt.clone(),
            p,
            traceparent,
        )
        .map_err(|e| {
            s.metrics.request_done("rejected");
            HttpError::from_api(e, rename)
        })?;
        jobs.push(job);
        rxs.push(rx);
    }
    let mut jobs = jobs.into_iter();
    let first = jobs.next().expect("k >= 1");
    router::submit(s, first).map_err(|e| HttpError::from_status(&e))?;
    let rest: Vec<_> = jobs.collect();
    if rest.is_empty() {
        return Ok(rxs);
    }
    // Relay the first choice's events; on the first one, queue the others.
    let (tx0, relayed) = tokio::sync::mpsc::unbounded_channel();
    let mut rx0 = std::mem::replace(&mut rxs[0], relayed);
    let shared = s.clone();
    tokio::spawn(async move {
        let mut rest = Some(rest);
        let submit_rest = |rest: Vec<crate::request::Job>| {
            for job in rest {
                let tx = job.tx.clone();
                if let Err(e) = router::submit(&shared, job) {
                    let _ = tx.send(GenEvent::Error(e));
                }
            }
        };
        while let Some(ev) = rx0.recv().await {
            if let Some(r) = rest.take() {
                submit_rest(r);
            }
            if tx0.send(ev).is_err() {
                break;
            }
        }
        if let Some(r) = rest.take() {
            submit_rest(r);
        }
    });
    Ok(rxs)
}

fn rejected<T>(app: &App, r: Result<T, HttpError>) -> Result<T, HttpError> {
    if r.is_err() {
        app.shared.metrics.request_done("rejected");
    }
    r
}

fn completion_request(app: &App, body: Map<String, Value>, tp: Option<String>) -> Started {
    let (c, prompt, logprobs, echo) = rejected(
        app,
        parse_completion(&app.shared.cfg.served_model_name, body),
    )?;
    let mut params = c.params(c.max_tokens.unwrap_or(16), logprobs.unwrap_or(0));
    // `echo`: the prompt comes back before the completion, scored when logprobs are asked for
    // (as vLLM does; max_tokens may then be 0).
    let echo = if echo {
        params.prompt_logprobs = Some(logprobs.unwrap_or(0));
        let s = &app.shared;
        let (text, ids) = match &prompt {
            PromptInput::Text(t) => {
                let ids = match &s.tokenizer {
                    Some(tok) => rejected(
                        app,
                        tok.encode(t)
                            .map_err(|e| HttpError::invalid("prompt", format!("prompt: {e}"))),
                    )?,
                    // build_job refuses text without a tokenizer.
                    None => vec![],
                };
                (t.clone(), ids)
            }
            PromptInput::Ids(ids) => {
                let text = s
                    .tokenizer
                    .as_ref()
                    .and_then(|t| t.decode(ids).ok())
                    .unwrap_or_default();
                (text, ids.clone())
            }
        };
        Some((text, ids))
    } else {
        None
    };
    let (mt, cn) = (c.max_tokens_name, c.constraint_name);
    let rename = |f: &'static str| match f {
        "max_tokens" => mt,
        "prompt_logprobs" => "logprobs",
        "constraint" => cn,
        f => f,
    };
    let rxs = start(app, prompt, params, c.best_of, &rename, tp.as_deref())?;
    Ok((
        rxs,
        Answer {
            n: c.n,
            echo,
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

fn chat_request(app: &App, body: Map<String, Value>, tp: Option<String>) -> Started {
    let (mut c, text, logprobs) =
        rejected(app, parse_chat(&app.shared.cfg.served_model_name, body))?;
    c.stop.extend(STOP.iter().map(|s| s.to_string()));
    // The default length needs the prompt's length: tokenize here when the cluster can.
    let s = &app.shared;
    let (prompt, max_tokens) = match &s.tokenizer {
        Some(tok) => {
            let ids = rejected(
                app,
                tok.encode(&text)
                    .map_err(|e| HttpError::invalid("messages", format!("messages: {e}"))),
            )?;
            let room = s.model.max_position_embeddings.min(s.kv_tokens());
            let mt = c
                .max_tokens
                .unwrap_or_else(|| room.saturating_sub(ids.len()).max(1));
            (PromptInput::Ids(ids), mt)
        }
        // build_job refuses text without a tokenizer.
        None => (PromptInput::Text(text), c.max_tokens.unwrap_or(1)),
    };
    let params = c.params(max_tokens, logprobs.unwrap_or(0));
    let (mt, cn) = (c.max_tokens_name, c.constraint_name);
    let rename = |f: &'static str| match f {
        "prompt" => "messages",
        "max_tokens" => mt,
        "logprobs" => "top_logprobs",
        "constraint" => cn,
        f => f,
    };
    let rxs = start(app, prompt, params, c.best_of, &rename, tp.as_deref())?;
    Ok((
        rxs,
        Answer {
            n: c.n,
            echo: None,
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
