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

/// Fortran-order arrays (numpy pickles a transposed array column-major): every leaf of a
/// checkpoint written with `np.asfortranarray` (2-D attention, embedding and router matrices,
/// 3-D expert stacks, QuantizedWeight8bit weights and scales) reads element for element as the
/// same checkpoint in C order, and converts to byte-identical safetensors files.
#[test]
fn fortran_order_pickles_read_and_convert_like_c_order() {
    use grok_shared::formats::ckpt0::{convert_to_hf, list_files, Leaf, TensorFile};
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    let cfg = grok_shared::config::ModelConfig::preset("tiny8", None).unwrap();
    grok_shared::formats::genmodel::generate(
        &cfg,
        grok_shared::formats::genmodel::GenDType::Int8,
        4,
        &p("hf"),
        1 << 30,
        |_, _| {},
    )
    .unwrap();
    let s = |x: &Path| x.display().to_string();
    python(&[&s(&p("hf")), &s(&p("ckpt-c"))]);
    python(&[&s(&p("hf")), &s(&p("ckpt-f")), "--fortran"]);
    let (cf, ff) = (
        list_files(&p("ckpt-c")).unwrap(),
        list_files(&p("ckpt-f")).unwrap(),
    );
    assert_eq!(cf.len(), ff.len());
    let (mut fortran, mut ndims, mut quantized) = (0, std::collections::BTreeSet::new(), 0);
    for (c, f) in cf.iter().zip(&ff) {
        let (c, f) = (TensorFile::open(c).unwrap(), TensorFile::open(f).unwrap());
        let pairs = match (&c.leaf, &f.leaf) {
            (Leaf::Array(a), Leaf::Array(b)) => vec![(a, b)],
            (
                Leaf::Quantized {
                    weight: wa,
                    scales: sa,
                },
                Leaf::Quantized {
                    weight: wb,
                    scales: sb,
                },
            ) => {
                quantized += 1;
                vec![(wa, wb), (sa, sb)]
            }
            other => panic!("{}: leaves differ: {other:?}", f.path.display()),
        };
        for (a, b) in pairs {
            assert!(!a.fortran);
            assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape));
            // numpy flags an array F-contiguous only when it is not also C-contiguous (a
            // dimension > 1 besides the last).
            let nontrivial = a.shape.iter().filter(|&&d| d > 1).count() > 1;
            assert_eq!(b.fortran, nontrivial, "{}: {b:?}", f.path.display());
            if b.fortran {
                fortran += 1;
                ndims.insert(b.shape.len());
                // The stored bytes really are another order.
                assert_ne!(c.raw_bytes(a), f.raw_bytes(b));
            }
            let size = a.dtype.size();
            let (x, y) = (c.bytes(a), f.bytes(b));
            assert_eq!(x.len(), y.len());
            for (k, (u, v)) in x.chunks(size).zip(y.chunks(size)).enumerate() {
                assert_eq!(u, v, "{}: element {k} of {:?}", f.path.display(), b.shape);
            }
        }
    }
    assert!(fortran > 20 && quantized > 0, "{fortran} {quantized}");
    assert_eq!(
        ndims.into_iter().collect::<Vec<_>>(),
        vec![2, 3],
        "2-D and 3-D"
    );
    // Converted, both give the same files, byte for byte.
    convert_to_hf(&p("ckpt-c"), &p("conv-c"), &cfg, |_, _| {}).unwrap();
    convert_to_hf(&p("ckpt-f"), &p("conv-f"), &cfg, |_, _| {}).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(p("conv-c"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(names.len() > 3);
    for n in names {
        assert_eq!(
            std::fs::read(p("conv-c").join(&n)).unwrap(),
            std::fs::read(p("conv-f").join(&n)).unwrap(),
            "{n:?}"
        );
    }
}
