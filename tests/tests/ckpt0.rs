//! The official release format: a checkpoint written in ckpt-0 pickles (by a Python helper with
//! numpy and the official QuantizedWeight8bit dataclass) converts to the safetensors layout and
//! gives the same logits as the original; hostile, truncated and misshapen pickles are refused.

use std::path::Path;
use std::process::{Command, Output};

fn grokctl(args: &[&str]) -> Output {
    Command::new(grok_tests::bin("grokctl"))
        .args(args)
        .env("GROK_THREADS", "1")
        .output()
        .unwrap()
}

fn python(args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/make_ckpt0.py");
    let o = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "make_ckpt0.py failed (scripts/test.sh installs numpy and ml_dtypes): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn official_pickles_convert_to_identical_logits_and_bad_pickles_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).display().to_string();
    ok(grokctl(&[
        "gen-model",
        "--preset",
        "tiny8",
        "--dtype",
        "int8",
        "--seed",
        "9",
        "--out",
        &p("hf"),
    ]));
    python(&[&p("hf"), &p("ckpt-0")]);
    let cfg = p("hf/config.json");
    ok(grokctl(&[
        "convert",
        "--from",
        &p("ckpt-0"),
        "--to",
        &p("conv"),
        "--config",
        &cfg,
    ]));
    let run = |m: &str, npy: &str| {
        ok(grokctl(&[
            "generate",
            "--model",
            m,
            "--prompt-ids",
            "5,6,0,7,9,300",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
            "--logits-out",
            npy,
        ]))
    };
    let a = run(&p("hf"), &p("a.npy"));
    let b = run(&p("conv"), &p("b.npy"));
    assert_eq!(a.lines().last(), b.lines().last());
    // Same weights (the release's int8 and bf16 scales, fp32 norms and router): same bits.
    assert_eq!(
        std::fs::read(p("a.npy")).unwrap(),
        std::fs::read(p("b.npy")).unwrap()
    );

    // Resumable: a missing layer file is rewritten, finished ones are kept.
    std::fs::remove_file(p("conv/model-layer-001.safetensors")).unwrap();
    ok(grokctl(&[
        "convert",
        "--from",
        &p("ckpt-0"),
        "--to",
        &p("conv"),
        "--config",
        &cfg,
    ]));
    run(&p("conv"), &p("c.npy"));
    assert_eq!(
        std::fs::read(p("a.npy")).unwrap(),
        std::fs::read(p("c.npy")).unwrap()
    );

    // A hostile pickle is refused by name and never executed.
    let marker = p("pwned");
    let evil = format!(
        "import os, pickle\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\npickle.dump(E(), open('{}', 'wb'))\n",
        p("ckpt-0/tensor00003_000")
    );
    assert!(Command::new("python3")
        .arg("-c")
        .arg(evil)
        .status()
        .unwrap()
        .success());
    let o = grokctl(&[
        "convert",
        "--from",
        &p("ckpt-0"),
        "--to",
        &p("conv2"),
        "--config",
        &cfg,
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("refusing pickle global")
            && e.contains("system")
            && e.contains("tensor00003_000"),
        "{e}"
    );
    assert!(!Path::new(&marker).exists(), "the pickle was executed");

    // Truncated.
    python(&[&p("hf"), &p("ckpt-t")]);
    let f = p("ckpt-t/tensor00002_000");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = grokctl(&[
        "convert",
        "--from",
        &p("ckpt-t"),
        "--to",
        &p("conv3"),
        "--config",
        &cfg,
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("truncated") && e.contains("tensor00002_000"),
        "{e}"
    );

    // Wrong shapes for the config: names the tensor, the file, expected and found.
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["intermediate_size"] = 320.into();
    std::fs::write(p("bigger.json"), c.to_string()).unwrap();
    python(&[&p("hf"), &p("ckpt-s")]);
    let o = grokctl(&[
        "convert",
        "--from",
        &p("ckpt-s"),
        "--to",
        &p("conv4"),
        "--config",
        &p("bigger.json"),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("moe/linear/w") && e.contains("expected shape"),
        "{e}"
    );
    // Not a checkpoint at all.
    let o = grokctl(&["convert", "--from", &p("hf"), "--to", &p("conv5")]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an official ckpt-0 directory"));
}
