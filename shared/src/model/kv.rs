//! The paged KV cache and the free list of its blocks.

use super::error::ModelError;

/// The paged KV cache of the layers a shard holds: `[block, slot, kv_head, key_size]` per layer,
/// plus one "key visible" flag per slot (token id > pad), shared by all layers.
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub key_size: usize,
    pub(super) k: Vec<Vec<f32>>,
    pub(super) v: Vec<Vec<f32>>,
    pub(super) visible: Vec<bool>,
}

impl KvCache {
    /// `num_blocks` blocks of `block_size` slots for `n` layers of `nkv` KV heads of `ks`.
    pub(super) fn zeroed(
        nkv: usize,
        ks: usize,
        n: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let too_big = || {
            ModelError::Kv(format!(
                "{num_blocks} blocks of {block_size} slots ({nkv} KV heads of {ks}, {n} layers) do not fit in memory"
            ))
        };
        if block_size == 0 {
            return Err(ModelError::Kv("block_size must be at least 1".into()));
        }
        let slots = num_blocks.checked_mul(block_size).ok_or_else(too_big)?;
        let per = slots
            .checked_mul(nkv)
            .and_then(|x| x.checked_mul(ks))
            .ok_or_else(too_big)?;
        // Keys and values of every layer, in f32.
        per.checked_mul(2 * 4)
            .and_then(|x| x.checked_mul(n))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(too_big)?;
        let mut k = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            k.push(try_zeroed(per).ok_or_else(too_big)?);
            v.push(try_zeroed(per).ok_or_else(too_big)?);
        }
        Ok(Self {
            block_size,
            num_blocks,
            num_kv_heads: nkv,
            key_size: ks,
            k,
            v,
            visible: try_zeroed(slots).ok_or_else(too_big)?,
        })
    }

    /// Bytes of one block of `block_size` slots for the layers and KV heads `model` holds.
    pub fn block_bytes<D: super::Device>(model: &super::Model<D>, block_size: usize) -> u64 {
        let width = model.shard.kv_heads.len() * model.config.key_size;
        kv_block_bytes(model.layers.len(), width, block_size, 1)
    }

    /// Bytes of memory the cache holds: keys, values and the visibility flags.
    pub fn bytes(&self) -> usize {
        let slots = self.num_blocks * self.block_size;
        slots * (self.bytes_per_token() + std::mem::size_of::<bool>())
    }

    /// Bytes one token takes in this cache.
    pub fn bytes_per_token(&self) -> usize {
        2 * 4 * self.num_kv_heads * self.key_size * self.k.len()
    }

    pub(super) fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}

/// KV blocks a CPU worker allocates when neither the coordinator (`--kv-blocks`) nor the worker
/// (`--kv-memory`) says how many: the host's memory is shared with everything else on it.
pub const DEFAULT_CPU_KV_BLOCKS: usize = 512;

/// Share of a GPU's memory a worker uses for its weights and KV cache together when the
/// coordinator does not fix the block count (`--kv-memory-fraction`).
pub const DEFAULT_KV_MEMORY_FRACTION: f64 = 0.9;

/// How a worker sizes its KV cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvSizing {
    /// Exactly this many blocks (the coordinator's `--kv-blocks`); None: as many as the memory
    /// budget allows.
    pub blocks: Option<usize>,
    /// Share of the device's memory this worker may take for its weights and its cache
    /// (a GPU sized without `blocks`).
    pub memory_fraction: f64,
    /// The most bytes this worker's cache may take, on any device (the worker's `--kv-memory`).
    pub memory_cap: Option<u64>,
}

impl Default for KvSizing {
    fn default() -> Self {
        Self {
            blocks: None,
            memory_fraction: DEFAULT_KV_MEMORY_FRACTION,
            memory_cap: None,
        }
    }
}

/// A GPU's memory as the cache sizing sees it, bytes.
#[derive(Clone, Copy, Debug)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
    /// This worker's weights on the device.
    pub weights: u64,
    /// Kept free for activations and workspace.
    pub reserve: u64,
}

/// Bytes of one KV block: keys and values in f32 for `layers` layers of `width` (KV heads x key
/// size) per slot, and a visibility flag of `flag_bytes` per slot.
pub fn kv_block_bytes(layers: usize, width: usize, block_size: usize, flag_bytes: usize) -> u64 {
    (block_size as u64) * (2 * 4 * (width as u64) * (layers as u64) + flag_bytes as u64)
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

/// The number of blocks to allocate: `sizing.blocks` when given (refused when it exceeds the
/// worker's `--kv-memory`), else what the budget holds: on a GPU (`device`), the share
/// `memory_fraction` of the device's memory less the weights and the reserve, at most the free
/// memory less the reserve; on a CPU, `--kv-memory`'s worth or [`DEFAULT_CPU_KV_BLOCKS`]. Never
/// more than `--kv-memory` allows; an error when not one block fits.
pub fn kv_blocks_to_allocate(
    sizing: &KvSizing,
    per_block: u64,
    device: Option<&DeviceMemory>,
) -> Result<usize, ModelError> {
    let per_block = per_block.max(1);
    let cap_blocks = sizing.memory_cap.map(|c| (c / per_block) as usize);
    if let Some(n) = sizing.blocks {
        if let (Some(cb), Some(cap)) = (cap_blocks, sizing.memory_cap) {
            if n > cb {
                return Err(ModelError::Kv(format!(
                    "--kv-blocks {n} needs {} of KV cache, and this worker's --kv-memory allows {}: at most {cb} blocks fit (lower --kv-blocks, or raise --kv-memory)",
                    gb(n as u64 * per_block),
                    gb(cap)
                )));
            }
        }
        return Ok(n);
    }
    if !(sizing.memory_fraction > 0.0 && sizing.memory_fraction <= 1.0) {
        return Err(ModelError::Kv(format!(
            "--kv-memory-fraction {} is outside (0, 1]",
            sizing.memory_fraction
        )));
    }
    let (blocks, why) = match device {
        None => (
            cap_blocks.unwrap_or(DEFAULT_CPU_KV_BLOCKS),
            match sizing.memory_cap {
                Some(c) => format!("--kv-memory {}", gb(c)),
                None => "the CPU default".into(),
            },
        ),
        Some(m) => {
            let budget = (sizing.memory_fraction * m.total as f64) as u64;
            let room = budget
                .saturating_sub(m.weights + m.reserve)
                .min(m.free.saturating_sub(m.reserve));
            let fit = (room / per_block) as usize;
            let by_free =
                m.free.saturating_sub(m.reserve) < budget.saturating_sub(m.weights + m.reserve);
            let why = format!(
                "{:.0}% of the device's {} is {}; the weights take {}, {} is kept for activations, {} is free{}",
                sizing.memory_fraction * 100.0,
                gb(m.total),
                gb(budget),
                gb(m.weights),
                gb(m.reserve),
                gb(m.free),
                if by_free {
                    " (other processes hold the rest: free the device, or give each worker that shares it a smaller --kv-memory-fraction)"
                } else {
                    ""
                }
            );
            match (cap_blocks, sizing.memory_cap) {
                (Some(cb), Some(c)) if cb < fit => (cb, format!("--kv-memory {}", gb(c))),
                _ => (fit, why),
            }
        }
    };
    if blocks == 0 {
        return Err(ModelError::Kv(format!(
            "no room for one KV block of {} ({why}): give the worker more memory (--kv-memory-fraction, --kv-memory), or give --kv-blocks",
            gb(per_block)
        )));
    }
    Ok(blocks)
}

/// `n` zeroed values, or None when the allocator refuses (`vec![0; n]` aborts the process then).
fn try_zeroed<T: bytemuck::Zeroable>(n: usize) -> Option<Vec<T>> {
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Some((0..n).map(|_| T::zeroed()).collect());
    }
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    // SAFETY: the layout has a non-zero size (n > 0, T is not zero-sized).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` comes from the global allocator with the layout of `[T; n]`, and its `n`
    // elements are initialized: all-zero bytes are a valid `T` (`Zeroable`).
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// A free list of KV blocks: the block manager of the single-process generator and of the
/// coordinator's scheduler.
pub struct BlockAllocator {
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            free: (0..num_blocks as u32).rev().collect(),
        }
    }
    /// Grows `table` to cover `len` positions.
    pub fn ensure(
        &mut self,
        table: &mut Vec<u32>,
        len: usize,
        block_size: usize,
    ) -> Result<(), ModelError> {
        while table.len() * block_size < len {
            let b = self
                .free
                .pop()
                .ok_or_else(|| ModelError::Kv(format!("out of KV blocks for {len} positions")))?;
            table.push(b);
        }
        Ok(())
    }
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }
    /// One free block, if any.
    pub fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    /// The free blocks (the next one handed out last).
    pub fn free_list(&self) -> &[u32] {
        &self.free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn gpu(free: u64, total: u64, weights: u64) -> DeviceMemory {
        DeviceMemory {
            free,
            total,
            weights,
            reserve: GIB,
        }
    }

    #[test]
    fn a_gpu_cache_takes_its_share_of_the_device_less_the_weights_and_reserve() {
        let per = kv_block_bytes(8, 256, 16, 4);
        assert_eq!(per, 16 * (2 * 4 * 256 * 8 + 4));
        let s = KvSizing::default();
        // 0.9 x 80 GiB = 72 GiB; less 20 GiB of weights and 1 GiB of reserve: 51 GiB.
        let m = gpu(60 * GIB, 80 * GIB, 20 * GIB);
        let n = kv_blocks_to_allocate(&s, per, Some(&m)).unwrap();
        assert_eq!(n as u64, (72 * GIB - 21 * GIB) / per);
        // Never more than is free (another process holds most of the card).
        let m = gpu(5 * GIB, 80 * GIB, 20 * GIB);
        let n = kv_blocks_to_allocate(&s, per, Some(&m)).unwrap();
        assert_eq!(n as u64, 4 * GIB / per);
        // Two workers sharing a card each ask for their share.
        let half = KvSizing {
            memory_fraction: 0.45,
            ..s
        };
        let m = gpu(70 * GIB, 80 * GIB, 10 * GIB);
        let n = kv_blocks_to_allocate(&half, per, Some(&m)).unwrap();
        assert_eq!(
            n as u64,
            ((0.45 * (80 * GIB) as f64) as u64 - 11 * GIB) / per
        );
        // --kv-memory caps it.
        let capped = KvSizing {
            memory_cap: Some(GIB),
            ..s
        };
        let n = kv_blocks_to_allocate(&capped, per, Some(&m)).unwrap();
        assert_eq!(n as u64, GIB / per);
    }

    #[test]
    fn a_cpu_cache_takes_the_default_or_its_cap_and_fixed_counts_are_checked_against_the_cap() {
        let per = kv_block_bytes(2, 64, 16, 1);
        let s = KvSizing::default();
        assert_eq!(
            kv_blocks_to_allocate(&s, per, None).unwrap(),
            DEFAULT_CPU_KV_BLOCKS
        );
        let capped = KvSizing {
            memory_cap: Some(40 * per + per / 2),
            ..s
        };
        assert_eq!(kv_blocks_to_allocate(&capped, per, None).unwrap(), 40);
        let fixed = KvSizing {
            blocks: Some(41),
            ..capped
        };
        let e = kv_blocks_to_allocate(&fixed, per, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--kv-blocks 41") && e.contains("at most 40 blocks"),
            "{e}"
        );
        let fixed = KvSizing {
            blocks: Some(40),
            ..capped
        };
        assert_eq!(kv_blocks_to_allocate(&fixed, per, None).unwrap(), 40);
        // A fixed count is what the coordinator asked for, whatever the default.
        let fixed = KvSizing {
            blocks: Some(3000),
            ..s
        };
        assert_eq!(kv_blocks_to_allocate(&fixed, per, None).unwrap(), 3000);
    }

    #[test]
    fn no_room_and_bad_fractions_are_errors_that_say_what_to_change() {
        let per = kv_block_bytes(64, 1024, 16, 4);
        let s = KvSizing::default();
        // The weights fill the share.
        let m = gpu(10 * GIB, 80 * GIB, 71 * GIB);
        let e = kv_blocks_to_allocate(&s, per, Some(&m))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no room") && e.contains("--kv-memory-fraction"),
            "{e}"
        );
        let tiny = KvSizing {
            memory_cap: Some(per - 1),
            ..s
        };
        assert!(kv_blocks_to_allocate(&tiny, per, None).is_err());
        for f in [0.0, -0.5, 1.5, f64::NAN] {
            let bad = KvSizing {
                memory_fraction: f,
                ..s
            };
            let e = kv_blocks_to_allocate(&bad, per, Some(&gpu(GIB, GIB, 0)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("outside (0, 1]"), "{f}: {e}");
        }
    }
}
