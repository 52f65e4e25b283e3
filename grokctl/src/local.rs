//! Single-process commands of `grokctl`: they load a checkpoint into this process and run the
//! CPU backend directly (no cluster).

use anyhow::{bail, Context, Result};
use grok_shared::backend::cpu::measure_read_bandwidth;
use grok_shared::config::ModelConfig;
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_shared::generate::{generate, GenerateOptions};
use grok_shared::model::Model;
use grok_shared::sampling::SamplingParams;
use grok_shared::tokenizer::{StreamDecoder, Tokenizer};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sets the size of the global compute pool (0 = one thread per core).
pub fn init_threads(threads: usize) -> Result<()> {
    grok_shared::threads::init(threads).context("cannot start the compute thread pool")
}

pub struct GenModelArgs {
    pub preset: String,
    pub layers: Option<usize>,
    pub dtype: GenDType,
    pub seed: u64,
    pub out: PathBuf,
    pub max_file_mb: usize,
}

pub fn gen_model(a: &GenModelArgs) -> Result<()> {
    let cfg = ModelConfig::preset(&a.preset, a.layers)?;
    eprintln!(
        "writing {} ({} layers, {:.3} B parameters, {:?}) to {}",
        a.preset,
        cfg.num_layers,
        cfg.num_params() as f64 / 1e9,
        a.dtype,
        a.out.display()
    );
    let t = Instant::now();
    let mut last = 0usize;
    genmodel::generate(
        &cfg,
        a.dtype,
        a.seed,
        &a.out,
        a.max_file_mb << 20,
        |done, total| {
            let pct = done * 100 / total.max(1);
            if pct >= last + 10 || done == total {
                last = pct;
                eprintln!(
                    "  {pct:3}%  {:.2} / {:.2} GB",
                    done as f64 / 1e9,
                    total as f64 / 1e9
                );
            }
        },
    )
    .with_context(|| format!("writing the model to {}", a.out.display()))?;
    eprintln!("done in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

fn load_model(dir: &Path) -> Result<Model> {
    let ckpt = Checkpoint::open(dir).with_context(|| format!("opening model {}", dir.display()))?;
    let mut m = Model::load(&ckpt).with_context(|| format!("loading model {}", dir.display()))?;
    // Served from this process's own (huge) pages, not the file's mapping.
    m.make_resident()
        .with_context(|| format!("loading model {}", dir.display()))?;
    Ok(m)
}

/// The tokenizer named on the command line, else `tokenizer.model` inside the model directory.
pub fn find_tokenizer(
    explicit: Option<&Path>,
    model_dir: Option<&Path>,
) -> Result<Option<Tokenizer>> {
    let path = match (explicit, model_dir) {
        (Some(p), _) => Some(p.to_path_buf()),
        (None, Some(d)) if d.join("tokenizer.model").exists() => Some(d.join("tokenizer.model")),
        _ => None,
    };
    match path {
        None => Ok(None),
        Some(p) => Ok(Some(Tokenizer::from_file(&p)?)),
    }
}

pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .with_context(|| format!("`{x}` is not a token id"))
        })
        .collect()
}

pub struct GenerateArgs {
    pub model: PathBuf,
    pub prompt: Option<String>,
    pub prompt_ids: Option<String>,
    pub tokenizer: Option<PathBuf>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub json: bool,
    pub logits_out: Option<PathBuf>,
    pub ignore_eos: bool,
}

pub fn run_generate(a: &GenerateArgs) -> Result<()> {
    a.sampling.validate()?;
    let tok = find_tokenizer(a.tokenizer.as_deref(), Some(&a.model))?;
    let prompt: Vec<u32> = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => {
            let Some(t) = &tok else {
                bail!(
                    "--prompt needs a tokenizer: pass --tokenizer FILE, put tokenizer.model in {}, or use --prompt-ids",
                    a.model.display()
                );
            };
            t.encode(text)?
        }
        (None, Some(ids)) => parse_ids(ids)?,
        _ => bail!("give exactly one of --prompt or --prompt-ids"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let model = load_model(&a.model)?;
    if let Some(t) = &tok {
        if t.vocab_size() > model.config.vocab_size {
            tracing::warn!(
                tokenizer = t.vocab_size(),
                model = model.config.vocab_size,
                "the tokenizer's vocabulary is larger than the model's"
            );
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: a.sampling.clone(),
        stop_at_eos: !a.ignore_eos,
        prompt_logits: a.logits_out.is_some(),
        ..Default::default()
    };
    let mut stream = StreamDecoder::default();
    let stdout = std::io::stdout();
    let mut decode_err = None;
    let out = generate(&model, &prompt, &opts, |id| {
        if a.json {
            return;
        }
        let mut o = stdout.lock();
        match &tok {
            Some(t) => match stream.push(t, id) {
                Ok(delta) => {
                    let _ = write!(o, "{delta}");
                }
                Err(e) => decode_err = Some(e),
            },
            None => {
                let _ = write!(o, "{id} ");
            }
        }
        let _ = o.flush();
    })?;
    if let Some(e) = decode_err {
        tracing::warn!("could not decode generated ids: {e}");
    }
    if let (Some(path), Some(l)) = (&a.logits_out, &out.prompt_logits) {
        grok_shared::formats::npy::write_f32(path, &[prompt.len(), model.config.vocab_size], l)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let text = match &tok {
        Some(t) => Some(t.decode(&out.ids)?),
        None => None,
    };
    if a.json {
        let mut j = serde_json::json!({"ids": out.ids});
        if let Some(t) = text {
            j["text"] = t.into();
        }
        println!("{j}");
    } else {
        println!();
    }
    eprintln!(
        "prompt {} tokens in {:.3} s; {} tokens in {:.3} s ({:.2} tokens/s); finish: {}",
        prompt.len(),
        out.prefill_seconds,
        out.ids.len(),
        out.decode_seconds,
        out.ids.len().saturating_sub(1) as f64 / out.decode_seconds.max(1e-9),
        out.finish.as_str()
    );
    Ok(())
}

/// `{"text": ...}` lines in, `{"ids": [...]}` lines out.
pub fn run_tokenize(tokenizer: &Path) -> Result<()> {
    let t = Tokenizer::from_file(tokenizer)?;
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("line {}: not JSON", n + 1))?;
        let text = v
            .get("text")
            .and_then(|x| x.as_str())
            .with_context(|| format!("line {}: expected {{\"text\": \"...\"}}", n + 1))?;
        let ids = t.encode(text)?;
        writeln!(out, "{}", serde_json::json!({ "ids": ids }))?;
    }
    out.flush()?;
    Ok(())
}

/// `{"ids": [...]}` lines in, `{"text": ...}` lines out.
pub fn run_detokenize(tokenizer: &Path) -> Result<()> {
    let t = Tokenizer::from_file(tokenizer)?;
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("line {}: not JSON", n + 1))?;
        let ids: Vec<u32> = v
            .get("ids")
            .and_then(|x| x.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
                    .collect()
            })
            .with_context(|| {
                format!(
                    "line {}: expected {{\"ids\": [non-negative integers]}}",
                    n + 1
                )
            })?;
        let text = t.decode(&ids)?;
        writeln!(out, "{}", serde_json::json!({ "text": text }))?;
    }
    out.flush()?;
    Ok(())
}

pub struct BenchArgs {
    pub model: PathBuf,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub json: bool,
    pub bandwidth_mb: usize,
}

pub fn run_bench(a: &BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    let bw = measure_read_bandwidth(a.bandwidth_mb << 20, 5);
    let t = Instant::now();
    let model = load_model(&a.model)?;
    let load_s = t.elapsed().as_secs_f64();
    let c = &model.config;
    if a.prompt_len == 0 || a.gen_len == 0 {
        bail!("--prompt-len and --gen-len must be positive");
    }
    // A fixed pseudo-random prompt of ids >= 3 (no pad or control tokens).
    let mut rng = grok_shared::sampling::Rng::new(42);
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|_| 3 + (rng.next_u64() % (c.vocab_size as u64 - 3)) as u32)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: a.gen_len + 1,
        stop_at_eos: false,
        ..Default::default()
    };
    // Warm-up: touch every weight page once.
    generate(
        &model,
        &prompt[..prompt.len().min(8)],
        &GenerateOptions {
            max_new_tokens: 2,
            ..opts.clone()
        },
        |_| {},
    )?;
    let out = generate(&model, &prompt, &opts, |_| {})?;
    let prompt_tps = a.prompt_len as f64 / out.prefill_seconds;
    // The first sampled token comes from prefill; gen_len decode steps follow.
    let decode_tps = a.gen_len as f64 / out.decode_seconds;
    let active = model.active_weight_bytes_per_token();
    let roofline = bw / active;
    let dtype = model.layers[0].q.w.dtype_name();
    let j = serde_json::json!({
        "model": a.model.display().to_string(),
        "dtype": dtype,
        "threads": threads,
        "params": c.num_params(),
        "weight_bytes": model.weight_bytes(),
        "active_weight_bytes_per_token": active,
        "load_seconds": load_s,
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "prompt_tokens_per_s": prompt_tps,
        "decode_tokens_per_s": decode_tps,
        "bandwidth_bytes_per_s": bw,
        "roofline_decode_tokens_per_s": roofline,
        "decode_fraction_of_roofline": decode_tps / roofline,
        "isa": format!("{:?}", grok_shared::backend::simd::isa()),
    });
    if a.json {
        println!("{j}");
    } else {
        println!(
            "model            {} ({dtype}, {:.3} B params, {threads} threads)",
            a.model.display(),
            c.num_params() as f64 / 1e9
        );
        println!(
            "prefill          {:.1} tokens/s ({} tokens)",
            prompt_tps, a.prompt_len
        );
        println!(
            "decode           {:.2} tokens/s ({} tokens, batch 1)",
            decode_tps, a.gen_len
        );
        println!(
            "memory bandwidth {:.2} GB/s (read, {} threads)",
            bw / 1e9,
            threads
        );
        println!("active bytes     {:.1} MB per token", active / 1e6);
        println!(
            "decode roofline  {:.2} tokens/s  -> {:.0}% reached",
            roofline,
            100.0 * decode_tps / roofline
        );
    }
    Ok(())
}
