//! A generation request from the client APIs to the engine: what it asks for, its validation
//! (the same for gRPC and HTTP), and the events it answers with.

use grok_shared::config::ModelConfig;
use grok_shared::constrain::{ConstrainError, Grammar};
pub use grok_shared::generate::FinishReason;
use grok_shared::sampling::{Penalties, SamplingParams};
use grok_shared::tokenizer::Tokenizer;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::Status;

/// What a request asks for besides its prompt.
#[derive(Clone, Debug)]
pub struct RequestParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    /// Return this many most likely tokens with each sampled token.
    pub top_logprobs: u32,
    /// Return the logits of every prompt position with the first token (tests).
    pub prompt_logits: bool,
    /// Logit bias and penalties (`stop_ids` unset: the replica fills in EOS and the request's
    /// stop ids for `min_tokens`).
    pub penalties: Penalties,
    /// Score the prompt, with this many alternatives per token (`max_tokens` may then be 0).
    pub prompt_logprobs: Option<u32>,
    /// Structured output: what the generated text must match.
    pub constraint: Option<Grammar>,
}

/// The score of one prompt token: its log-probability after the tokens before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptScore {
    /// From 1 (the first token has no score).
    pub position: usize,
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One sampled token as the client sees it.
#[derive(Clone, Debug, Default)]
pub struct TokenEvent {
    pub id: u32,
    /// Text released by this token (held back while it may be the start of a stop string).
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub enum GenEvent {
    /// Whole rows of prompt logits (at most `limits::CHUNK_BYTES`), in order, before the
    /// first token (only when the request asked for them).
    PromptLogits(Vec<f32>),
    /// Scores of prompt tokens, in order, before the first token (when asked for).
    PromptScores(Vec<PromptScore>),
    Token(TokenEvent),
    /// The last event of a successful request; `text` is any text still held back.
    Done {
        reason: FinishReason,
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens taken from the prefix cache.
        cached_tokens: usize,
    },
    Error(Status),
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: RequestParams,
    /// Unbounded: delivering an event never blocks the engine loop (a client that does not
    /// read holds only its own request's events, which its max_tokens bounds).
    pub tx: mpsc::UnboundedSender<GenEvent>,
    pub arrived: Instant,
    /// The request's span (ends when the job is dropped); steps that compute it link to it.
    pub span: tracing::Span,
}

/// A request rejected before it reaches the engine: the field at fault and why.
#[derive(Debug)]
pub struct ApiError {
    pub code: tonic::Code,
    pub field: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: tonic::Code::InvalidArgument,
            field: Some(field),
            message: message.into(),
        }
    }
    pub fn status(&self) -> Status {
        Status::new(self.code, self.message.clone())
    }
}

/// The prompt of a request, as text or token ids.
#[derive(Clone, Debug)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// Checks a request's structured output (once for all its choices): the cluster has a
/// tokenizer, the grammar compiles over its vocabulary, and nothing else in the request
/// contradicts it. Compiling takes a few milliseconds for a large schema.
pub fn check_constraint(
    cluster: &crate::cluster::Cluster,
    p: &RequestParams,
) -> Result<(), ApiError> {
    let Some(g) = &p.constraint else {
        return Ok(());
    };
    if p.ignore_eos {
        return Err(ApiError::invalid(
            "ignore_eos",
            "ignore_eos cannot be combined with structured output: the grammar ends the output",
        ));
    }
    let c = match cluster.constrainer() {
        None => {
            return Err(ApiError {
                code: tonic::Code::FailedPrecondition,
                field: Some("constraint"),
                message: "structured output needs a tokenizer; this cluster has none (start it with --tokenizer)".into(),
            })
        }
        Some(Err(e)) => {
            return Err(ApiError {
                code: tonic::Code::Internal,
                field: Some("constraint"),
                message: format!("structured output is unavailable: {e}"),
            })
        }
        Some(Ok(c)) => c,
    };
    match c.compile(g) {
        Ok(_) => Ok(()),
        Err(ConstrainError::Invalid(m)) => Err(ApiError::invalid("constraint", m)),
        Err(e) => Err(ApiError {
            code: tonic::Code::Internal,
            field: Some("constraint"),
            message: e.to_string(),
        }),
    }
}

/// Checks everything a caller can get wrong and builds the engine job.
pub fn build_job(
    c: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
    kv_tokens: usize,
    prompt: PromptInput,
    p: RequestParams,
    traceparent: Option<&str>,
) -> Result<(Job, mpsc::UnboundedReceiver<GenEvent>), ApiError> {
    let prompt = match prompt {
        PromptInput::Text(t) => {
            let tok = tokenizer.ok_or_else(|| ApiError {
                code: tonic::Code::FailedPrecondition,
                field: Some("prompt"),
                message:
                    "this cluster has no tokenizer: send token ids, or start it with --tokenizer"
                        .into(),
            })?;
            tok.encode(&t)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
        }
        PromptInput::Ids(ids) => ids,
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let Some((pos, id)) = prompt
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= c.vocab_size)
    {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {id} at position {pos} is outside the vocabulary (size {})",
                c.vocab_size
            ),
        ));
    }
    let ctx = c.max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(ApiError::invalid(
            "prompt",
            format!("the prompt has {} tokens; the context length is {ctx} (room is needed for at least one new token)", prompt.len()),
        ));
    }
    if p.max_tokens == 0 && p.prompt_logprobs.is_none() {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1 (0 only to score the prompt)",
        ));
    }
    if p.prompt_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid(
            "prompt_logprobs",
            format!(
                "at most 20 alternatives per prompt token, got {}",
                p.prompt_logprobs.unwrap_or_default()
            ),
        ));
    }
    if prompt.len() + p.max_tokens > ctx {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context length {ctx}",
                prompt.len(),
                p.max_tokens
            ),
        ));
    }
    let cache = kv_tokens;
    if prompt.len() + 1 > cache {
        return Err(ApiError {
            code: tonic::Code::InvalidArgument,
            field: Some("prompt"),
            message: format!("the prompt needs more than the {cache} tokens the KV cache holds"),
        });
    }
    if !(p.sampling.temperature.is_finite() && p.sampling.temperature >= 0.0) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be >= 0, got {}", p.sampling.temperature),
        ));
    }
    if !(p.sampling.top_p > 0.0 && p.sampling.top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {}", p.sampling.top_p),
        ));
    }
    if let Err(e) = p.penalties.validate(c.vocab_size) {
        // The message names the field first ("presence_penalty must be ...").
        let field = [
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logit_bias",
        ]
        .into_iter()
        .find(|f| e.starts_with(f))
        .unwrap_or("logit_bias");
        return Err(ApiError::invalid(field, e));
    }
    if p.penalties.min_tokens as usize > p.max_tokens {
        return Err(ApiError::invalid(
            "min_tokens",
            format!(
                "min_tokens ({}) exceeds max_tokens ({})",
                p.penalties.min_tokens, p.max_tokens
            ),
        ));
    }
    if p.top_logprobs > 20 {
        return Err(ApiError::invalid(
            "logprobs",
            format!("at most 20 top logprobs, got {}", p.top_logprobs),
        ));
    }
    if !p.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(ApiError {
            code: tonic::Code::FailedPrecondition,
            field: Some("stop"),
            message: "stop strings need a tokenizer; this cluster has none (use stop token ids)"
                .into(),
        });
    }
    if p.stop_strings.iter().any(|x| x.is_empty()) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if p.prompt_logits {
        let bytes = prompt.len() * c.vocab_size * 4;
        if bytes > grok_proto::limits::MAX_PROMPT_LOGITS_BYTES {
            return Err(ApiError::invalid(
                "prompt_logits",
                format!(
                    "the logits of a {}-token prompt take {} MiB ({} x vocabulary {} x 4 bytes); at most {} MiB are returned: send at most {} prompt tokens",
                    prompt.len(),
                    bytes >> 20,
                    prompt.len(),
                    c.vocab_size,
                    grok_proto::limits::MAX_PROMPT_LOGITS_BYTES >> 20,
                    grok_proto::limits::MAX_PROMPT_LOGITS_BYTES / 4 / c.vocab_size.max(1)
                ),
            ));
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!(
        "request",
        prompt_tokens = prompt.len(),
        max_tokens = p.max_tokens,
        outcome = tracing::field::Empty,
        completion_tokens = tracing::field::Empty
    );
    grok_proto::telemetry::set_parent(&span, traceparent);
    Ok((
        Job {
            prompt,
            params: p,
            tx,
            arrived: std::time::Instant::now(),
            span,
        },
        rx,
    ))
}
