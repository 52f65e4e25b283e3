//! The closed pickle machine: the opcodes and the few globals the ckpt-0 files use, nothing
//! else; every length, memo index and shape checked, values bounded.

use super::array::{c_order, Ckpt0Error, Leaf, NpArray, NpDType};
use memmap2::Mmap;
use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

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
