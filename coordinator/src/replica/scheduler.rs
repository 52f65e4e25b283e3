//! The replica's scheduler, as continuous-batching servers run it, in plain data: sequences
//! and the KV block free list in, a step plan out. No I/O, no clock, no channel: the step
//! loop ([`super::Replica`]) sends the plan to the workers and reports back what they
//! computed.
//!
//! Each step takes running sequences first (a decode token each, or the next chunk of a
//! prefill), then admits waiting ones (their first prefill chunk) while the per-step token
//! budget, the cap on running sequences and the free KV blocks allow. The KV cache is paged:
//! a sequence gets blocks as it grows, and a plan names only the blocks appended since the
//! last one. When a running sequence needs a block and none is free, the most recently
//! admitted sequence is preempted (its blocks freed, its tokens kept: it goes back to the
//! front of the queue and is recomputed when it is admitted again).
//!
//! Pipeline parallelism: with `pp` stages the step loop keeps up to `pp` steps in flight, each
//! over its own sequences. A scheduled sequence is *busy* until its step's result is applied
//! ([`Scheduler::complete`]): it is in no other plan, and it is never preempted or removed
//! meanwhile. [`Scheduler::schedule`] takes `parts`, the number of steps still to form to fill
//! the pipeline, and gives this step its share of the sequences that can run (micro-batches
//! balanced by count; with `parts` 1 it takes all, as a single-stage replica does).
//!
//! Data-parallel attention: with `ranks` > 1 every rank of the replica has its own KV cache
//! (and prefix cache) of `kv_blocks` blocks and runs attention for its own sequences. A
//! sequence is admitted to one rank (the one holding the longest cached prefix of its tokens,
//! then the one with the most free blocks) and stays there; block ids are the rank's own; the
//! token budget and the cap hold per rank; a sequence that needs a block preempts the most
//! recently admitted sequence of its own rank.
//!
//! Invariants (unit-tested below): every block is either free or held by exactly one
//! sequence; a sequence's worker id is fresh after each admission and is freed on the
//! workers exactly once; a plan never exceeds the token budget or the cap; no sequence is in
//! two steps in flight.

use super::blocks::{chain, Blocks};
use std::collections::VecDeque;

/// What a scheduled sequence is to the scheduler: its length (prompt and generated tokens),
/// and for prefix caching its tokens and whether it may reuse cached blocks.
pub trait Tokens {
    fn num_tokens(&self) -> usize;
    /// Its tokens (the blocks it computes are cached under them); empty: none are cached.
    fn tokens(&self) -> &[u32] {
        &[]
    }
    /// Whether it may start from cached blocks (not when its prompt's rows are asked for).
    fn may_reuse(&self) -> bool {
        false
    }
}

/// The limits of one step.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Tokens per step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_seqs: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

/// A sequence and its place in the KV cache.
pub struct Entry<T> {
    pub seq: T,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Blocks already announced to the workers.
    sent_blocks: usize,
    /// Its id on the workers (new after each admission); 0 = not started.
    wid: u64,
    /// In a step in flight.
    busy: bool,
    /// Hashes of its full blocks computed so far (prefix caching).
    hashes: Vec<u64>,
    /// The rank whose cache holds it (data-parallel attention; 0 otherwise).
    rank: usize,
}

impl<T> Entry<T> {
    fn new(seq: T) -> Self {
        Entry {
            seq,
            computed: 0,
            blocks: Vec::new(),
            sent_blocks: 0,
            wid: 0,
            busy: false,
            hashes: Vec::new(),
            rank: 0,
        }
    }

    /// Tokens whose keys and values are in the cache.
    pub fn computed(&self) -> usize {
        self.computed
    }

    /// Its id on the workers (0 before its first step).
    pub fn wid(&self) -> u64 {
        self.wid
    }
}

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Index in [`Scheduler::running`] when the plan was made (indices move as sequences
    /// finish: a step's result finds its sequences by `wid`).
    pub index: usize,
    /// Its id on the workers.
    pub wid: u64,
    /// First position computed, and how many.
    pub start: usize,
    pub n: usize,
    /// Blocks appended since its previous step.
    pub new_blocks: Vec<u32>,
    /// Its first step since admission (the workers learn its sampling parameters).
    pub first: bool,
    /// Tokens this admission took from the prefix cache (0 after the first step).
    pub reused: usize,
    /// The rank that runs it (data-parallel attention; 0 otherwise).
    pub rank: usize,
}

/// What one step computes.
pub struct Plan<T> {
    pub slots: Vec<Slot>,
    /// Worker-side sequence ids to free with this step (finished or preempted sequences).
    pub free: Vec<u64>,
    /// Sequences that the whole cache cannot hold even alone: the caller ends them.
    pub too_long: Vec<T>,
    /// Tokens of the sequences admitted by this plan.
    pub admitted_tokens: usize,
    /// Sequences preempted to make room.
    pub preempted: usize,
    /// Tokens of the admitted sequences found in the prefix cache (not recomputed).
    pub reused_tokens: usize,
}

pub struct Scheduler<T> {
    budget: Budget,
    /// One pool per rank (one in all but data-parallel attention).
    blocks: Vec<Blocks>,
    /// Blocks per rank.
    kv_blocks: usize,
    waiting: VecDeque<Entry<T>>,
    running: Vec<Entry<T>>,
    next_wid: u64,
    /// Worker-side ids to free in the next plan.
    pending_free: Vec<u64>,
}

/// Where an admission goes: (rank, cached blocks it reuses, tokens of its first chunk, blocks
/// to allocate).
type Admit = (usize, Vec<(u64, u32)>, usize, usize);

enum Grow {
    Ok,
    /// The sequence itself was the most recent one and went back to the queue.
    SelfPreempted,
    /// Alone and still out of blocks.
    Impossible,
}

/// Whether the entries are in a step in flight.
fn is_busy<T>(e: &Entry<T>) -> bool {
    e.busy
}

impl<T: Tokens> Scheduler<T> {
    /// A scheduler over `kv_blocks` blocks; `prefix_caching` keeps computed full blocks for
    /// sequences that start with the same tokens.
    pub fn new(budget: Budget, kv_blocks: usize, prefix_caching: bool) -> Self {
        Self::with_ranks(budget, 1, kv_blocks, prefix_caching)
    }

    /// A scheduler for data-parallel attention over `ranks` ranks of `kv_blocks` blocks each;
    /// the budget's token budget and cap hold per rank.
    pub fn with_ranks(
        budget: Budget,
        ranks: usize,
        kv_blocks: usize,
        prefix_caching: bool,
    ) -> Self {
        Scheduler {
            budget: Budget {
                max_batch_tokens: budget.max_batch_tokens.max(1),
                max_seqs: budget.max_seqs.max(1),
                block_size: budget.block_size.max(1),
            },
            blocks: (0..ranks.max(1))
                .map(|_| Blocks::new(kv_blocks, prefix_caching))
                .collect(),
            kv_blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_wid: 1,
            pending_free: Vec::new(),
        }
    }

    /// Queues a new sequence behind the others.
    pub fn push_back(&mut self, seq: T) {
        self.waiting.push_back(Entry::new(seq));
    }

    /// Queues a sequence before the others (one that waited elsewhere already).
    pub fn push_front(&mut self, seq: T) {
        self.waiting.push_front(Entry::new(seq));
    }

    pub fn running(&self) -> &[Entry<T>] {
        &self.running
    }

    pub fn running_mut(&mut self) -> &mut [Entry<T>] {
        &mut self.running
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Sequences in steps in flight.
    pub fn num_busy(&self) -> usize {
        self.running.iter().filter(|e| is_busy(e)).count()
    }

    pub fn free_blocks(&self) -> usize {
        self.blocks.iter().map(Blocks::num_free).sum()
    }

    /// Blocks in the prefix cache.
    pub fn cached_blocks(&self) -> usize {
        self.blocks.iter().map(Blocks::num_cached).sum()
    }

    /// Ranks (each with its own KV cache).
    pub fn ranks(&self) -> usize {
        self.blocks.len()
    }

    /// Block hashes cached and evicted since the previous call (of every rank: the router
    /// sees the replica as one cache).
    pub fn cache_changes(&mut self) -> (Vec<u64>, Vec<u64>) {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for b in &mut self.blocks {
            let (a, r) = b.take_changes();
            added.extend(a);
            removed.extend(r);
        }
        (added, removed)
    }

    /// Plans the next step: this step's share (1 / `parts`) of the sequences that can run,
    /// running ones first, then admissions.
    pub fn schedule(&mut self, parts: usize) -> Plan<T> {
        let Budget {
            max_batch_tokens,
            max_seqs: cap,
            block_size: bs,
        } = self.budget;
        let ranks = self.blocks.len();
        // Tokens left this step, and running sequences, per rank.
        let mut budget = vec![max_batch_tokens; ranks];
        let mut held = vec![0usize; ranks];
        for e in &self.running {
            held[e.rank] += 1;
        }
        let mut plan = Plan {
            slots: Vec::new(),
            free: Vec::new(),
            too_long: Vec::new(),
            admitted_tokens: 0,
            preempted: 0,
            reused_tokens: 0,
        };
        let ready = self.running.len() - self.num_busy();
        let mut share = (ready + self.waiting.len()).div_ceil(parts.max(1));
        // (index in running, tokens this step)
        let mut sched: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget.iter().any(|&b| b > 0) && share > 0 {
            let e = &self.running[i];
            let r = e.rank;
            if e.busy || budget[r] == 0 {
                i += 1;
                continue;
            }
            let n = (e.seq.num_tokens() - e.computed).min(budget[r]);
            let end = e.computed + n;
            match self.grow(i, end, &mut plan.preempted) {
                Grow::Ok => {}
                // `i` went back to the queue; the entries after it are busy.
                Grow::SelfPreempted => continue,
                Grow::Impossible => {
                    let e = self.remove(i);
                    held[r] -= 1;
                    plan.too_long.push(e);
                    continue;
                }
            }
            sched.push((i, n));
            budget[r] -= n;
            share -= 1;
            i += 1;
        }
        // Preemptions moved sequences back to the queue.
        held.iter_mut().for_each(|h| *h = 0);
        for e in &self.running {
            held[e.rank] += 1;
        }
        // Admit waiting sequences while blocks for their first chunk are free.
        while share > 0 {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let len = front.seq.num_tokens();
            // One the whole cache of a rank cannot hold would wait forever (and hold up those
            // behind it): it goes back with its error.
            if len.div_ceil(bs) > self.kv_blocks {
                let e = self.waiting.pop_front().expect("front exists");
                plan.too_long.push(e.seq);
                continue;
            }
            // The rank to admit it to: among those with budget, room under the cap and the
            // blocks for its first chunk, the one holding the longest cached prefix of its
            // tokens (whole blocks, and at least one token left to compute: the step must give
            // the last row's logits), then the one with the most free blocks.
            // (rank, cached blocks it reuses, tokens of its first chunk, blocks to allocate)
            let mut best: Option<Admit> = None;
            for r in 0..ranks {
                if budget[r] == 0 || held[r] >= cap {
                    continue;
                }
                let blocks = &self.blocks[r];
                let hits = if front.seq.may_reuse() && blocks.caching() {
                    blocks.lookup(front.seq.tokens(), bs, len.saturating_sub(1) / bs)
                } else {
                    vec![]
                };
                let reused = hits.len() * bs;
                let n = (len - reused).min(budget[r]);
                let need = (reused + n).div_ceil(bs) - hits.len();
                if need + blocks.evictable_among(&hits) > blocks.num_free() {
                    continue;
                }
                let better = match &best {
                    None => true,
                    Some((b, h, _, _)) => {
                        (hits.len(), blocks.num_free()) > (h.len(), self.blocks[*b].num_free())
                    }
                };
                if better {
                    best = Some((r, hits, n, need));
                }
            }
            let Some((r, hits, n, need)) = best else {
                break;
            };
            let reused = hits.len() * bs;
            let mut e = self.waiting.pop_front().expect("front exists");
            let blocks = &mut self.blocks[r];
            blocks.take(&hits);
            e.blocks = hits.iter().map(|h| h.1).collect();
            e.hashes = hits.iter().map(|h| h.0).collect();
            e.computed = reused;
            e.rank = r;
            for _ in 0..need {
                e.blocks.push(blocks.alloc().expect("counted"));
            }
            plan.admitted_tokens += e.seq.num_tokens();
            plan.reused_tokens += reused;
            self.running.push(e);
            sched.push((self.running.len() - 1, n));
            budget[r] -= n;
            held[r] += 1;
            share -= 1;
        }
        for (index, n) in sched {
            let e = &mut self.running[index];
            let first = e.wid == 0;
            if first {
                e.wid = self.next_wid;
                self.next_wid += 1;
            }
            e.busy = true;
            plan.slots.push(Slot {
                index,
                wid: e.wid,
                start: e.computed,
                n,
                new_blocks: e.blocks[e.sent_blocks..].to_vec(),
                first,
                reused: if first { e.computed } else { 0 },
                rank: e.rank,
            });
            e.sent_blocks = e.blocks.len();
        }
        plan.free = std::mem::take(&mut self.pending_free);
        plan
    }

    /// Records that the workers computed `slot` (its step's result arrived): the sequence is
    /// no longer busy. Returns its index in [`Scheduler::running`] now.
    pub fn complete(&mut self, slot: &Slot) -> Option<usize> {
        let i = self
            .running
            .iter()
            .position(|e| e.wid == slot.wid && e.busy)?;
        let bs = self.budget.block_size;
        let e = &mut self.running[i];
        e.computed += slot.n;
        e.busy = false;
        // Blocks now full are computed: cache them under their tokens.
        let blocks = &mut self.blocks[e.rank];
        if blocks.caching() {
            let tokens = e.seq.tokens();
            while e.hashes.len() < e.computed / bs && tokens.len() >= (e.hashes.len() + 1) * bs {
                let j = e.hashes.len();
                let prev = e.hashes.last().copied().unwrap_or(0);
                let h = chain(prev, &tokens[j * bs..(j + 1) * bs]);
                e.hashes.push(h);
                blocks.register(h, e.blocks[j]);
            }
        }
        Some(i)
    }

    /// Ends `running[index]`: its blocks are free and its worker state is freed with the next
    /// plan. (Indices after it shift down: end the highest first.)
    pub fn finish(&mut self, index: usize) -> T {
        self.remove(index)
    }

    /// Ends every sequence, running (but not busy) or waiting, that `drop` selects (their
    /// blocks freed), returning them: running ones first. A busy one is ended once its step
    /// is complete.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].busy && drop(&self.running[i].seq) {
                out.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        let (gone, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|e| drop(&e.seq));
        self.waiting = keep;
        for mut e in gone {
            self.release(&mut e);
            out.push(e.seq);
        }
        out
    }

    /// Takes every sequence out (the workers' state is gone: a fault): running ones, then
    /// waiting ones, in order. The cache is empty after.
    pub fn drain(&mut self) -> (Vec<T>, Vec<T>) {
        let running = self.running.drain(..).map(|e| e.seq).collect();
        let waiting = self.waiting.drain(..).map(|e| e.seq).collect();
        // The workers' caches are gone with their state: so is the prefix cache.
        let caching = self.blocks[0].caching();
        for b in &mut self.blocks {
            *b = Blocks::new(self.kv_blocks, caching);
        }
        self.pending_free.clear();
        (running, waiting)
    }

    fn remove(&mut self, index: usize) -> T {
        let mut e = self.running.remove(index);
        self.release(&mut e);
        e.seq
    }

    fn release(&mut self, e: &mut Entry<T>) {
        self.blocks[e.rank].release(&mut e.blocks);
        e.hashes.clear();
        e.sent_blocks = 0;
        e.computed = 0;
        if e.wid != 0 {
            self.pending_free.push(e.wid);
            e.wid = 0;
        }
    }

    /// Gives `running[i]` blocks for `positions`, preempting the most recently admitted
    /// sequences that are not busy when none are free (sequence `i` itself when it is the most
    /// recent of those).
    fn grow(&mut self, i: usize, positions: usize, preempted: &mut usize) -> Grow {
        let bs = self.budget.block_size;
        let r = self.running[i].rank;
        while self.running[i].blocks.len() * bs < positions {
            if let Some(b) = self.blocks[r].alloc() {
                self.running[i].blocks.push(b);
                continue;
            }
            if self.running.iter().filter(|e| e.rank == r).count() == 1 {
                return Grow::Impossible;
            }
            // `i` is not busy, so there is one; it is `i` or one of its rank admitted after it.
            let j = (i..self.running.len())
                .rev()
                .find(|&j| !self.running[j].busy && self.running[j].rank == r)
                .unwrap_or(i);
            let mut victim = self.running.remove(j);
            self.release(&mut victim);
            *preempted += 1;
            self.waiting.push_front(victim);
            if j == i {
                return Grow::SelfPreempted;
            }
        }
        Grow::Ok
    }

    /// Checks the invariants (tests): every block free, held or cached (see
    /// [`Blocks::check`]), ids unique.
    #[cfg(test)]
    fn check(&self) {
        for (r, blocks) in self.blocks.iter().enumerate() {
            let held: Vec<u32> = self
                .running
                .iter()
                .chain(&self.waiting)
                .filter(|e| e.rank == r)
                .flat_map(|e| e.blocks.iter().copied())
                .collect();
            blocks.check(&held);
        }
        assert!(self
            .waiting
            .iter()
            .all(|e| e.blocks.is_empty() && e.wid == 0));
        let mut wids: Vec<u64> = self
            .running
            .iter()
            .map(|e| e.wid)
            .filter(|&w| w != 0)
            .collect();
        wids.extend(&self.pending_free);
        let n = wids.len();
        wids.sort_unstable();
        wids.dedup();
        assert_eq!(wids.len(), n, "a worker id in use twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence of `len` tokens that generates up to `max` more.
    #[derive(Debug, Clone, PartialEq)]
    struct S {
        id: usize,
        len: usize,
    }

    impl Tokens for S {
        fn num_tokens(&self) -> usize {
            self.len
        }
    }

    fn sched(max_batch_tokens: usize, max_seqs: usize, kv_blocks: usize) -> Scheduler<S> {
        Scheduler::new(
            Budget {
                max_batch_tokens,
                max_seqs,
                block_size: 4,
            },
            kv_blocks,
            false,
        )
    }

    /// Runs one step as the replica does: every slot computed, and the sequences whose
    /// last token was computed get one more token.
    fn step(s: &mut Scheduler<S>) -> Plan<S> {
        let plan = s.schedule(1);
        apply(s, &plan);
        plan
    }

    /// Applies a plan's result as the replica does.
    fn apply(s: &mut Scheduler<S>, plan: &Plan<S>) {
        for slot in &plan.slots {
            let i = s
                .complete(slot)
                .expect("a scheduled sequence is running and busy");
            let e = &mut s.running_mut()[i];
            if e.computed() == e.seq.len {
                e.seq.len += 1;
            }
        }
        s.check();
    }

    #[test]
    fn decodes_go_first_and_prefill_is_chunked_under_the_budget() {
        let mut s = sched(8, 4, 64);
        s.push_back(S { id: 0, len: 3 });
        let p = step(&mut s);
        assert_eq!(p.slots.len(), 1);
        assert_eq!(
            (p.slots[0].start, p.slots[0].n, p.slots[0].first),
            (0, 3, true)
        );
        assert_eq!(p.admitted_tokens, 3);
        // A 20-token prompt arrives: the running sequence's decode token first, then 7 of it.
        s.push_back(S { id: 1, len: 20 });
        let p = step(&mut s);
        let parts: Vec<(usize, usize, usize)> =
            p.slots.iter().map(|x| (x.index, x.start, x.n)).collect();
        assert_eq!(parts, vec![(0, 3, 1), (1, 0, 7)]);
        assert!(!p.slots[0].first && p.slots[1].first);
        // Then 7 and 6 more: the prefill completes in chunks, never over the budget.
        let p = step(&mut s);
        assert_eq!(p.slots[1].start, 7);
        assert!(p.slots.iter().map(|x| x.n).sum::<usize>() <= 8);
        let p = step(&mut s);
        assert_eq!((p.slots[1].start, p.slots[1].n), (14, 6));
        let p = step(&mut s);
        assert_eq!(p.slots.iter().map(|x| x.n).collect::<Vec<_>>(), vec![1, 1]);
    }

    #[test]
    fn the_cap_and_the_free_blocks_bound_admission() {
        let mut s = sched(100, 2, 64);
        for id in 0..3 {
            s.push_back(S { id, len: 4 });
        }
        let p = step(&mut s);
        assert_eq!(p.slots.len(), 2);
        assert_eq!(s.num_waiting(), 1);
        // Two blocks only: the second 8-token prompt waits for the first to finish.
        let mut s = sched(100, 4, 3);
        s.push_back(S { id: 0, len: 8 });
        s.push_back(S { id: 1, len: 8 });
        let p = step(&mut s);
        assert_eq!(p.slots.len(), 1);
        assert_eq!(s.free_blocks(), 1);
        let done = s.finish(0);
        assert_eq!(done.id, 0);
        assert_eq!(s.free_blocks(), 3);
        let p = step(&mut s);
        assert_eq!(
            p.free,
            vec![1],
            "the finished sequence's worker state is freed"
        );
        assert_eq!((p.slots.len(), p.slots[0].wid), (1, 2));
    }

    #[test]
    fn out_of_blocks_preempts_the_most_recent_and_recomputes_it_later() {
        // 4 blocks of 4 tokens; two sequences of 7 tokens hold 2 each.
        let mut s = sched(100, 4, 4);
        s.push_back(S { id: 0, len: 7 });
        s.push_back(S { id: 1, len: 7 });
        let p = step(&mut s);
        assert_eq!(p.slots.len(), 2);
        assert_eq!(s.free_blocks(), 0);
        // Both reach 8 tokens (fits); at 9 the first needs a third block: the second goes.
        step(&mut s);
        let p = step(&mut s);
        assert_eq!(p.preempted, 1);
        assert_eq!(p.slots.len(), 1);
        assert_eq!(p.slots[0].new_blocks.len(), 1);
        assert_eq!(
            p.free,
            vec![2],
            "the preempted sequence's worker state is freed"
        );
        assert_eq!(s.num_waiting(), 1);
        // Once the first finishes, the second is admitted again from position 0 (new id).
        s.finish(0);
        let p = step(&mut s);
        assert_eq!(p.slots.len(), 1);
        assert_eq!((p.slots[0].start, p.slots[0].n, p.slots[0].wid), (0, 9, 3));
        assert!(p.slots[0].first);
    }

    #[test]
    fn a_sequence_the_whole_cache_cannot_hold_is_returned() {
        let mut s = sched(100, 4, 2);
        s.push_back(S { id: 7, len: 8 });
        step(&mut s);
        let p = step(&mut s);
        assert_eq!(p.too_long.len(), 1);
        assert_eq!(p.too_long[0].id, 7);
        assert!(p.slots.is_empty());
        assert_eq!(s.free_blocks(), 2);
        assert_eq!(p.free, vec![1]);
    }

    #[test]
    fn a_prompt_longer_than_the_whole_cache_is_returned_at_once_and_holds_up_nothing() {
        // 3 blocks of 4 tokens: a 13-token prompt can never be admitted.
        let mut s = sched(100, 4, 3);
        s.push_back(S { id: 1, len: 13 });
        s.push_back(S { id: 2, len: 5 });
        let p = step(&mut s);
        assert_eq!(p.too_long.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(p.slots.len(), 1, "the sequence behind it runs");
        assert_eq!((p.slots[0].start, p.slots[0].n), (0, 5));
    }

    #[test]
    fn cancelled_and_drained_sequences_give_their_blocks_back() {
        let mut s = sched(6, 4, 16);
        for id in 0..4 {
            s.push_back(S { id, len: 5 });
        }
        step(&mut s);
        let gone = s.remove_where(|x| x.id % 2 == 1);
        assert_eq!(gone.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 3]);
        s.check();
        let (running, waiting) = s.drain();
        assert_eq!(running.len() + waiting.len(), 2);
        assert_eq!(s.free_blocks(), 16);
        assert!(s.is_idle());
        assert!(s.schedule(1).free.is_empty());
    }

    #[test]
    fn steps_in_flight_take_disjoint_shares() {
        let mut s = sched(100, 8, 64);
        for id in 0..5 {
            s.push_back(S { id, len: 3 });
        }
        step(&mut s);
        // Two stages: the first step takes half (3 of 5), the second the rest.
        let a = s.schedule(2);
        assert_eq!(a.slots.len(), 3);
        let b = s.schedule(1);
        assert_eq!(b.slots.len(), 2);
        let wa: Vec<u64> = a.slots.iter().map(|x| x.wid).collect();
        assert!(b.slots.iter().all(|x| !wa.contains(&x.wid)));
        // Everything is in flight: nothing more to plan, nothing cancellable meanwhile.
        assert!(s.schedule(1).slots.is_empty());
        assert_eq!(s.num_busy(), 5);
        assert!(s.remove_where(|_| true).is_empty());
        // Results arrive in order; a sequence of the first step finishing moves the indices
        // of the second step's sequences, whose result still finds them.
        apply(&mut s, &a);
        s.finish(a.slots[0].index);
        apply(&mut s, &b);
        assert_eq!(s.num_busy(), 0);
        assert_eq!(s.running().len(), 4);
    }

    #[test]
    fn busy_sequences_are_never_preempted() {
        // 4 blocks of 4 tokens: a 2-token sequence holds one, a 12-token one three.
        let mut s = sched(100, 4, 4);
        s.push_back(S { id: 0, len: 2 });
        s.push_back(S { id: 1, len: 12 });
        step(&mut s);
        assert_eq!(s.free_blocks(), 0);
        // Two stages: the first (still within its block) is in flight; the second needs a
        // fourth block: it goes back to the queue itself, the busy one keeps its blocks.
        let one = s.schedule(2);
        assert_eq!(one.slots.len(), 1);
        assert_eq!(one.slots[0].index, 0);
        let p = s.schedule(1);
        assert!(p.slots.is_empty());
        assert_eq!(p.preempted, 1);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.running().len(), 1);
        assert_eq!(s.running()[0].wid(), one.slots[0].wid);
        apply(&mut s, &one);
    }

    #[test]
    fn random_pipelines_keep_every_invariant() {
        let mut rng = grok_shared::sampling::Rng::new(5);
        for round in 0..30 {
            let depth = 1 + (rng.next_u64() % 3) as usize;
            let cap = 1 + (rng.next_u64() % 8) as usize;
            let budget = 1 + (rng.next_u64() % 40) as usize;
            let blocks = 8 + (rng.next_u64() % 24) as usize;
            let mut s = sched(budget, cap, blocks);
            let mut inflight: std::collections::VecDeque<Plan<S>> = Default::default();
            let mut next = 0;
            for _ in 0..300 {
                if rng.next_u64().is_multiple_of(3) {
                    let len = 1 + (rng.next_u64() % 40) as usize;
                    s.push_back(S { id: next, len });
                    next += 1;
                }
                while inflight.len() < depth {
                    let p = s.schedule(depth - inflight.len());
                    s.check();
                    let tokens: usize = p.slots.iter().map(|x| x.n).sum();
                    assert!(
                        tokens <= budget,
                        "round {round}: {tokens} tokens > {budget}"
                    );
                    for q in &inflight {
                        assert!(
                            p.slots
                                .iter()
                                .all(|x| q.slots.iter().all(|y| y.wid != x.wid)),
                            "round {round}: a sequence in two steps in flight"
                        );
                    }
                    if p.slots.is_empty() {
                        break;
                    }
                    inflight.push_back(p);
                }
                assert!(s.running().len() <= cap);
                if let Some(p) = inflight.pop_front() {
                    apply(&mut s, &p);
                }
                if !s.running().is_empty() && rng.next_u64().is_multiple_of(4) {
                    let i = (rng.next_u64() as usize) % s.running().len();
                    if s.running()[i].busy {
                        continue;
                    }
                    s.finish(i);
                    s.check();
                }
            }
        }
    }

    /// A sequence with real tokens, for the prefix cache.
    #[derive(Debug, Clone)]
    struct P {
        toks: Vec<u32>,
        reuse: bool,
    }

    impl Tokens for P {
        fn num_tokens(&self) -> usize {
            self.toks.len()
        }
        fn tokens(&self) -> &[u32] {
            &self.toks
        }
        fn may_reuse(&self) -> bool {
            self.reuse
        }
    }

    fn cached(kv_blocks: usize) -> Scheduler<P> {
        Scheduler::new(
            Budget {
                max_batch_tokens: 100,
                max_seqs: 8,
                block_size: 4,
            },
            kv_blocks,
            true,
        )
    }

    /// One step as the replica runs it; sequences that reached `stop` tokens finish.
    fn step_p(s: &mut Scheduler<P>, stop: usize) -> Plan<P> {
        let plan = s.schedule(1);
        for slot in &plan.slots {
            let i = s.complete(slot).unwrap();
            let e = &mut s.running_mut()[i];
            if e.computed() == e.seq.toks.len() {
                let next = 7 + e.seq.toks.len() as u32;
                e.seq.toks.push(next);
            }
        }
        let mut i = s.running().len();
        while i > 0 {
            i -= 1;
            if s.running()[i].seq.toks.len() >= stop {
                s.finish(i);
            }
        }
        s.check();
        plan
    }

    #[test]
    fn a_shared_prefix_is_computed_once() {
        let mut s = cached(16);
        let prompt: Vec<u32> = (1..=10).collect();
        s.push_back(P {
            toks: prompt.clone(),
            reuse: true,
        });
        let p = step_p(&mut s, 12);
        assert_eq!(
            (p.slots[0].start, p.slots[0].n, p.reused_tokens),
            (0, 10, 0)
        );
        // Its two full blocks (positions 0..8) are cached now; a request with the same
        // prompt starts at position 8 on them.
        s.push_back(P {
            toks: prompt.clone(),
            reuse: true,
        });
        let p = step_p(&mut s, 12);
        let second = p.slots.iter().find(|x| x.first).unwrap();
        assert_eq!((second.start, second.n, second.reused), (8, 2, 8));
        assert_eq!(p.reused_tokens, 8);
        assert_eq!(
            second.new_blocks.len(),
            3,
            "the two shared blocks and a new one"
        );
        // A prompt of exactly two blocks reuses one: its last token is computed again.
        s.push_back(P {
            toks: prompt[..8].to_vec(),
            reuse: true,
        });
        let p = step_p(&mut s, 12);
        let third = p.slots.iter().find(|x| x.first).unwrap();
        assert_eq!((third.start, third.n), (4, 4));
        // One that may not reuse (its prompt's rows are asked for) computes everything.
        s.push_back(P {
            toks: prompt.clone(),
            reuse: false,
        });
        let p = step_p(&mut s, 12);
        let fourth = p.slots.iter().find(|x| x.first).unwrap();
        assert_eq!((fourth.start, fourth.reused), (0, 0));
        assert!(s.cached_blocks() >= 2);
    }

    #[test]
    fn cached_blocks_are_evicted_only_when_space_is_needed() {
        // 4 blocks: a 9-token prompt caches 2 of them, then finishes (they stay cached).
        let mut s = cached(4);
        s.push_back(P {
            toks: (1..=9).collect(),
            reuse: true,
        });
        step_p(&mut s, 10);
        assert!(s.running().is_empty());
        assert_eq!(s.cached_blocks(), 2);
        assert_eq!(
            s.free_blocks(),
            4,
            "cached blocks no one holds can be handed out"
        );
        // A different 16-token prompt needs all 4 blocks: the cached ones are evicted.
        s.push_back(P {
            toks: (100..116).collect(),
            reuse: true,
        });
        let p = step_p(&mut s, 17);
        assert_eq!(p.slots[0].n, 16);
        // The first prompt finds nothing cached any more... once the second has gone, its own
        // blocks are cached instead.
        s.push_back(P {
            toks: (1..=9).collect(),
            reuse: true,
        });
        let p = step_p(&mut s, 100);
        let again = p.slots.iter().find(|x| x.first);
        assert!(again.is_none_or(|x| x.reused == 0), "{:?}", p.slots);
    }

    #[test]
    fn random_prefix_sharing_keeps_every_invariant() {
        let mut rng = grok_shared::sampling::Rng::new(9);
        let prefixes: Vec<Vec<u32>> = (0..4)
            .map(|k| (0..(3 + k * 5)).map(|i| (k * 100 + i) as u32).collect())
            .collect();
        for round in 0..20 {
            let blocks = 6 + (rng.next_u64() % 20) as usize;
            let mut s = cached(blocks);
            let mut reused = 0;
            for _ in 0..200 {
                if rng.next_u64().is_multiple_of(2) {
                    let mut toks = prefixes[(rng.next_u64() % 4) as usize].clone();
                    toks.extend((0..rng.next_u64() % 6).map(|i| 500 + i as u32));
                    s.push_back(P {
                        toks,
                        reuse: !rng.next_u64().is_multiple_of(5),
                    });
                }
                let p = step_p(&mut s, 20);
                reused += p.reused_tokens;
                for x in &p.slots {
                    assert!(x.n > 0, "round {round}: an empty slot");
                }
            }
            assert!(
                reused > 0,
                "round {round}: shared prefixes were never reused"
            );
        }
    }

    #[test]
    fn random_loads_keep_every_invariant() {
        let mut rng = grok_shared::sampling::Rng::new(11);
        for round in 0..40 {
            let cap = 1 + (rng.next_u64() % 6) as usize;
            let budget = 1 + (rng.next_u64() % 40) as usize;
            let blocks = 8 + (rng.next_u64() % 24) as usize;
            let mut s = sched(budget, cap, blocks);
            let mut next = 0;
            for _ in 0..200 {
                if rng.next_u64().is_multiple_of(3) {
                    let len = 1 + (rng.next_u64() % 40) as usize;
                    s.push_back(S { id: next, len });
                    next += 1;
                }
                let p = step(&mut s);
                let tokens: usize = p.slots.iter().map(|x| x.n).sum();
                assert!(
                    tokens <= budget,
                    "round {round}: {tokens} tokens > {budget}"
                );
                assert!(s.running().len() <= cap);
                // Finish a random running sequence now and then.
                if !s.running().is_empty() && rng.next_u64().is_multiple_of(4) {
                    let i = (rng.next_u64() as usize) % s.running().len();
                    s.finish(i);
                    s.check();
                }
            }
        }
    }

    /// Data-parallel attention: the cap, the token budget and the blocks hold per rank, every
    /// block is its rank's, admissions go to the rank with the most free blocks, and a
    /// sequence out of blocks preempts one of its own rank only.
    #[test]
    fn random_loads_over_ranks_keep_every_invariant() {
        let mut rng = grok_shared::sampling::Rng::new(13);
        for round in 0..40 {
            let ranks = 2 + (rng.next_u64() % 3) as usize;
            let cap = 1 + (rng.next_u64() % 4) as usize;
            let budget = 1 + (rng.next_u64() % 30) as usize;
            let blocks = 6 + (rng.next_u64() % 16) as usize;
            let mut s = Scheduler::with_ranks(
                Budget {
                    max_batch_tokens: budget,
                    max_seqs: cap,
                    block_size: 4,
                },
                ranks,
                blocks,
                false,
            );
            let mut next = 0;
            let mut used = vec![false; ranks];
            for _ in 0..200 {
                if rng.next_u64().is_multiple_of(2) {
                    let len = 1 + (rng.next_u64() % 30) as usize;
                    s.push_back(S { id: next, len });
                    next += 1;
                }
                let p = step(&mut s);
                for r in 0..ranks {
                    let mine: Vec<&Slot> = p.slots.iter().filter(|x| x.rank == r).collect();
                    let tokens: usize = mine.iter().map(|x| x.n).sum();
                    assert!(
                        tokens <= budget,
                        "round {round}: rank {r}: {tokens} > {budget}"
                    );
                    used[r] |= !mine.is_empty();
                    let held = s.running().iter().filter(|e| e.rank == r).count();
                    assert!(held <= cap, "round {round}: rank {r} runs {held} > {cap}");
                }
                for x in &p.slots {
                    assert!(x.new_blocks.iter().all(|&b| (b as usize) < blocks));
                }
                if !s.running().is_empty() && rng.next_u64().is_multiple_of(4) {
                    let i = (rng.next_u64() as usize) % s.running().len();
                    s.finish(i);
                    s.check();
                }
            }
            assert!(used.iter().all(|&u| u), "round {round}: a rank never ran");
        }
        // Two ranks of 2 blocks: two 8-token prompts go to different ranks, where one rank
        // would hold only one of them.
        let mut s = Scheduler::with_ranks(
            Budget {
                max_batch_tokens: 100,
                max_seqs: 4,
                block_size: 4,
            },
            2,
            2,
            false,
        );
        s.push_back(S { id: 0, len: 8 });
        s.push_back(S { id: 1, len: 8 });
        let p = step(&mut s);
        let mut r: Vec<usize> = p.slots.iter().map(|x| x.rank).collect();
        r.sort_unstable();
        assert_eq!(r, vec![0, 1]);
        assert_eq!(s.free_blocks(), 0);
    }
}
