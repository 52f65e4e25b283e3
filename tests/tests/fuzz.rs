//! Fuzzing of every parser fed by files or the network, on the stable toolchain (no cargo-fuzz,
//! no nightly): a seeded mutation engine starts from valid inputs made here (ckpt-0 pickles as
//! numpy writes them, safetensors files and an index from the project's writers, `config.json`
//! from `ModelConfig::to_hf_json`, a pre-sharded `manifest.json`, tokenizer text, the HTTP API's
//! JSON bodies, and the `StepPlan` / `LoadRequest` messages a worker receives) and checks the
//! parsers' contract (ARCHITECTURE.md, Invariants) on every input:
//!
//! - no panic (each input runs under `catch_unwind`);
//! - no allocation sized by an unchecked length: a global allocator records the largest single
//!   allocation while an input is parsed, which must stay under `FLOOR + 16 x` the input's size
//!   (plus the size of the files it names);
//! - each rejection a clear error (a non-empty message; parsed values are checked against the
//!   input where they can be, so garbage does not pass as `Ok`).
//!
//! Mutations: bit flips, interesting bytes (0, 0xff, 0x7f, 0x80) and little-endian u32/u64
//! lengths, truncation, insertion, deletion and duplication of chunks, splices from other seeds,
//! and for JSON a structure-aware pass (huge, negative and fractional numbers, wrong types, deep
//! nesting, long strings, missing and unknown keys) before the byte-level one.
//!
//! Bounded by default (about 30 s for the whole binary on two cores). `GROK_FUZZ_ITERS=N`
//! multiplies every target's iterations by N for long runs; `GROK_FUZZ_SEED=S` fixes the seed
//! (by default each run draws one and prints it). A failure prints the target, the seed and the
//! iteration, and writes the failing input under the system temp dir.

use grok_shared::sampling::Rng;
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// The allocation watch

struct Watch;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-locals may be gone while a thread exits.
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; `note` only touches const-initialized
// thread-locals without destructors, so it never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Watch = Watch;

/// Runs `f` with the watch on (this thread only); returns its result and the largest single
/// allocation it made.
fn watched<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    WATCHING.with(|w| w.set(true));
    let r = f();
    WATCHING.with(|w| w.set(false));
    (r, LARGEST.with(|m| m.get()))
}

/// Allocations up to this size are always allowed (buffers of fixed size, thread pools).
const FLOOR: usize = 4 << 20;

// ---------------------------------------------------------------------------------------------
// The harness

fn env_usize(k: &str) -> Option<u64> {
    let v = std::env::var(k).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The run's seed: GROK_FUZZ_SEED, else drawn from the clock.
fn base_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        env_usize("GROK_FUZZ_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ (std::process::id() as u64) << 32
        })
    })
}

fn iters(default: usize) -> usize {
    default * env_usize("GROK_FUZZ_ITERS").unwrap_or(1).max(1) as usize
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The fuzzer's generator.
struct R(Rng);

impl R {
    fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `0..n` (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.u64() % n as u64) as usize
        }
    }
    /// True with probability `p` in percent.
    fn pct(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// Runs `check` on `iters(default_iters)` inputs from `gen`. `check` returns how many bytes
/// of files the input names (added to its size for the allocation bound), or the contract it
/// broke. A panic, a broken contract or an oversized allocation fails the test with everything
/// needed to reproduce it.
fn fuzz(
    target: &str,
    default_iters: usize,
    mut gen: impl FnMut(&mut R) -> Vec<u8>,
    mut check: impl FnMut(&[u8]) -> Result<usize, String>,
) {
    let seed = base_seed() ^ fnv(target);
    let n = iters(default_iters);
    REJECTED.with(|r| r.set(0));
    SAMPLES.with(|v| v.borrow_mut().clear());
    let mut r = R(Rng::new(seed));
    let t = Instant::now();
    let mut largest_seen = 0;
    for it in 0..n {
        let input = gen(&mut r);
        let (res, largest) =
            watched(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input))));
        largest_seen = largest_seen.max(largest);
        let failure = match res {
            Err(p) => Some(format!("panicked: {}", panic_text(&*p))),
            Ok(Err(why)) => Some(why),
            Ok(Ok(extra)) => {
                let limit = FLOOR + 16 * (input.len() + extra);
                (largest > limit).then(|| {
                    format!("allocated {largest} bytes at once (limit {limit} for this input)")
                })
            }
        };
        if let Some(why) = failure {
            let path =
                std::env::temp_dir().join(format!("grok-fuzz-{target}-{:x}-{it}.bin", base_seed()));
            let _ = std::fs::write(&path, &input);
            panic!(
                "fuzz target `{target}`: {why}\n  GROK_FUZZ_SEED={:#x} (target seed {seed:#x}), iteration {it}\n  input ({} bytes) written to {}",
                base_seed(),
                input.len(),
                path.display()
            );
        }
    }
    let rejected = REJECTED.with(|r| r.get());
    eprintln!(
        "fuzz {target}: {n} inputs ({rejected} rejected with an error, at least one step) in {:.1} s, largest allocation {largest_seen} bytes, GROK_FUZZ_SEED={:#x}",
        t.elapsed().as_secs_f64(),
        base_seed()
    );
    SAMPLES.with(|v| {
        for m in v.borrow().iter() {
            eprintln!("  {target} error: {m}");
        }
    });
}

thread_local! {
    /// Inputs rejected (with a clear error) by the current target, and a few of the messages.
    static REJECTED: Cell<usize> = const { Cell::new(0) };
    static SAMPLES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An error message must say something. Counts the rejection.
fn clear(e: impl std::fmt::Display) -> Result<(), String> {
    let m = e.to_string();
    if m.trim().is_empty() {
        return Err("rejected with an empty error message".into());
    }
    REJECTED.with(|r| r.set(r.get() + 1));
    if std::env::var_os("GROK_FUZZ_VERBOSE").is_some() {
        SAMPLES.with(|v| {
            let mut v = v.borrow_mut();
            let head: String = m.chars().take(160).collect();
            if v.len() < 12 && !v.contains(&head) {
                v.push(head);
            }
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mutations

const BYTES: [u8; 9] = [0, 1, 0x7f, 0x80, 0xff, b'(', b'.', b'\n', b'"'];
const U32S: [u32; 11] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    1 << 20,
    1 << 24,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
];
const U64S: [u64; 7] = [
    u64::MAX,
    1 << 62,
    1 << 40,
    i64::MAX as u64,
    1 << 63,
    100 << 20,
    (1 << 32) + 1,
];

/// A position in `0..len`, inside `focus` most of the time (headers are where lengths live).
fn at(r: &mut R, len: usize, focus: usize) -> usize {
    if len == 0 {
        0
    } else if focus > 0 && r.pct(75) {
        r.below(focus.min(len))
    } else {
        r.below(len)
    }
}

/// One to four byte-level mutations of `b`; `others` are splice sources.
fn mutate_bytes(r: &mut R, b: &mut Vec<u8>, focus: usize, others: &[&[u8]]) {
    let cap = 4 * b.len() + 4096;
    for _ in 0..1 + r.below(4) {
        let len = b.len();
        let p = at(r, len, focus);
        match r.below(10) {
            0 if len > 0 => b[p] ^= 1 << r.below(8),
            1 if len > 0 => b[p] = *r.pick(&BYTES),
            2 if len > 0 => b[p] = r.u64() as u8,
            3 if len >= 4 => {
                let p = p.min(len - 4);
                let v = *r.pick(&U32S);
                b[p..p + 4].copy_from_slice(&v.to_le_bytes());
            }
            4 if len >= 8 => {
                let p = p.min(len - 8);
                let v = if r.pct(20) {
                    len as u64 + r.below(64) as u64
                } else {
                    *r.pick(&U64S)
                };
                b[p..p + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 => b.truncate(p),
            6 if len > 0 && len < cap => {
                let a = r.below(len);
                let n = 1 + r.below((len - a).min(256));
                let chunk = b[a..a + n].to_vec();
                let times = if r.pct(10) { 1 + r.below(32) } else { 1 };
                for _ in 0..times {
                    b.splice(p..p, chunk.iter().copied());
                }
            }
            7 if len < cap => {
                let n = 1 + r.below(16);
                let ins: Vec<u8> = (0..n).map(|_| r.u64() as u8).collect();
                b.splice(p..p, ins);
            }
            8 if len > 0 => {
                let n = 1 + r.below((len - p).min(64));
                b.drain(p..p + n);
            }
            9 if !others.is_empty() && len < cap => {
                let o = *r.pick(others);
                if !o.is_empty() {
                    let a = r.below(o.len());
                    let n = 1 + r.below((o.len() - a).min(128));
                    b.splice(p..p, o[a..a + n].iter().copied());
                }
            }
            _ => {}
        }
    }
}

/// A hostile JSON value.
fn odd_value(r: &mut R, near: &Value) -> Value {
    match r.below(20) {
        0 => json!(u64::MAX),
        1 => json!(i64::MIN),
        2 => json!(-1),
        3 => json!(1e308),
        4 => json!(-1e308),
        5 => json!(1.5),
        6 => json!(0),
        7 => json!((1u64 << 53) + 1),
        8 => json!(1u64 << 32),
        9 => json!(u32::MAX),
        10 => json!("x"),
        11 => json!(""),
        12 => Value::String("a".repeat(r.below(1 << 16))),
        13 => json!(true),
        14 => Value::Null,
        15 => json!([]),
        16 => json!({}),
        17 => {
            // Nested past serde_json's recursion limit (128) now and then.
            let mut v = json!(1);
            for _ in 0..1 + r.below(200) {
                v = json!([v]);
            }
            v
        }
        18 => Value::Array(vec![near.clone(); 1 + r.below(64)]),
        _ => Value::String(
            (0..r.below(64))
                .map(|_| char::from_u32(r.below(0x11_0000) as u32).unwrap_or('\u{fffd}'))
                .collect(),
        ),
    }
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// Mutates the `k`-th node of `v` in pre-order; false when `v` has fewer nodes.
fn mutate_node(r: &mut R, v: &mut Value, k: &mut usize) -> bool {
    if *k == 0 {
        mutate_here(r, v);
        return true;
    }
    *k -= 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| mutate_node(r, x, k)),
        Value::Object(o) => o.values_mut().any(|x| mutate_node(r, x, k)),
        _ => false,
    }
}

/// One to three structure-aware mutations of `v`.
fn mutate_json(r: &mut R, v: &mut Value) {
    for _ in 0..1 + r.below(3) {
        let mut k = r.below(count(v));
        mutate_node(r, v, &mut k);
    }
}

/// Removes a key, adds an unknown one, duplicates an element, or replaces the node.
fn mutate_here(r: &mut R, n: &mut Value) {
    let k = r.below(4);
    match n {
        Value::Object(o) if k == 0 && !o.is_empty() => {
            let key = o.keys().nth(r.below(o.len())).cloned().unwrap_or_default();
            o.remove(&key);
            return;
        }
        Value::Object(o) if k == 1 => {
            let v = odd_value(r, &Value::Null);
            o.insert(format!("unknown_{}", r.below(100)), v);
            return;
        }
        Value::Array(a) if k == 2 && !a.is_empty() => {
            let x = a[r.below(a.len())].clone();
            a.push(x);
            return;
        }
        _ => {}
    }
    let near = n.clone();
    *n = odd_value(r, &near);
}

/// A mutated JSON text of one of `seeds`: structure-aware, then (sometimes) byte-level.
fn json_input(r: &mut R, seeds: &[Value]) -> Vec<u8> {
    let mut v = r.pick(seeds).clone();
    if r.pct(85) {
        mutate_json(r, &mut v);
    }
    let mut b = serde_json::to_vec(&v).unwrap_or_default();
    if r.pct(30) {
        mutate_bytes(r, &mut b, 0, &[]);
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Seeds: models, checkpoints and ckpt-0 pickles

fn tiny_model(dir: &Path, preset: &str, dtype: grok_shared::formats::genmodel::GenDType) {
    let c = grok_shared::config::ModelConfig::preset(preset, None).unwrap();
    grok_shared::formats::genmodel::generate(&c, dtype, 7, dir, 1 << 30, |_, _| {}).unwrap();
}

/// numpy's pickles (protocol 4 as `pickle.dump` writes them, or protocol 5 `_frombuffer`), with
/// the same memo use as CPython's pickler.
mod pickle {
    use grok_shared::formats::ckpt0::NpDType;
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct W {
        out: Vec<u8>,
        memo: HashMap<String, u32>,
        next: u32,
    }

    impl W {
        fn memoize(&mut self) -> u32 {
            self.out.push(0x94);
            self.next += 1;
            self.next - 1
        }
        fn get(&mut self, k: u32) {
            if k < 256 {
                self.out.extend([b'h', k as u8]);
            } else {
                self.out.push(b'j');
                self.out.extend(k.to_le_bytes());
            }
        }
        fn str(&mut self, s: &str) {
            if let Some(&k) = self.memo.get(s) {
                return self.get(k);
            }
            self.out.extend([0x8c, s.len() as u8]);
            self.out.extend(s.as_bytes());
            let k = self.memoize();
            self.memo.insert(s.to_string(), k);
        }
        fn global(&mut self, m: &str, n: &str) {
            let key = format!("{m}\n{n}");
            if let Some(&k) = self.memo.get(&key) {
                return self.get(k);
            }
            self.str(m);
            self.str(n);
            self.out.push(0x93);
            let k = self.memoize();
            self.memo.insert(key, k);
        }
        fn int(&mut self, v: usize) {
            if v < 256 {
                self.out.extend([b'K', v as u8]);
            } else if v < 65536 {
                self.out.push(b'M');
                self.out.extend((v as u16).to_le_bytes());
            } else {
                self.out.extend([0x8a, 8]);
                self.out.extend((v as u64).to_le_bytes());
            }
        }
        fn tuple(&mut self, items: &[usize]) {
            match items.len() {
                0 => self.out.push(b')'),
                1..=3 => {
                    for &x in items {
                        self.int(x);
                    }
                    self.out.push(0x84 + items.len() as u8);
                }
                _ => {
                    self.out.push(b'(');
                    for &x in items {
                        self.int(x);
                    }
                    self.out.push(b't');
                }
            }
            self.memoize();
        }
        fn bytes(&mut self, b: &[u8]) {
            if b.len() < 256 {
                self.out.extend([b'C', b.len() as u8]);
            } else {
                self.out.push(b'B');
                self.out.extend((b.len() as u32).to_le_bytes());
            }
            self.out.extend(b);
            self.memoize();
        }
        fn dtype(&mut self, dt: NpDType) {
            self.global("numpy", "dtype");
            match dt {
                NpDType::F32 => self.str("f4"),
                NpDType::I8 => self.str("i1"),
                NpDType::Bf16 => self.global("ml_dtypes", "bfloat16"),
            }
            self.out.extend([0x89, 0x88, 0x87]);
            self.memoize();
            self.out.push(b'R');
            self.memoize();
            self.out.extend([b'(', b'K', 3]);
            self.str(if dt == NpDType::I8 { "|" } else { "<" });
            self.out.extend(b"NNN");
            if dt == NpDType::Bf16 {
                self.out.extend([b'K', 2, b'K', 2, b'K', 64]);
            } else {
                self.out.extend(b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00");
            }
            self.out.push(b't');
            self.memoize();
            self.out.push(b'b');
        }
        /// An array whose C-order bytes are `c`, pickled in C or Fortran order.
        pub fn array(&mut self, dt: NpDType, shape: &[usize], fortran: bool, c: &[u8]) {
            let data = if fortran {
                to_fortran(c, shape, dt.size())
            } else {
                c.to_vec()
            };
            self.global("numpy._core.multiarray", "_reconstruct");
            self.global("numpy", "ndarray");
            self.out.extend([b'K', 0, 0x85]);
            self.memoize();
            self.bytes(b"b");
            self.out.push(0x87);
            self.memoize();
            self.out.push(b'R');
            self.memoize();
            self.out.extend([b'(', b'K', 1]);
            self.tuple(shape);
            self.dtype(dt);
            self.out.push(if fortran { 0x88 } else { 0x89 });
            self.bytes(&data);
            self.out.push(b't');
            self.memoize();
            self.out.push(b'b');
        }
        /// The same array as protocol 5 writes it.
        pub fn array_p5(&mut self, dt: NpDType, shape: &[usize], fortran: bool, c: &[u8]) {
            let data = if fortran {
                to_fortran(c, shape, dt.size())
            } else {
                c.to_vec()
            };
            self.global("numpy._core.numeric", "_frombuffer");
            self.out.extend([b'(', 0x96]);
            self.out.extend((data.len() as u64).to_le_bytes());
            self.out.extend(&data);
            self.memoize();
            self.dtype(dt);
            self.tuple(shape);
            self.str(if fortran { "F" } else { "C" });
            self.out.push(b't');
            self.memoize();
            self.out.push(b'R');
            self.memoize();
        }
        /// `__main__.QuantizedWeight8bit(weight, scales)` as the dataclass pickles.
        pub fn qw(&mut self, w: (&[usize], bool, &[u8]), s: (&[usize], bool, &[u8])) {
            self.global("__main__", "QuantizedWeight8bit");
            self.out.extend([b')', 0x81]);
            self.memoize();
            self.out.push(b'}');
            self.memoize();
            self.out.push(b'(');
            self.str("weight");
            self.array(NpDType::I8, w.0, w.1, w.2);
            self.str("scales");
            self.array(NpDType::Bf16, s.0, s.1, s.2);
            self.out.extend([b'u', b'b']);
        }
        pub fn finish(self, protocol: u8) -> Vec<u8> {
            let mut b = vec![0x80, protocol, 0x95];
            b.extend((self.out.len() as u64 + 1).to_le_bytes());
            b.extend(self.out);
            b.push(b'.');
            b
        }
    }

    /// C-order bytes of `shape` to Fortran order.
    pub fn to_fortran(c: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
        let mut out = vec![0u8; c.len()];
        let n = c.len() / size;
        let mut idx = vec![0usize; shape.len()];
        for e in 0..n {
            let mut off = 0;
            let mut stride = 1;
            for (k, &i) in idx.iter().enumerate() {
                off += i * stride;
                stride *= shape[k];
            }
            out[off * size..(off + 1) * size].copy_from_slice(&c[e * size..(e + 1) * size]);
            for k in (0..shape.len()).rev() {
                idx[k] += 1;
                if idx[k] < shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        out
    }
}

fn random_bytes(r: &mut R, n: usize) -> Vec<u8> {
    (0..n).map(|_| r.u64() as u8).collect()
}

/// Valid ckpt-0 pickles (each with its leaf's C-order bytes) of every kind the release has,
/// in both orders and both protocols.
fn pickle_seeds() -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    use grok_shared::formats::ckpt0::NpDType;
    let mut r = R(Rng::new(1));
    let mut out = Vec::new();
    for (dt, shape) in [
        (NpDType::F32, vec![6usize]),
        (NpDType::F32, vec![4, 3]),
        (NpDType::F32, vec![3, 300]),
        (NpDType::Bf16, vec![2, 3, 4]),
        (NpDType::I8, vec![2, 5, 7]),
        (NpDType::F32, vec![2, 1, 3, 2]),
    ] {
        let c = random_bytes(&mut r, shape.iter().product::<usize>() * dt.size());
        for fortran in [false, true] {
            let mut w = pickle::W::default();
            w.array(dt, &shape, fortran, &c);
            out.push((w.finish(4), vec![c.clone()]));
            let mut w = pickle::W::default();
            w.array_p5(dt, &shape, fortran, &c);
            out.push((w.finish(5), vec![c.clone()]));
        }
    }
    for (ws, ss) in [
        (vec![6usize, 4], vec![1usize, 4]),
        (vec![2, 8, 3], vec![2, 8, 3]),
    ] {
        let wc = random_bytes(&mut r, ws.iter().product());
        let sc = random_bytes(&mut r, ss.iter().product::<usize>() * 2);
        for fortran in [false, true] {
            let mut w = pickle::W::default();
            w.qw((&ws, fortran, &wc), (&ss, fortran, &sc));
            out.push((w.finish(4), vec![wc.clone(), sc.clone()]));
        }
    }
    out
}

/// The arrays of a leaf.
fn leaf_arrays(
    l: &grok_shared::formats::ckpt0::Leaf,
) -> Vec<&grok_shared::formats::ckpt0::NpArray> {
    match l {
        grok_shared::formats::ckpt0::Leaf::Array(a) => vec![a],
        grok_shared::formats::ckpt0::Leaf::Quantized { weight, scales } => vec![weight, scales],
    }
}

/// What an accepted array must satisfy: inside the input, as many bytes as its shape needs, and
/// readable in C order (whole and a slice).
fn check_array(input: &[u8], a: &grok_shared::formats::ckpt0::NpArray) -> Result<Vec<u8>, String> {
    let end = a.start.checked_add(a.len).filter(|&e| e <= input.len());
    let Some(end) = end else {
        return Err(format!("accepted an array outside the input: {a:?}"));
    };
    let numel = a
        .shape
        .iter()
        .try_fold(1usize, |x, &d| x.checked_mul(d))
        .ok_or_else(|| format!("accepted an overflowing shape: {a:?}"))?;
    if numel.checked_mul(a.dtype.size()) != Some(a.len) {
        return Err(format!("accepted {} bytes for shape {:?}", a.len, a.shape));
    }
    let raw = &input[a.start..end];
    let all = grok_shared::formats::ckpt0::c_order(raw, a, 0, numel).into_owned();
    let half = numel / 2;
    let tail = grok_shared::formats::ckpt0::c_order(raw, a, half, numel - half);
    if tail[..] != all[half * a.dtype.size()..] {
        return Err(format!("a slice of {a:?} differs from the whole"));
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------------
// Targets: files

#[test]
fn ckpt0_pickle_seeds_read_back_exactly() {
    for (k, (b, want)) in pickle_seeds().iter().enumerate() {
        let leaf = grok_shared::formats::ckpt0::parse(b, Path::new("seed")).unwrap();
        let got: Vec<Vec<u8>> = leaf_arrays(&leaf)
            .into_iter()
            .map(|a| check_array(b, a).unwrap())
            .collect();
        assert_eq!(&got, want, "seed {k}");
    }
}

#[test]
fn fuzz_ckpt0_pickle() {
    let seeds = pickle_seeds();
    let raw: Vec<&[u8]> = seeds.iter().map(|s| &s.0[..]).collect();
    fuzz(
        "ckpt0_pickle",
        400_000,
        |r| {
            let mut b = r.pick(&raw).to_vec();
            mutate_bytes(r, &mut b, 0, &raw);
            b
        },
        |b| {
            match grok_shared::formats::ckpt0::parse(b, Path::new("tensor00000_000")) {
                Ok(leaf) => {
                    for a in leaf_arrays(&leaf) {
                        check_array(b, a)?;
                    }
                }
                Err(e) => {
                    clear(&e)?;
                    if !e.to_string().contains("tensor00000_000") {
                        return Err(format!("the error does not name the file: {e}"));
                    }
                }
            }
            Ok(0)
        },
    );
}

/// A whole (random) ckpt-0 directory of the `tiny` shape, leaves in random orders.
fn write_ckpt0(dir: &Path, c: &grok_shared::config::ModelConfig, r: &mut R) {
    use grok_shared::formats::ckpt0::NpDType;
    std::fs::create_dir_all(dir).unwrap();
    let (d, v, f, e) = (c.emb_size, c.vocab_size, c.ffn_size, c.num_experts);
    let (q, kv) = (c.q_size(), c.kv_size());
    let mut leaves: Vec<Vec<u8>> = Vec::new();
    let arr = |r: &mut R, shape: &[usize]| {
        let mut w = pickle::W::default();
        let data = random_bytes(r, shape.iter().product::<usize>() * 4);
        let fortran = r.pct(50);
        w.array(NpDType::F32, shape, fortran, &data);
        w.finish(4)
    };
    let qw = |r: &mut R, lead: Option<usize>, inp: usize, out: usize| {
        let mut ws: Vec<usize> = lead.into_iter().collect();
        let mut ss = ws.clone();
        ws.extend([inp, out]);
        ss.extend([1, out]);
        let wc = random_bytes(r, ws.iter().product());
        let sc: Vec<u8> = (0..ss.iter().product::<usize>())
            .flat_map(|_| half::bf16::from_f32(0.01).to_le_bytes())
            .collect();
        let mut w = pickle::W::default();
        let fortran = r.pct(50);
        w.qw((&ws, fortran, &wc), (&ss, fortran, &sc));
        w.finish(4)
    };
    leaves.push(arr(r, &[v, d]));
    leaves.push(arr(r, &[d]));
    for _ in 0..c.num_layers {
        leaves.push(qw(r, Some(e), d, f));
        leaves.push(qw(r, Some(e), f, d));
        leaves.push(qw(r, Some(e), d, f));
        leaves.push(qw(r, None, d, kv));
        leaves.push(qw(r, None, q, d));
        leaves.push(qw(r, None, d, q));
        leaves.push(qw(r, None, d, kv));
        for _ in 0..4 {
            leaves.push(arr(r, &[d]));
        }
        leaves.push(arr(r, &[d, e]));
    }
    for (i, b) in leaves.iter().enumerate() {
        std::fs::write(dir.join(format!("tensor{i:05}_000")), b).unwrap();
    }
}

#[test]
fn fuzz_ckpt0_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let c = grok_shared::config::ModelConfig::preset("tiny", None).unwrap();
    let src = tmp.path().join("ckpt-0");
    write_ckpt0(&src, &c, &mut R(Rng::new(base_seed())));
    let files = grok_shared::formats::ckpt0::list_files(&src).unwrap();
    grok_shared::formats::ckpt0::convert_to_hf(&src, &tmp.path().join("ok"), &c, |_, _| {})
        .unwrap();
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let total: usize = originals.iter().map(Vec::len).sum();
    let which = Cell::new(0);
    fuzz(
        "ckpt0_convert",
        2000,
        |r| {
            which.set(r.below(files.len()));
            let mut b = originals[which.get()].clone();
            // The pickle opcodes sit before and after the data.
            let focus = if r.pct(50) { 400 } else { b.len() };
            if r.pct(30) {
                let tail = b.len().saturating_sub(64);
                let mut t = b.split_off(tail);
                mutate_bytes(r, &mut t, 0, &[]);
                b.extend(t);
            } else {
                mutate_bytes(r, &mut b, focus, &[]);
            }
            b
        },
        |b| {
            let which = which.get();
            std::fs::write(&files[which], b).map_err(|e| e.to_string())?;
            let dst = tmp.path().join("out");
            let _ = std::fs::remove_dir_all(&dst);
            let res = grok_shared::formats::ckpt0::convert_to_hf(&src, &dst, &c, |_, _| {});
            std::fs::write(&files[which], &originals[which]).map_err(|e| e.to_string())?;
            if let Err(e) = res {
                clear(e)?;
            }
            // Conversion copies one layer's tensors at a time.
            Ok(total)
        },
    );
}

/// Small safetensors files (a few tensors of every dtype) written by the project's writer.
fn safetensors_seeds(dir: &Path) -> Vec<Vec<u8>> {
    use grok_shared::formats::checkpoint::{write_safetensors, DType, PendingTensor};
    let mut out = Vec::new();
    for (k, set) in [
        vec![("a.weight", DType::F32, vec![3usize, 4])],
        vec![
            ("x.weight", DType::I8, vec![4, 8]),
            ("x.scales", DType::BF16, vec![1, 4]),
            ("n.scale", DType::F16, vec![5]),
        ],
        vec![("e", DType::F32, vec![0, 7]), ("s", DType::BF16, vec![])],
    ]
    .into_iter()
    .enumerate()
    {
        let pend: Vec<PendingTensor> = set
            .iter()
            .map(|(n, d, s)| PendingTensor {
                name: n.to_string(),
                dtype: *d,
                shape: s.clone(),
            })
            .collect();
        let p = dir.join(format!("seed{k}.safetensors"));
        write_safetensors(&p, &pend, |i, w| w.write_all(&vec![7u8; pend[i].nbytes()])).unwrap();
        out.push(std::fs::read(&p).unwrap());
    }
    out
}

/// Every way the loader reads a checkpoint's tensors.
fn read_all(ck: &grok_shared::formats::checkpoint::Checkpoint) -> Result<(), String> {
    let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
    for n in &names {
        let info = ck.get(n).ok_or("a listed tensor is missing")?;
        let b = ck.bytes(info);
        if b.len() != info.numel() * info.dtype.size() {
            return Err(format!(
                "tensor {n}: {} bytes for {:?}",
                b.len(),
                info.shape
            ));
        }
        let _ = ck.buf::<f32>(info).as_slice().len();
        let _ = ck.buf::<i8>(info).as_slice().len();
        if let Err(e) = ck.f32_vec(n, info) {
            clear(e)?;
        }
    }
    Ok(())
}

#[test]
fn fuzz_safetensors_header() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seeds = safetensors_seeds(tmp.path());
    // And the real files of a small model (mutated mostly in the header).
    let model = tmp.path().join("model");
    tiny_model(
        &model,
        "tiny",
        grok_shared::formats::genmodel::GenDType::Int8,
    );
    for e in std::fs::read_dir(&model).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            seeds.push(std::fs::read(p).unwrap());
        }
    }
    let raw: Vec<&[u8]> = seeds.iter().map(|s| &s[..]).collect();
    let name = "fuzz.safetensors".to_string();
    fuzz(
        "safetensors_header",
        40_000,
        |r| {
            let mut b = r.pick(&raw).to_vec();
            let header = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            if r.pct(50) {
                // Structure-aware: mutate the header as JSON, keep the data.
                let mut h: Value = serde_json::from_slice(&b[8..header]).unwrap();
                mutate_json(r, &mut h);
                let mut hb = serde_json::to_vec(&h).unwrap();
                if r.pct(30) {
                    mutate_bytes(r, &mut hb, 0, &[]);
                }
                let mut out = (hb.len() as u64).to_le_bytes().to_vec();
                out.extend(hb);
                out.extend(&b[header..]);
                b = out;
            } else {
                mutate_bytes(r, &mut b, header, &raw);
            }
            b
        },
        |b| {
            std::fs::write(tmp.path().join(&name), b).map_err(|e| e.to_string())?;
            match grok_shared::formats::checkpoint::Checkpoint::open_files(
                tmp.path(),
                std::slice::from_ref(&name),
            ) {
                Ok(ck) => read_all(&ck)?,
                Err(e) => clear(e)?,
            }
            Ok(0)
        },
    );
}

#[test]
fn fuzz_safetensors_index() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let c = grok_shared::config::ModelConfig::preset("tiny", None).unwrap();
    // Small files, so the model comes with an index.
    grok_shared::formats::genmodel::generate(
        &c,
        grok_shared::formats::genmodel::GenDType::Bf16,
        3,
        &model,
        64 << 10,
        |_, _| {},
    )
    .unwrap();
    let index = model.join("model.safetensors.index.json");
    let seed: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let total: usize = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len() as usize)
        .sum();
    fuzz(
        "safetensors_index",
        6000,
        |r| json_input(r, std::slice::from_ref(&seed)),
        |b| {
            std::fs::write(&index, b).map_err(|e| e.to_string())?;
            match grok_shared::formats::checkpoint::Checkpoint::open(&model) {
                Ok(ck) => {
                    read_all(&ck)?;
                    if let Err(e) = grok_shared::model::Model::load(&ck) {
                        clear(e)?;
                    }
                }
                Err(e) => clear(e)?,
            }
            Ok(total)
        },
    );
}

/// A change that keeps a safetensors header valid (so that the loader, not the header check,
/// meets it): a shape refactored with the same element count, a dtype of the same size, two
/// tensors' names swapped, a tensor removed or renamed.
fn consistent_header_change(r: &mut R, h: &mut Value) {
    let Some(o) = h.as_object_mut() else { return };
    let names: Vec<String> = o.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return;
    }
    let a = r.pick(&names).clone();
    match r.below(5) {
        0 => {
            let shape: Vec<u64> = o[&a]["shape"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            let n: u64 = shape.iter().product();
            let new = match r.below(4) {
                0 => shape.iter().rev().copied().collect(),
                1 => vec![n],
                2 => vec![1, n],
                _ => {
                    let mut s = shape.clone();
                    s.push(1);
                    s
                }
            };
            o[&a]["shape"] = json!(new);
        }
        1 => {
            let dt = o[&a]["dtype"].as_str().unwrap_or("").to_string();
            let to = match dt.as_str() {
                "BF16" => "F16",
                "F16" => "BF16",
                "F32" => "F32",
                _ => "I8",
            };
            o[&a]["dtype"] = json!(to);
        }
        2 => {
            let b = r.pick(&names).clone();
            let (x, y) = (o[&a].clone(), o[&b].clone());
            o[&a] = y;
            o[&b] = x;
        }
        3 => {
            o.remove(&a);
        }
        _ => {
            let v = o.remove(&a).unwrap_or_default();
            let renamed = if let Some(b) = a.strip_suffix(".scales") {
                format!("{b}.weight_scale")
            } else {
                format!("{a}.x")
            };
            o.insert(renamed, v);
        }
    }
}

/// A whole model whose safetensors header is mutated (shapes, dtypes, offsets, names), then
/// loaded as a worker loads it and run for two tokens.
#[test]
fn fuzz_model_load() {
    use grok_shared::model::{KvCache, Model, SeqInput, WantLogits};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    tiny_model(
        &model,
        "tiny",
        grok_shared::formats::genmodel::GenDType::Int8,
    );
    let file = model.join("model.safetensors");
    let orig = std::fs::read(&file).unwrap();
    let header = 8 + u64::from_le_bytes(orig[..8].try_into().unwrap()) as usize;
    let seed: Value = serde_json::from_slice(&orig[8..header]).unwrap();
    fuzz(
        "model_load",
        6000,
        |r| {
            let mut h = seed.clone();
            if r.pct(60) {
                consistent_header_change(r, &mut h);
            } else {
                mutate_json(r, &mut h);
            }
            let mut b = serde_json::to_vec(&h).unwrap();
            if r.pct(20) {
                mutate_bytes(r, &mut b, 0, &[]);
            }
            let mut out = (b.len() as u64).to_le_bytes().to_vec();
            out.extend(b);
            out.extend(&orig[header..]);
            out
        },
        |b| {
            std::fs::write(&file, b).map_err(|e| e.to_string())?;
            let ck = match grok_shared::formats::checkpoint::Checkpoint::open(&model) {
                Ok(ck) => ck,
                Err(e) => return clear(e).map(|_| 0),
            };
            let m = match Model::load(&ck) {
                Ok(m) => m,
                Err(e) => return clear(e).map(|_| 0),
            };
            let mut kv = KvCache::new(&m, 2, 8);
            let logits = m
                .forward(
                    &[SeqInput {
                        tokens: &[1, 2],
                        start_pos: 0,
                        block_table: &[1, 0],
                        want: WantLogits::Last,
                    }],
                    &mut kv,
                    &grok_shared::collective::SingleRank,
                )
                .map_err(|e| format!("a loaded model does not run: {e}"))?;
            if logits.len() != m.config.vocab_size {
                return Err(format!("{} logits", logits.len()));
            }
            Ok(0)
        },
    );
}

fn config_seeds() -> Vec<Value> {
    let mut out: Vec<Value> = ["tiny", "tiny8", "small", "grok-1"]
        .iter()
        .map(|p| {
            grok_shared::config::ModelConfig::preset(p, None)
                .unwrap()
                .to_hf_json()
        })
        .collect();
    // The aliases of the other converters (GROK1_SPEC.md §8.2, §8.3).
    let mut j = out[3].clone();
    let o = j.as_object_mut().unwrap();
    o.remove("head_dim");
    let n = o.remove("num_experts").unwrap();
    o.insert("num_local_experts".into(), n);
    let cap = o.remove("max_attn_value").unwrap();
    o.insert("attn_logit_softcapping".into(), cap);
    o.insert(
        "output_multiplier_scale".into(),
        json!([0.5773502691896257]),
    );
    out.push(j);
    out
}

#[test]
fn fuzz_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    let seeds = config_seeds();
    fuzz(
        "config_json",
        40_000,
        |r| json_input(r, &seeds),
        |b| {
            std::fs::write(&path, b).map_err(|e| e.to_string())?;
            match grok_shared::config::ModelConfig::from_file(&path) {
                Ok(c) => {
                    // What every consumer derives from a config must not overflow.
                    c.validate()
                        .map_err(|e| format!("accepted, then invalid: {e}"))?;
                    let _ = (c.q_size(), c.kv_size(), c.group_size());
                    let _ = (c.num_params(), c.active_params());
                    let l = grok_shared::sharding::Layout::new(1, 1, 1);
                    l.validate(&c).map_err(|e| format!("tp=1 refused: {e}"))?;
                    let _ = l.shard(&c, 0);
                    let _ = grok_shared::sharding::Layout::new(3, 1, 2).validate(&c);
                    let again = grok_shared::config::ModelConfig::from_hf_json(&c.to_hf_json())
                        .map_err(|e| format!("to_hf_json does not read back: {e}"))?;
                    if again != c {
                        return Err(format!("to_hf_json reads back as {again:?}, not {c:?}"));
                    }
                }
                Err(e) => clear(e)?,
            }
            Ok(0)
        },
    );
}

#[test]
fn fuzz_presharded_manifest() {
    use grok_shared::sharding::Layout;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    tiny_model(
        &model,
        "tiny",
        grok_shared::formats::genmodel::GenDType::Int8,
    );
    let dst = tmp.path().join("pre");
    let layout = Layout::new(2, 1, 1);
    let ck = grok_shared::formats::checkpoint::Checkpoint::open(&model).unwrap();
    grok_shared::formats::presharded::write(&ck, &dst, layout, |_, _| {}).unwrap();
    drop(ck);
    let mpath = dst.join("manifest.json");
    let seed: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let total: usize = std::fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len() as usize)
        .sum();
    let (rank, verify) = (Cell::new(0), Cell::new(false));
    fuzz(
        "presharded_manifest",
        6000,
        |r| {
            rank.set(r.below(3));
            verify.set(r.pct(50));
            json_input(r, std::slice::from_ref(&seed))
        },
        |b| {
            let (rank, verify) = (rank.get(), verify.get());
            std::fs::write(&mpath, b).map_err(|e| e.to_string())?;
            if let Err(e) = grok_shared::formats::presharded::verify(&dst) {
                clear(e)?;
            }
            match grok_shared::formats::presharded::open_rank(&dst, layout, rank, verify) {
                Ok(ck) => {
                    // As a worker goes on: the layout against the manifest's config, then the
                    // rank's shard.
                    match layout.validate(&ck.config) {
                        Ok(()) if rank < layout.world_size() => {
                            let shard = layout.shard(&ck.config, rank);
                            if let Err(e) = grok_shared::model::Model::load_shard(&ck, &shard) {
                                clear(e)?;
                            }
                        }
                        Ok(()) => {}
                        Err(e) => clear(e)?,
                    }
                }
                Err(e) => clear(e)?,
            }
            Ok(total)
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Targets: text and the network

fn tokenizer_path() -> Option<PathBuf> {
    let p = grok_tests::shared_dir()?.join("models/grok-1/tokenizer.model");
    p.exists().then_some(p)
}

#[test]
fn fuzz_tokenizer() {
    use grok_shared::tokenizer::{StreamDecoder, Tokenizer};
    let Some(path) = tokenizer_path() else {
        eprintln!("fuzz tokenizer: skipped, no ../shared/models/grok-1/tokenizer.model");
        return;
    };
    let tok = Tokenizer::from_file(&path).unwrap();
    let vocab = tok.vocab_size();
    let texts: Vec<Vec<u8>> = [
        "Hello, world! The answer is 42.",
        "  leading spaces\n\ttabs and\r\nnewlines   ",
        "<|separator|> [UNK] <s></s> <|pad|>",
        "日本語のテキスト、中文文本，한국어 텍스트",
        "emoji 🙂👍🏽‍♀️ and combining e\u{301}\u{302}",
        "1234567890 0000000000000 3.14159",
        "\u{0}\u{1}\u{7f}\u{fffd}\u{feff}\u{200b}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let raw: Vec<&[u8]> = texts.iter().map(|t| &t[..]).collect();
    fuzz(
        "tokenizer",
        50_000,
        |r| match r.below(3) {
            // Random bytes, read as (lossy) UTF-8.
            0 => {
                let n = r.below(300);
                random_bytes(r, n)
            }
            // Random code points, runs of one piece, and odd whitespace.
            1 => {
                let mut s = String::new();
                for _ in 0..r.below(200) {
                    match r.below(6) {
                        0 => s.push_str(&" ".repeat(r.below(40))),
                        1 => s.push_str(&"9".repeat(r.below(40))),
                        2 => s.push_str("<|separator|>"),
                        _ => {
                            s.push(char::from_u32(r.below(0x11_0000) as u32).unwrap_or('\u{fffd}'))
                        }
                    }
                }
                s.into_bytes()
            }
            _ => {
                let mut b = r.pick(&raw).to_vec();
                mutate_bytes(r, &mut b, 0, &raw);
                b
            }
        },
        |b| {
            let text = String::from_utf8_lossy(b);
            let ids = match tok.encode(&text) {
                Ok(ids) => ids,
                Err(e) => {
                    clear(e)?;
                    return Ok(0);
                }
            };
            if let Some(id) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(format!(
                    "encode gave id {id} outside the vocabulary {vocab}"
                ));
            }
            // What encode gives, decode takes.
            tok.decode(&ids)
                .map_err(|e| format!("decoding the ids of an encoded text: {e}"))?;
            // Ids from the input bytes: in range, and some out of it.
            let ids: Vec<u32> = b
                .chunks(4)
                .map(|c| {
                    let mut x = [0u8; 4];
                    x[..c.len()].copy_from_slice(c);
                    let v = u32::from_le_bytes(x);
                    if c.len() == 4 && v & 0xf == 0 {
                        v
                    } else {
                        v % vocab as u32
                    }
                })
                .collect();
            match tok.decode(&ids) {
                Ok(_) => {
                    if let Some(id) = ids.iter().find(|&&i| i as usize >= vocab) {
                        return Err(format!("decode accepted id {id} (vocabulary {vocab})"));
                    }
                }
                Err(e) => clear(e)?,
            }
            let mut sd = StreamDecoder::default();
            for &id in ids.iter().take(64) {
                if let Err(e) = sd.push(&tok, id) {
                    clear(e)?;
                    break;
                }
            }
            Ok(0)
        },
    );
}

fn http_seeds() -> Vec<(bool, Value)> {
    vec![
        (
            false,
            json!({"model": "grok-1", "prompt": "Hello", "max_tokens": 5, "temperature": 0.7,
                   "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n"], "logprobs": 2,
                   "stream": false, "stream_options": {"include_usage": true}}),
        ),
        (
            false,
            json!({"prompt": [5, 6, 0, 7], "max_tokens": 3, "stop_token_ids": [2],
                   "ignore_eos": true, "return_token_ids": true, "echo": false,
                   "suffix": "", "n": 1, "best_of": 1}),
        ),
        (false, json!({"prompt": [[1, 2, 3]], "stream": true})),
        (
            true,
            json!({"model": "grok-1", "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": "Hello"}],
                   "max_completion_tokens": 8, "logprobs": true, "top_logprobs": 3,
                   "temperature": 0, "seed": -5}),
        ),
        (
            true,
            json!({"messages": [{"role": "user", "content": "x"}], "stream": true}),
        ),
    ]
}

#[test]
fn fuzz_http_json_bodies() {
    use axum::body::Body;
    use tower_service::Service;
    let tmp = tempfile::tempdir().unwrap();
    // The coordinator reads only the model's config (and a tokenizer) before serving.
    std::fs::write(
        tmp.path().join("config.json"),
        grok_shared::config::ModelConfig::grok1()
            .to_hf_json()
            .to_string(),
    )
    .unwrap();
    let cfg = grok_coordinator::config::CoordinatorConfig {
        model_dir: tmp.path().to_path_buf(),
        layout: grok_shared::sharding::Layout::new(1, 1, 1),
        listen: "127.0.0.1:0".parse().unwrap(),
        tokenizer: tokenizer_path(),
        kv_blocks: Some(64),
        kv_memory_fraction: 0.9,
        block_size: 16,
        comm_timeout_ms: 1000,
        max_queue: 8,
        max_seqs: 4,
        max_batch_tokens: 256,
        fault_hold_ms: 0,
        prefix_caching: true,
        expert_placement: None,
        served_model_name: "grok-1".into(),
        http_listen: None,
        api_token: None,
        tls: None,
    };
    let shared = grok_coordinator::cluster::prepare(cfg).unwrap();
    let mut router = grok_coordinator::api::http::router(shared);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seeds = http_seeds();
    let values: Vec<Value> = seeds.iter().map(|s| s.1.clone()).collect();
    let chat = Cell::new(false);
    fuzz(
        "http_json",
        50_000,
        |r| {
            let k = r.below(seeds.len());
            chat.set(seeds[k].0 != r.pct(10));
            json_input(r, &values[k..k + 1])
        },
        |b| {
            let uri = if chat.get() {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            let req = axum::http::Request::post(uri)
                .header("content-type", "application/json")
                .body(Body::from(b.to_vec()))
                .map_err(|e| e.to_string())?;
            let (status, body) = rt.block_on(async {
                let call = router.call(req);
                let resp = tokio::time::timeout(std::time::Duration::from_secs(10), call)
                    .await
                    .map_err(|_| "no answer within 10 s".to_string())?
                    .unwrap_or_else(|e| match e {});
                let status = resp.status();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((status, body))
            })?;
            // Nothing is serving: a valid request is UNAVAILABLE (503), an invalid one a 4xx,
            // and either way the body is OpenAI's error object with a message.
            if !(status.is_client_error() || status.as_u16() == 503) {
                return Err(format!(
                    "{uri}: status {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| format!("{uri}: status {status}, the body is not JSON: {e}"))?;
            let msg = v["error"]["message"].as_str().unwrap_or_default();
            if msg.trim().is_empty() {
                return Err(format!("{uri}: status {status} without a message: {v}"));
            }
            if status.is_client_error() {
                clear(msg)?;
            }
            Ok(0)
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Targets: what a worker receives

mod worker {
    use super::*;
    use grok_proto::v1 as pb;
    use grok_shared::sharding::Layout;
    use grok_worker::engine::{Engine, LoadSpec};
    use prost::Message;
    use std::net::{SocketAddr, TcpListener};
    use std::time::Duration;

    fn listeners() -> (TcpListener, TcpListener) {
        (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        )
    }

    /// Loads the whole model as rank 0 of a one-worker replica.
    fn engine(dir: &Path, kv_blocks: usize, block_size: usize) -> Engine {
        let (w, t) = listeners();
        let spec = LoadSpec {
            model_dir: dir,
            layout: Layout::new(1, 1, 1),
            rank: 0,
            world_peers: vec![w.local_addr().unwrap()],
            tp_peers: vec![t.local_addr().unwrap()],
            kv: grok_shared::model::KvSizing {
                blocks: Some(kv_blocks),
                ..Default::default()
            },
            block_size,
            comm_timeout: Duration::from_secs(5),
            cuda_device: None,
            live_ranks: Vec::new(),
            placement: Vec::new(),
            nccl: Default::default(),
            gemm: Default::default(),
        };
        Engine::load(spec, w, t, |_, _, _| {}).unwrap().0
    }

    const BLOCKS: usize = 32;
    const BS: usize = 8;

    /// Plans that mostly follow the protocol (sequences start with sampling parameters, go on
    /// where they stopped, get blocks as they grow, are freed) with one field made hostile
    /// about half of the time.
    struct Planner {
        vocab: u32,
        step: u64,
        /// Live sequences: id, tokens so far, blocks.
        live: Vec<(u64, usize, usize)>,
        free: Vec<u32>,
        next_id: u64,
    }

    impl Planner {
        fn plan(&mut self, r: &mut R) -> pb::StepPlan {
            self.step += 1;
            let mut plan = pb::StepPlan {
                step_id: self.step,
                ..Default::default()
            };
            // Now and then every sequence finishes, and all blocks come back (blocks handed
            // out in refused plans too).
            if self.live.is_empty() || self.live.len() > 3 || r.pct(15) {
                plan.free_seqs.extend(self.live.drain(..).map(|l| l.0));
                self.free = (0..BLOCKS as u32).collect();
            }
            for _ in 0..1 + r.below(2) {
                let others: Vec<(u64, usize, usize)> = self
                    .live
                    .iter()
                    .filter(|l| !plan.seqs.iter().any(|s| s.seq_id == l.0))
                    .copied()
                    .collect();
                let fresh = others.is_empty() || r.pct(40);
                let (id, pos, blocks) = if fresh {
                    self.next_id += 1;
                    (self.next_id, 0, 0)
                } else {
                    *r.pick(&others)
                };
                let n = if pos == 0 { 1 + r.below(20) } else { 1 };
                let need = (pos + n).div_ceil(BS).saturating_sub(blocks);
                if need > self.free.len() {
                    continue;
                }
                let new_blocks: Vec<u32> = self.free.drain(..need).collect();
                plan.seqs.push(pb::SeqStep {
                    seq_id: id,
                    tokens: (0..n)
                        .map(|_| r.below(self.vocab as usize) as u32)
                        .collect(),
                    start_pos: pos as u32,
                    new_blocks,
                    sampling: fresh.then(|| pb::SamplingParams {
                        temperature: *r.pick(&[0.0, 0.7, 1.0]),
                        top_p: *r.pick(&[0.0, 0.9, 1.0]),
                        top_k: *r.pick(&[0, 5]),
                        seed: r.u64(),
                        presence_penalty: *r.pick(&[0.0, 0.5]),
                        min_tokens: r.below(3) as u32,
                        ..Default::default()
                    }),
                    sample: r.pct(80),
                    return_logits: r.pct(20),
                    top_logprobs: r.below(4) as u32,
                    score_prompt: r.pct(20),
                    prompt_top: r.below(4) as u32,
                    next_token: r.pct(50).then(|| r.below(self.vocab as usize + 2) as u32),
                });
                if fresh {
                    self.live.push((id, 0, 0));
                }
            }
            if r.pct(50) {
                self.corrupt(r, &mut plan);
            }
            plan
        }

        fn corrupt(&mut self, r: &mut R, plan: &mut pb::StepPlan) {
            let odd32 = |r: &mut R| *r.pick(&U32S);
            if plan.seqs.is_empty() || r.pct(10) {
                plan.free_seqs.push(r.u64());
                return;
            }
            let k = r.below(plan.seqs.len());
            let s = &mut plan.seqs[k];
            match r.below(14) {
                0 => s.seq_id = r.u64(),
                1 => {
                    let x = s.clone();
                    plan.seqs.push(x);
                }
                2 => s.tokens.push(self.vocab + r.below(3) as u32),
                3 => s.tokens.push(odd32(r)),
                4 => s.tokens.clear(),
                5 => s.start_pos = odd32(r),
                6 => s.new_blocks.push(BLOCKS as u32 + odd32(r) % 4),
                7 => s.new_blocks.push(odd32(r)),
                8 => s
                    .new_blocks
                    .extend(std::iter::repeat_n(0, 1 + r.below(100_000))),
                9 => {
                    s.sampling = Some(pb::SamplingParams {
                        temperature: *r.pick(&[f32::NAN, -1.0, f32::INFINITY, 1e-45, 1e30]),
                        top_p: *r.pick(&[f32::NAN, -0.5, 2.0, f32::INFINITY, 1e-45]),
                        top_k: odd32(r),
                        seed: r.u64(),
                        logit_bias: [(odd32(r), *r.pick(&[f32::NAN, 1e9, -1e9]))].into(),
                        presence_penalty: *r.pick(&[f32::NAN, 3.0, -1e30]),
                        frequency_penalty: *r.pick(&[f32::NAN, f32::INFINITY]),
                        repetition_penalty: *r.pick(&[-1.0, f32::NAN, f32::INFINITY]),
                        min_tokens: odd32(r),
                        min_tokens_stop_ids: vec![odd32(r)],
                        prompt_len: odd32(r),
                        constraint: Some(pb::Constraint {
                            kind: Some(pb::constraint::Kind::Regex(
                                (*r.pick(&["([a-", "a{99999999}", "", "\\"])).into(),
                            )),
                        }),
                        generated: vec![odd32(r), self.vocab],
                    })
                }
                10 => s.sampling = None,
                11 => s.top_logprobs = odd32(r),
                12 => {
                    s.return_logits = true;
                    s.tokens
                        .extend((0..r.below(600)).map(|_| r.below(self.vocab as usize) as u32));
                }
                _ => plan.free_seqs.push(s.seq_id),
            }
        }

        /// The engine's answer to a plan, checked; the planner follows what it accepted.
        fn observe(&mut self, plan: &pb::StepPlan, res: &pb::StepResult) -> Result<(), String> {
            if res.step_id != plan.step_id {
                return Err(format!("step id {} for plan {}", res.step_id, plan.step_id));
            }
            if !res.error.is_empty() {
                if !res.error.starts_with("rank 0: ") || res.error.len() <= 8 {
                    return Err(format!("unclear error: {:?}", res.error));
                }
                clear(&res.error)?;
                // A refused plan leaves no trace: sequences it would have started do not exist
                // (the blocks it handed out come back at the next general free).
                self.live.retain(|l| l.1 > 0);
                return Ok(());
            }
            let sampled = plan.seqs.iter().filter(|s| s.sample).count();
            if res.tokens.len() != sampled {
                return Err(format!(
                    "{} tokens for {sampled} sampling sequences",
                    res.tokens.len()
                ));
            }
            if let Some(t) = res.tokens.iter().find(|t| t.token >= self.vocab) {
                return Err(format!("sampled token {} outside the vocabulary", t.token));
            }
            let rows: usize = plan
                .seqs
                .iter()
                .filter(|s| s.return_logits)
                .map(|s| s.tokens.len())
                .sum();
            if res.logits.len() != rows * self.vocab as usize {
                return Err(format!("{} logits for {rows} rows", res.logits.len()));
            }
            for s in &plan.seqs {
                if let Some(l) = self.live.iter_mut().find(|l| l.0 == s.seq_id) {
                    l.1 = s.start_pos as usize + s.tokens.len();
                    l.2 += s.new_blocks.len();
                }
            }
            Ok(())
        }
    }

    #[test]
    fn fuzz_worker_step_plans() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(
            tmp.path(),
            "tiny",
            grok_shared::formats::genmodel::GenDType::F32,
        );
        let mut eng = engine(tmp.path(), BLOCKS, BS);
        let p = std::cell::RefCell::new(Planner {
            vocab: 256,
            step: 0,
            live: Vec::new(),
            free: (0..BLOCKS as u32).collect(),
            next_id: 0,
        });
        fuzz(
            "worker_step_plan",
            25_000,
            |r| {
                let plan = p.borrow_mut().plan(r);
                let mut b = plan.encode_to_vec();
                // The wire form itself, mutated, now and then (a plan that does not decode is
                // refused by gRPC before the engine sees it).
                if r.pct(15) {
                    mutate_bytes(r, &mut b, 0, &[]);
                }
                b
            },
            |b| {
                let plan = match pb::StepPlan::decode(b) {
                    Ok(p) => p,
                    Err(e) => {
                        clear(e)?;
                        return Ok(0);
                    }
                };
                let res = eng.step(plan.clone());
                p.borrow_mut().observe(&plan, &res)?;
                // Logits come back: [tokens, vocab] floats.
                Ok(res.logits.len() * 4)
            },
        );
    }

    /// The worker's mapping of a `LoadRequest` (worker/src/lib.rs), with the peers replaced by
    /// this process's listeners: a plan whose world is larger than one would otherwise wait
    /// for peers that do not exist.
    fn load(
        r: &pb::LoadRequest,
        dirs: &[PathBuf],
        w: TcpListener,
        t: TcpListener,
    ) -> Result<(), String> {
        let Some(l) = r.layout else {
            // As the worker's service answers.
            return clear("layout missing");
        };
        let layout = grok_proto::convert::layout_of(&l);
        let addr = |l: &TcpListener| l.local_addr().unwrap();
        let world = layout.world_size();
        let n = r.world_peers.len().min(4);
        // Never a full set of peers for a world of several ranks (nothing would answer).
        // (The group is the live ranks when they are given.)
        let group = if r.live_ranks.is_empty() {
            world
        } else {
            r.live_ranks.len()
        };
        let n = if group > 1 && n == group { n - 1 } else { n };
        let world_peers: Vec<SocketAddr> = vec![addr(&w); n];
        let tp_peers: Vec<SocketAddr> = vec![addr(&t); r.tp_peers.len().min(4)];
        let dir = dirs
            .iter()
            .find(|d| d.to_string_lossy() == r.model_dir)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&r.model_dir));
        // As the worker's service checks them (a CPU worker refuses any).
        let nccl = match grok_worker::comm::NcclIds::parse(&r.world_nccl_id, &r.tp_nccl_id) {
            Ok(ids) if !ids.any() => ids,
            Ok(_) => return clear("an NCCL id was sent to a CPU worker"),
            Err(e) => return clear(e),
        };
        let spec = LoadSpec {
            model_dir: &dir,
            layout,
            rank: r.rank as usize,
            world_peers,
            tp_peers,
            kv: grok_shared::model::KvSizing {
                blocks: Some(r.kv_blocks.max(1) as usize),
                ..Default::default()
            },
            block_size: r.block_size.max(1) as usize,
            comm_timeout: Duration::from_millis(300),
            cuda_device: None,
            live_ranks: r.live_ranks.iter().map(|&x| x as usize).collect(),
            placement: grok_proto::convert::placement_of(&r.placement),
            nccl,
            gemm: Default::default(),
        };
        match Engine::load(spec, w, t, |_, _, _| {}) {
            Ok(_) => Ok(()),
            Err(e) => clear(e),
        }
    }

    #[test]
    fn fuzz_worker_load_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        tiny_model(
            &model,
            "tiny",
            grok_shared::formats::genmodel::GenDType::Bf16,
        );
        let pre = tmp.path().join("pre");
        let ck = grok_shared::formats::checkpoint::Checkpoint::open(&model).unwrap();
        grok_shared::formats::presharded::write(&ck, &pre, Layout::new(1, 1, 1), |_, _| {})
            .unwrap();
        drop(ck);
        let dirs = vec![model.clone(), pre.clone(), tmp.path().join("missing")];
        let seeds: Vec<pb::LoadRequest> = dirs
            .iter()
            .map(|d| pb::LoadRequest {
                model_dir: d.display().to_string(),
                layout: Some(pb::Layout {
                    tp: 1,
                    ep: 1,
                    pp: 1,
                    replicas: 1,
                    ..Default::default()
                }),
                rank: 0,
                world_peers: vec!["127.0.0.1:1".into()],
                tp_peers: vec!["127.0.0.1:2".into()],
                kv_blocks: 16,
                block_size: 16,
                comm_timeout_ms: 300,
                ..Default::default()
            })
            .collect();
        let raw: Vec<Vec<u8>> = seeds.iter().map(|s| s.encode_to_vec()).collect();
        fuzz(
            "worker_load_request",
            3000,
            |r| {
                let mut m = r.pick(&seeds).clone();
                let odd = |r: &mut R| {
                    if r.pct(50) {
                        r.below(5) as u32
                    } else {
                        *r.pick(&U32S)
                    }
                };
                // A third of the requests only change the cache (and load), the others get one
                // to three hostile fields.
                let hostile = if r.pct(33) { 0 } else { 1 + r.below(3) };
                if hostile == 0 {
                    m.kv_blocks = 1 + r.below(64) as u32;
                    m.block_size = 1 + r.below(32) as u32;
                }
                for _ in 0..hostile {
                    let l = m.layout.get_or_insert_with(Default::default);
                    match r.below(10) {
                        0 => l.tp = odd(r),
                        1 => l.ep = odd(r),
                        2 => l.pp = odd(r),
                        3 => l.replicas = odd(r),
                        4 => m.rank = odd(r),
                        5 => m.kv_blocks = odd(r),
                        6 => m.block_size = odd(r),
                        7 => m.world_peers = vec![String::new(); r.below(4)],
                        8 => m.tp_peers = vec![String::new(); r.below(4)],
                        _ => m.layout = None,
                    }
                }
                let mut b = m.encode_to_vec();
                if r.pct(20) {
                    let others: Vec<&[u8]> = raw.iter().map(|x| &x[..]).collect();
                    mutate_bytes(r, &mut b, 0, &others);
                }
                b
            },
            |b| {
                let req = match pb::LoadRequest::decode(b) {
                    Ok(q) => q,
                    Err(e) => {
                        clear(e)?;
                        return Ok(0);
                    }
                };
                let (w, t) = listeners();
                // Not watched: the KV cache is as large as the request asks, by design (the
                // engine refuses sizes that overflow or cannot be allocated).
                WATCHING.with(|x| x.set(false));
                load(&req, &dirs, w, t)?;
                Ok(0)
            },
        );
    }
}
