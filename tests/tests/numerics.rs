//! The whole model against the float64 reference: f32, bf16 and int8 weights, full forward,
//! KV-cache decoding, chunked prefill, batching, and prompts containing the pad id 0.

use grok_shared::collective::SingleRank;
use grok_shared::config::ModelConfig;
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::formats::genmodel::{generate, GenDType};
use grok_shared::model::{KvCache, Model, SeqInput, WantLogits};
use grok_tests::reference::{rel_err, RefModel};
use std::path::Path;

/// Tolerances (max |Δlogit| / max |logit| per position) of the f32 compute against float64 on
/// the same weights. f32 accumulation over d_model-long dot products and softmax gives about
/// 1e-6 here; the spec's target for an f32 implementation is 1e-5. bf16 and int8 weights are
/// compared against the reference run on the same rounded / dequantized values, so only the
/// compute precision differs and the same bound applies.
const TOL: f64 = 1e-5;

fn make(preset: &str, dtype: GenDType, seed: u64, dir: &Path) -> (Model, RefModel) {
    let c = ModelConfig::preset(preset, None).unwrap();
    generate(&c, dtype, seed, dir, 1 << 30, |_, _| {}).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    (Model::load(&ck).unwrap(), RefModel::load(dir))
}

fn full_logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let bs = 16;
    let nb = tokens.len().div_ceil(bs);
    let mut kv = KvCache::new(m, nb + 3, bs);
    // A scrambled block table: paging must not depend on contiguous blocks.
    let table: Vec<u32> = (0..nb as u32)
        .map(|b| (b * 7 + 3) % (nb as u32 + 3))
        .collect();
    let mut uniq = table.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), table.len());
    m.forward(
        &[SeqInput {
            tokens,
            start_pos: 0,
            block_table: &table,
            want: WantLogits::All,
        }],
        &mut kv,
        &SingleRank,
    )
    .unwrap()
}

fn prompt(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut r = grok_shared::sampling::Rng::new(seed);
    (0..n)
        .map(|_| 1 + (r.next_u64() % (vocab as u64 - 1)) as u32)
        .collect()
}

fn check_rows(got: &[f32], want: &[f64], vocab: usize, tol: f64, what: &str) {
    let mut worst: f64 = 0.0;
    for (i, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let e = rel_err(g, w);
        worst = worst.max(e);
        assert!(
            e <= tol,
            "{what}: position {i}: rel err {e:.3e} > {tol:.0e}"
        );
    }
    eprintln!("{what}: worst rel err {worst:.2e}");
}

#[test]
fn f32_matches_reference_on_two_configs() {
    for (preset, seed) in [("tiny", 1), ("tiny8", 2)] {
        let dir = tempfile::tempdir().unwrap();
        let (m, r) = make(preset, GenDType::F32, seed, dir.path());
        let v = m.config.vocab_size;
        let toks = prompt(v, 40, seed);
        let got = full_logits(&m, &toks);
        let want = r.forward(&toks);
        check_rows(&got, &want, v, TOL, preset);
        // The reference agrees on the argmax at every position.
        for (g, w) in got.chunks(v).zip(want.chunks(v)) {
            let ga = grok_shared::sampling::argmax(g) as usize;
            let wa = (0..v)
                .max_by(|&a, &b| w[a].partial_cmp(&w[b]).unwrap())
                .unwrap();
            assert!(ga == wa || (w[ga] - w[wa]).abs() < 1e-6 * w[wa].abs().max(1.0));
        }
    }
}

#[test]
fn bf16_and_int8_match_reference_on_same_weights() {
    for dtype in [GenDType::Bf16, GenDType::Int8] {
        let dir = tempfile::tempdir().unwrap();
        let (m, r) = make("tiny8", dtype, 5, dir.path());
        let v = m.config.vocab_size;
        let toks = prompt(v, 33, 9);
        check_rows(
            &full_logits(&m, &toks),
            &r.forward(&toks),
            v,
            TOL,
            &format!("{dtype:?}"),
        );
    }
}

#[test]
fn pad_token_zero_is_masked_as_the_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = make("tiny8", GenDType::F32, 3, dir.path());
    let v = m.config.vocab_size;
    // Leading zeros give query rows whose keys are all masked (uniform attention over every
    // key of the pass); zeros in the middle are invisible as keys.
    let mut toks = prompt(v, 24, 4);
    toks[0] = 0;
    toks[1] = 0;
    toks[9] = 0;
    toks[15] = 0;
    let got = full_logits(&m, &toks);
    let want = r.forward(&toks);
    check_rows(&got, &want, v, TOL, "pad");
    // Not masking id 0 would change the logits: the test can tell.
    let mut other = toks.clone();
    other[9] = 1;
    let moved = rel_err(&got[10 * v..11 * v], &r.forward(&other)[10 * v..11 * v]);
    assert!(moved > 1e-3, "masking must matter: {moved}");
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = make("tiny8", GenDType::F32, 7, dir.path());
    let v = m.config.vocab_size;
    let mut toks = prompt(v, 30, 8);
    toks[4] = 0; // a pad id stays masked in later decode steps
    let want = r.forward(&toks);
    let bs = 4;
    let mut kv = KvCache::new(&m, 16, bs);
    let table: Vec<u32> = (0..8).map(|b| 15 - b).collect();
    // Prefill 11 tokens in two chunks (6 + 5), then decode one token at a time.
    let mut rows: Vec<f32> = Vec::new();
    let chunks = [(0usize, 6usize), (6, 11)];
    for (s, e) in chunks {
        let out = m
            .forward(
                &[SeqInput {
                    tokens: &toks[s..e],
                    start_pos: s,
                    block_table: &table,
                    want: WantLogits::All,
                }],
                &mut kv,
                &SingleRank,
            )
            .unwrap();
        rows.extend(out);
    }
    for p in 11..toks.len() {
        let out = m
            .forward(
                &[SeqInput {
                    tokens: &toks[p..p + 1],
                    start_pos: p,
                    block_table: &table,
                    want: WantLogits::Last,
                }],
                &mut kv,
                &SingleRank,
            )
            .unwrap();
        rows.extend(out);
    }
    check_rows(&rows, &want, v, TOL, "kv decode");
}

#[test]
fn batched_sequences_equal_separate_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = make("tiny", GenDType::F32, 11, dir.path());
    let v = m.config.vocab_size;
    let a = prompt(v, 13, 1);
    // Every kernel computes a row the same way whatever else is in the batch: bit for bit.

    let b = prompt(v, 21, 2);
    let alone_a = full_logits(&m, &a);
    let alone_b = full_logits(&m, &b);
    let ta = [0u32, 1, 2, 3];
    let tb = [4u32, 5, 6, 7, 8, 9];
    let mut kv2 = KvCache::new(&m, 10, 4);
    let out = m
        .forward(
            &[
                SeqInput {
                    tokens: &a,
                    start_pos: 0,
                    block_table: &ta,
                    want: WantLogits::All,
                },
                SeqInput {
                    tokens: &b,
                    start_pos: 0,
                    block_table: &tb,
                    want: WantLogits::Last,
                },
            ],
            &mut kv2,
            &SingleRank,
        )
        .unwrap();
    assert_eq!(out.len(), (13 + 1) * v);
    let d1 = rel_err(
        &out[..13 * v],
        &alone_a.iter().map(|&x| x as f64).collect::<Vec<_>>(),
    );
    let d2 = rel_err(
        &out[13 * v..],
        &alone_b[20 * v..]
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<_>>(),
    );
    assert!(d1 < 1e-5 && d2 < 1e-5, "{d1} {d2}");
}

#[test]
fn random_model_behaves_like_a_trained_one() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = make("tiny8", GenDType::F32, 21, dir.path());
    let v = m.config.vocab_size;
    let toks = prompt(v, 48, 5);
    // Attention logits of the first layer reach the soft-cap region (|s| > 20 before capping).
    let c = &r.cfg;
    let l0 = &r.layers[0];
    let mut h = vec![0f64; toks.len() * c.d];
    for (i, &t) in toks.iter().enumerate() {
        for k in 0..c.d {
            h[i * c.d + k] = r.embed[t as usize * c.d + k] * c.emb_mult;
        }
    }
    let x = grok_tests::reference::rms(&h, &l0.norms[0], c.eps, c.d);
    let q = grok_tests::reference::matmul(&x, toks.len(), c.d, &l0.wq, c.q_heads * c.head_dim);
    let k = grok_tests::reference::matmul(&x, toks.len(), c.d, &l0.wk, c.kv_heads * c.head_dim);
    let mut max_logit: f64 = 0.0;
    for i in 0..toks.len() {
        for u in 0..toks.len() {
            let dot: f64 = (0..c.head_dim)
                .map(|e| q[i * c.q_heads * c.head_dim + e] * k[u * c.kv_heads * c.head_dim + e])
                .sum();
            // f64::max drops a NaN: check each logit, or a NaN would pass unseen.
            assert!(dot.is_finite(), "attention logit ({i}, {u}) is {dot}");
            max_logit = max_logit.max((dot * c.attn_mult).abs());
        }
    }
    assert!(max_logit > 20.0, "attention logits too small: {max_logit}");
    // Different tokens pick different experts.
    let probs = r.router_probs(
        l0,
        &grok_tests::reference::rms(&h, &l0.norms[2], c.eps, c.d),
        toks.len(),
    );
    let mut firsts: Vec<usize> = probs
        .iter()
        .map(|p| {
            (0..c.experts)
                .max_by(|&a, &b| p[a].partial_cmp(&p[b]).unwrap())
                .unwrap()
        })
        .collect();
    firsts.sort();
    firsts.dedup();
    assert!(
        firsts.len() >= 4,
        "router picks too few experts: {firsts:?}"
    );
    // Greedy generation is not constant and activations stay finite.
    let out = grok_shared::generate::generate(
        &m,
        &toks[..5],
        &grok_shared::generate::GenerateOptions {
            max_new_tokens: 24,
            stop_at_eos: false,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    let mut ids = out.ids.clone();
    ids.sort();
    ids.dedup();
    assert!(
        ids.len() >= 3,
        "greedy output too repetitive: {:?}",
        out.ids
    );
    let logits = full_logits(&m, &toks);
    assert!(logits.iter().all(|x| x.is_finite()));
    let spread = logits.iter().fold(0f32, |a, b| a.max(b.abs()));
    assert!(spread > 1.0 && spread < 1e3, "logit scale {spread}");
}
