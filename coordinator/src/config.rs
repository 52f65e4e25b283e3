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
    pub kv_blocks: usize,
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
    /// Tokens one sequence's KV cache can hold: a replica's (a worker's with data-parallel
    /// attention, where a sequence lives on one worker).
    pub fn kv_tokens(&self) -> usize {
        self.kv_blocks * self.block_size
    }

    /// KV blocks of one replica: `kv_blocks`, or with data-parallel attention `kv_blocks` on
    /// each of its workers.
    pub fn replica_kv_blocks(&self) -> usize {
        if self.layout.dp_attention {
            self.kv_blocks * self.layout.world_size()
        } else {
            self.kv_blocks
        }
    }
}
