//! Reader of the official Grok-1 release (`ckpt-0`, GROK1_SPEC.md §6): 770 files
//! `tensor{idx:05d}_000`, each a Python pickle of a numpy array (fp32) or a
//! `__main__.QuantizedWeight8bit(weight: int8 array, scales: bf16 array)`.
//!
//! The pickle is interpreted by a small, closed virtual machine that knows exactly the opcodes
//! and the few globals those files use (numpy array and dtype reconstruction, `ml_dtypes`
//! bfloat16, the dataclass); any other global is refused by name and nothing is ever executed.
//! Array payloads are not copied: a parsed array refers to a byte range of the memory-mapped file,
//! so converting one tensor at a time keeps memory bounded by the largest output tensor. Arrays
//! numpy pickled in Fortran order are read in C order through [`c_order`] (a copy of just the
//! elements asked for). Every length, memo index and shape read from a file is checked, and the
//! machine's values are bounded (see `MAX_VALUES`), so no pickle can make it panic or allocate
//! more than its size justifies.

use memmap2::Mmap;
use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Ckpt0Error {
    #[error("cannot read {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error("{path}: not a checkpoint pickle this reader accepts: {why}")]
    Pickle { path: PathBuf, why: String },
    #[error("{path}: refusing pickle global `{module}.{name}` (only numpy arrays and QuantizedWeight8bit are accepted)")]
    Global {
        path: PathBuf,
        module: String,
        name: String,
    },
    #[error("{path}: tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{0}")]
    Layout(String),
}

/// Element types found in the release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpDType {
    F32,
    I8,
    Bf16,
}

impl NpDType {
    pub fn size(self) -> usize {
        match self {
            NpDType::F32 => 4,
            NpDType::I8 => 1,
            NpDType::Bf16 => 2,
        }
    }
}

/// An array inside a mapped pickle, little-endian. Its bytes are in C (row-major) order, or in
/// Fortran (column-major) order when `fortran` is set: numpy pickles an F-contiguous array (a
/// transposed one, `np.asfortranarray(x)`) that way. [`TensorFile::bytes`] always hands out C
/// order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpArray {
    pub dtype: NpDType,
    pub shape: Vec<usize>,
    /// The data is stored in Fortran (column-major) order.
    pub fortran: bool,
    /// Byte range of the data inside the file.
    pub start: usize,
    pub len: usize,
}

impl NpArray {
    /// Number of elements (the product of the shape, checked when the array was parsed).
    pub fn numel(&self) -> usize {
        self.len / self.dtype.size()
    }
}

/// One leaf of the parameter tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Leaf {
    Array(NpArray),
    Quantized { weight: NpArray, scales: NpArray },
}

/// A mapped tensor file and its parsed leaf.
pub struct TensorFile {
    pub path: PathBuf,
    pub map: Mmap,
    pub leaf: Leaf,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self, Ckpt0Error> {
        let io = |e: std::io::Error| Ckpt0Error::Io {
            path: path.into(),
            why: e.to_string(),
        };
        let f = File::open(path).map_err(io)?;
        // SAFETY: read-only mapping of a file the converter does not modify.
        let map = unsafe { Mmap::map(&f) }.map_err(io)?;
        let leaf = parse(&map, path)?;
        Ok(Self {
            path: path.into(),
            map,
            leaf,
        })
    }

    /// The array's bytes as stored in the file (C or Fortran order).
    pub fn raw_bytes(&self, a: &NpArray) -> &[u8] {
        &self.map[a.start..a.start + a.len]
    }

    /// The whole array in C (row-major) order: a view of the mapping for a C-order array, a
    /// reordered copy for a Fortran-order one.
    pub fn bytes(&self, a: &NpArray) -> Cow<'_, [u8]> {
        c_order(self.raw_bytes(a), a, 0, a.numel())
    }

    /// Elements `first..first + n` of the array in C order (e.g. one expert of a stacked
    /// weight), zero-copy for a C-order array.
    pub fn c_range(&self, a: &NpArray, first: usize, n: usize) -> Cow<'_, [u8]> {
        c_order(self.raw_bytes(a), a, first, n)
    }
}

/// Elements `first..first + n`, counted in C (row-major) order, of the array `a` whose stored
/// bytes are `raw`. A C-order array (or one of fewer than two dimensions, where both orders
/// agree) is borrowed; a Fortran-order one is gathered element by element into a copy of `n`
/// elements, so slicing one expert out of a stacked weight never copies the whole stack.
///
/// Panics if the range is outside the array: callers check shapes first.
pub fn c_order<'a>(raw: &'a [u8], a: &NpArray, first: usize, n: usize) -> Cow<'a, [u8]> {
    let size = a.dtype.size();
    let end = first
        .checked_add(n)
        .filter(|&e| e <= a.numel() && e * size <= raw.len())
        .unwrap_or_else(|| {
            panic!(
                "elements {first}..+{n} outside the array of shape {:?}",
                a.shape
            )
        });
    if !a.fortran || a.shape.len() < 2 {
        return Cow::Borrowed(&raw[first * size..end * size]);
    }
    let nd = a.shape.len();
    // Fortran strides (in elements): the first axis varies fastest.
    let mut fstride = vec![0usize; nd];
    let mut s = 1usize;
    for k in 0..nd {
        fstride[k] = s;
        s *= a.shape[k];
    }
    // The multi-index of element `first` (C order) and its offset in the stored data.
    let mut idx = vec![0usize; nd];
    let mut rem = first;
    for k in (0..nd).rev() {
        if a.shape[k] > 0 {
            idx[k] = rem % a.shape[k];
            rem /= a.shape[k];
        }
    }
    let mut off: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
    let mut out = Vec::with_capacity(n * size);
    for _ in 0..n {
        out.extend_from_slice(&raw[off * size..(off + 1) * size]);
        // The next element in C order: the last axis moves first, carrying into the others.
        for k in (0..nd).rev() {
            idx[k] += 1;
            off += fstride[k];
            if idx[k] < a.shape[k] {
                break;
            }
            off -= fstride[k] * a.shape[k];
            idx[k] = 0;
        }
    }
    Cow::Owned(out)
}

#[derive(Clone, Debug)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Str(String),
    /// A byte string inside the file.
    Bytes(usize, usize),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(String, String),
    DType(Option<NpDType>),
    /// `_reconstruct(ndarray, (0,), b'b')`, waiting for its BUILD.
    EmptyArray,
    Array(NpArray),
    Qw(Option<NpArray>, Option<NpArray>),
    Mark,
}

/// Number of values in `v`, itself included (what a copy of it costs).
fn nodes(v: &V) -> usize {
    match v {
        V::Tuple(x) | V::List(x) => 1 + x.iter().map(nodes).sum::<usize>(),
        V::Dict(d) => 1 + d.iter().map(|(k, v)| nodes(k) + nodes(v)).sum::<usize>(),
        _ => 1,
    }
}

/// Bounds of the pickle machine. The release's pickles use a few dozen values and nest three
/// deep; these limits only stop hostile files from exhausting memory (memo copies of a large
/// list, over and over) or the stack (values nested thousands deep, dropped recursively).
/// Operations that build or fill a container (each can nest one level deeper).
const MAX_CONTAINER_OPS: usize = 1024;
/// Values created or copied (memo reads and writes copy) over the whole pickle.
const MAX_VALUES: usize = 1 << 16;
/// Memo slots.
const MAX_MEMO: usize = 4096;

const ALLOWED: &[(&str, &str)] = &[
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("ml_dtypes", "bfloat16"),
    ("jax.numpy", "bfloat16"),
    ("__main__", "QuantizedWeight8bit"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
];

/// Parses one tensor pickle. Never panics and allocates at most what the file's size and the
/// machine's limits allow: every length and memo index read from the file is checked first.
pub fn parse(b: &[u8], path: &Path) -> Result<Leaf, Ckpt0Error> {
    let err = |why: String| Ckpt0Error::Pickle {
        path: path.into(),
        why,
    };
    let mut st: Vec<V> = Vec::new();
    let mut memo: Vec<V> = Vec::new();
    let mut i = 0usize;
    // Values created or copied, and container operations, so far.
    let mut values = 0usize;
    let mut containers = 0usize;
    let take = |i: &mut usize, n: usize| -> Result<usize, Ckpt0Error> {
        let s = *i;
        match s.checked_add(n) {
            Some(e) if e <= b.len() => {
                *i = e;
                Ok(s)
            }
            _ => Err(Ckpt0Error::Pickle {
                path: path.into(),
                why: format!(
                    "truncated at byte {s} (needs {n} more, the file has {})",
                    b.len() - s
                ),
            }),
        }
    };
    let u32le = |s: usize| u32::from_le_bytes([b[s], b[s + 1], b[s + 2], b[s + 3]]) as usize;
    let u64le = |s: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[s..s + 8]);
        // Beyond the address space is beyond the file: `take` refuses it.
        usize::try_from(u64::from_le_bytes(x)).unwrap_or(usize::MAX)
    };
    let pop = |st: &mut Vec<V>| st.pop().ok_or_else(|| err("stack underflow".into()));
    let pop_mark = |st: &mut Vec<V>| -> Result<Vec<V>, Ckpt0Error> {
        let m = st
            .iter()
            .rposition(|v| matches!(v, V::Mark))
            .ok_or_else(|| err("no MARK on the stack".into()))?;
        let items = st.split_off(m + 1);
        st.pop();
        Ok(items)
    };
    let text = |s: usize, n: usize| -> Result<String, Ckpt0Error> {
        std::str::from_utf8(&b[s..s + n])
            .map(str::to_string)
            .map_err(|_| err("invalid UTF-8 in a string".into()))
    };
    // Charges `n` values against MAX_VALUES.
    let charge = |values: &mut usize, n: usize| -> Result<(), Ckpt0Error> {
        *values = values.saturating_add(n);
        if *values > MAX_VALUES {
            return Err(err(format!(
                "more than {MAX_VALUES} values created or copied: not a tensor pickle"
            )));
        }
        Ok(())
    };
    loop {
        let op = b[take(&mut i, 1)?];
        charge(&mut values, 1)?;
        if matches!(
            op,
            b')' | b']' | b'}' | 0x85..=0x87 | b't' | b'a' | b'e' | b's' | b'u'
        ) {
            containers += 1;
            if containers > MAX_CONTAINER_OPS {
                return Err(err(format!(
                    "more than {MAX_CONTAINER_OPS} tuple, list and dict operations: not a tensor pickle"
                )));
            }
        }
        match op {
            0x80 => {
                take(&mut i, 1)?;
            }
            0x95 => {
                take(&mut i, 8)?;
            }
            0x8c => {
                let n = b[take(&mut i, 1)?] as usize;
                let s = take(&mut i, n)?;
                st.push(V::Str(text(s, n)?));
            }
            b'X' => {
                let n = u32le(take(&mut i, 4)?);
                let s = take(&mut i, n)?;
                st.push(V::Str(text(s, n)?));
            }
            0x8d => {
                let n = u64le(take(&mut i, 8)?);
                let s = take(&mut i, n)?;
                st.push(V::Str(text(s, n)?));
            }
            b'C' => {
                let n = b[take(&mut i, 1)?] as usize;
                let s = take(&mut i, n)?;
                st.push(V::Bytes(s, n));
            }
            b'B' => {
                let n = u32le(take(&mut i, 4)?);
                let s = take(&mut i, n)?;
                st.push(V::Bytes(s, n));
            }
            0x8e | 0x96 => {
                let n = u64le(take(&mut i, 8)?);
                let s = take(&mut i, n)?;
                st.push(V::Bytes(s, n));
            }
            0x98 => {} // READONLY_BUFFER
            0x94 | b'q' | b'r' => {
                // MEMOIZE (the next slot), BINPUT, LONG_BINPUT (a given slot). Writers number
                // the slots in order, so a slot past the next one is refused: an index read
                // from the file never sizes an allocation.
                let k = match op {
                    0x94 => memo.len(),
                    b'q' => b[take(&mut i, 1)?] as usize,
                    _ => u32le(take(&mut i, 4)?),
                };
                if k > memo.len() || k >= MAX_MEMO {
                    return Err(err(format!(
                        "memo slot {k} is out of order (the memo holds {} values)",
                        memo.len()
                    )));
                }
                let top = st
                    .last()
                    .ok_or_else(|| err("memo write on an empty stack".into()))?;
                charge(&mut values, nodes(top))?;
                let top = top.clone();
                if k == memo.len() {
                    memo.push(top);
                } else {
                    memo[k] = top;
                }
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    b[take(&mut i, 1)?] as usize
                } else {
                    u32le(take(&mut i, 4)?)
                };
                let v = memo
                    .get(k)
                    .ok_or_else(|| err(format!("memo {k} undefined")))?;
                charge(&mut values, nodes(v))?;
                st.push(v.clone());
            }
            0x93 | b'c' => {
                let (module, name) = if op == 0x93 {
                    let n = pop(&mut st)?;
                    let m = pop(&mut st)?;
                    match (m, n) {
                        (V::Str(m), V::Str(n)) => (m, n),
                        _ => return Err(err("STACK_GLOBAL needs two strings".into())),
                    }
                } else {
                    let start = i;
                    let nl1 = b[start..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .ok_or_else(|| err("bad GLOBAL".into()))?;
                    let m = text(start, nl1)?;
                    let s2 = start + nl1 + 1;
                    let nl2 = b[s2..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .ok_or_else(|| err("bad GLOBAL".into()))?;
                    let n = text(s2, nl2)?;
                    i = s2 + nl2 + 1;
                    (m, n)
                };
                if !ALLOWED.iter().any(|(m, n)| *m == module && *n == name) {
                    return Err(Ckpt0Error::Global {
                        path: path.into(),
                        module,
                        name,
                    });
                }
                st.push(V::Global(module, name));
            }
            b')' => st.push(V::Tuple(vec![])),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if st.len() < n {
                    return Err(err("stack underflow in TUPLEn".into()));
                }
                let items = st.split_off(st.len() - n);
                st.push(V::Tuple(items));
            }
            b'(' => st.push(V::Mark),
            b't' => {
                let items = pop_mark(&mut st)?;
                st.push(V::Tuple(items));
            }
            b']' => st.push(V::List(vec![])),
            b'a' => {
                let v = pop(&mut st)?;
                match st.last_mut() {
                    Some(V::List(l)) => l.push(v),
                    _ => return Err(err("APPEND outside a list".into())),
                }
            }
            b'e' => {
                let items = pop_mark(&mut st)?;
                match st.last_mut() {
                    Some(V::List(l)) => l.extend(items),
                    _ => return Err(err("APPENDS outside a list".into())),
                }
            }
            b'}' => st.push(V::Dict(vec![])),
            b's' => {
                let v = pop(&mut st)?;
                let k = pop(&mut st)?;
                match st.last_mut() {
                    Some(V::Dict(d)) => d.push((k, v)),
                    _ => return Err(err("SETITEM outside a dict".into())),
                }
            }
            b'u' => {
                let items = pop_mark(&mut st)?;
                if items.len() % 2 != 0 {
                    return Err(err("SETITEMS with an odd number of items".into()));
                }
                let mut it = items.into_iter();
                let mut pairs = vec![];
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                match st.last_mut() {
                    Some(V::Dict(d)) => d.extend(pairs),
                    _ => return Err(err("SETITEMS outside a dict".into())),
                }
            }
            b'K' => {
                let s = take(&mut i, 1)?;
                st.push(V::Int(b[s] as i64));
            }
            b'M' => {
                let s = take(&mut i, 2)?;
                st.push(V::Int(u16::from_le_bytes([b[s], b[s + 1]]) as i64));
            }
            b'J' => {
                let s = take(&mut i, 4)?;
                st.push(V::Int(
                    i32::from_le_bytes([b[s], b[s + 1], b[s + 2], b[s + 3]]) as i64,
                ));
            }
            0x8a => {
                let n = b[take(&mut i, 1)?] as usize;
                let s = take(&mut i, n)?;
                if n > 8 {
                    return Err(err("integer too large".into()));
                }
                let mut v: i64 = 0;
                for (k, &byte) in b[s..s + n].iter().enumerate() {
                    v |= (byte as i64) << (8 * k);
                }
                if n > 0 && n < 8 && b[s + n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                st.push(V::Int(v));
            }
            b'N' => st.push(V::None),
            0x88 => st.push(V::Bool(true)),
            0x89 => st.push(V::Bool(false)),
            0x81 => {
                let args = pop(&mut st)?;
                let cls = pop(&mut st)?;
                match (cls, args) {
                    (V::Global(m, n), V::Tuple(a))
                        if m == "__main__" && n == "QuantizedWeight8bit" && a.is_empty() =>
                    {
                        st.push(V::Qw(None, None))
                    }
                    _ => {
                        return Err(err(
                            "NEWOBJ of something other than QuantizedWeight8bit".into()
                        ))
                    }
                }
            }
            b'R' => {
                let args = pop(&mut st)?;
                let f = pop(&mut st)?;
                let V::Global(m, n) = f else {
                    return Err(err("REDUCE on a non-global".into()));
                };
                let V::Tuple(a) = args else {
                    return Err(err("REDUCE arguments are not a tuple".into()));
                };
                match n.as_str() {
                    "_reconstruct" => st.push(V::EmptyArray),
                    "dtype" => {
                        let dt = match a.first() {
                            Some(V::Str(s)) => match s.as_str() {
                                "f4" | "<f4" => Some(NpDType::F32),
                                "i1" | "|i1" => Some(NpDType::I8),
                                other => return Err(err(format!("unsupported array dtype `{other}` (expected f4, i1 or bfloat16)"))),
                            },
                            Some(V::Global(_, g)) if g == "bfloat16" => Some(NpDType::Bf16),
                            _ => return Err(err("unsupported dtype constructor".into())),
                        };
                        st.push(V::DType(dt));
                    }
                    "_frombuffer" => {
                        // (buffer, dtype, shape, order): protocol 5 pickles.
                        match a.as_slice() {
                            [V::Bytes(s, len), V::DType(Some(dt)), V::Tuple(shape), V::Str(order)]
                                if order == "C" || order == "F" =>
                            {
                                let shape = ints(shape).ok_or_else(|| err("bad shape".into()))?;
                                st.push(V::Array(
                                    array(*dt, shape, order == "F", *s, *len).map_err(err)?,
                                ));
                            }
                            _ => return Err(err("unsupported _frombuffer arguments".into())),
                        }
                    }
                    other => return Err(err(format!("REDUCE of `{m}.{other}` is not allowed"))),
                }
            }
            b'b' => {
                let state = pop(&mut st)?;
                let obj = pop(&mut st)?;
                let built = match obj {
                    V::DType(d) => {
                        // (version, byte order, ...): only little-endian (or byte-sized) data.
                        if let V::Tuple(t) = &state {
                            if let Some(V::Str(o)) = t.get(1) {
                                if o == ">" {
                                    return Err(err(
                                        "big-endian arrays are not supported (the release is little-endian)"
                                            .into(),
                                    ));
                                }
                            }
                        }
                        V::DType(d)
                    }
                    V::EmptyArray => match state {
                        V::Tuple(t) => match t.as_slice() {
                            [V::Int(1), V::Tuple(shape), V::DType(Some(dt)), V::Bool(fortran), V::Bytes(s, len)] =>
                            {
                                let shape = ints(shape).ok_or_else(|| err("bad shape".into()))?;
                                V::Array(array(*dt, shape, *fortran, *s, *len).map_err(err)?)
                            }
                            _ => return Err(err("unexpected ndarray state".into())),
                        },
                        _ => return Err(err("unexpected ndarray state".into())),
                    },
                    V::Qw(_, _) => {
                        let V::Dict(d) = state else {
                            return Err(err("QuantizedWeight8bit state is not a dict".into()));
                        };
                        let mut w = None;
                        let mut sc = None;
                        for (k, v) in d {
                            match (k, v) {
                                (V::Str(k), V::Array(a)) if k == "weight" => w = Some(a),
                                (V::Str(k), V::Array(a)) if k == "scales" => sc = Some(a),
                                _ => {
                                    return Err(err(
                                        "QuantizedWeight8bit has an unexpected field".into()
                                    ))
                                }
                            }
                        }
                        V::Qw(w, sc)
                    }
                    _ => return Err(err("BUILD on an unexpected object".into())),
                };
                st.push(built);
            }
            b'.' => {
                let top = pop(&mut st)?;
                return match top {
                    V::Array(a) => Ok(Leaf::Array(a)),
                    V::Qw(Some(w), Some(s)) => {
                        if w.dtype != NpDType::I8 {
                            return Err(err("QuantizedWeight8bit.weight is not int8".into()));
                        }
                        if s.dtype == NpDType::I8 {
                            return Err(err(
                                "QuantizedWeight8bit.scales are int8 (expected bfloat16 or f32)"
                                    .into(),
                            ));
                        }
                        Ok(Leaf::Quantized {
                            weight: w,
                            scales: s,
                        })
                    }
                    _ => Err(err(
                        "the pickle does not hold an array or a QuantizedWeight8bit".into(),
                    )),
                };
            }
            other => {
                return Err(err(format!(
                    "opcode 0x{other:02x} at byte {} is not accepted",
                    i - 1
                )))
            }
        }
    }
}

fn ints(v: &[V]) -> Option<Vec<usize>> {
    v.iter()
        .map(|x| {
            if let V::Int(n) = x {
                usize::try_from(*n).ok()
            } else {
                None
            }
        })
        .collect()
}

fn array(
    dtype: NpDType,
    shape: Vec<usize>,
    fortran: bool,
    start: usize,
    len: usize,
) -> Result<NpArray, String> {
    let need = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d));
    if need != Some(len) {
        return Err(match need {
            Some(n) => {
                format!("array data is {len} bytes but shape {shape:?} of {dtype:?} needs {n}")
            }
            None => format!("array shape {shape:?} of {dtype:?} overflows"),
        });
    }
    Ok(NpArray {
        dtype,
        shape,
        fortran,
        start,
        len,
    })
}

/// Names of the 770 leaves in file order (GROK1_SPEC.md §6: lexicographic keys).
pub fn leaf_names(num_layers: usize) -> Vec<String> {
    let mut out = vec![
        "language_model/in_out_embed/embeddings".to_string(),
        "language_model/rms_norm/scale".to_string(),
    ];
    let mut layers: Vec<String> = (0..num_layers)
        .map(|i| format!("decoder_layer_{i}"))
        .collect();
    layers.sort();
    for l in layers {
        for leaf in [
            "moe/linear/w",
            "moe/linear_1/w",
            "moe/linear_v/w",
            "multi_head_attention/key/w",
            "multi_head_attention/linear/w",
            "multi_head_attention/query/w",
            "multi_head_attention/value/w",
            "rms_norm/scale",
            "rms_norm_1/scale",
            "rms_norm_2/scale",
            "rms_norm_3/scale",
            "router/w",
        ] {
            out.push(format!("transformer/{l}/{leaf}"));
        }
    }
    out
}

/// The tensor files of a `ckpt-0` directory, in order; the layer count follows from their number.
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>, Ckpt0Error> {
    let mut files = Vec::new();
    loop {
        let p = dir.join(format!("tensor{:05}_000", files.len()));
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    if files.len() < 14 || (files.len() - 2) % 12 != 0 {
        return Err(Ckpt0Error::Layout(format!(
            "{}: found {} files tensor00000_000..; an official checkpoint has 2 + 12 per layer (770 for Grok-1)",
            dir.display(),
            files.len()
        )));
    }
    Ok(files)
}

/// `[rows, cols]` row-major -> `[cols, rows]` for elements of `size` bytes.
fn transpose(src: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            let s = (r * cols + c) * size;
            let d = (c * rows + r) * size;
            out[d..d + size].copy_from_slice(&src[s..s + size]);
        }
    }
    out
}

fn np_to_dtype(d: NpDType) -> crate::checkpoint::DType {
    match d {
        NpDType::F32 => crate::checkpoint::DType::F32,
        NpDType::I8 => crate::checkpoint::DType::I8,
        NpDType::Bf16 => crate::checkpoint::DType::BF16,
    }
}

/// One output tensor: its name, dtype, shape and bytes.
type OutTensor = (String, crate::checkpoint::DType, Vec<usize>, Vec<u8>);

fn expect(f: &TensorFile, name: &str, a: &NpArray, shape: &[usize]) -> Result<(), Ckpt0Error> {
    if a.shape != shape {
        return Err(Ckpt0Error::Shape {
            path: f.path.clone(),
            name: name.into(),
            expected: shape.to_vec(),
            found: a.shape.clone(),
        });
    }
    Ok(())
}

/// A `[.., in, out]` matrix leaf (expert `e` of a stacked one of `n` experts when `expert` is
/// `Some((e, n))`) as Hugging Face tensors `base.weight` `[out, in]` (+ `base.scales`
/// `[nb, out]` for int8).
fn matrix_out(
    f: &TensorFile,
    leaf: &str,
    expert: Option<(usize, usize)>,
    inp: usize,
    out: usize,
    base: &str,
) -> Result<Vec<OutTensor>, Ckpt0Error> {
    let (w, s) = match &f.leaf {
        Leaf::Quantized { weight, scales } => (weight, Some(scales)),
        Leaf::Array(a) => (a, None),
    };
    // The stack must hold every expert the config names: its leading size is checked too.
    let lead: Vec<usize> = expert.map(|(_, n)| vec![n]).unwrap_or_default();
    let e = expert.map_or(0, |(e, _)| e);
    let mut want = lead.clone();
    want.extend([inp, out]);
    expect(f, leaf, w, &want)?;
    let per = inp * out;
    let data = f.c_range(w, e * per, per);
    let mut v = vec![(
        format!("{base}.weight"),
        np_to_dtype(w.dtype),
        vec![out, inp],
        transpose(&data, inp, out, w.dtype.size()),
    )];
    if let Some(s) = s {
        let nb = *s.shape.get(s.shape.len().wrapping_sub(2)).unwrap_or(&0);
        let mut want = lead;
        want.extend([nb, out]);
        if (nb != 1 && nb != 8) || !inp.is_multiple_of(nb) {
            return Err(Ckpt0Error::Shape {
                path: f.path.clone(),
                name: format!("{leaf} scales"),
                expected: want,
                found: s.shape.clone(),
            });
        }
        expect(f, &format!("{leaf} scales"), s, &want)?;
        let sper = nb * out;
        v.push((
            format!("{base}.scales"),
            np_to_dtype(s.dtype),
            vec![nb, out],
            f.c_range(s, e * sper, sper).into_owned(),
        ));
    }
    Ok(v)
}

fn vector_out(
    f: &TensorFile,
    leaf: &str,
    d: usize,
    name: &str,
) -> Result<Vec<OutTensor>, Ckpt0Error> {
    let Leaf::Array(a) = &f.leaf else {
        return Err(Ckpt0Error::Layout(format!(
            "{}: `{leaf}` should be a plain array",
            f.path.display()
        )));
    };
    expect(f, leaf, a, &[d])?;
    Ok(vec![(
        name.into(),
        np_to_dtype(a.dtype),
        vec![d],
        f.bytes(a).into_owned(),
    )])
}

fn write_group(dst: &Path, fname: &str, ts: Vec<OutTensor>) -> std::io::Result<()> {
    let pend: Vec<crate::checkpoint::PendingTensor> = ts
        .iter()
        .map(|(n, d, s, _)| crate::checkpoint::PendingTensor {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    crate::checkpoint::write_safetensors(&dst.join(fname), &pend, |k, w| w.write_all(&ts[k].3))
}

/// Converts an official `ckpt-0` directory into the Hugging Face layout this project loads
/// (int8 kept as int8 with its scales), one layer at a time. Files already written by an earlier,
/// interrupted run are kept (each file appears only once complete), so the conversion resumes.
pub fn convert_to_hf(
    src: &Path,
    dst: &Path,
    cfg: &crate::config::ModelConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), Ckpt0Error> {
    use std::io::Write as _;
    let files = list_files(src)?;
    let layers = (files.len() - 2) / 12;
    if layers != cfg.num_layers {
        return Err(Ckpt0Error::Layout(format!(
            "{} holds {layers} layers but the config says {}",
            src.display(),
            cfg.num_layers
        )));
    }
    let io = |e: std::io::Error| Ckpt0Error::Io {
        path: dst.into(),
        why: e.to_string(),
    };
    std::fs::create_dir_all(dst).map_err(io)?;
    let names = leaf_names(layers);
    let (d, v, f, e) = (cfg.emb_size, cfg.vocab_size, cfg.ffn_size, cfg.num_experts);
    let (q, kv) = (cfg.q_size(), cfg.kv_size());
    let mut weight_map = serde_json::Map::new();
    let total = 1 + layers;
    // Embedding and final norm.
    let fname = "model-embed.safetensors".to_string();
    if !dst.join(&fname).exists() {
        let emb = TensorFile::open(&files[0])?;
        let Leaf::Array(a) = &emb.leaf else {
            return Err(Ckpt0Error::Layout(
                "the embedding should be a plain array".into(),
            ));
        };
        expect(&emb, &names[0], a, &[v, d])?;
        let mut ts = vec![(
            "model.embed_tokens.weight".to_string(),
            np_to_dtype(a.dtype),
            vec![v, d],
            emb.bytes(a).into_owned(),
        )];
        ts.extend(vector_out(
            &TensorFile::open(&files[1])?,
            &names[1],
            d,
            "model.norm.scale",
        )?);
        write_group(dst, &fname, ts).map_err(io)?;
    }
    for n in ["model.embed_tokens.weight", "model.norm.scale"] {
        weight_map.insert(n.into(), fname.clone().into());
    }
    progress(1, total);
    // Layers, in the files' (lexicographic) order; each is written as model-layer-NNN.
    let mut order: Vec<usize> = (0..layers).collect();
    order.sort_by_key(|i| format!("decoder_layer_{i}"));
    for (k, &li) in order.iter().enumerate() {
        let fname = format!("model-layer-{li:03}.safetensors");
        let base = 2 + 12 * k;
        let p = format!("model.layers.{li}");
        let mut ts: Vec<OutTensor> = Vec::new();
        let done = dst.join(&fname).exists();
        if !done {
            let open = |j: usize| TensorFile::open(&files[base + j]);
            let (lin, lin1, linv) = (open(0)?, open(1)?, open(2)?);
            for x in 0..e {
                let eb = format!("{p}.moe_block.experts.{x}");
                ts.extend(matrix_out(
                    &lin,
                    &names[base],
                    Some((x, e)),
                    d,
                    f,
                    &format!("{eb}.linear"),
                )?);
                ts.extend(matrix_out(
                    &lin1,
                    &names[base + 1],
                    Some((x, e)),
                    f,
                    d,
                    &format!("{eb}.linear_1"),
                )?);
                ts.extend(matrix_out(
                    &linv,
                    &names[base + 2],
                    Some((x, e)),
                    d,
                    f,
                    &format!("{eb}.linear_v"),
                )?);
            }
            ts.extend(matrix_out(
                &open(3)?,
                &names[base + 3],
                None,
                d,
                kv,
                &format!("{p}.attn.k_proj"),
            )?);
            ts.extend(matrix_out(
                &open(4)?,
                &names[base + 4],
                None,
                q,
                d,
                &format!("{p}.attn.o_proj"),
            )?);
            ts.extend(matrix_out(
                &open(5)?,
                &names[base + 5],
                None,
                d,
                q,
                &format!("{p}.attn.q_proj"),
            )?);
            ts.extend(matrix_out(
                &open(6)?,
                &names[base + 6],
                None,
                d,
                kv,
                &format!("{p}.attn.v_proj"),
            )?);
            for (j, norm) in [
                "pre_attn_norm",
                "post_attn_norm",
                "pre_moe_norm",
                "post_moe_norm",
            ]
            .iter()
            .enumerate()
            {
                ts.extend(vector_out(
                    &open(7 + j)?,
                    &names[base + 7 + j],
                    d,
                    &format!("{p}.{norm}.scale"),
                )?);
            }
            let r = open(11)?;
            let Leaf::Array(a) = &r.leaf else {
                return Err(Ckpt0Error::Layout(
                    "the router should be a plain array".into(),
                ));
            };
            expect(&r, &names[base + 11], a, &[d, e])?;
            ts.push((
                format!("{p}.moe_block.gate.weight"),
                np_to_dtype(a.dtype),
                vec![e, d],
                transpose(&r.bytes(a), d, e, a.dtype.size()),
            ));
            for t in &ts {
                weight_map.insert(t.0.clone(), fname.clone().into());
            }
            write_group(dst, &fname, ts).map_err(io)?;
        } else {
            // Resumed: list the names of the finished file from its header.
            let ck = crate::checkpoint::Checkpoint::open_files(dst, std::slice::from_ref(&fname))
                .map_err(|e| Ckpt0Error::Layout(e.to_string()))?;
            for n in ck.tensor_names() {
                weight_map.insert(n.to_string(), fname.clone().into());
            }
        }
        progress(k + 2, total);
    }
    let idx = serde_json::json!({"metadata": {"format": "converted from the official ckpt-0"}, "weight_map": weight_map});
    std::fs::write(
        dst.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&idx).expect("json"),
    )
    .map_err(io)?;
    let mut cj = std::fs::File::create(dst.join("config.json")).map_err(io)?;
    cj.write_all(&serde_json::to_vec_pretty(&cfg.to_hf_json()).expect("json"))
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_globals_and_truncation() {
        // pickle.dumps(os.system) style: GLOBAL 'posix' 'system'.
        let evil = b"\x80\x04\x95\x12\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.";
        let e = parse(evil, Path::new("t")).unwrap_err().to_string();
        assert!(e.contains("refusing pickle global `posix.system`"), "{e}");
        let e = parse(b"\x80\x04\x8c\x05ab", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        assert_eq!(leaf_names(64).len(), 770);
        assert_eq!(
            leaf_names(11)[2 + 12 * 2],
            "transformer/decoder_layer_10/moe/linear/w"
        );
    }

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|k| u8::from_str_radix(&h[k..k + 2], 16).unwrap())
            .collect()
    }

    // `pickle.dumps(x)` (protocol 4) of x = np.arange(6, dtype=np.float32).reshape(2, 3), in C
    // order and as np.asfortranarray(x); the same with protocol 5 (`_frombuffer`, order 'F');
    // y = np.arange(24, dtype=np.int8).reshape(2, 3, 4) in both orders.
    const HEAD: &str = "800495a3000000000000008c166e756d70792e5f636f72652e6d756c74696172726179948c0c5f7265636f6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b024b03869468038c0564747970659493948c02663494898887945294284b038c013c944e4e4e4affffffff4affffffff4b00749462";
    const C2: &str = "894318000000000000803f0000004000004040000080400000a040947494622e";
    const F2: &str = "88431800000000000040400000803f00008040000000400000a040947494622e";
    const F2_P5: &str = "8005958e000000000000008c136e756d70792e5f636f72652e6e756d65726963948c0b5f66726f6d6275666665729493942896180000000000000000000000000040400000803f00008040000000400000a040948c056e756d7079948c0564747970659493948c02663494898887945294284b038c013c944e4e4e4affffffff4affffffff4b007494624b024b0386948c014694749452942e";
    const C3: &str = "800495a5000000000000008c166e756d70792e5f636f72652e6d756c74696172726179948c0c5f7265636f6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b024b034b04879468038c0564747970659493948c02693194898887945294284b038c017c944e4e4e4affffffff4affffffff4b00749462894318000102030405060708090a0b0c0d0e0f1011121314151617947494622e";
    const F3: &str = "800495a5000000000000008c166e756d70792e5f636f72652e6d756c74696172726179948c0c5f7265636f6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b024b034b04879468038c0564747970659493948c02693194898887945294284b038c017c944e4e4e4affffffff4affffffff4b00749462884318000c04100814010d05110915020e06120a16030f07130b17947494622e";

    fn array_of(b: &[u8]) -> NpArray {
        match parse(b, Path::new("t")).unwrap() {
            Leaf::Array(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn fortran_order_arrays_read_in_c_order() {
        let want: Vec<f32> = (0..6).map(|x| x as f32).collect();
        for (what, b) in [
            ("C", unhex(&format!("{HEAD}{C2}"))),
            ("F", unhex(&format!("{HEAD}{F2}"))),
            ("F, protocol 5", unhex(F2_P5)),
        ] {
            let a = array_of(&b);
            assert_eq!(a.shape, vec![2, 3], "{what}");
            assert_eq!(a.fortran, what != "C", "{what}");
            let raw = &b[a.start..a.start + a.len];
            assert_eq!(f32s(&c_order(raw, &a, 0, 6)), want, "{what}");
            // Any range in C order, e.g. the second row.
            assert_eq!(f32s(&c_order(raw, &a, 3, 3)), want[3..], "{what}");
            // C order stays a view of the file.
            assert_eq!(
                matches!(c_order(raw, &a, 0, 6), Cow::Borrowed(_)),
                what == "C"
            );
        }
        let want: Vec<u8> = (0..24).collect();
        for b in [unhex(C3), unhex(F3)] {
            let a = array_of(&b);
            assert_eq!(a.shape, vec![2, 3, 4]);
            let raw = &b[a.start..a.start + a.len];
            assert_eq!(&*c_order(raw, &a, 0, 24), &want[..]);
            // The second of a stack of two [3, 4] matrices, and a range across rows.
            assert_eq!(&*c_order(raw, &a, 12, 12), &want[12..]);
            assert_eq!(&*c_order(raw, &a, 5, 9), &want[5..14]);
        }
    }

    #[test]
    fn stacked_experts_in_either_order_convert_alike_and_missing_experts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str, hex: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, unhex(hex)).unwrap();
            TensorFile::open(&p).unwrap()
        };
        let (c, f) = (open("c", C3), open("f", F3));
        for e in 0..2 {
            let a = matrix_out(&c, "w", Some((e, 2)), 3, 4, "x").unwrap();
            let b = matrix_out(&f, "w", Some((e, 2)), 3, 4, "x").unwrap();
            assert_eq!(a, b);
            // [in, out] = [3, 4] becomes [out, in].
            assert_eq!(a[0].2, vec![4, 3]);
            assert_eq!(
                a[0].3[..3],
                [12 * e as u8, 12 * e as u8 + 4, 12 * e as u8 + 8]
            );
        }
        // A stack of 2 where the config says 8 experts: a shape error, not a slice past the end.
        let e = matrix_out(&c, "w", Some((5, 8)), 3, 4, "x").unwrap_err();
        assert!(matches!(e, Ckpt0Error::Shape { .. }), "{e}");
    }

    fn pickle_err(b: &[u8]) -> String {
        let e = parse(b, Path::new("t")).unwrap_err().to_string();
        assert!(e.starts_with("t: "), "{e}");
        e
    }

    #[test]
    fn lengths_indices_and_sizes_from_the_file_are_checked() {
        // BINUNICODE8 of length 2^64 - 1: the end offset overflowed.
        let mut b = b"\x80\x04\x8d".to_vec();
        b.extend([0xff; 8]);
        assert!(pickle_err(&b).contains("truncated"));
        // LONG_BINPUT 0x7fffffff: resized the memo to 2^31 values.
        let e = pickle_err(b"\x80\x04Nr\xff\xff\xff\x7f.");
        assert!(e.contains("memo slot 2147483647 is out of order"), "{e}");
        // A shape whose byte count overflows: (2^62, 8) of f32.
        let ok = format!("{HEAD}{C2}");
        let bad = ok.replace("4b024b0386", "8a0800000000000000404b0886");
        assert_ne!(ok, bad);
        assert!(pickle_err(&unhex(&bad)).contains("overflows"));
        // Big-endian data would be read as garbage: refused.
        let be = ok.replace("8c013c94", "8c013e94");
        assert!(pickle_err(&unhex(&be)).contains("big-endian"));
    }

    #[test]
    fn nesting_and_memo_copies_are_bounded() {
        // 100000 nested tuples: dropping them recursed 100000 deep (a stack overflow).
        let mut b = b"\x80\x04)".to_vec();
        b.extend(std::iter::repeat_n(0x85u8, 100_000));
        b.push(b'.');
        assert!(pickle_err(&b).contains("tuple, list and dict operations"));
        // A 1000-item list memoized, then copied 100000 times (10^8 values).
        let mut b = b"\x80\x04](".to_vec();
        b.extend(std::iter::repeat_n(b'N', 1000));
        b.extend(b"e\x94");
        for _ in 0..100_000 {
            b.extend(b"h\x00");
        }
        b.push(b'.');
        assert!(pickle_err(&b).contains("values created or copied"));
    }
}
