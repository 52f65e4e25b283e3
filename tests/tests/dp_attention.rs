//! Data-parallel attention with expert parallelism (`--dp-attention --ep E --expert-copies K`)
//! on CPU worker processes over loopback: every rank runs attention for its own sequences and
//! the MoE exchanges rows by all-to-all. Prompt logits of the f32 model stay within 1e-5 of
//! one process and greedy ids are identical, for one request and for several at once (spread
//! over the ranks); bad placements are refused with the rule named.

use grok_shared::config::ModelConfig;
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_shared::generate::{generate, GenerateOptions};
use grok_shared::model::Model;
use grok_tests::cluster::{bin, greedy, json_ids, status, up};

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    (0..6)
        .map(|i| {
            (0..(3 + 5 * i))
                .map(|j| ((j * 37 + i * 11 + 2) % (vocab - 2) + 1) as u32)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_attention_matches_the_single_process_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny8", None).unwrap();
    genmodel::generate(&c, GenDType::F32, 21, &model, 1 << 30, |_, _| {}).unwrap();
    let v = c.vocab_size;
    let m = Model::load(&Checkpoint::open(&model).unwrap()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        stop_at_eos: false,
        prompt_logits: true,
        ..Default::default()
    };
    let ps = prompts(v);
    let want: Vec<_> = ps
        .iter()
        .map(|p| generate(&m, p, &opts, |_| {}).unwrap())
        .collect();
    for (ep, k) in [(2, 1), (2, 2), (4, 1), (4, 2), (8, 2)] {
        let what = format!("dp-attention ep {ep} copies {k}");
        let cl = up(
            &model,
            &[
                "--dp-attention",
                "--ep",
                &ep.to_string(),
                "--expert-copies",
                &k.to_string(),
                "--kv-blocks",
                "32",
            ],
        );
        let st = status(&cl.endpoint).await;
        let l = st.layout.unwrap();
        assert!(
            l.dp_attention && l.ep == ep && l.expert_copies == k,
            "{what}: {l:?}"
        );
        assert_eq!(st.shards.len(), ep as usize, "{what}");
        // One request with its prompt logits.
        let npy = tmp.path().join(format!("dp{ep}{k}.npy"));
        let p = &ps[3];
        let ids: Vec<String> = p.iter().map(|x| x.to_string()).collect();
        let out = bin("grokctl")
            .args(["generate", "--endpoint", &cl.endpoint, "--prompt-ids"])
            .arg(ids.join(","))
            .args(["--max-new-tokens", "8", "--ignore-eos", "--json"])
            .arg("--logits-out")
            .arg(&npy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            json_ids(&out.stdout),
            want[3].ids,
            "{what}: greedy ids differ"
        );
        let (shape, logits) = grok_shared::formats::npy::read_f32(&npy).unwrap();
        assert_eq!(shape, vec![p.len(), v]);
        let wl = want[3].prompt_logits.as_ref().unwrap();
        for i in 0..p.len() {
            let w: Vec<f64> = wl[i * v..(i + 1) * v].iter().map(|&x| x as f64).collect();
            let e = grok_tests::reference::rel_err(&logits[i * v..(i + 1) * v], &w);
            assert!(e <= 1e-5, "{what}: position {i}: rel err {e:.2e}");
        }
        // Every prompt at once: the sequences spread over the ranks.
        let runs: Vec<_> = ps
            .iter()
            .map(|p| tokio::spawn(greedy_owned(cl.endpoint.clone(), p.clone())))
            .collect();
        for (i, r) in runs.into_iter().enumerate() {
            let got = r.await.unwrap().unwrap();
            assert_eq!(got, want[i].ids, "{what}: prompt {i} run with the others");
        }
    }
}

async fn greedy_owned(endpoint: String, prompt: Vec<u32>) -> Result<Vec<u32>, tonic::Status> {
    greedy(&endpoint, prompt, 8).await
}

#[test]
fn bad_placements_are_refused_with_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny8", None).unwrap();
    genmodel::generate(&c, GenDType::Bf16, 1, &model, 1 << 30, |_, _| {}).unwrap();
    for (args, rule) in [
        (
            vec!["--dp-attention", "--ep", "4", "--expert-copies", "5"],
            "expert copies (5) exceed the ep ranks (4)",
        ),
        (vec!["--dp-attention", "--ep", "16"], "without an expert"),
        (
            vec!["--dp-attention", "--ep", "4", "--tp", "2"],
            "tp (2) must equal ep (4)",
        ),
        (
            vec!["--ep", "2", "--tp", "2", "--expert-copies", "2"],
            "need data-parallel attention",
        ),
    ] {
        let out = bin("grokctl")
            .args(["up", "--model"])
            .arg(&model)
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(rule), "{args:?}: {err}");
    }
}
