//! The worker's compute engine: one thread owns the model shard, its KV cache and its
//! communicators, and runs the steps the coordinator plans, in order.

use crate::comm::{Comm, NcclIds, NcclStream};
use crate::grammar::{self, Grammars, SeqGrammar};
use crate::group::{dispatch_of, dp_group, placement_for};
pub use crate::loaded::LoadedShard;
use crate::shard::{run_pass, with_shard, Route, Shard};
use grok_proto::v1 as pb;
use grok_shared::collective::{TcpComm, TcpConfig};
use grok_shared::constrain::TokenMask;
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::model::Device;
use grok_shared::model::{kv_blocks_to_allocate, KvCache, KvSizing, Model, SeqInput, WantLogits};
use grok_shared::sampling::{
    logprob_of, sample, top_logprobs, Penalties, Rng, SamplingParams, SeenTokens,
};
use grok_shared::sharding::{Layout, Placement, RankPlace};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the model directory {dir}: {why}")]
    Model { dir: String, why: String },
    #[error("collective: {0}")]
    Comm(#[from] grok_shared::collective::CommError),
    #[error(transparent)]
    Forward(#[from] grok_shared::model::ModelError),
}

struct SeqState {
    table: Vec<u32>,
    sampling: SamplingParams,
    /// Logit changes before sampling, with what they count (only when any is active).
    penalties: Option<Box<PenaltyState>>,
    /// Structured output (on the sampling rank).
    grammar: Option<SeqGrammar>,
}

/// A sequence's penalties and the tokens they look at.
struct PenaltyState {
    p: Penalties,
    prompt_len: usize,
    seen: SeenTokens,
}

impl SeqState {
    /// Counts the tokens of a step (before its sampling: they precede the sampled token).
    fn record(&mut self, s: &pb::SeqStep) {
        if let Some(ps) = &mut self.penalties {
            for (i, &t) in s.tokens.iter().enumerate() {
                ps.seen.record(t, s.start_pos as usize + i, ps.prompt_len);
            }
        }
    }
}

/// What [`Engine::admit`] recorded: the sequences it created and the table lengths before.
struct Undo {
    fresh: Vec<u64>,
    tables: Vec<(u64, usize)>,
}

pub struct Engine {
    config: grok_shared::config::ModelConfig,
    /// The model shard and its KV cache, on the CPU or a GPU.
    shard: Shard,
    layout: Layout,
    place: RankPlace,
    world: Comm,
    tp: Comm,
    seqs: HashMap<u64, SeqState>,
    /// Structured output's vocabulary (the sampling rank, given the coordinator's tokenizer).
    grammars: Option<Grammars>,
    /// Data-parallel attention: the ranks holding each expert (empty otherwise).
    placement: Placement,
    /// What was loaded: a later `Load` asking for the same shard only reconnects.
    loaded: LoadedShard,
}

/// Resident set size of this process, from /proc (0 where unavailable).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples the token that follows step `s` of a sequence from its last logits row; the
/// generator is seeded by position, so the token does not depend on the batch.
///
/// Penalties and biases change the row that is sampled from; the log-probabilities returned
/// are the model's own (of the unchanged row), as vLLM returns them by default.
///
/// A constrained sequence samples only tokens its grammar allows (`masks`, by sequence); when
/// penalties or biases leave none of them a finite logit (min_tokens against a finished
/// grammar), the grammar wins.
fn sample_step(st: &SeqState, s: &pb::SeqStep, row: &[f32], masks: &Masks) -> pb::SampledToken {
    let pos = s.start_pos as usize + s.tokens.len();
    let mut rng = Rng::for_token(st.sampling.seed, pos);
    let failed = |error: String| pb::SampledToken {
        seq_id: s.seq_id,
        error,
        ..Default::default()
    };
    let mask = match (&st.grammar, masks.get(&s.seq_id)) {
        (None, _) => None,
        (Some(_), Some(Ok(m))) => Some(m),
        (Some(_), Some(Err(e))) => return failed(e.clone()),
        (Some(_), None) => return failed("structured output: no token mask was computed".into()),
    };
    let mut changed = match &st.penalties {
        Some(ps) => {
            let mut changed = row.to_vec();
            ps.p.apply(&mut changed, &ps.seen);
            Some(changed)
        }
        None => None,
    };
    if let Some(m) = mask {
        let mut c = changed.unwrap_or_else(|| row.to_vec());
        m.apply(&mut c);
        if !c.iter().any(|x| x.is_finite()) {
            c.copy_from_slice(row);
            m.apply(&mut c);
            if !c.iter().any(|x| x.is_finite()) {
                return failed(
                    "structured output: no token the grammar allows has a finite logit".into(),
                );
            }
        }
        changed = Some(c);
    }
    let out = sample(changed.as_deref().unwrap_or(row), &st.sampling, &mut rng);
    let top = top_logprobs(row, s.top_logprobs as usize)
        .into_iter()
        .map(|(token, logprob)| pb::TopLogprob { token, logprob })
        .collect();
    pb::SampledToken {
        seq_id: s.seq_id,
        token: out.id,
        logprob: logprob_of(row, out.id),
        top,
        error: String::new(),
    }
}

/// A step's token masks, by sequence.
type Masks = HashMap<u64, Result<TokenMask, String>>;

/// The prompt scores of step `s` from its logits `rows` (one per token of the step): row `i`
/// scores the token at position `start_pos + i + 1` when that is known (in the step, or
/// `next_token` after its last row).
fn score_prompt(s: &pb::SeqStep, rows: &[f32], v: usize) -> Vec<pb::PromptLogprob> {
    let n = s.tokens.len();
    (0..n)
        .filter_map(|i| {
            let token = if i + 1 < n {
                s.tokens[i + 1]
            } else {
                s.next_token?
            };
            let row = rows.get(i * v..(i + 1) * v)?;
            Some(pb::PromptLogprob {
                position: s.start_pos + i as u32 + 1,
                token,
                logprob: logprob_of(row, token),
                top: top_logprobs(row, s.prompt_top as usize)
                    .into_iter()
                    .map(|(token, logprob)| pb::TopLogprob { token, logprob })
                    .collect(),
                seq_id: s.seq_id,
            })
        })
        .collect()
}

pub struct LoadSpec<'a> {
    pub model_dir: &'a Path,
    pub layout: Layout,
    pub rank: usize,
    pub world_peers: Vec<SocketAddr>,
    pub tp_peers: Vec<SocketAddr>,
    /// How many KV blocks: fixed by the coordinator, or from the memory budget.
    pub kv: KvSizing,
    pub block_size: usize,
    pub comm_timeout: Duration,
    /// CUDA device ordinal (None: CPU).
    pub cuda_device: Option<usize>,
    /// Data-parallel attention after the loss of ranks: the ranks that serve (empty: all).
    pub live_ranks: Vec<usize>,
    /// Data-parallel attention: the ranks holding each expert (empty: the layout's
    /// round-robin placement of its copies).
    pub placement: Placement,
    /// NCCL ids of this rank's groups (GPU replicas whose ranks each have a GPU of their own).
    pub nccl: NcclIds,
    /// Which passes of a GPU shard take cuBLAS.
    pub gemm: grok_shared::backend::cuda_shapes::GemmSettings,
}

/// The world and tensor-parallel communicators over their TCP groups, each on NCCL when its id
/// came and every member joined (see [`Comm::join`]); the world group joins first on every rank.
fn join_groups(
    world: TcpComm,
    tp: TcpComm,
    ids: NcclIds,
    stream: Option<&NcclStream>,
    timeout: Duration,
) -> Result<(Comm, Comm), EngineError> {
    let (world, why_w) = Comm::join(world, ids.world, stream, timeout)?;
    let (tp, why_t) = Comm::join(tp, ids.tp, stream, timeout)?;
    for (group, c, why) in [("world", &world, why_w), ("tensor-parallel", &tp, why_t)] {
        match why {
            Some(why) => tracing::warn!(group, why = %why, "NCCL asked for, TCP serves"),
            None if c.transport() == "nccl" => tracing::info!(group, "collectives over NCCL"),
            None => {}
        }
    }
    Ok((world, tp))
}

impl Engine {
    /// Connects the collectives, then loads the shard of `spec.rank`.
    pub fn load(
        spec: LoadSpec,
        world_listener: TcpListener,
        tp_listener: TcpListener,
        mut progress: impl FnMut(&str, f32, String),
    ) -> Result<(Engine, u64), EngineError> {
        let dir = spec.model_dir;
        let layout = spec.layout;
        // A pre-sharded directory: open only this rank's file, checked against the manifest.
        let ck = if grok_shared::formats::presharded::is_presharded(dir) {
            grok_shared::formats::presharded::open_rank(dir, layout, spec.rank, true).map_err(
                |e| EngineError::Model {
                    dir: dir.display().to_string(),
                    why: e.to_string(),
                },
            )?
        } else {
            Checkpoint::open(dir).map_err(|e| EngineError::Model {
                dir: dir.display().to_string(),
                why: e.to_string(),
            })?
        };
        layout
            .validate(&ck.config)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let (group_rank, group) =
            dp_group(&layout, spec.rank, &spec.live_ranks).map_err(EngineError::Invalid)?;
        if spec.world_peers.len() != group || spec.rank >= layout.world_size() {
            return Err(EngineError::Invalid(format!(
                "rank {} with {} peers does not match the layout's {} ranks",
                spec.rank,
                spec.world_peers.len(),
                group
            )));
        }
        let place = layout.place(spec.rank);
        let tp_group = if layout.dp_attention {
            group
        } else {
            layout.tp
        };
        if spec.tp_peers.len() != tp_group {
            return Err(EngineError::Invalid(format!(
                "{} tensor-parallel peers for tp={}",
                spec.tp_peers.len(),
                tp_group
            )));
        }
        let tp_rank = if layout.dp_attention {
            group_rank
        } else {
            place.tp_rank
        };
        progress(
            "connecting",
            0.0,
            format!("{} peers", spec.world_peers.len() - 1),
        );
        let cfg = || TcpConfig {
            timeout: spec.comm_timeout,
            connect_timeout: spec.comm_timeout,
        };
        let world = TcpComm::connect(group_rank, &spec.world_peers, world_listener, cfg())?;
        let tp = TcpComm::connect(tp_rank, &spec.tp_peers, tp_listener, cfg())?;
        // A GPU worker opens its device before the shard loads: NCCL joins on its stream.
        #[cfg(feature = "cuda")]
        let backend = spec
            .cuda_device
            .map(|n| grok_shared::backend::cuda::CudaBackend::open(n).map(std::sync::Arc::new))
            .transpose()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        #[cfg(feature = "cuda")]
        let stream = backend.as_ref().map(|b| b.stream().clone());
        #[cfg(not(feature = "cuda"))]
        let stream: Option<NcclStream> = None;
        let (world, tp) = join_groups(world, tp, spec.nccl, stream.as_ref(), spec.comm_timeout)?;
        if spec.nccl.any() {
            progress(
                "connecting",
                0.0,
                format!(
                    "collectives: world {}, tensor-parallel {}",
                    world.transport(),
                    tp.transport()
                ),
            );
        }
        let placement =
            placement_for(&layout, &ck.config, &spec.placement).map_err(EngineError::Invalid)?;
        let shard = if layout.dp_attention {
            layout.shard_placed(&ck.config, spec.rank, &placement)
        } else {
            layout.shard(&ck.config, spec.rank)
        };
        progress("loading", 0.0, format!("layers {:?}", shard.layers));
        // A GPU's upload is the second half of its loading.
        let share = if spec.cuda_device.is_some() { 0.5 } else { 1.0 };
        let mut model = Model::load_shard_with_progress(&ck, &shard, |done, total| {
            progress(
                "loading",
                share * done as f32 / total as f32,
                format!("layer {done}/{total}"),
            );
        })?;
        if layout.dp_attention {
            model.dispatch = Some(
                dispatch_of(&layout, &placement, &spec.live_ranks).map_err(EngineError::Invalid)?,
            );
        }
        let shard = match spec.cuda_device {
            None => {
                // The shard in the process's own (huge) pages; the file's pages go with `ck`.
                model.make_resident()?;
                let per_block = KvCache::block_bytes(&model, spec.block_size);
                let blocks = kv_blocks_to_allocate(&spec.kv, per_block, None)?;
                let kv = KvCache::try_new(&model, blocks, spec.block_size)?;
                Shard::Cpu { model, kv }
            }
            #[cfg(feature = "cuda")]
            Some(n) => {
                use grok_shared::backend::cuda::{Cuda, CudaKv};
                progress("loading", 0.5, format!("uploading to cuda:{n}"));
                // The model owns its device (opened above): a reload opens it again, the old
                // one is freed.
                let be = backend
                    .ok_or_else(|| EngineError::Invalid(format!("cuda:{n} was not opened")))?;
                let mut dev = Cuda::new(be);
                dev.set_gemm(spec.gemm);
                let (model, _) = Model::upload_with_progress(model, dev, &mut |done, total| {
                    progress(
                        "loading",
                        0.5 + 0.5 * done as f32 / total as f32,
                        format!("uploading to cuda:{n}: {done}/{total} (embedding, layers)"),
                    )
                })?;
                let kv = CudaKv::sized(&model, &spec.kv, spec.block_size)?;
                Shard::Cuda { model, kv }
            }
            #[cfg(not(feature = "cuda"))]
            Some(n) => {
                return Err(EngineError::Invalid(format!(
                    "cuda:{n}: this build has no CUDA support (build with --features cuda)"
                )))
            }
        };
        let bytes = shard.weight_bytes() as u64;
        let config = ck.config.clone();
        Ok((
            Engine {
                config,
                shard,
                layout,
                place,
                world,
                tp,
                seqs: HashMap::new(),
                grammars: None,
                placement,
                loaded: LoadedShard {
                    model_dir: dir.to_path_buf(),
                    layout,
                    rank: spec.rank,
                    kv: spec.kv,
                    block_size: spec.block_size,
                },
            },
            bytes,
        ))
    }

    /// The coordinator's tokenizer (a SentencePiece model file; empty: none): the sampling
    /// rank builds structured output's vocabulary from it, in the background.
    pub fn use_tokenizer(&mut self, tokenizer: Vec<u8>) {
        if self.grammars.as_ref().is_some_and(|g| g.is_for(&tokenizer)) {
            return;
        }
        self.grammars = (self.samples() && !tokenizer.is_empty()).then(|| {
            let c = &self.config;
            Grammars::new(tokenizer, c.vocab_size, c.eos_token_id)
        });
    }

    pub fn rank(&self) -> usize {
        self.place.rank
    }

    pub fn weight_bytes(&self) -> u64 {
        self.shard.weight_bytes() as u64
    }

    /// Bytes of the KV cache (in device memory for a GPU).
    pub fn kv_bytes(&self) -> u64 {
        self.shard.kv_bytes() as u64
    }

    /// Blocks of the KV cache.
    pub fn kv_blocks(&self) -> u32 {
        self.shard.kv_blocks() as u32
    }

    pub fn loaded(&self) -> &LoadedShard {
        &self.loaded
    }

    /// Rebuilds the collectives with a new set of peers (a lost rank was replaced) and forgets
    /// every sequence: the coordinator starts its requests again. The weights stay.
    ///
    /// With data-parallel attention, `live_ranks` (not empty) are the ranks that serve after
    /// the loss of others: the group shrinks to them and each expert's rows go to its live
    /// copies; when the lost ranks return, a reconnect with every rank restores the group.
    /// A new `placement` (not empty) makes this rank load the experts placed on it anew and
    /// drop those it no longer holds (rebalancing); the others stay. Returns the number of
    /// expert slices loaded per layer.
    #[allow(clippy::too_many_arguments)]
    pub fn reconnect(
        &mut self,
        world_peers: &[SocketAddr],
        tp_peers: &[SocketAddr],
        live_ranks: &[usize],
        placement: &[Vec<usize>],
        world_listener: TcpListener,
        tp_listener: TcpListener,
        comm_timeout: Duration,
        nccl: NcclIds,
    ) -> Result<usize, EngineError> {
        let placement = if placement.is_empty() && self.layout.dp_attention {
            self.placement.clone()
        } else {
            placement_for(&self.layout, &self.config, placement).map_err(EngineError::Invalid)?
        };
        let (group_rank, group) =
            dp_group(&self.layout, self.place.rank, live_ranks).map_err(EngineError::Invalid)?;
        let tp_group = if self.layout.dp_attention {
            group
        } else {
            self.layout.tp
        };
        if world_peers.len() != group || tp_peers.len() != tp_group {
            return Err(EngineError::Invalid(format!(
                "{} peers and {} tensor-parallel peers do not match the layout's {} ranks, tp={}",
                world_peers.len(),
                tp_peers.len(),
                group,
                tp_group
            )));
        }
        let dispatch = if self.layout.dp_attention {
            Some(dispatch_of(&self.layout, &placement, live_ranks).map_err(EngineError::Invalid)?)
        } else {
            None
        };
        let mut loaded = 0;
        if placement != self.placement {
            let dir = &self.loaded.model_dir;
            if grok_shared::formats::presharded::is_presharded(dir) {
                return Err(EngineError::Invalid(format!(
                    "{} is pre-sharded: its rank files hold the experts of the first placement only; a new placement needs the whole checkpoint",
                    dir.display()
                )));
            }
            let ck = Checkpoint::open(dir).map_err(|e| EngineError::Model {
                dir: dir.display().to_string(),
                why: e.to_string(),
            })?;
            let spec = self
                .layout
                .shard_placed(&self.config, self.place.rank, &placement);
            loaded = match &mut self.shard {
                Shard::Cpu { model, .. } => {
                    let n = model.set_experts(&ck, &spec.experts)?;
                    model.make_resident()?;
                    n
                }
                #[cfg(feature = "cuda")]
                Shard::Cuda { .. } => {
                    return Err(EngineError::Invalid(
                        "a new placement of the experts is loaded in place on CPU workers only; restart this CUDA worker to load it".into(),
                    ))
                }
            };
            self.placement = placement;
        }
        let tp_rank = if self.layout.dp_attention {
            group_rank
        } else {
            self.place.tp_rank
        };
        let cfg = || TcpConfig {
            timeout: comm_timeout,
            connect_timeout: comm_timeout,
        };
        // The old NCCL communicators go first (aborted on this rank alone: a peer may be gone),
        // so that their device memory is free for the new ones.
        self.world.close_nccl();
        self.tp.close_nccl();
        let world = TcpComm::connect(group_rank, world_peers, world_listener, cfg())?;
        let tp = TcpComm::connect(tp_rank, tp_peers, tp_listener, cfg())?;
        let stream = self.shard.nccl_stream();
        (self.world, self.tp) = join_groups(world, tp, nccl, stream.as_ref(), comm_timeout)?;
        with_shard!(&mut self.shard, |m, _kv| m.dispatch = dispatch);
        self.seqs.clear();
        Ok(loaded)
    }

    fn is_last_stage(&self) -> bool {
        self.place.stage == self.layout.pp - 1
    }

    /// Whether this rank computes logits and samples: the last stage's first tensor rank, or
    /// with data-parallel attention every rank (for its own sequences).
    fn samples(&self) -> bool {
        self.is_last_stage() && (self.place.tp_rank == 0 || self.layout.dp_attention)
    }

    /// Runs one step; errors are returned in the result, not raised.
    pub fn step(&mut self, plan: pb::StepPlan) -> pb::StepResult {
        let t = Instant::now();
        let c0 = self.world.comm_seconds() + self.tp.comm_seconds();
        let b0 = self.world.bytes_sent() + self.tp.bytes_sent();
        // On a thread of the compute pool: the step's parallel loops split there directly
        // instead of each waking the pool from this thread.
        let span = tracing::Span::current();
        let mut res =
            match grok_shared::threads::on_pool(|| span.in_scope(|| self.step_inner(&plan))) {
                Ok(r) => r,
                Err(e) => pb::StepResult {
                    error: format!("rank {}: {e}", self.place.rank),
                    ..Default::default()
                },
            };
        res.step_id = plan.step_id;
        res.compute_seconds = t.elapsed().as_secs_f64();
        res.comm_seconds = self.world.comm_seconds() + self.tp.comm_seconds() - c0;
        res.comm_bytes = (self.world.bytes_sent() + self.tp.bytes_sent()).saturating_sub(b0);
        res
    }

    /// Checks the plan's sequences against the engine's state (new sequences need valid
    /// sampling parameters, block ids must lie in the cache, a table never holds more blocks
    /// than the cache has, a sequence appears once) and then, only if all of it holds, records
    /// the new sequences and blocks. What it returns undoes that, for a plan the model then
    /// refuses: a refused plan leaves no trace.
    fn admit(&mut self, plan: &pb::StepPlan) -> Result<Undo, EngineError> {
        let blocks = self.shard.kv_blocks();
        let mut seen = std::collections::HashSet::with_capacity(plan.seqs.len());
        let mut fresh = Vec::new();
        for s in &plan.seqs {
            if !seen.insert(s.seq_id) {
                return Err(EngineError::Invalid(format!(
                    "sequence {} appears twice in step {}",
                    s.seq_id, plan.step_id
                )));
            }
            let held = match self.seqs.get(&s.seq_id) {
                Some(st) => st.table.len(),
                None => {
                    let sp = s.sampling.as_ref().ok_or_else(|| {
                        EngineError::Invalid(format!(
                            "sequence {} starts without sampling parameters",
                            s.seq_id
                        ))
                    })?;
                    let sampling = SamplingParams {
                        temperature: sp.temperature,
                        top_p: if sp.top_p <= 0.0 { 1.0 } else { sp.top_p },
                        top_k: sp.top_k as usize,
                        seed: sp.seed,
                    };
                    sampling
                        .validate()
                        .map_err(|e| EngineError::Invalid(format!("sequence {}: {e}", s.seq_id)))?;
                    let mut logit_bias: Vec<(u32, f32)> =
                        sp.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
                    logit_bias.sort_by_key(|x| x.0);
                    let p = Penalties {
                        logit_bias,
                        presence: sp.presence_penalty,
                        frequency: sp.frequency_penalty,
                        repetition: if sp.repetition_penalty == 0.0 {
                            1.0
                        } else {
                            sp.repetition_penalty
                        },
                        min_tokens: sp.min_tokens,
                        stop_ids: sp.min_tokens_stop_ids.clone(),
                    };
                    p.validate(self.config.vocab_size)
                        .map_err(|e| EngineError::Invalid(format!("sequence {}: {e}", s.seq_id)))?;
                    let penalties = p.is_active().then(|| {
                        Box::new(PenaltyState {
                            p,
                            prompt_len: sp.prompt_len as usize,
                            seen: SeenTokens::default(),
                        })
                    });
                    let grammar = sp
                        .constraint
                        .as_ref()
                        .and_then(grok_proto::convert::grammar_of)
                        .filter(|_| self.samples())
                        .map(|g| {
                            SeqGrammar::new(
                                g,
                                sp.prompt_len as usize,
                                sp.generated.clone(),
                                self.grammars.is_some(),
                            )
                        });
                    fresh.push((s.seq_id, sampling, penalties, grammar));
                    0
                }
            };
            if let Some(t) = s
                .next_token
                .filter(|&t| t as usize >= self.config.vocab_size)
            {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: next token {t} is outside the vocabulary",
                    s.seq_id
                )));
            }
            if let Some(b) = s.new_blocks.iter().find(|&&b| b as usize >= blocks) {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: block {b} outside the cache of {blocks} blocks",
                    s.seq_id
                )));
            }
            if held.saturating_add(s.new_blocks.len()) > blocks {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: {held} + {} new blocks exceed the cache of {blocks} blocks",
                    s.seq_id,
                    s.new_blocks.len()
                )));
            }
        }
        let mut undo = Undo {
            fresh: fresh.iter().map(|(id, ..)| *id).collect(),
            tables: Vec::new(),
        };
        for (id, sampling, penalties, grammar) in fresh {
            self.seqs.insert(
                id,
                SeqState {
                    table: Vec::new(),
                    sampling,
                    penalties,
                    grammar,
                },
            );
        }
        for s in &plan.seqs {
            if let Some(st) = self.seqs.get_mut(&s.seq_id) {
                undo.tables.push((s.seq_id, st.table.len()));
                st.table.extend_from_slice(&s.new_blocks);
            }
        }
        Ok(undo)
    }

    /// Starts the step's grammar work (constrained sequences' new tokens and masks) on a
    /// thread of its own; None when no sequence of the step is constrained.
    fn start_masks(&self, plan: &pb::StepPlan) -> Option<grammar::Pending> {
        let work: Vec<grammar::Work> = plan
            .seqs
            .iter()
            .filter_map(|s| {
                let g = self.seqs.get(&s.seq_id)?.grammar.as_ref()?;
                Some(grammar::Work::of(s.seq_id, g, s))
            })
            .collect();
        (!work.is_empty()).then(|| grammar::start(self.grammars.as_ref(), work))
    }

    fn undo(&mut self, u: Undo) {
        for (id, len) in u.tables {
            if let Some(st) = self.seqs.get_mut(&id) {
                st.table.truncate(len);
            }
        }
        for id in u.fresh {
            self.seqs.remove(&id);
        }
    }

    /// A plan this rank refuses. With data-parallel attention the other ranks are already in
    /// the step's exchanges: this rank takes part with no rows (serving its experts), so that
    /// the step fails with this error and not with a collective's deadline.
    fn refuse_in_step(&mut self, e: EngineError) -> EngineError {
        if self.layout.dp_attention {
            let tp = &self.tp;
            let r: Result<(), grok_shared::model::ModelError> =
                with_shard!(&mut self.shard, |m, kv| m
                    .dev
                    .zeros(0)
                    .and_then(|mut h| m.forward_layers(&mut h, &[], kv, tp)));
            if let Err(c) = r {
                return EngineError::Invalid(format!("{e}; then, serving the experts: {c}"));
            }
        }
        e
    }

    fn step_inner(&mut self, plan: &pb::StepPlan) -> Result<pb::StepResult, EngineError> {
        for id in &plan.free_seqs {
            self.seqs.remove(id);
        }
        let mut res = pb::StepResult::default();
        // With data-parallel attention a rank with no sequence in a step still serves its
        // experts to the others' rows: it runs the layers on no rows.
        if plan.seqs.is_empty() && !self.layout.dp_attention {
            return Ok(res);
        }
        let undo = match self.admit(plan) {
            Ok(u) => u,
            Err(e) => return Err(self.refuse_in_step(e)),
        };
        let want = |s: &pb::SeqStep| {
            if s.return_logits || s.score_prompt {
                WantLogits::All
            } else if s.sample {
                WantLogits::Last
            } else {
                WantLogits::None
            }
        };
        fn inputs<'a>(
            plan: &'a pb::StepPlan,
            seqs: &'a HashMap<u64, SeqState>,
            want: impl Fn(&pb::SeqStep) -> WantLogits,
        ) -> Vec<SeqInput<'a>> {
            plan.seqs
                .iter()
                .map(|s| SeqInput {
                    tokens: &s.tokens,
                    start_pos: s.start_pos as usize,
                    block_table: &seqs[&s.seq_id].table,
                    want: want(s),
                })
                .collect()
        }
        let checked: Result<(), grok_shared::model::ModelError> = {
            let inputs = inputs(plan, &self.seqs, want);
            with_shard!(&self.shard, |m, kv| m.check_batch(&inputs, kv))
        };
        if let Err(e) = checked {
            self.undo(undo);
            return Err(self.refuse_in_step(e.into()));
        }
        let pending = self.start_masks(plan);
        let inputs = inputs(plan, &self.seqs, want);
        let tp = self.layout.tp;
        let route = Route {
            prev: (self.place.stage > 0).then(|| self.place.rank - tp),
            next: (!self.is_last_stage()).then(|| self.place.rank + tp),
            samples: self.samples(),
            world: &self.world,
            tp: &self.tp,
        };
        let out = with_shard!(&mut self.shard, |m, kv| run_pass(m, kv, &inputs, &route))?;
        // Tokens routed to each expert of this stage's layers: every tensor rank routes the
        // same tokens, so tensor rank 0 reports them (the others only reset their counts);
        // with data-parallel attention each rank routes its own.
        res.expert_served = out.served;
        if self.place.tp_rank == 0 || self.layout.dp_attention {
            res.expert_counts = out.counts;
            res.first_layer = out.first_layer as u32;
        }
        if !self.samples() {
            return Ok(res);
        }
        // The step's tokens precede the tokens it samples: the penalties count them first,
        // every step (a prompt chunk that asks for no logits too).
        for s in &plan.seqs {
            if let Some(st) = self.seqs.get_mut(&s.seq_id) {
                st.record(s);
            }
        }
        let Some(logits) = out.logits else {
            return Ok(res);
        };
        let masks = pending.map(grammar::Pending::finish).unwrap_or_default();
        let v = self.config.vocab_size;
        let mut off = 0;
        for s in &plan.seqs {
            let n = match want(s) {
                WantLogits::All => s.tokens.len(),
                WantLogits::Last => 1,
                WantLogits::None => 0,
            };
            if s.return_logits {
                res.logits
                    .extend_from_slice(&logits[off * v..(off + n) * v]);
            }
            if s.score_prompt {
                res.prompt_logprobs
                    .extend(score_prompt(s, &logits[off * v..(off + n) * v], v));
            }
            if s.sample {
                let row = &logits[(off + n - 1) * v..(off + n) * v];
                res.tokens
                    .push(sample_step(&self.seqs[&s.seq_id], s, row, &masks));
            }
            off += n;
        }
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-worker engine on a random `tiny` model (4 KV blocks of 4 slots).
    fn engine(name: &str) -> (std::path::PathBuf, Engine) {
        let dir = std::env::temp_dir().join(format!("grok-engine-{name}-{}", std::process::id()));
        let c = grok_shared::config::ModelConfig::preset("tiny", None).unwrap();
        grok_shared::formats::genmodel::generate(
            &c,
            grok_shared::formats::genmodel::GenDType::F32,
            1,
            &dir,
            1 << 30,
            |_, _| {},
        )
        .unwrap();
        let w = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = LoadSpec {
            model_dir: &dir,
            layout: Layout::new(1, 1, 1),
            rank: 0,
            world_peers: vec![w.local_addr().unwrap()],
            tp_peers: vec![t.local_addr().unwrap()],
            kv: KvSizing {
                blocks: Some(4),
                ..Default::default()
            },
            block_size: 4,
            comm_timeout: Duration::from_secs(5),
            cuda_device: None,
            live_ranks: Vec::new(),
            placement: Vec::new(),
            nccl: NcclIds::default(),
            gemm: Default::default(),
        };
        let e = Engine::load(spec, w, t, |_, _, _| {}).unwrap().0;
        (dir, e)
    }

    fn seq(id: u64, tokens: Vec<u32>, start: u32, blocks: Vec<u32>, first: bool) -> pb::SeqStep {
        pb::SeqStep {
            seq_id: id,
            tokens,
            start_pos: start,
            new_blocks: blocks,
            sampling: first.then_some(pb::SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 1,
                ..Default::default()
            }),
            sample: true,
            ..Default::default()
        }
    }

    fn step(e: &mut Engine, seqs: Vec<pb::SeqStep>) -> pb::StepResult {
        e.step(pb::StepPlan {
            step_id: 1,
            seqs,
            ..Default::default()
        })
    }

    #[test]
    fn hostile_plans_are_refused_and_leave_no_trace() {
        let (dir, mut e) = engine("plans");
        // Blocks outside the cache, more blocks than the cache has, a sequence twice, NaN
        // sampling: each a clear error. Before, blocks were appended to the table first (a
        // table grew without bound, step after step) and NaN reached the sampler.
        for (plan, why) in [
            (
                vec![seq(1, vec![5], 0, vec![9], true)],
                "block 9 outside the cache of 4",
            ),
            (
                vec![seq(1, vec![5], 0, vec![0; 100_000], true)],
                "0 + 100000 new blocks exceed the cache of 4 blocks",
            ),
            (
                vec![
                    seq(1, vec![5], 0, vec![0], true),
                    seq(1, vec![6], 1, vec![], false),
                ],
                "sequence 1 appears twice",
            ),
            (
                vec![pb::SeqStep {
                    sampling: Some(pb::SamplingParams {
                        temperature: f32::NAN,
                        ..Default::default()
                    }),
                    ..seq(1, vec![5], 0, vec![0], false)
                }],
                "temperature must be a finite number",
            ),
            (
                vec![pb::SeqStep {
                    sampling: Some(pb::SamplingParams {
                        logit_bias: [(1_000_000, 1.0)].into(),
                        ..Default::default()
                    }),
                    ..seq(1, vec![5], 0, vec![0], false)
                }],
                "logit_bias: token 1000000 is outside the vocabulary",
            ),
            (
                vec![pb::SeqStep {
                    sampling: Some(pb::SamplingParams {
                        presence_penalty: f32::NAN,
                        ..Default::default()
                    }),
                    ..seq(1, vec![5], 0, vec![0], false)
                }],
                "presence_penalty must be in [-2, 2]",
            ),
            // Refused by the model after the engine's own checks: undone too.
            (
                vec![seq(1, vec![5, 9999], 0, vec![0], true)],
                "token id 9999 at position 1 is outside the vocabulary",
            ),
        ] {
            let r = step(&mut e, plan);
            assert!(
                r.error.starts_with("rank 0: ") && r.error.contains(why),
                "{}",
                r.error
            );
        }
        // Sequence 1 was never created: it still needs its sampling parameters...
        let r = step(&mut e, vec![seq(1, vec![5], 0, vec![0], false)]);
        assert!(
            r.error.contains("starts without sampling parameters"),
            "{}",
            r.error
        );
        // ...and, started properly, its table holds exactly its own blocks (4 of 4).
        let r = step(
            &mut e,
            vec![seq(1, vec![5, 6, 7, 8, 9], 0, vec![2, 3], true)],
        );
        assert!(r.error.is_empty(), "{}", r.error);
        assert_eq!(r.tokens.len(), 1);
        let r = step(&mut e, vec![seq(1, vec![1], 5, vec![0, 1], false)]);
        assert!(r.error.is_empty(), "{}", r.error);
        let r = step(&mut e, vec![seq(1, vec![1], 6, vec![1], false)]);
        assert!(r.error.contains("4 + 1 new blocks exceed"), "{}", r.error);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn kv_cache_sizes_that_overflow_are_a_load_error() {
        let (dir, _) = engine("kv");
        let w = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        // u32::MAX blocks of u32::MAX slots (a LoadRequest's fields): the cache's size
        // overflowed (a panic in the load thread, or in release a tiny cache indexed past its
        // end).
        let spec = LoadSpec {
            model_dir: &dir,
            layout: Layout::new(1, 1, 1),
            rank: 0,
            world_peers: vec![w.local_addr().unwrap()],
            tp_peers: vec![t.local_addr().unwrap()],
            kv: KvSizing {
                blocks: Some(u32::MAX as usize),
                ..Default::default()
            },
            block_size: u32::MAX as usize,
            comm_timeout: Duration::from_secs(5),
            cuda_device: None,
            live_ranks: Vec::new(),
            placement: Vec::new(),
            nccl: NcclIds::default(),
            gemm: Default::default(),
        };
        let e = Engine::load(spec, w, t, |_, _, _| {})
            .err()
            .expect("refused");
        assert!(e.to_string().contains("do not fit in memory"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
