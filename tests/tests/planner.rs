//! The capacity planner's memory accounting agrees with the real loader to the byte.

use grok_shared::config::ModelConfig;
use grok_shared::formats::checkpoint::Checkpoint;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_shared::model::Model;
use grok_shared::planner::{shard_weight_bytes, PlanDType};
use grok_shared::sharding::Layout;

#[test]
fn planner_weight_bytes_equal_the_loaders_for_every_rank() {
    let c = ModelConfig::preset("tiny8", None).unwrap();
    for (gd, pd) in [
        (GenDType::F32, PlanDType::F32),
        (GenDType::Bf16, PlanDType::Bf16),
        (GenDType::Int8, PlanDType::Int8),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        genmodel::generate(&c, gd, 5, tmp.path(), 1 << 30, |_, _| {}).unwrap();
        let ck = Checkpoint::open(tmp.path()).unwrap();
        let mut checked = 0;
        for workers in [1, 2, 3, 4, 6] {
            for l in Layout::candidates(&c, workers) {
                for r in 0..l.world_size() {
                    let shard = l.shard(&c, r);
                    let m = Model::load_shard(&ck, &shard).unwrap();
                    assert_eq!(
                        m.weight_bytes() as u64,
                        shard_weight_bytes(&c, pd, &shard),
                        "{gd:?} tp={} ep={} pp={} rank {r}",
                        l.tp,
                        l.ep,
                        l.pp
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 20, "{checked}");
    }
}
