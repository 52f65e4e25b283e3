//! A replica's KV blocks: the free list (`grok_shared::model::BlockAllocator`) and, when
//! prefix caching is on, the prefix cache. A full block is keyed by a hash of its tokens and of
//! every block before it, so a new sequence reuses the longest cached prefix of its tokens
//! instead of recomputing it. Blocks are reference-counted; a cached block no sequence holds
//! stays cached until its space is needed (least recently released first). Pure data.

use grok_shared::model::BlockAllocator;
use std::collections::{BTreeMap, HashMap};

/// The hash of a full block after the block whose hash is `prev` (0 before the first).
pub fn chain(prev: u64, tokens: &[u32]) -> u64 {
    // FNV-1a over the previous hash and the tokens.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prev.to_le_bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    for &t in tokens {
        for b in t.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The hashes of the first full blocks of `tokens` (at most `max_blocks` of `bs` tokens), as
/// the prefix cache keys them.
pub fn prefix_hashes(tokens: &[u32], bs: usize, max_blocks: usize) -> Vec<u64> {
    let mut prev = 0;
    tokens
        .chunks_exact(bs.max(1))
        .take(max_blocks)
        .map(|c| {
            prev = chain(prev, c);
            prev
        })
        .collect()
}

struct PrefixCache {
    /// Hash of a cached block -> the block.
    map: HashMap<u64, u32>,
    /// The hash each block is cached under.
    hash_of: Vec<Option<u64>>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Cached blocks no sequence holds, by when they were released (oldest first).
    lru: BTreeMap<u64, u32>,
    lru_key: Vec<Option<u64>>,
    tick: u64,
    /// Hashes cached and evicted since the last [`Blocks::take_changes`] (what the router's
    /// view of this replica's cache needs).
    added: Vec<u64>,
    removed: Vec<u64>,
}

pub struct Blocks {
    free: BlockAllocator,
    cache: Option<PrefixCache>,
    /// Read by the tests' invariant check.
    #[cfg_attr(not(test), allow(dead_code))]
    total: usize,
}

impl Blocks {
    pub fn new(total: usize, prefix_caching: bool) -> Self {
        Blocks {
            free: BlockAllocator::new(total),
            cache: prefix_caching.then(|| PrefixCache {
                map: HashMap::new(),
                hash_of: vec![None; total],
                refs: vec![0; total],
                lru: BTreeMap::new(),
                lru_key: vec![None; total],
                tick: 0,
                added: Vec::new(),
                removed: Vec::new(),
            }),
            total,
        }
    }

    pub fn caching(&self) -> bool {
        self.cache.is_some()
    }

    /// Blocks that can be handed out: free ones and cached ones no sequence holds.
    pub fn num_free(&self) -> usize {
        self.free.num_free() + self.cache.as_ref().map_or(0, |c| c.lru.len())
    }

    /// Cached blocks (held or not).
    pub fn num_cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.map.len())
    }

    /// One block: a free one, else the least recently released cached one (evicted).
    pub fn alloc(&mut self) -> Option<u32> {
        let b = match self.free.alloc() {
            Some(b) => b,
            None => {
                let c = self.cache.as_mut()?;
                let (&key, &b) = c.lru.iter().next()?;
                c.lru.remove(&key);
                c.lru_key[b as usize] = None;
                if let Some(h) = c.hash_of[b as usize].take() {
                    c.map.remove(&h);
                    c.removed.push(h);
                }
                b
            }
        };
        if let Some(c) = &mut self.cache {
            c.refs[b as usize] = 1;
        }
        Some(b)
    }

    /// Gives a sequence's blocks back: a block no sequence holds any more is free, or, when
    /// cached, evictable.
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        let Some(c) = &mut self.cache else {
            self.free.release(blocks);
            return;
        };
        for b in blocks.drain(..) {
            let i = b as usize;
            c.refs[i] = c.refs[i].saturating_sub(1);
            if c.refs[i] > 0 {
                continue;
            }
            if c.hash_of[i].is_some() {
                c.tick += 1;
                c.lru.insert(c.tick, b);
                c.lru_key[i] = Some(c.tick);
            } else {
                self.free.release(&mut vec![b]);
            }
        }
    }

    /// The cached blocks of the longest cached prefix of `tokens` (at most `max_blocks` full
    /// blocks of `bs` tokens), with their hashes; nothing is taken yet.
    pub fn lookup(&self, tokens: &[u32], bs: usize, max_blocks: usize) -> Vec<(u64, u32)> {
        let Some(c) = &self.cache else {
            return vec![];
        };
        prefix_hashes(tokens, bs, max_blocks)
            .into_iter()
            .map_while(|h| c.map.get(&h).map(|&b| (h, b)))
            .collect()
    }

    /// How many of `hits` no sequence holds (taking them removes them from the free count).
    pub fn evictable_among(&self, hits: &[(u64, u32)]) -> usize {
        self.cache.as_ref().map_or(0, |c| {
            hits.iter()
                .filter(|h| c.lru_key[h.1 as usize].is_some())
                .count()
        })
    }

    /// Takes cached blocks found by [`Blocks::lookup`] for a sequence.
    pub fn take(&mut self, hits: &[(u64, u32)]) {
        if let Some(c) = &mut self.cache {
            for &(_, b) in hits {
                let i = b as usize;
                if let Some(k) = c.lru_key[i].take() {
                    c.lru.remove(&k);
                }
                c.refs[i] += 1;
            }
        }
    }

    /// Caches a block whose keys and values are computed, under `hash`, unless a block with
    /// the same content is cached already.
    pub fn register(&mut self, hash: u64, block: u32) {
        if let Some(c) = &mut self.cache {
            let i = block as usize;
            if c.hash_of[i].is_none() && !c.map.contains_key(&hash) {
                c.map.insert(hash, block);
                c.hash_of[i] = Some(hash);
                c.added.push(hash);
            }
        }
    }

    /// The hashes cached and evicted since the previous call.
    pub fn take_changes(&mut self) -> (Vec<u64>, Vec<u64>) {
        match &mut self.cache {
            Some(c) => (std::mem::take(&mut c.added), std::mem::take(&mut c.removed)),
            None => (vec![], vec![]),
        }
    }

    /// Checks the invariants (tests): every block is free, held (with as many holders as
    /// `held` counts), or cached and evictable; never two of these.
    #[cfg(test)]
    pub fn check(&self, held: &[u32]) {
        let mut count = vec![0u32; self.total];
        for &b in held {
            count[b as usize] += 1;
        }
        let mut free = vec![false; self.total];
        for &b in self.free.free_list() {
            assert!(!free[b as usize], "block {b} free twice");
            free[b as usize] = true;
        }
        for b in 0..self.total {
            match &self.cache {
                None => assert!(
                    free[b] ^ (count[b] == 1),
                    "block {b}: free {} and held {} times",
                    free[b],
                    count[b]
                ),
                Some(c) => {
                    assert_eq!(c.refs[b], count[b], "block {b}: holders");
                    let evictable = c.lru_key[b].is_some();
                    assert_eq!(
                        evictable,
                        count[b] == 0 && c.hash_of[b].is_some(),
                        "block {b}"
                    );
                    assert_eq!(free[b], count[b] == 0 && !evictable, "block {b}: free");
                    if let Some(h) = c.hash_of[b] {
                        assert_eq!(c.map.get(&h), Some(&(b as u32)), "block {b}: cache map");
                    }
                }
            }
        }
        if let Some(c) = &self.cache {
            assert_eq!(c.lru.len(), c.lru_key.iter().flatten().count());
        }
    }
}
