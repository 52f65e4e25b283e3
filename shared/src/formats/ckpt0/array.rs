//! The arrays of a ckpt-0 file: dtypes, shapes, byte ranges of the memory-mapped file, C or
//! Fortran order; and the file set (names of the 770 leaves, the files of a directory).

use std::borrow::Cow;
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
