//! `grokctl`: the operator's command line for grok-cluster.

use anyhow::Result;
use clap::{Parser, Subcommand};
use grok_coordinator::local;
use grok_shared::genmodel::GenDType;
use grok_shared::sampling::SamplingParams;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "grokctl",
    version,
    about = "Run, inspect and benchmark Grok-1 on grok-cluster",
    after_help = "Examples:\n  grokctl gen-model --preset tiny --out /tmp/tiny\n  grokctl generate --model /tmp/tiny --prompt-ids 5,17,99 --max-new-tokens 16\n  grokctl bench --model /tmp/small --threads 2"
)]
struct Cli {
    /// Compute threads (0 = one per core).
    #[arg(long, global = true, default_value_t = 0, env = "GROK_THREADS")]
    threads: usize,
    /// Log format on stderr.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text", env = "GROK_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    Generate {
        /// Model directory (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Prompt text (needs a tokenizer).
        #[arg(long, conflicts_with = "prompt_ids")]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids.
        #[arg(long)]
        prompt_ids: Option<String>,
        /// SentencePiece tokenizer.model (default: MODEL/tokenizer.model when present).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 disables.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep generating after the end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// Print one JSON object {"ids": [...], "text": "..."} as the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Write the logits of every prompt position as float32 .npy [prompt_len, vocab].
        #[arg(long)]
        logits_out: Option<PathBuf>,
    },
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
    /// Measure prefill and decode speed against the machine's memory-bandwidth roofline.
    #[command(
        after_help = "Examples:\n  grokctl bench --model /tmp/small --threads 1\n  grokctl bench --model /tmp/small --prompt-len 128 --gen-len 64 --threads 2 --json"
    )]
    Bench {
        #[arg(long)]
        model: PathBuf,
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

fn main() {
    let cli = Cli::parse();
    grok_coordinator::logging::init(cli.log_format == "json", "warn");
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    local::init_threads(cli.threads)?;
    match cli.cmd {
        Cmd::GenModel {
            preset,
            layers,
            dtype,
            seed,
            out,
            max_file_mb,
        } => local::gen_model(&local::GenModelArgs {
            preset,
            layers,
            dtype,
            seed,
            out,
            max_file_mb,
        }),
        Cmd::Generate {
            model,
            prompt,
            prompt_ids,
            tokenizer,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            ignore_eos,
            json,
            logits_out,
        } => local::run_generate(&local::GenerateArgs {
            model,
            prompt,
            prompt_ids,
            tokenizer,
            max_new_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                seed,
            },
            json,
            logits_out,
            ignore_eos,
        }),
        Cmd::Tokenize { tokenizer } => local::run_tokenize(&tokenizer),
        Cmd::Detokenize { tokenizer } => local::run_detokenize(&tokenizer),
        Cmd::Bench {
            model,
            prompt_len,
            gen_len,
            bandwidth_mb,
            json,
        } => local::run_bench(&local::BenchArgs {
            model,
            prompt_len,
            gen_len,
            json,
            bandwidth_mb,
        }),
    }
}
