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

    /// Bytes one token takes in this cache.
    pub fn bytes_per_token(&self) -> usize {
        2 * 4 * self.num_kv_heads * self.key_size * self.k.len()
    }

    pub(super) fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
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
