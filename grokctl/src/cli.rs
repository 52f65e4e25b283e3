//! The command line of `grokctl`: every command, flag and example of its help.

use clap::{Parser, Subcommand};
use grok_shared::formats::genmodel::GenDType;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "grokctl",
    version,
    about = "Run, inspect and benchmark Grok-1 on grok-cluster",
    after_help = "Examples:\n  grokctl gen-model --preset tiny --out /tmp/tiny\n  grokctl generate --model /tmp/tiny --prompt-ids 5,17,99 --max-new-tokens 16\n  grokctl bench --model /tmp/small --threads 2"
)]
pub struct Cli {
    /// Compute threads (0 = one per core).
    #[arg(long, global = true, default_value_t = 0, env = "GROK_THREADS")]
    pub threads: usize,
    /// Log format on stderr.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text", env = "GROK_LOG_FORMAT")]
    pub log_format: String,
    /// OTLP/gRPC collector for the processes `grokctl up` starts (their spans: requests, steps,
    /// each worker's part of a step), e.g. http://127.0.0.1:4317.
    #[arg(long, global = true, env = "GROK_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// File holding the bearer token of a cluster's client APIs (default: GROK_API_TOKEN).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) of a cluster that uses mutual TLS: connect with https and check the
    /// coordinator's certificate against it. `up` and `launch` give it, with --tls-cert and
    /// --tls-key (all three), to the processes they start [env: GROK_TLS_CA]
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Certificate (PEM, signed by the CA) to present: optional for status, generate, bench
    /// and drain; the processes' certificate for up and launch [env: GROK_TLS_CERT]
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert; read from the file, never printed [env: GROK_TLS_KEY]
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Write a checkpoint with random weights and Grok-1's architecture (§8.1 layout).
    #[command(
        after_help = "Examples:\n  grokctl gen-model --preset tiny --out /tmp/tiny\n  grokctl gen-model --preset small --dtype int8 --out /tmp/small-int8\n  grokctl gen-model --preset grok-1 --layers 2 --dtype bf16 --out /data/grok1-2l"
    )]
    GenModel {
        /// tiny (tests), tiny8 (tests, 8 experts), small (~0.75B, CPU benchmarks), grok-1 (real widths).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Override the number of layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Weight storage: f32, bf16 or int8 (weight-only, with scales as the official release).
        #[arg(long, default_value = "f32")]
        dtype: GenDType,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Split into files of at most this many MiB (with model.safetensors.index.json).
        #[arg(long, default_value_t = 2048)]
        max_file_mb: usize,
    },
    /// Generate tokens from a prompt in this process (CPU).
    #[command(
        after_help = "Examples:\n  grokctl generate --model /tmp/tiny --prompt-ids 5,17,99 --max-new-tokens 8 --json\n  grokctl generate --model /tmp/small --tokenizer tokenizer.model --prompt 'The answer is' --temperature 0.8 --top-p 0.95 --seed 1\n  grokctl generate --model /tmp/tiny --prompt-ids 5,0,9 --max-new-tokens 1 --logits-out logits.npy"
    )]
    Generate(GenerateCmd),
    /// Encode JSON lines {"text": ...} from stdin into {"ids": [...]} lines.
    #[command(
        after_help = "Example:\n  echo '{\"text\": \"hello world\"}' | grokctl tokenize --tokenizer tokenizer.model"
    )]
    Tokenize {
        #[arg(long)]
        tokenizer: PathBuf,
    },
    /// Decode JSON lines {"ids": [...]} from stdin into {"text": ...} lines.
    #[command(
        after_help = "Example:\n  echo '{\"ids\": [21560, 1990]}' | grokctl detokenize --tokenizer tokenizer.model"
    )]
    Detokenize {
        #[arg(long)]
        tokenizer: PathBuf,
    },
    /// Start a coordinator and tp*pp workers on this machine, in the foreground (Ctrl-C stops all).
    #[command(
        after_help = "Examples:\n  grokctl up --model /tmp/tiny --tp 2 --pp 2\n  grokctl up --model /tmp/small --tp 2 --ep 2 --listen 127.0.0.1:50051\n  grokctl up --model /tmp/tiny8 --dp-attention --ep 4 --expert-copies 2   (4 workers, attention data-parallel, every expert on 2)\n\nWorkers on other hosts join a coordinator with:\n  grok-worker --coordinator HOST:PORT --listen 0.0.0.0:50061 --advertise MYIP:50061\n\nWith mutual TLS (the coordinator and every worker get --tls-ca, --tls-cert and --tls-key):\n  grokctl certs --out certs\n  grokctl up --model /tmp/tiny --tls-ca certs/ca.pem --tls-cert certs/coordinator.pem --tls-key certs/coordinator.key"
    )]
    Up {
        /// Cluster config file (TOML; see deploy/cluster.example.toml). Flags override it and
        /// environment variables (GROK_MODEL, GROK_TP, ...) override both.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Give up when the cluster is not ready after this many seconds.
        #[arg(long, default_value_t = 600)]
        ready_timeout_s: u64,
        #[command(flatten)]
        flags: grokctl::cluster_file::UpFlags,
    },
    /// Convert a checkpoint: the official release (ckpt-0 pickles) into the safetensors layout the workers load, any checkpoint to another weight type (--dtype), and pre-sharding (--tp).
    #[command(
        after_help = "Examples:\n  grokctl convert --from /data/grok-1/ckpt-0 --to /data/grok-1-hf\n  grokctl convert --from ckpt-0 --to out --config small/config.json   (a non-Grok-1 size)\n  grokctl convert --from /models/small-bf16 --to /models/small-int8 --dtype int8\n  grokctl convert --from /models/grok-1-hf --to /models/grok-1-tp8 --dtype int8 --tp 8\n\nWithout --dtype, int8 weights stay int8 with their scales (<name>.weight + <name>.scales). --dtype int8 quantizes as the official release is (one scale per output column for q/k/v, linear and linear_v; 8 blocks along the input for the attention output and linear_1; scales max|w|/127 in bf16; the embedding stays bf16) and prints the relative error of the quantized matrices. An interrupted ckpt-0 run resumes: finished layer files are kept."
    )]
    Convert {
        /// The official `ckpt-0` directory (tensor00000_000 ...).
        #[arg(long)]
        from: PathBuf,
        /// Output directory (config.json + safetensors + index).
        #[arg(long)]
        to: PathBuf,
        /// config.json describing the model (ckpt-0 input; default: Grok-1).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write the weights as this type (f32, bf16, int8), from any layout and type the
        /// workers load (§8.1-§8.3 or ckpt-0).
        #[arg(long)]
        dtype: Option<GenDType>,
        /// Pre-shard for this layout: one file per rank plus manifest.json (with --ep, --pp).
        #[arg(long)]
        tp: Option<usize>,
        #[arg(long, default_value_t = 1)]
        ep: usize,
        #[arg(long, default_value_t = 1)]
        pp: usize,
    },
    /// Make a development CA and certificates for mutual TLS between the coordinator and workers.
    #[command(
        after_help = "Examples:\n  grokctl certs --out certs\n  grokctl certs --out /etc/grok/certs --hosts 10.0.0.1,10.0.0.2,node1 --days 90\n  grokctl up --model /tmp/tiny --tls-ca certs/ca.pem --tls-cert certs/coordinator.pem --tls-key certs/coordinator.key\n  grokctl status --endpoint https://127.0.0.1:50051 --tls-ca certs/ca.pem\n\nWrites ca.pem, ca.key, coordinator.pem, coordinator.key, worker.pem and worker.key (keys with mode 600). Every certificate names 127.0.0.1, localhost and the --hosts (IP addresses as IP SANs, names as DNS SANs) and serves as server and client certificate. Existing files are kept unless --force. Keep ca.key off the cluster's hosts."
    )]
    Certs {
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated host names and IP addresses the certificates are valid for, besides
        /// 127.0.0.1 and localhost: every address workers and clients use to reach a process.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Check every file of a pre-sharded directory against its manifest (sizes, dtypes, sha256).
    #[command(after_help = "Example:\n  grokctl verify /data/grok-1-tp8")]
    Verify { dir: PathBuf },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  grokctl completions bash > /etc/bash_completion.d/grokctl\n  grokctl completions zsh > ~/.zfunc/_grokctl\n  grokctl completions fish > ~/.config/fish/completions/grokctl.fish"
    )]
    Completions { shell: clap_complete::Shell },
    /// Plan capacity: every layout of a cluster with memory, KV capacity, latency, throughput and cost.
    #[command(
        after_help = "Examples:\n  grokctl plan --model grok-1 --gpu h100-sxm --gpus-per-node 8 --nodes 2 --dtype int8 --prompt-len 1000 --gen-len 200 --concurrency 64 --explain\n  grokctl plan --model grok-1 --gpu h200 --dtype bf16 --tpot-ms 50 --json\n  grokctl plan --model /models/small --gpu cpu-host --gpus-per-node 2 --dtype bf16 --context 1024 --prompt-len 64 --gen-len 32\n\nDevices: a100-40gb a100-80gb h100-sxm h100-pcie h200 b200 l40s cpu-host (extend with --catalog FILE)"
    )]
    #[command(args_conflicts_with_subcommands = true)]
    Plan {
        #[command(subcommand)]
        sub: Option<PlanCmd>,
        #[command(flatten)]
        args: grokctl::plan::PlanArgs,
    },
    /// Start the cluster of a config file on its hosts over ssh (or stop it with --stop).
    #[command(
        after_help = "Examples:\n  grokctl launch --config cluster.toml\n  grokctl launch --config cluster.toml --stop\n\nEvery [[hosts]] entry needs the grok binaries in its bin_dir (default /usr/local/bin) and the model at model.path; ssh must log in without a password (BatchMode). The processes started are recorded in CONFIG.launch.json."
    )]
    Launch {
        #[arg(long)]
        config: PathBuf,
        /// Stop the processes a previous launch started.
        #[arg(long)]
        stop: bool,
        /// The ssh client to use.
        #[arg(long, env = "GROK_SSH", default_value = "ssh")]
        ssh: String,
        #[arg(long, default_value_t = 600)]
        ready_timeout_s: u64,
    },
    /// Give the experts that get the most tokens more copies (data-parallel attention replicas)
    #[command(
        after_help = "Examples:\n  grokctl rebalance --endpoint 127.0.0.1:50051 --extra-copies 2 --dry-run\n  grokctl rebalance --endpoint 127.0.0.1:50051 --extra-copies 2\n\nThe placement comes from the tokens routed to each expert so far (all layers): each extra copy goes where it lowers the busiest rank's expected expert work the most, and copies stop when none would. Applying it stops the replica briefly: each worker loads only the experts placed on it anew (no restart), and running requests resume by re-prefilling with the outputs they would have had."
    )]
    Rebalance {
        #[arg(long, env = "GROK_ENDPOINT")]
        endpoint: String,
        /// The replica to rebalance.
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// Copies to add in all (each costs one expert's weights on one more rank).
        #[arg(long, default_value_t = 1)]
        extra_copies: u32,
        /// Show the placement without applying it.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop admitting requests, let in-flight ones finish, and report when drained.
    #[command(
        after_help = "Examples:\n  grokctl drain --endpoint 127.0.0.1:50051\n  grokctl drain --endpoint 127.0.0.1:50051 --worker worker-3\n  grokctl drain --endpoint 127.0.0.1:50051 --resume"
    )]
    Drain {
        #[arg(long, env = "GROK_ENDPOINT")]
        endpoint: String,
        /// Drain the replica of this worker.
        #[arg(long)]
        worker: Option<String>,
        /// Return a drained cluster to service.
        #[arg(long)]
        resume: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Show a running cluster: layout, workers and the state of each shard.
    #[command(
        after_help = "Examples:\n  grokctl status --endpoint 127.0.0.1:50051\n  grokctl status --endpoint 127.0.0.1:50051 --wait-ready 120\n  grokctl status --endpoint https://10.0.0.1:50051 --tls-ca certs/ca.pem   (a cluster with TLS)"
    )]
    Status {
        #[arg(long, env = "GROK_ENDPOINT")]
        endpoint: String,
        /// Wait until the cluster serves; exit non-zero if it fails or after SECONDS.
        #[arg(long, value_name = "SECONDS")]
        wait_ready: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill and decode speed against the machine's memory-bandwidth roofline.
    #[command(
        after_help = "Examples:\n  grokctl bench --model /tmp/small --threads 1\n  grokctl bench --model /tmp/small --prompt-len 128 --gen-len 64 --threads 2 --json\n  grokctl bench --endpoint 127.0.0.1:50051\n  grokctl bench serve --endpoint 127.0.0.1:50051 --concurrency 1,8,32",
        args_conflicts_with_subcommands = true
    )]
    Bench {
        #[command(subcommand)]
        serve: Option<BenchCmd>,
        /// Model directory: benchmark in this process.
        #[arg(long, conflicts_with = "endpoint")]
        model: Option<PathBuf>,
        /// A running cluster's coordinator: benchmark the cluster.
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 64)]
        gen_len: usize,
        /// Size of the buffer used to measure memory bandwidth (MiB; keep well above L3).
        #[arg(long, default_value_t = 1024)]
        bandwidth_mb: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum PlanCmd {
    /// Data-parallel attention with expert parallelism: memory per GPU with K copies of each
    /// expert, the decode step (all-to-all included), and what the loss of one GPU costs.
    #[command(
        after_help = "Example:\n  grokctl plan ep --model grok-1 --gpu h200 --ranks 8 --expert-copies 2 --dtype int8 --concurrency 256\n\nEach rank runs attention for its share of the sequences with the whole attention weights and holds K copies' worth of experts (placed round-robin: the copies of an expert on distinct ranks); each layer's MoE costs two all-to-alls. After the loss of a rank, its sequences move to the others and each expert's tokens to its live copies; with one copy, the lost rank's experts are gone and the replica stops admitting. The engine runs this layout as `grokctl up --dp-attention --ep E --expert-copies K` (CPU workers; CUDA workers do not run it yet)."
    )]
    Ep(grokctl::plan::EpArgs),
    /// Measure this host (matmul bandwidth and throughput, TCP all-reduce latency and
    /// bandwidth between local workers) into a catalog entry (TOML on stdout).
    #[command(
        after_help = "Example:\n  grokctl plan calibrate --workers 2 > host.toml\n  grokctl plan --catalog host.toml --gpu calibrated --gpus-per-node 2 --model models/small-bf16 --dtype bf16 --context 1024 --prompt-len 64 --gen-len 32"
    )]
    Calibrate {
        /// Workers that will share this host (each gets cores / workers threads).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Memory of the host in GB (default: 24).
        #[arg(long, default_value_t = 24.0)]
        memory_gb: f64,
    },
    /// Run real CPU clusters of a model and compare measured TTFT, ITL and throughput with the
    /// planner's predictions (calibrated on this host).
    #[command(
        after_help = "Example:\n  grokctl plan validate --model models/small-bf16 --layouts 1,1,1 --layouts 2,1,1 --layouts 1,1,2 --concurrency 1,4"
    )]
    Validate(grokctl::plan::ValidateArgs),
    /// Simulate a Poisson request trace through the engine's policy on a planned cluster:
    /// TTFT and ITL p50/p99, goodput under the SLO, and the fewest replicas that meet it.
    #[command(
        after_help = "Example:\n  grokctl plan simulate --model grok-1 --gpu h100-sxm --nodes 4 --dtype int8 --rate 5 --requests 500 --prompt-len 200:2000 --gen-len 50:400 --ttft-ms 2000 --tpot-ms 60\n\nA request meets the SLO when its TTFT (arrival to first token) is within --ttft-ms and its TPOT (mean time per output token after the first) within --tpot-ms; goodput counts such requests per second, as DistServe and the vLLM and SGLang benchmarks do. ITL p50/p99 are over every gap between two tokens; the share of requests whose longest gap exceeds --max-gap-ms is reported beside, not counted against the SLO."
    )]
    Simulate(grokctl::plan::SimArgs),
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Serving benchmark against a running cluster: request throughput, output tokens/s,
    /// TTFT and inter-token latency (p50, p99) at several concurrency levels.
    #[command(
        after_help = "Example:\n  grokctl bench serve --endpoint 127.0.0.1:50051 --concurrency 1,8,32 --requests 64 --prompt-len 64 --gen-len 32"
    )]
    Serve {
        #[arg(long, env = "GROK_ENDPOINT")]
        endpoint: String,
        /// Requests in flight, comma-separated levels.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        concurrency: Vec<usize>,
        /// Requests per level.
        #[arg(long, default_value_t = 64)]
        requests: usize,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 64)]
        gen_len: usize,
        #[arg(long)]
        json: bool,
    },
    /// Chaos soak: starts a local cluster, keeps it under load from streaming clients, and
    /// injects a seeded schedule of faults (SIGKILL and restart of a worker, SIGSTOP/SIGCONT of
    /// one), one at a time. Prints requests completed, failed with a retryable error (retried
    /// until they succeed), lost (hung, non-retryable, or tokens other than the fault-free
    /// run's), time to recover p50/max, and replicas left down; exits non-zero when anything
    /// was lost or left down.
    #[command(
        after_help = "Examples:\n  grokctl gen-model --preset tiny --layers 2 --out /tmp/tiny\n  grokctl bench chaos --model /tmp/tiny --tp 2 --replicas 2 --clients 8 --duration-s 300 --seed 7\n  grokctl bench chaos --model /tmp/tiny --faults stop --duration-s 60 --json"
    )]
    Chaos(grokctl::chaos::ChaosArgs),
}

/// `grokctl generate`: in this process (`--model`) or on a cluster (`--endpoint`).
#[derive(clap::Args)]
pub struct GenerateCmd {
    /// Model directory (config.json + safetensors): run in this process.
    #[arg(
        long,
        required_unless_present = "endpoint",
        conflicts_with = "endpoint"
    )]
    pub model: Option<PathBuf>,
    /// A running cluster's coordinator (HOST:PORT or URL).
    #[arg(long, env = "GROK_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Prompt text (needs a tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// SentencePiece tokenizer.model (default: MODEL/tokenizer.model when present).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object {"ids": [...], "text": "..."} as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Write the logits of every prompt position as float32 .npy [prompt_len, vocab].
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}
