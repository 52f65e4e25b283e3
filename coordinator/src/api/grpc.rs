//! The gRPC services: `Cluster` (workers register), `Admin` (status, drain) and `Inference`
//! (generate, tokenize, model info). Wire messages to requests and back, nothing else.

use crate::cluster::Cluster;
use crate::request::{build_job, GenEvent, PromptInput, RequestParams};
use crate::state::ClusterState;
use crate::{membership, router};
use grok_proto::v1 as pb;
use grok_shared::sampling::{Penalties, SamplingParams};
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct Svc(pub Arc<Cluster>);

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Svc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        // With TLS on, only a peer whose certificate the CA verified (at the handshake) joins.
        if self.0.cfg.tls.is_some() && req.peer_certs().is_none_or(|c| c.is_empty()) {
            tracing::warn!(peer = ?req.remote_addr(), "registration refused: no client certificate");
            return Err(Status::unauthenticated(
                "registration needs a client certificate signed by the cluster's CA: start the worker with --tls-ca, --tls-cert and --tls-key",
            ));
        }
        if self.0.state() == ClusterState::Standby {
            return Err(Status::unavailable(
                "this coordinator is a standby: register with the leader (see its status)",
            ));
        }
        membership::admit(&self.0, &req.into_inner()).map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Svc {
    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        router::drain(&self.0, &req.into_inner()).map(Response::new)
    }

    async fn rebalance(
        &self,
        req: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        crate::replica::placement::rebalance(&self.0, &req.into_inner()).map(Response::new)
    }
}

fn to_pb(ev: GenEvent) -> Result<pb::GenerateResponse, Status> {
    match ev {
        GenEvent::PromptScores(scores) => Ok(pb::GenerateResponse {
            prompt_logprobs: scores
                .into_iter()
                .map(|x| pb::PromptLogprob {
                    position: x.position as u32,
                    token: x.token,
                    logprob: x.logprob,
                    top: x
                        .top
                        .into_iter()
                        .map(|(token, logprob)| pb::TopLogprob { token, logprob })
                        .collect(),
                    seq_id: 0,
                })
                .collect(),
            ..Default::default()
        }),
        GenEvent::PromptLogits(prompt_logits) => Ok(pb::GenerateResponse {
            prompt_logits,
            ..Default::default()
        }),
        GenEvent::Token(t) => Ok(pb::GenerateResponse {
            ids: vec![t.id],
            text: t.text,
            logprobs: vec![t.logprob],
            top_logprobs: if t.top.is_empty() {
                vec![]
            } else {
                vec![pb::TopLogprobs {
                    top: t
                        .top
                        .into_iter()
                        .map(|(token, logprob)| pb::TopLogprob { token, logprob })
                        .collect(),
                }]
            },
            ..Default::default()
        }),
        GenEvent::Done {
            reason,
            text,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        } => Ok(pb::GenerateResponse {
            text,
            finish_reason: reason.as_str().into(),
            usage: Some(pb::Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: completion_tokens as u32,
                cached_tokens: cached_tokens as u32,
            }),
            ..Default::default()
        }),
        GenEvent::Error(s) => Err(s),
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for Svc {
    type GenerateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>,
    >;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let traceparent = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let r = req.into_inner();
        let prompt = match r.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => PromptInput::Text(t),
            Some(pb::generate_request::Prompt::Ids(ids)) => PromptInput::Ids(ids.ids),
            None => {
                return Err(Status::invalid_argument(
                    "prompt: the request has no prompt (text or ids)",
                ))
            }
        };
        let params = RequestParams {
            max_tokens: r.max_tokens as usize,
            sampling: SamplingParams {
                temperature: r.temperature,
                top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
                top_k: r.top_k as usize,
                seed: r.seed,
            },
            stop_ids: r.stop_token_ids,
            stop_strings: r.stop,
            ignore_eos: r.ignore_eos,
            top_logprobs: r.logprobs,
            prompt_logits: r.prompt_logits,
            penalties: Penalties {
                logit_bias: {
                    let mut b: Vec<(u32, f32)> = r.logit_bias.into_iter().collect();
                    b.sort_by_key(|x| x.0);
                    b
                },
                presence: r.presence_penalty,
                frequency: r.frequency_penalty,
                repetition: if r.repetition_penalty == 0.0 {
                    1.0
                } else {
                    r.repetition_penalty
                },
                min_tokens: r.min_tokens,
                stop_ids: vec![],
            },
            prompt_logprobs: r.prompt_logprobs,
            constraint: r
                .constraint
                .as_ref()
                .and_then(grok_proto::convert::grammar_of),
        };
        let c = &self.0;
        let refused = |e: crate::request::ApiError| {
            self.0.metrics.request_done("rejected");
            Status::new(
                e.code,
                format!("{}: {}", e.field.unwrap_or("request"), e.message),
            )
        };
        // Compiling a grammar (and, the first time, waiting for the vocabulary) takes time:
        // off the async worker threads.
        if params.constraint.is_some() {
            let (cl, p) = (c.clone(), params.clone());
            tokio::task::spawn_blocking(move || crate::request::check_constraint(&cl, &p))
                .await
                .map_err(|e| Status::internal(format!("request validation failed: {e}")))?
                .map_err(refused)?;
        }
        let (job, rx) = build_job(
            &c.model,
            c.tokenizer.as_ref(),
            c.kv_tokens(),
            prompt,
            params,
            traceparent.as_deref(),
        )
        .map_err(refused)?;
        router::submit(&self.0, job)?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(to_pb);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let tok = self
            .0
            .tokenizer
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this cluster has no tokenizer"))?;
        let ids = tok
            .encode(&req.into_inner().text)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn model_info(
        &self,
        _req: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(pb::ModelInfoResponse {
            name: self
                .0
                .cfg
                .model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            config_json: self.0.model.to_hf_json().to_string(),
            num_params: self.0.model.num_params(),
        }))
    }
}
