//! The coordinator's configuration (its command line, resolved).

use grok_shared::sharding::Layout;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub model_dir: PathBuf,
    pub layout: Layout,
    pub listen: SocketAddr,
    pub tokenizer: Option<PathBuf>,
    /// KV blocks per worker (None: each worker allocates what its memory budget holds and
    /// the coordinator schedules each replica against what its workers report).
    pub kv_blocks: Option<usize>,
    /// With `kv_blocks` None: the share of a GPU's memory a worker takes for its weights and
    /// KV cache together.
    pub kv_memory_fraction: f64,
    pub block_size: usize,
    pub comm_timeout_ms: u32,
    /// Requests waiting beyond this are refused at once.
    pub max_queue: usize,
    /// Sequences in the running batch.
    pub max_seqs: usize,
    /// Tokens per step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// How long requests wait for a recovering replica when no other serves (milliseconds).
    pub fault_hold_ms: u64,
    /// The model name clients use (`/v1/models`, the `model` field).
    pub served_model_name: String,
    /// HTTP (OpenAI-compatible API, health, metrics) listen address.
    pub http_listen: Option<SocketAddr>,
    /// Bearer token the client APIs require (None: open).
    pub api_token: Option<String>,
    /// Mutual TLS (None: plaintext): the gRPC port serves TLS, registration needs a client
    /// certificate signed by the CA, and the coordinator presents its certificate to workers.
    pub tls: Option<grok_proto::tls::Tls>,
    /// Reuse the KV blocks of a cached prompt prefix (CPU workers).
    pub prefix_caching: bool,
    /// Data-parallel attention: the ranks holding each expert, from a placement file (None:
    /// the layout's `expert_copies` placed round-robin).
    pub expert_placement: Option<grok_shared::sharding::Placement>,
}

impl CoordinatorConfig {
    /// Schedulers of a replica with `blocks` blocks per worker: one over `blocks`, or with
    /// data-parallel attention one per serving worker.
    pub fn replica_kv_blocks(&self, blocks: usize, ranks: usize) -> usize {
        if self.layout.dp_attention {
            blocks * ranks
        } else {
            blocks
        }
    }
}
