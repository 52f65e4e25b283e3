//! `grok-coordinator`: the cluster coordinator process.

use clap::Parser;
use grok_coordinator::server::{self, CoordinatorConfig};
use grok_shared::sharding::Layout;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "grok-coordinator",
    version,
    about = "grok-cluster coordinator: membership, placement, the step loop and the client APIs",
    after_help = "Examples:\n  grok-coordinator --model /models/tiny --tp 2 --pp 2 --listen 127.0.0.1:50051\n  (then start tp*pp workers: grok-worker --coordinator 127.0.0.1:50051)"
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
    #[arg(long, default_value = "127.0.0.1:50051", env = "GROK_LISTEN")]
    listen: SocketAddr,
    /// SentencePiece tokenizer.model (default: MODEL/tokenizer.model when present).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// KV cache blocks per worker.
    #[arg(long, default_value_t = 512)]
    kv_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Deadline of every collective operation between workers.
    #[arg(long, default_value_t = 30_000)]
    comm_timeout_ms: u32,
    #[arg(long, value_parser = ["text", "json"], default_value = "text", env = "GROK_LOG_FORMAT")]
    log_format: String,
}

fn main() {
    let a = Args::parse();
    grok_coordinator::logging::init(a.log_format == "json", "info");
    let cfg = CoordinatorConfig {
        model_dir: a.model,
        layout: Layout::new(a.tp, a.ep, a.pp),
        listen: a.listen,
        tokenizer: a.tokenizer,
        kv_blocks: a.kv_blocks.max(1),
        block_size: a.block_size.max(1),
        comm_timeout_ms: a.comm_timeout_ms,
    };
    let shared = match server::prepare(cfg) {
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
    if let Err(e) = rt.block_on(server::serve(shared, grok_coordinator::shutdown_signal())) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
