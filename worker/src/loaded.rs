//! What a worker has loaded, and whether a new `Load` is for the same shard and cache (the
//! worker then reconnects, keeping its weights) or needs a restart.

use grok_shared::model::KvSizing;
use grok_shared::sharding::Layout;

/// The identity of a loaded shard.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedShard {
    pub model_dir: std::path::PathBuf,
    pub layout: Layout,
    pub rank: usize,
    /// How the KV cache was sized (what was asked, not the blocks it came to).
    pub kv: KvSizing,
    pub block_size: usize,
}

impl LoadedShard {
    /// Whether a worker that loaded `self` (its cache: `allocated` blocks) serves a Load asking
    /// for `want` by reconnecting only; the error says what differs and what to do.
    pub fn serves(&self, want: &LoadedShard, allocated: usize) -> Result<(), String> {
        if (&self.model_dir, self.layout, self.rank, self.block_size)
            != (&want.model_dir, want.layout, want.rank, want.block_size)
        {
            return Err(format!(
                "this worker holds rank {} of {} ({:?}, blocks of {} tokens); restart it to load rank {} of {} ({:?}, blocks of {} tokens)",
                self.rank,
                self.model_dir.display(),
                self.layout,
                self.block_size,
                want.rank,
                want.model_dir.display(),
                want.layout,
                want.block_size
            ));
        }
        // The same cache: the count asked for is the one allocated, or both were sized alike.
        let same_kv = match want.kv.blocks {
            Some(n) => n == allocated,
            None => self.kv == want.kv,
        };
        if !same_kv {
            let asked = match want.kv.blocks {
                Some(n) => format!("{n} blocks"),
                None => format!(
                    "a cache sized from memory (fraction {})",
                    want.kv.memory_fraction
                ),
            };
            return Err(format!(
                "this worker's KV cache holds {allocated} blocks and the Load asks for {asked}; restart the worker to change its cache"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_worker_takes_a_load_for_the_same_shard_and_cache_only() {
        let have = LoadedShard {
            model_dir: "/m".into(),
            layout: Layout::new(2, 1, 1),
            rank: 1,
            kv: KvSizing::default(),
            block_size: 16,
        };
        // Sized from memory to 512 blocks: the same sizing, or exactly 512, reconnects.
        assert_eq!(have.serves(&have, 512), Ok(()));
        let fixed = |n| LoadedShard {
            kv: KvSizing {
                blocks: Some(n),
                ..Default::default()
            },
            ..have.clone()
        };
        assert_eq!(have.serves(&fixed(512), 512), Ok(()));
        let e = have.serves(&fixed(64), 512).unwrap_err();
        assert!(
            e.contains("holds 512 blocks") && e.contains("64 blocks"),
            "{e}"
        );
        let e = fixed(64).serves(&have, 64).unwrap_err();
        assert!(e.contains("sized from memory"), "{e}");
        let other = LoadedShard {
            rank: 0,
            ..have.clone()
        };
        let e = have.serves(&other, 512).unwrap_err();
        assert!(e.contains("restart it to load rank 0"), "{e}");
    }
}
