//! `grokctl` end to end: gen-model, generate (--json, --logits-out against the float64
//! reference), tokenize/detokenize, and clear errors (never a panic) on bad input.

use grok_tests::reference::{rel_err, RefModel};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn grokctl(args: &[&str]) -> Output {
    let bin = grok_tests::bin("grokctl");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace binaries first (cargo build)",
        bin.display()
    );
    Command::new(bin)
        .args(args)
        .env("GROK_THREADS", "2")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "grokctl failed: {err}");
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Fails with exit 1, a message containing every `needles`, and no panic.
fn fails_with(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean failure, got {:?}: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
}

fn gen_tiny(dir: &Path) {
    ok(&grokctl(&[
        "gen-model",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--out",
        dir.to_str().unwrap(),
    ]));
}

#[test]
fn generate_json_and_logits_match_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    gen_tiny(&model);
    let npy = tmp.path().join("l.npy");
    let out = ok(&grokctl(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "5,0,17,99,3,250",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--logits-out",
        npy.to_str().unwrap(),
    ]));
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let ids: Vec<u64> = last["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 6);
    assert!(last.get("text").is_none(), "no tokenizer, so no text");
    let (shape, logits) = grok_shared::formats::npy::read_f32(&npy).unwrap();
    assert_eq!(shape, vec![6, 256]);
    let r = RefModel::load(&model);
    let prompt = [5u32, 0, 17, 99, 3, 250];
    let want = r.forward(&prompt);
    for p in 0..6 {
        let e = rel_err(
            &logits[p * 256..(p + 1) * 256],
            &want[p * 256..(p + 1) * 256],
        );
        assert!(e < 1e-5, "position {p}: {e}");
    }
    // Greedy: the generated ids follow the reference's argmax step by step.
    let mut seq = prompt.to_vec();
    for &id in &ids {
        let w = r.forward(&seq);
        let row = &w[(seq.len() - 1) * 256..];
        let best = (0..256)
            .max_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap())
            .unwrap();
        assert_eq!(id as usize, best);
        seq.push(id as u32);
    }
}

#[test]
fn tokenize_and_detokenize_lines() {
    let tok = grok_tests::shared_dir()
        .expect("../shared beside the project")
        .join("models/grok-1/tokenizer.model");
    let run = |cmd: &str, input: &str| {
        let mut c = Command::new(grok_tests::bin("grokctl"))
            .args([cmd, "--tokenizer", tok.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    let out = run("tokenize", "{\"text\": \"The answer to life the universe and everything is of course\"}\n{\"text\": \"\"}\n");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        r#"{"ids":[422,3033,356,1180,333,9072,360,2175,391,359,1805]}"#
    );
    assert_eq!(lines[1], r#"{"ids":[]}"#);
    let back = run("detokenize", "{\"ids\": [422,3033,356]}\n");
    assert_eq!(back.trim(), r#"{"text":"The answer to"}"#);
}

#[test]
fn generate_with_a_prompt_text_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    // The small preset's vocabulary matches the real tokenizer; one layer keeps it quick.
    ok(&grokctl(&[
        "gen-model",
        "--preset",
        "small",
        "--layers",
        "1",
        "--dtype",
        "bf16",
        "--out",
        model.to_str().unwrap(),
    ]));
    let tok = grok_tests::shared_dir()
        .unwrap()
        .join("models/grok-1/tokenizer.model");
    let out = ok(&grokctl(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--prompt",
        "The answer to life",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "7",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 4);
    assert!(v["text"].is_string());
    // Same seed, same output.
    let again = ok(&grokctl(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--prompt",
        "The answer to life",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "7",
        "--json",
    ]));
    assert_eq!(out.lines().last(), again.lines().last());
}

/// Rewrites the model's safetensors file with `edit` applied to (name, dtype, shape, bytes).
fn rewrite(dir: &Path, edit: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, safetensors::tensor::TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn gen_ids(dir: &Path, ids: &str) -> Output {
    grokctl(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        ids,
        "--max-new-tokens",
        "2",
    ])
}

#[test]
fn bad_checkpoints_and_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let d = tmp.path().join(name);
        gen_tiny(&d);
        d
    };
    // Missing tensor: named, with the names tried and the directory.
    let d = fresh("missing");
    rewrite(&d, |ts| {
        ts.retain(|t| t.0 != "model.layers.1.attn.k_proj.weight")
    });
    fails_with(
        &gen_ids(&d, "5,6"),
        &["model.layers.1.attn.k_proj.weight", "not found", "missing"],
    );

    // Wrong shape: expected vs found.
    let d = fresh("shape");
    rewrite(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.0.attn.v_proj.weight")
            .unwrap();
        t.2 = vec![t.2[1], t.2[0]];
    });
    fails_with(
        &gen_ids(&d, "5,6"),
        &[
            "model.layers.0.attn.v_proj.weight",
            "expected shape [32, 64]",
            "found [64, 32]",
        ],
    );

    // Wrong dtype: an int8 norm.
    let d = fresh("dtype");
    rewrite(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.0.pre_attn_norm.scale")
            .unwrap();
        t.1 = safetensors::Dtype::I8;
        t.3.truncate(64);
    });
    fails_with(
        &gen_ids(&d, "5,6"),
        &["model.layers.0.pre_attn_norm.scale", "I8"],
    );

    // int8 weight without its scales.
    let d = fresh("noscales");
    rewrite(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.0.attn.q_proj.weight")
            .unwrap();
        t.1 = safetensors::Dtype::I8;
        t.3.truncate(64 * 64);
    });
    fails_with(&gen_ids(&d, "5,6"), &["model.layers.0.attn.q_proj.scales"]);

    // Truncated file.
    let d = fresh("trunc");
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    fails_with(&gen_ids(&d, "5,6"), &["model.safetensors", "truncated"]);

    // Corrupt header.
    let d = fresh("corrupt");
    let f = d.join("model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    b[8] = b'#';
    std::fs::write(&f, b).unwrap();
    fails_with(&gen_ids(&d, "5,6"), &["not a valid safetensors file"]);

    // Inconsistent config.
    let d = fresh("config");
    let cfg_path = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["num_key_value_heads"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    fails_with(
        &gen_ids(&d, "5,6"),
        &["num_attention_heads (4) must be a multiple of num_key_value_heads (3)"],
    );

    // Token ids outside the vocabulary, a prompt longer than the context, a bad id list.
    let d = fresh("inputs");
    fails_with(
        &gen_ids(&d, "5,256"),
        &["token id 256", "vocabulary (size 256)"],
    );
    let long: Vec<String> = (0..513).map(|i| (1 + i % 200).to_string()).collect();
    fails_with(
        &gen_ids(&d, &long.join(",")),
        &["513 tokens exceeds the context length 512"],
    );
    fails_with(&gen_ids(&d, "5,x"), &["`x` is not a token id"]);
    fails_with(
        &grokctl(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]),
        &["--prompt needs a tokenizer"],
    );
    fails_with(
        &grokctl(&[
            "generate",
            "--model",
            tmp.path().join("nowhere").to_str().unwrap(),
            "--prompt-ids",
            "1",
        ]),
        &["config.json"],
    );
}

#[test]
fn plan_command_ranks_layouts_and_refuses_bad_input() {
    let out = ok(&grokctl(&[
        "plan",
        "--model",
        "grok-1",
        "--gpu",
        "h100-sxm",
        "--gpus-per-node",
        "8",
        "--nodes",
        "1",
        "--dtype",
        "int8",
        "--prompt-len",
        "1000",
        "--gen-len",
        "200",
        "--concurrency",
        "64",
        "--json",
    ]));
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let layouts = j["layouts"].as_array().unwrap();
    assert!(!layouts.is_empty());
    let best = &layouts[0];
    for k in [
        "tp",
        "ep",
        "pp",
        "replicas",
        "fits",
        "weight_bytes_per_gpu",
        "kv_bytes_per_token_per_gpu",
        "kv_capacity_tokens",
        "ttft_ms",
        "itl_ms",
        "decode_step",
        "output_tokens_per_s",
        "cost_per_million_output_tokens",
    ] {
        assert!(best.get(k).is_some(), "missing {k}");
    }
    assert_eq!(best["fits"], true);
    let costs: Vec<f64> = layouts
        .iter()
        .filter(|l| l["fits"] == true)
        .map(|l| l["cost_per_million_output_tokens"].as_f64().unwrap())
        .collect();
    assert!(
        costs.windows(2).all(|w| w[0] <= w[1]),
        "fitting layouts ranked by cost"
    );
    // bf16 on 8 x 80 GB: nothing fits, and the explanation says what would.
    let out = ok(&grokctl(&[
        "plan",
        "--model",
        "grok-1",
        "--gpu",
        "h100-sxm",
        "--dtype",
        "bf16",
        "--explain",
    ]));
    assert!(
        out.contains("Nothing fits") && out.contains("int8"),
        "{out}"
    );
    // The winning layout's decode step, part by part, with the collective's algorithm.
    let out = ok(&grokctl(&[
        "plan",
        "--model",
        "grok-1",
        "--gpu",
        "h100-sxm",
        "--dtype",
        "int8",
        "--concurrency",
        "1",
        "--explain",
    ]));
    for part in [
        "One decode step",
        "weights",
        "KV cache",
        "all-reduce x128",
        "sampling",
    ] {
        assert!(out.contains(part), "--explain lacks `{part}`: {out}");
    }
    // simulate: the SLO is TTFT and TPOT, printed with its definitions; --itl-ms still reads
    // as the TPOT target.
    let sim = ok(&grokctl(&[
        "plan",
        "simulate",
        "--model",
        "grok-1",
        "--gpu",
        "h100-sxm",
        "--rate",
        "2",
        "--requests",
        "40",
        "--itl-ms",
        "80",
    ]));
    assert!(
        sim.contains("TPOT 80 ms") && sim.contains("TPOT p50"),
        "{sim}"
    );
    assert!(sim.contains("mean time per output token"), "{sim}");
    // Output into a pipe that closes early (`| head -c 16`): the command ends quietly. The
    // bash completion script (about 70 KB) outgrows the pipe's buffer, so the write fails.
    let mut child = Command::new(grok_tests::bin("grokctl"))
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    use std::io::Read;
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "closed pipe: {err}");
    // dp-attention + EP: two copies survive the loss of a GPU, one does not.
    let ep = |copies: &str| {
        ok(&grokctl(&[
            "plan",
            "ep",
            "--model",
            "grok-1",
            "--gpu",
            "h200",
            "--ranks",
            "8",
            "--expert-copies",
            copies,
            "--concurrency",
            "64",
        ]))
    };
    let two = ep("2");
    assert!(
        two.contains("fits") && two.contains("after losing one (7 ranks"),
        "{two}"
    );
    assert!(ep("1").contains("not serving"));
    fails_with(
        &grokctl(&[
            "plan",
            "ep",
            "--model",
            "grok-1",
            "--gpu",
            "h200",
            "--ranks",
            "4",
            "--expert-copies",
            "5",
        ]),
        &["distinct ranks"],
    );
    fails_with(
        &grokctl(&["plan", "--gpu", "tpu-v9"]),
        &["unknown device `tpu-v9`", "h100-sxm"],
    );
    fails_with(&grokctl(&["plan", "--nodes", "0"]), &["at least 1"]);
    fails_with(
        &grokctl(&["plan", "--context", "10000"]),
        &["context 10000"],
    );
}

/// `convert --dtype`: a generated f32 model to the release's int8 (and on to bf16, pre-sharded
/// for tp 2 in the same run); every result loads and generates; the error is reported; a
/// directory that is neither ckpt-0 nor asked to change is refused.
#[test]
fn convert_changes_the_weight_type_of_any_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    gen_tiny(&tmp.path().join("f32"));
    let o = grokctl(&[
        "convert",
        "--from",
        &p("f32"),
        "--to",
        &p("i8"),
        "--dtype",
        "int8",
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    let e: f64 = err
        .split("relative error of the rounded matrices ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no error reported: {err}"));
    assert!(e > 1e-4 && e < 0.02, "int8 relative error {e}");
    let cfg = std::fs::read_to_string(tmp.path().join("i8/config.json")).unwrap();
    assert!(cfg.contains("grok-int8-weight-only"), "{cfg}");
    assert!(gen_ids(&tmp.path().join("i8"), "5,6,7").status.success());
    ok(&grokctl(&[
        "convert",
        "--from",
        &p("i8"),
        "--to",
        &p("b16tp2"),
        "--dtype",
        "bf16",
        "--tp",
        "2",
    ]));
    assert!(tmp.path().join("b16tp2/manifest.json").exists());
    assert!(
        !tmp.path().join("b16tp2/typed").exists(),
        "the intermediate copy is left"
    );
    ok(&grokctl(&["verify", &p("b16tp2")]));
    fails_with(
        &grokctl(&["convert", "--from", &p("f32"), "--to", &p("x")]),
        &["--dtype", "--tp"],
    );
    fails_with(
        &grokctl(&[
            "convert",
            "--from",
            &p("f32"),
            "--to",
            &p("f32"),
            "--dtype",
            "bf16",
        ]),
        &["--to must differ"],
    );
}

/// GPU-only worker flags on a CPU worker are refused before anything starts (never accepted
/// and ignored), and a bad precision is named.
#[test]
fn a_cpu_worker_refuses_the_gpu_gemm_flags() {
    let run = |args: &[&str]| {
        Command::new(grok_tests::bin("grok-worker"))
            .args(["--coordinator", "127.0.0.1:1"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for (args, needle) in [
        (&["--gemm-min-rows", "64"][..], "apply to GPU workers"),
        (&["--gemm-precision", "bf16"][..], "apply to GPU workers"),
        (
            &["--device", "cuda:0", "--gemm-precision", "fp8"][..],
            "possible values: split, bf16",
        ),
    ] {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
