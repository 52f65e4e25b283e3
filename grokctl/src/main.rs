//! `grokctl`: the operator's command line for grok-cluster.

use anyhow::Result;
use clap::Parser;
use grok_proto::tls::{TlsError, TlsPaths};
use grok_shared::sampling::SamplingParams;
use grokctl::{client, local, up};

mod cli;
use cli::{BenchCmd, Cli, Cmd, GenerateCmd, PlanCmd};

fn main() {
    let cli = Cli::parse();
    let _telemetry = match grok_proto::telemetry::init(&grok_proto::telemetry::TelemetryConfig {
        service: "grokctl".into(),
        json: cli.log_format == "json",
        default_level: "warn".into(),
        otlp_endpoint: None,
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    // The processes `grokctl up` starts inherit these.
    std::env::set_var("GROK_LOG_FORMAT", &cli.log_format);
    if let Some(u) = &cli.otlp_endpoint {
        if let Err(e) = grok_proto::telemetry::check_endpoint(u) {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
        std::env::set_var("GROK_OTLP_ENDPOINT", u);
    }
    // An offline command whose output goes to a pipe that closes (`grokctl plan ... | head`)
    // ends quietly, as command-line tools do, instead of failing on the write. Only commands
    // without sockets: a peer closing a connection must stay an error with its message.
    let offline = matches!(
        cli.cmd,
        Cmd::Completions { .. }
            | Cmd::Tokenize { .. }
            | Cmd::Detokenize { .. }
            | Cmd::Plan {
                sub: None | Some(PlanCmd::Simulate(_)) | Some(PlanCmd::Ep(_)),
                ..
            }
    );
    if offline {
        // SAFETY: setting a signal disposition to the default before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    grok_proto::process::keep_freed_memory();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        // Incomplete TLS settings are a usage error, like a bad flag.
        let usage = e
            .chain()
            .any(|c| c.downcast_ref::<TlsError>().is_some_and(TlsError::is_usage));
        std::process::exit(if usage { 2 } else { 1 });
    }
}

/// Resolves the TLS settings of a command that talks to a cluster (config file < flags <
/// environment) and sets them for grokctl's connections. `member`: they also go to the
/// processes `up` or `launch` starts, so all three are needed; otherwise the CA suffices (a
/// certificate with its key is optional). Returns the paths when TLS is on.
fn cluster_tls(
    flags: &TlsPaths,
    file: &grokctl::cluster_file::ClusterFile,
    member: bool,
) -> Result<Option<TlsPaths>> {
    let p = grokctl::cluster_file::resolve_tls(file, flags, &|k| std::env::var(k).ok());
    let on = if member {
        p.check_member()?
    } else {
        p.check_client()?
    };
    client::set_tls(grok_proto::tls::Tls::load(&p)?);
    Ok(on.then_some(p))
}

fn run(cli: Cli) -> Result<()> {
    local::init_threads(cli.threads)?;
    grokctl::auth::set_client_token(grok_proto::auth::load_token(cli.token_file.as_deref())?);
    let tls_flags = TlsPaths::new(
        cli.tls_ca.clone(),
        cli.tls_cert.clone(),
        cli.tls_key.clone(),
    );
    let no_file = grokctl::cluster_file::ClusterFile::default();
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    match cli.cmd {
        Cmd::Convert {
            from,
            to,
            config,
            dtype,
            tp,
            ep,
            pp,
        } => {
            let t = std::time::Instant::now();
            let official = from.join("tensor00000_000").exists();
            // From ckpt-0: convert to the safetensors layout first (into TO, or TO/full when
            // pre-sharding follows).
            let hf = if official {
                let cfg = match &config {
                    Some(p) => grok_shared::config::ModelConfig::from_file(p)?,
                    None => grok_shared::config::ModelConfig::grok1(),
                };
                let out = if tp.is_some() || dtype.is_some() {
                    to.join("full")
                } else {
                    to.clone()
                };
                grok_shared::formats::ckpt0::convert_to_hf(&from, &out, &cfg, |done, total| {
                    eprintln!("  converting ckpt-0: {done}/{total} groups written");
                })?;
                out
            } else {
                if tp.is_none() && dtype.is_none() {
                    anyhow::bail!("{} is not an official ckpt-0 directory (no tensor00000_000); to change a safetensors model's weight type give --dtype, to pre-shard it --tp (and --ep, --pp)", from.display());
                }
                from.clone()
            };
            // Another weight type: into TO, or TO/typed when pre-sharding follows.
            let hf = match dtype {
                Some(dt) => {
                    let out = if tp.is_some() {
                        to.join("typed")
                    } else {
                        to.clone()
                    };
                    if out == hf {
                        anyhow::bail!("--to must differ from --from");
                    }
                    let src = grok_shared::formats::checkpoint::Checkpoint::open(&hf)?;
                    let r =
                        grok_shared::formats::retype::convert(&src, &out, dt, |done, total| {
                            eprintln!(
                                "  writing {}: layer {done}/{total}",
                                format!("{dt:?}").to_lowercase()
                            );
                        })?;
                    eprintln!(
                        "{} tensors, {:.1} MB; relative error of the rounded matrices {:.3e}{}",
                        r.tensors,
                        r.bytes as f64 / 1e6,
                        r.rel_error,
                        r.worst
                            .as_ref()
                            .map(|(n, e)| format!(" (largest: {n} {e:.3e})"))
                            .unwrap_or_default()
                    );
                    if hf != from {
                        std::fs::remove_dir_all(&hf).ok();
                    }
                    out
                }
                None => hf,
            };
            if let Some(tp) = tp {
                let src = grok_shared::formats::checkpoint::Checkpoint::open(&hf)?;
                let layout = grok_shared::sharding::Layout::new(tp, ep, pp);
                let man =
                    grok_shared::formats::presharded::write(&src, &to, layout, |done, total| {
                        eprintln!("  pre-sharding: rank {done}/{total} written");
                    })?;
                if hf != from {
                    std::fs::remove_dir_all(&hf).ok();
                }
                let bytes: u64 = man.ranks.iter().map(|r| r.bytes).sum();
                eprintln!(
                    "{} ranks, {:.1} MB in all",
                    man.ranks.len(),
                    bytes as f64 / 1e6
                );
            }
            eprintln!(
                "converted {} to {} in {:.1} s",
                from.display(),
                to.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Launch {
            config,
            stop,
            ssh,
            ready_timeout_s,
        } => {
            let tls = if stop {
                None
            } else {
                let file = grokctl::cluster_file::ClusterFile::load(&config)?;
                cluster_tls(&tls_flags, &file, true)?
            };
            rt()?.block_on(grokctl::launch::launch(&grokctl::launch::LaunchArgs {
                config,
                stop,
                ssh,
                ready_timeout_s,
                tls,
            }))
        }
        Cmd::Certs {
            out,
            hosts,
            days,
            force,
        } => grokctl::certs::run(&grokctl::certs::CertsArgs {
            out,
            hosts,
            days,
            force,
        }),
        Cmd::Rebalance {
            endpoint,
            replica,
            extra_copies,
            dry_run,
            json,
        } => {
            cluster_tls(&tls_flags, &no_file, false)?;
            rt()?.block_on(client::rebalance(
                &endpoint,
                pb_rebalance(replica, extra_copies, dry_run),
                json,
            ))
        }
        Cmd::Drain {
            endpoint,
            worker,
            resume,
            timeout_s,
        } => {
            cluster_tls(&tls_flags, &no_file, false)?;
            rt()?.block_on(client::drain(&endpoint, worker, resume, timeout_s))
        }
        Cmd::Verify { dir } => {
            let bytes = grok_shared::formats::presharded::verify(&dir)?;
            println!(
                "{}: every tensor matches the manifest ({:.1} MB checked)",
                dir.display(),
                bytes as f64 / 1e6
            );
            Ok(())
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "grokctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Up {
            config,
            ready_timeout_s,
            flags,
        } => {
            use grokctl::cluster_file as cf;
            let file = match &config {
                Some(p) => cf::ClusterFile::load(p)?,
                None => cf::ClusterFile::default(),
            };
            let s = cf::resolve_up(&file, &flags, &|k| std::env::var(k).ok())?;
            let tls = cluster_tls(&tls_flags, &file, true)?;
            let cf::UpSettings {
                model,
                tokenizer,
                tp,
                ep,
                pp,
                replicas,
                dp_attention,
                expert_copies,
                listen,
                http_listen,
                kv_blocks,
                max_seqs,
                max_queue,
                max_batch_tokens,
            } = s;
            let env = |k: &str| std::env::var(k).ok();
            let (mut coordinator_args, _) = file.process_args(&env, true);
            if let Some(p) = &file.coordinator.api_token_file {
                grokctl::auth::set_config_token(grok_proto::auth::load_token(Some(p))?);
            }
            if dp_attention {
                coordinator_args.push("--dp-attention".into());
            }
            for (flag, v) in [
                (
                    "--expert-copies",
                    (expert_copies != 1).then(|| expert_copies.to_string()),
                ),
                ("--http-listen", http_listen),
                ("--max-queue", max_queue.map(|x| x.to_string())),
                ("--max-seqs", max_seqs.map(|x| x.to_string())),
                (
                    "--max-batch-tokens",
                    max_batch_tokens.map(|x| x.to_string()),
                ),
            ] {
                if let Some(v) = v {
                    coordinator_args.push(flag.to_string());
                    coordinator_args.push(v);
                }
            }
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads_per_worker = if cli.threads > 0 {
                cli.threads
            } else {
                (cores / (tp * pp * replicas).max(1)).max(1)
            };
            rt()?.block_on(up::up(&up::UpArgs {
                model,
                tp,
                ep,
                pp,
                replicas,
                listen,
                tokenizer,
                threads_per_worker,
                kv_blocks,
                ready_timeout_s,
                coordinator_args,
                tls,
            }))
        }
        Cmd::Plan {
            sub: Some(PlanCmd::Simulate(a)),
            ..
        } => grokctl::plan::simulate(&a),
        Cmd::Plan {
            sub: Some(PlanCmd::Ep(a)),
            ..
        } => grokctl::plan::ep(&a),
        Cmd::Plan {
            sub: Some(PlanCmd::Calibrate { workers, memory_gb }),
            ..
        } => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = (cores / workers.max(1)).max(1);
            let h = grokctl::plan::calibrate_host(threads)?;
            let d = h.device(
                "calibrated",
                memory_gb / workers.max(1) as f64,
                workers.max(1),
            );
            print!("{}", h.toml(&d));
            Ok(())
        }
        Cmd::Plan {
            sub: Some(PlanCmd::Validate(a)),
            ..
        } => rt()?.block_on(grokctl::plan::validate(&a)),
        Cmd::Plan { sub: None, args } => grokctl::plan::run(&args),
        Cmd::Status {
            endpoint,
            wait_ready,
            json,
        } => {
            cluster_tls(&tls_flags, &no_file, false)?;
            rt()?.block_on(client::status(&endpoint, wait_ready, json))
        }
        Cmd::Generate(g) => generate(g, &tls_flags, &no_file, rt),
        Cmd::Bench {
            serve:
                Some(BenchCmd::Serve {
                    endpoint,
                    concurrency,
                    requests,
                    prompt_len,
                    gen_len,
                    json,
                }),
            ..
        } => {
            if requests == 0 || prompt_len == 0 || gen_len == 0 || concurrency.contains(&0) {
                anyhow::bail!("--requests, --prompt-len, --gen-len and every --concurrency level must be positive");
            }
            cluster_tls(&tls_flags, &no_file, false)?;
            rt()?.block_on(client::bench_serve(
                &endpoint,
                &concurrency,
                requests,
                prompt_len,
                gen_len,
                json,
            ))
        }
        Cmd::Bench {
            serve: Some(BenchCmd::Chaos(a)),
            ..
        } => rt()?.block_on(grokctl::chaos::bench_chaos(&a)),
        Cmd::Bench {
            model: None,
            endpoint: Some(endpoint),
            prompt_len,
            gen_len,
            json,
            ..
        } => {
            cluster_tls(&tls_flags, &no_file, false)?;
            rt()?.block_on(client::bench(&endpoint, prompt_len, gen_len, json))
        }
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
        Cmd::Tokenize { tokenizer } => local::run_tokenize(&tokenizer),
        Cmd::Detokenize { tokenizer } => local::run_detokenize(&tokenizer),
        Cmd::Bench {
            model: Some(model),
            prompt_len,
            gen_len,
            bandwidth_mb,
            json,
            ..
        } => local::run_bench(&local::BenchArgs {
            model,
            prompt_len,
            gen_len,
            json,
            bandwidth_mb,
        }),
        Cmd::Bench { .. } => {
            anyhow::bail!("give exactly one of --model or --endpoint")
        }
    }
}

/// `grokctl generate`: in this process or on a cluster.
fn generate(
    g: GenerateCmd,
    tls_flags: &TlsPaths,
    no_file: &grokctl::cluster_file::ClusterFile,
    rt: impl Fn() -> std::io::Result<tokio::runtime::Runtime>,
) -> Result<()> {
    let sampling = SamplingParams {
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        seed: g.seed,
    };
    match (g.model, g.endpoint) {
        (Some(model), None) => local::run_generate(&local::GenerateArgs {
            model,
            prompt: g.prompt,
            prompt_ids: g.prompt_ids,
            tokenizer: g.tokenizer,
            max_new_tokens: g.max_new_tokens,
            sampling,
            json: g.json,
            logits_out: g.logits_out,
            ignore_eos: g.ignore_eos,
        }),
        (None, Some(endpoint)) => {
            if g.tokenizer.is_some() {
                anyhow::bail!("--tokenizer applies to single-process generation (--model); the cluster uses its own tokenizer");
            }
            let prompt_ids = g.prompt_ids.as_deref().map(local::parse_ids).transpose()?;
            cluster_tls(tls_flags, no_file, false)?;
            rt()?.block_on(client::generate(&client::RemoteGenerate {
                endpoint,
                prompt: g.prompt,
                prompt_ids,
                max_new_tokens: g.max_new_tokens,
                sampling,
                ignore_eos: g.ignore_eos,
                json: g.json,
                logits_out: g.logits_out,
            }))
        }
        _ => anyhow::bail!("give exactly one of --model or --endpoint"),
    }
}

fn pb_rebalance(
    replica: u32,
    extra_copies: u32,
    dry_run: bool,
) -> grok_proto::v1::RebalanceRequest {
    grok_proto::v1::RebalanceRequest {
        replica,
        extra_copies,
        dry_run,
    }
}
