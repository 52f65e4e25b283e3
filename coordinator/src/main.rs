//! `grok-coordinator`: the cluster coordinator process.

use clap::Parser;
use grok_coordinator::config::CoordinatorConfig;
use grok_coordinator::discovery::{Discovery, Etcd, Static};
use grok_proto::membership::EtcdConfig;
use grok_shared::sharding::Layout;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "grok-coordinator",
    version,
    about = "grok-cluster coordinator: membership, placement, the step loop and the client APIs",
    after_help = "Examples:\n  grok-coordinator --model /models/tiny --tp 2 --pp 2 --listen 127.0.0.1:50051\n  (then start tp*pp workers: grok-worker --coordinator 127.0.0.1:50051)\n  grok-coordinator --model /models/tiny8 --dp-attention --ep 4 --expert-copies 2\n  (4 workers: attention data-parallel, every expert on 2 of them)\n\nWith mutual TLS (certificates from `grokctl certs --out certs`):\n  grok-coordinator --model /models/tiny --tls-ca certs/ca.pem --tls-cert certs/coordinator.pem --tls-key certs/coordinator.key"
)]
struct Args {
    /// Model directory (config.json + safetensors), readable by every worker at this path.
    #[arg(long, env = "GROK_MODEL")]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    tp: usize,
    #[arg(long, default_value_t = 1)]
    ep: usize,
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Data-parallel attention with expert parallelism: --ep E workers per replica, each running
    /// attention for its own sequences over its own KV cache and holding whole experts; the MoE
    /// exchanges rows by all-to-all (--tp defaults to --ep; pp 1).
    #[arg(long, env = "GROK_DP_ATTENTION")]
    dp_attention: bool,
    /// Copies of each expert over the ranks, placed round-robin (with --dp-attention; at most --ep).
    #[arg(long, default_value_t = 1, env = "GROK_EXPERT_COPIES")]
    expert_copies: usize,
    /// Where each expert is (with --dp-attention): a JSON file listing, per expert, the ranks
    /// holding a copy, e.g. [[0, 1], [2, 3], [1, 2], [3, 0]]. Replaces --expert-copies.
    #[arg(long, env = "GROK_EXPERT_PLACEMENT", value_name = "FILE")]
    expert_placement: Option<PathBuf>,
    /// Model replicas (each tp*pp workers; ranks numbered across replicas). Requests are spread
    /// over the serving replicas; those of a replica that loses a worker move to another.
    #[arg(long, default_value_t = 1, env = "GROK_REPLICAS")]
    replicas: usize,
    #[arg(long, default_value = "127.0.0.1:50051", env = "GROK_LISTEN")]
    listen: SocketAddr,
    /// SentencePiece tokenizer.model (default: MODEL/tokenizer.model when present).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// KV cache blocks per worker. Without it each worker allocates what its memory allows (a
    /// GPU: --kv-memory-fraction of the device less its weights; a CPU: 512 blocks, or its
    /// --kv-memory) and each replica admits against the smallest cache of its workers.
    #[arg(long, env = "GROK_KV_BLOCKS", value_parser = clap::value_parser!(u32).range(1..))]
    kv_blocks: Option<u32>,
    /// Without --kv-blocks: the share of each GPU's memory a worker takes for its weights and
    /// KV cache together (the rest stays free for other processes). Two workers sharing a GPU
    /// need at most 0.45 each.
    #[arg(long, default_value_t = 0.9, env = "GROK_KV_MEMORY_FRACTION", value_parser = fraction)]
    kv_memory_fraction: f64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Deadline of every collective operation between workers.
    #[arg(long, default_value_t = 30_000)]
    comm_timeout_ms: u32,
    /// Requests waiting for admission beyond this are refused at once (RESOURCE_EXHAUSTED / 429).
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// Tokens per step: decode tokens plus prefill chunks (chunked prefill budget).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// After a fault (a lost worker, a failed step), requests of a replica with no other
    /// serving replica wait this long for it to rejoin, then end with a retryable UNAVAILABLE.
    #[arg(long, default_value_t = 5000)]
    fault_hold_ms: u64,
    /// Turn off prefix caching (on by default with CPU workers): full KV blocks of a prompt
    /// are kept and reused by later requests that start with the same tokens.
    #[arg(long, env = "GROK_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
    /// The model name of the API (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// File whose first line is the bearer token the client APIs require (default: the
    /// GROK_API_TOKEN environment variable; none = open). /health, /ready, /metrics and the
    /// standard gRPC health service stay open.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Serve the OpenAI-compatible HTTP API, /health, /ready and /metrics on this address.
    #[arg(long, env = "GROK_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    #[command(flatten)]
    member: grok_proto::process::MemberArgs,
    /// Membership in etcd (URL[,URL...]): workers announce themselves there (grok-worker
    /// --etcd), and coordinators of the same --cluster elect a leader; the others stand by and
    /// take over within seconds when it goes. Without it the coordinator is the registry.
    #[arg(long, env = "GROK_ETCD", value_name = "URLS")]
    etcd: Option<String>,
    /// Cluster name: the etcd keys live under /grok/NAME/.
    #[arg(long, default_value = "default", env = "GROK_CLUSTER")]
    cluster: String,
    /// etcd user (the password comes from --etcd-password-file or GROK_ETCD_PASSWORD).
    #[arg(long, env = "GROK_ETCD_USER")]
    etcd_user: Option<String>,
    /// File whose first line is the etcd password (never logged).
    #[arg(long, value_name = "FILE")]
    etcd_password_file: Option<PathBuf>,
    /// CA of etcd's server certificates (https:// endpoints; the default scheme when given).
    #[arg(long, env = "GROK_ETCD_CA", value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// The address clients and standbys are told to reach this coordinator at (default: the
    /// bound --listen address).
    #[arg(long, env = "GROK_ADVERTISE")]
    advertise: Option<String>,
}

fn main() {
    let a = Args::parse();
    let (_telemetry, tls) =
        grok_proto::process::start_member("grok-coordinator", "info", &a.member);
    let discovery: Box<dyn Discovery> = match &a.etcd {
        None => Box::new(Static),
        Some(urls) => match EtcdConfig::new(
            urls,
            &a.cluster,
            a.etcd_user.clone(),
            a.etcd_password_file.clone(),
            std::env::var("GROK_ETCD_PASSWORD").ok(),
            a.etcd_ca.clone(),
        ) {
            Ok(cfg) => Box::new(Etcd {
                cfg,
                advertise: a.advertise.clone(),
            }),
            Err(e) => grok_proto::process::exit(2, e),
        },
    };
    let expert_placement = a.expert_placement.as_ref().map(|p| {
        let text = std::fs::read_to_string(p).unwrap_or_else(|e| {
            grok_proto::process::exit(2, format!("--expert-placement {}: {e}", p.display()))
        });
        serde_json::from_str::<Vec<Vec<usize>>>(&text).unwrap_or_else(|e| {
            grok_proto::process::exit(
                2,
                format!(
                    "--expert-placement {}: {e} (expected a list, per expert, of the ranks holding it, e.g. [[0, 1], [1, 0]])",
                    p.display()
                ),
            )
        })
    });
    let cfg = CoordinatorConfig {
        model_dir: a.model.clone(),
        layout: Layout {
            replicas: a.replicas,
            dp_attention: a.dp_attention,
            expert_copies: a.expert_copies,
            // With data-parallel attention the ep ranks are the workers.
            ..Layout::new(
                if a.dp_attention && a.tp == 1 {
                    a.ep
                } else {
                    a.tp
                },
                a.ep,
                a.pp,
            )
        },
        listen: a.listen,
        tokenizer: a.tokenizer,
        kv_blocks: a.kv_blocks.map(|b| b as usize),
        kv_memory_fraction: a.kv_memory_fraction,
        block_size: a.block_size.max(1),
        comm_timeout_ms: a.comm_timeout_ms,
        max_queue: a.max_queue.max(1),
        max_seqs: a.max_seqs.max(1),
        max_batch_tokens: a.max_batch_tokens.max(1),
        fault_hold_ms: a.fault_hold_ms,
        prefix_caching: !a.no_prefix_cache,
        expert_placement,
        served_model_name: a.served_model_name.unwrap_or_else(|| {
            a.model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "grok-1".into())
        }),
        http_listen: a.http_listen,
        api_token: grok_proto::auth::load_token(a.api_token_file.as_deref())
            .unwrap_or_else(|e| grok_proto::process::exit(1, e)),
        tls,
    };
    let shared = match grok_coordinator::cluster::prepare(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(grok_coordinator::serve::serve(
        shared,
        discovery,
        grok_proto::process::shutdown_signal(),
    )) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A share from 0.001 to 1.
fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (1e-3..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("`{s}`: expected a share from 0.001 to 1, e.g. 0.9")),
    }
}
