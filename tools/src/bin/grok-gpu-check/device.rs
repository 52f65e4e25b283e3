//! Group `device`: the one forward pass (`grok_shared::model::Model`) on the CUDA device
//! (`backend::cuda::Cuda`) against the same pass on the CPU: a batch of sequences over a
//! paged KV cache with scattered block tables (a prefill pass with every logit, then decode
//! passes), whole, whole with every product through cuBLAS, and as two tensor-parallel shards
//! on the one GPU (host-staged all-reduce).

use crate::common::*;
use crate::model::{io_err, model_test_config, per_row_rel, temp_model_dir};
use grok_shared::backend::cuda::{
    Cuda, CudaBackend, CudaError, CudaKv, GemmPrecision, GemmSettings,
};
use grok_shared::collective::{local_group, Communicator, SingleRank};
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_shared::model::{Device, KvCache, Model, SeqInput, WantLogits};
use grok_shared::sampling::Rng;
use grok_shared::sharding::Layout;
use serde_json::json;
use std::sync::Arc;

const BS: usize = 16;

/// The passes of the check: every sequence's prompt in one pass (all logits), then `decode`
/// passes of one token each (last logits). Block tables are interleaved over the cache.
struct Plan {
    prompts: Vec<Vec<u32>>,
    decode: Vec<Vec<u32>>,
    tables: Vec<Vec<u32>>,
    blocks: usize,
}

fn plan(vocab: usize, seed: u64) -> Plan {
    let mut r = Rng::new(seed);
    let lens = [21usize, 5, 40];
    let mut prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| 1 + (r.next_u64() % (vocab as u64 - 1)) as u32)
                .collect()
        })
        .collect();
    // The second sequence starts with a pad (its first row sees only masked keys).
    prompts[1][0] = 0;
    prompts[2][9] = 0;
    let decode: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            (0..3)
                .map(|_| 1 + (r.next_u64() % (vocab as u64 - 1)) as u32)
                .collect()
        })
        .collect();
    let per = (lens.iter().max().unwrap() + 4).div_ceil(BS);
    let n = lens.len();
    // Sequence s gets blocks s, s + n, s + 2n, ...: scattered tables.
    let tables = (0..n)
        .map(|s| (0..per).map(|j| (s + j * n) as u32).collect())
        .collect();
    Plan {
        prompts,
        decode,
        tables,
        blocks: per * n,
    }
}

/// Runs the plan's passes on `m` with `kv`: every logit row in order, or with `logits` false
/// (a shard that does not hold the output matrix) the layers only.
fn run<D: Device>(
    m: &Model<D>,
    kv: &mut D::Kv,
    p: &Plan,
    comm: &dyn Communicator,
    logits: bool,
) -> Result<Vec<f32>, String> {
    let e = |e: grok_shared::model::ModelError| e.to_string();
    let mut out = Vec::new();
    let mut pass = |seqs: &[SeqInput], kv: &mut D::Kv| -> Result<(), String> {
        if logits {
            out.extend(m.forward(seqs, kv, comm).map_err(e)?);
        } else {
            let mut h = m.embed_tokens(seqs).map_err(e)?;
            m.forward_layers(&mut h, seqs, kv, comm).map_err(e)?;
        }
        Ok(())
    };
    let (all, last) = if logits {
        (WantLogits::All, WantLogits::Last)
    } else {
        (WantLogits::None, WantLogits::None)
    };
    let seqs: Vec<SeqInput> = p
        .prompts
        .iter()
        .zip(&p.tables)
        .map(|(t, b)| SeqInput {
            tokens: t,
            start_pos: 0,
            block_table: b,
            want: all,
        })
        .collect();
    pass(&seqs, kv)?;
    for step in 0..p.decode[0].len() {
        let toks: Vec<[u32; 1]> = p.decode.iter().map(|d| [d[step]]).collect();
        let seqs: Vec<SeqInput> = toks
            .iter()
            .zip(&p.tables)
            .zip(&p.prompts)
            .map(|((t, b), pr)| SeqInput {
                tokens: t,
                start_pos: pr.len() + step,
                block_table: b,
                want: last,
            })
            .collect();
        pass(&seqs, kv)?;
    }
    Ok(out)
}

pub(crate) fn device_check(
    be: &Arc<CudaBackend>,
    args: &Args,
    rep: &mut Report,
) -> Result<(), CudaError> {
    let c = model_test_config();
    let vocab = c.vocab_size;
    let p = plan(vocab, seed_of(args.seed, "device plan"));
    for (dt, name) in [(GenDType::Bf16, "bf16"), (GenDType::Int8, "int8")] {
        let dir = temp_model_dir(&format!("device-{name}"));
        genmodel::generate(&c, dt, seed_of(args.seed, name), &dir, 1 << 30, |_, _| {})
            .map_err(|e| io_err("generate the test model", e))?;
        let ckpt = Checkpoint::open(&dir).map_err(|e| io_err("open the test model", e))?;
        let cpu = Model::load(&ckpt).map_err(|e| io_err("load the CPU model", e))?;
        let mut kv = KvCache::new(&cpu, p.blocks, BS);
        let want =
            run(&cpu, &mut kv, &p, &SingleRank, true).map_err(|e| io_err("CPU passes", e))?;
        let dev = Cuda::new(be.clone());
        // The whole model.
        let (gm, _) = Model::upload(
            Model::load(&ckpt).map_err(|e| io_err("load", e))?,
            dev.clone(),
        )
        .map_err(|e| io_err("upload", e))?;
        let mut gkv = CudaKv::new(&gm, p.blocks, BS).map_err(|e| io_err("device cache", e))?;
        let got =
            run(&gm, &mut gkv, &p, &SingleRank, true).map_err(|e| io_err("device passes", e))?;
        be.synchronize("device passes")?;
        // The decode passes' MoE ran on the device: it counted their routed tokens there.
        let on_device = gm
            .dev
            .take_routing_stats()
            .map_err(|e| io_err("routing counts", e))?;
        let ran = on_device
            .as_ref()
            .is_some_and(|s| s.routed.iter().sum::<u64>() > 0);
        let mut counts = (gm.take_expert_counts(), gm.take_expert_served());
        if let Some(s) = &on_device {
            counts
                .0
                .iter_mut()
                .zip(&s.routed)
                .for_each(|(a, b)| *a += b);
            counts
                .1
                .iter_mut()
                .zip(&s.served)
                .for_each(|(a, b)| *a += b);
        }
        let rel = per_row_rel(&got, &want, vocab);
        rep.check(
            "device",
            &format!("{name}: 3 sequences, paged, prefill + 3 decode"),
            Cmp::new(&got, &to_f64(&want)),
            TOL_MODEL,
            json!({"rows": rel.len(), "worst_row_rel": finite_or_null(rel.iter().copied().fold(0f64, f64::max))}),
        );
        drop((gm, gkv));
        // The same with the router's choices copied to the host in every pass: the decode
        // passes' MoE on the device (grouped GEMV) must give the same bits and counts.
        let mut hdev = dev.clone();
        hdev.set_device_routing(false);
        let (hm, _) = Model::upload(Model::load(&ckpt).map_err(|e| io_err("load", e))?, hdev)
            .map_err(|e| io_err("upload", e))?;
        let mut hkv = CudaKv::new(&hm, p.blocks, BS).map_err(|e| io_err("device cache", e))?;
        let host = run(&hm, &mut hkv, &p, &SingleRank, true)
            .map_err(|e| io_err("device passes (host routing)", e))?;
        be.synchronize("device passes (host routing)")?;
        let host_counts = (hm.take_expert_counts(), hm.take_expert_served());
        let same = got.len() == host.len()
            && got
                .iter()
                .zip(&host)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        let counts_same = counts == host_counts && counts.0.iter().sum::<u64>() > 0;
        rep.check(
            "device",
            &format!("{name}: decode MoE routed on the device = routed through the host (bits, expert counts)"),
            if same && counts_same && ran { Cmp::new(&got, &to_f64(&host)) } else { Cmp::failed() },
            0.0,
            json!({"bitwise_equal": same, "counts_equal": counts_same, "device_routing_ran": ran,
                   "routed": counts.0.iter().sum::<u64>(), "routed_host": host_counts.0.iter().sum::<u64>()}),
        );
        drop((hm, hkv));
        // The whole model with every matrix product through cuBLAS (prefill and decode).
        let mut gdev = dev.clone();
        gdev.set_gemm(GemmSettings {
            min_rows: 1,
            min_rows_int8: 1,
            precision: GemmPrecision::Split,
        });
        let (gm, _) = Model::upload(Model::load(&ckpt).map_err(|e| io_err("load", e))?, gdev)
            .map_err(|e| io_err("upload", e))?;
        let mut gkv = CudaKv::new(&gm, p.blocks, BS).map_err(|e| io_err("device cache", e))?;
        let got = run(&gm, &mut gkv, &p, &SingleRank, true)
            .map_err(|e| io_err("device passes (cuBLAS)", e))?;
        be.synchronize("device passes (cuBLAS)")?;
        rep.check(
            "device",
            &format!("{name}: 3 sequences, paged, every product through cuBLAS (split)"),
            Cmp::new(&got, &to_f64(&want)),
            TOL_MODEL,
            json!({"gemm_min_rows": 1, "precision": "split"}),
        );
        drop((gm, gkv));
        // Two tensor-parallel shards on the one GPU, all-reduce staged through the host.
        let layout = Layout::new(2, 1, 1);
        let comms = local_group(2);
        let outs: Vec<Result<Vec<f32>, String>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .enumerate()
                .map(|(r, comm)| {
                    let (ckpt, c, p, dev) = (&ckpt, &c, &p, dev.clone());
                    s.spawn(move || -> Result<Vec<f32>, String> {
                        let shard = layout.shard(c, r);
                        let cpu = Model::load_shard(ckpt, &shard).map_err(|e| e.to_string())?;
                        let (m, _) = Model::upload(cpu, dev).map_err(|e| e.to_string())?;
                        let mut kv = CudaKv::new(&m, p.blocks, BS).map_err(|e| e.to_string())?;
                        // Rank 1 holds no output matrix: it runs the layers only.
                        run(&m, &mut kv, p, comm, r == 0)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
                .collect()
        });
        match &outs[0] {
            Ok(got) if outs[1].is_ok() => {
                rep.check(
                    "device",
                    &format!("{name}: tp 2 on one GPU (host-staged)"),
                    Cmp::new(got, &to_f64(&want)),
                    TOL_MODEL,
                    json!({}),
                );
            }
            _ => {
                let why: Vec<String> = outs
                    .iter()
                    .filter_map(|o| o.as_ref().err().cloned())
                    .collect();
                rep.check(
                    "device",
                    &format!("{name}: tp 2 on one GPU (host-staged): {}", why.join("; ")),
                    Cmp::failed(),
                    TOL_MODEL,
                    json!({"error": why}),
                );
            }
        }
    }
    Ok(())
}
