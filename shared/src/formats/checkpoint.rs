//! Checkpoints in the safetensors format: memory-mapped reading of one or many files (with
//! `model.safetensors.index.json`), and a streaming writer.
//!
//! Reading never copies a tensor unless asked to: [`Checkpoint::buf`] hands out views into the
//! mapping when the data is aligned for its element type. Every header is validated against the
//! file size before any tensor is used, so a truncated or corrupt file is an error, not a crash.
//!
//! Int8 weights (the official release's quantization, GROK1_SPEC.md §6) are stored as
//! `<name>.weight` (dtype I8, `[out, in]`) plus `<name>.scales` (F32/BF16/F16, `[nb, out]`, `nb`
//! dividing `in`): `W[o, i] = weight[o, i] * scales[i / (in / nb), o]`. `nb = 1` is one scale per
//! output column, `nb = 8` the 8 row blocks along the input dimension.

use memmap2::Mmap;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{ConfigError, ModelConfig};

/// Element types this project reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::I8 => "I8",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => DType::F32,
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            "I8" => DType::I8,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors opening or reading a checkpoint. Each names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path} is not a valid safetensors file: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("no weights found in {0}: expected model.safetensors, model.safetensors.index.json or *.safetensors")]
    NoWeights(PathBuf),
    #[error("tensor `{name}` not found in {dir} (names tried: {tried})")]
    MissingTensor {
        name: String,
        dir: PathBuf,
        tried: String,
    },
    #[error("tensor `{name}` in {file}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {file}: dtype {found} is not accepted here (expected {expected})")]
    DType {
        name: String,
        file: PathBuf,
        expected: String,
        found: String,
    },
    #[error("tensor `{name}` in {file}: {why}")]
    Bad {
        name: String,
        file: PathBuf,
        why: String,
    },
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub file: usize,
    /// Absolute byte range inside the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A read-only, typed view of tensor data: either inside a mapped file or owned.
#[derive(Clone)]
pub enum Buf<T: bytemuck::Pod> {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
        /// A view of a file (its pages can be dropped and read again), not of this process's
        /// anonymous memory.
        file: bool,
        _t: std::marker::PhantomData<T>,
    },
    Owned(Arc<Vec<T>>),
}

impl<T: bytemuck::Pod> Buf<T> {
    pub fn owned(v: Vec<T>) -> Self {
        Buf::Owned(Arc::new(v))
    }
    pub fn as_slice(&self) -> &[T] {
        match self {
            Buf::Mapped {
                map, start, len, ..
            } => {
                let bytes = &map[*start..*start + *len * std::mem::size_of::<T>()];
                // Alignment was checked when the view was made.
                bytemuck::cast_slice(bytes)
            }
            Buf::Owned(v) => v,
        }
    }
    /// The view's bytes.
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self.as_slice())
    }

    /// A view of `len` elements at byte `start` of `map` (e.g. one [`copy_to_huge_pages`]
    /// made). Panics if they do not lie inside it or `start` is misaligned for `T`.
    pub fn in_map(map: Arc<Mmap>, start: usize, len: usize) -> Self {
        assert!(
            start.is_multiple_of(std::mem::align_of::<T>())
                && start + len * std::mem::size_of::<T>() <= map.len(),
            "view outside its mapping"
        );
        Buf::Mapped {
            map,
            start,
            len,
            file: false,
            _t: std::marker::PhantomData,
        }
    }

    /// Drops a file view's pages from this process's resident memory once they have been
    /// copied elsewhere: the data stays readable (read again, the pages come back from the
    /// file). Views of anonymous memory and owned buffers are left alone.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Buf::Mapped {
            map,
            start,
            len,
            file: true,
            ..
        } = self
        {
            const PAGE: usize = 4096;
            let base = map.as_ptr() as usize;
            let (a, b) = (base + start, base + start + len * std::mem::size_of::<T>());
            let (lo, hi) = (a.next_multiple_of(PAGE), b / PAGE * PAGE);
            if hi > lo {
                // SAFETY: a read-only mapping of a file the process never writes: dropped
                // pages are read back from the file, unchanged, if anything reads them again.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        lo - base,
                        hi - lo,
                    )
                };
            }
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Buf::Mapped { len, .. } => *len,
            Buf::Owned(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Copies `parts` into one anonymous mapping of this process, each at a 64-byte aligned byte
/// offset (returned), its whole 2 MB pages advised as transparent huge pages before they are
/// first touched (Linux; a kernel that refuses leaves ordinary pages). Weights read from it
/// once per token stream without a TLB miss every 4 KB, and the checkpoint's file pages can
/// leave the process.
///
/// `copied(i)` runs as soon as part `i` is copied (to let its source go: [`Buf::release_pages`]),
/// so the source and the copy are not both resident for the whole shard at once.
pub fn copy_to_huge_pages(
    parts: &[&[u8]],
    copied: impl Fn(usize) + Sync,
) -> std::io::Result<(Arc<Mmap>, Vec<usize>)> {
    use rayon::prelude::*;
    const HUGE: usize = 2 << 20;
    let mut offsets = Vec::with_capacity(parts.len());
    let mut end = 0usize;
    for p in parts {
        let o = end.next_multiple_of(64);
        offsets.push(o);
        end = o + p.len();
    }
    let mut map = memmap2::MmapMut::map_anon(end + HUGE)?;
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    let addr = map.as_ptr() as usize;
    let base = addr.next_multiple_of(HUGE) - addr;
    struct Dst(*mut u8);
    impl Dst {
        fn at(&self, o: usize) -> *mut u8 {
            self.0.wrapping_add(o)
        }
    }
    // SAFETY: the tasks below write disjoint ranges of the mapping.
    unsafe impl Sync for Dst {}
    let dst = Dst(map.as_mut_ptr());
    parts
        .par_iter()
        .zip(&offsets)
        .enumerate()
        .for_each(|(i, (p, &o))| {
            // SAFETY: [base + o, base + o + p.len()) lies inside the mapping (end + HUGE
            // bytes, base < HUGE) and no two parts overlap (offsets increase past each part's
            // end).
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst.at(base + o), p.len()) };
            copied(i);
        });
    let offsets = offsets.into_iter().map(|o| base + o).collect();
    Ok((Arc::new(map.make_read_only()?), offsets))
}

struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// An opened checkpoint directory: `config.json` plus safetensors files.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorInfo>,
    /// The tensors are one rank's slices already (a pre-sharded directory).
    pub presharded: bool,
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json`, maps every weight file and validates every header.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let names = weight_files(dir)?;
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for name in names {
            let path = dir.join(&name);
            let idx = files.len();
            let (map, infos) = map_and_parse(&path, idx)?;
            for (n, info) in infos {
                if tensors.insert(n.clone(), info).is_some() {
                    return Err(CheckpointError::Corrupt {
                        path: path.clone(),
                        why: format!("tensor `{n}` appears in more than one file"),
                    });
                }
            }
            files.push(MappedFile {
                path,
                map: Arc::new(map),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            files,
            tensors,
            presharded: false,
        })
    }

    /// Maps the given files of `dir` without a config (headers only).
    pub fn open_files(dir: &Path, names: &[String]) -> Result<Self, CheckpointError> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for name in names {
            let path = dir.join(name);
            let (map, infos) = map_and_parse(&path, files.len())?;
            tensors.extend(infos);
            files.push(MappedFile {
                path,
                map: Arc::new(map),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config: ModelConfig::grok1(),
            files,
            tensors,
            presharded: false,
        })
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn file_path(&self, info: &TensorInfo) -> &Path {
        &self.files[info.file].path
    }

    /// The first of `names` that exists.
    pub fn find(&self, names: &[String]) -> Result<(&str, &TensorInfo), CheckpointError> {
        for n in names {
            if let Some((k, v)) = self.tensors.get_key_value(n.as_str()) {
                return Ok((k.as_str(), v));
            }
        }
        Err(CheckpointError::MissingTensor {
            name: names.first().cloned().unwrap_or_default(),
            dir: self.dir.clone(),
            tried: names.join(", "),
        })
    }

    /// Raw bytes of a tensor.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.files[info.file].map[info.start..info.end]
    }

    /// Checks the shape of a tensor.
    pub fn expect_shape(
        &self,
        name: &str,
        info: &TensorInfo,
        shape: &[usize],
    ) -> Result<(), CheckpointError> {
        if info.shape != shape {
            return Err(CheckpointError::Shape {
                name: name.to_string(),
                file: self.file_path(info).to_path_buf(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(())
    }

    /// A view of a tensor's elements (zero-copy when aligned, copied otherwise).
    pub fn buf<T: bytemuck::Pod>(&self, info: &TensorInfo) -> Buf<T> {
        let f = &self.files[info.file];
        let size = std::mem::size_of::<T>();
        let len = (info.end - info.start) / size;
        let ptr = f.map.as_ptr() as usize + info.start;
        if ptr.is_multiple_of(std::mem::align_of::<T>()) {
            Buf::Mapped {
                map: f.map.clone(),
                start: info.start,
                len,
                file: true,
                _t: std::marker::PhantomData,
            }
        } else {
            let bytes = self.bytes(info);
            Buf::owned(bytemuck::pod_collect_to_vec(bytes))
        }
    }

    /// Any float tensor, converted to f32 (copied).
    pub fn f32_vec(&self, name: &str, info: &TensorInfo) -> Result<Vec<f32>, CheckpointError> {
        let b = self.bytes(info);
        Ok(match info.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(b),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::I8 => {
                return Err(CheckpointError::DType {
                    name: name.to_string(),
                    file: self.file_path(info).to_path_buf(),
                    expected: "F32, BF16 or F16".into(),
                    found: "I8".into(),
                })
            }
        })
    }
}

fn weight_files(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| CheckpointError::Io {
            path: index.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt {
            path: index.clone(),
            why: e.to_string(),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| CheckpointError::Corrupt {
                path: index.clone(),
                why: "no `weight_map` object".into(),
            })?;
        let mut files = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| CheckpointError::Corrupt {
                path: index.clone(),
                why: format!("the file of tensor `{name}` is {f}, not a file name"),
            })?;
            if !is_plain_file_name(f) {
                return Err(CheckpointError::Corrupt {
                    path: index.clone(),
                    why: format!("file name `{f}` must be a plain name inside the directory"),
                });
            }
            files.push(f.to_string());
        }
        files.sort();
        files.dedup();
        if files.is_empty() {
            return Err(CheckpointError::Corrupt {
                path: index.clone(),
                why: "the `weight_map` names no file".into(),
            });
        }
        return Ok(files);
    }
    if dir.join("model.safetensors").exists() {
        return Ok(vec!["model.safetensors".into()]);
    }
    let rd = std::fs::read_dir(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CheckpointError::NoWeights(dir.to_path_buf()));
    }
    Ok(files)
}

/// A file name that stays inside its directory: not empty, no separator, no `..`, no NUL. Index
/// and manifest files name weight files; a name from a file must not reach outside.
pub fn is_plain_file_name(f: &str) -> bool {
    !f.is_empty() && f != "." && !f.contains(['/', '\\', '\0']) && !f.contains("..")
}

/// Maps a safetensors file and validates its header against the file size.
fn map_and_parse(
    path: &Path,
    file_idx: usize,
) -> Result<(Mmap, Vec<(String, TensorInfo)>), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |why: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let f = File::open(path).map_err(io)?;
    // SAFETY: the file is opened read-only; the project never writes a checkpoint while it is
    // being served, and the header is validated against the mapped length below.
    let map = unsafe { Mmap::map(&f) }.map_err(io)?;
    if map.len() < 8 {
        return Err(corrupt(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            map.len()
        )));
    }
    let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes")) as usize;
    if n > 100 << 20 || 8 + n > map.len() {
        return Err(corrupt(format!(
            "header length {n} does not fit in the file of {} bytes (truncated?)",
            map.len()
        )));
    }
    let header: Value = serde_json::from_slice(&map[8..8 + n])
        .map_err(|e| corrupt(format!("header is not JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| corrupt("header is not a JSON object".into()))?;
    let base = 8 + n;
    let data_len = map.len() - base;
    let mut out = Vec::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dt = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let dtype = DType::parse(dt).ok_or_else(|| {
            corrupt(format!(
                "tensor `{name}` has dtype {dt}; supported: F32, BF16, F16, I8"
            ))
        })?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| corrupt(format!("tensor `{name}` has no shape")))?
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| corrupt(format!("tensor `{name}` has a bad shape")))?;
        let offs: Vec<usize> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| corrupt(format!("tensor `{name}` has bad data_offsets")))?;
        let (s, e) = (offs[0], offs[1]);
        let numel = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        let want = numel.and_then(|n| n.checked_mul(dtype.size()));
        if e < s || Some(e - s) != want {
            return Err(corrupt(format!(
                "tensor `{name}`: data_offsets [{s}, {e}) do not match shape {shape:?} of {dtype}"
            )));
        }
        if e > data_len {
            return Err(corrupt(format!(
                "tensor `{name}` ends at byte {e} of the data section but the file holds only {data_len} (truncated?)"
            )));
        }
        out.push((
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                file: file_idx,
                start: base + s,
                end: base + e,
            },
        ));
    }
    Ok((map, out))
}

/// One tensor to be written: its name, dtype, shape and a producer of its little-endian bytes.
pub struct PendingTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PendingTensor {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes a safetensors file whose tensors are produced one at a time (bounded memory).
pub fn write_safetensors(
    path: &Path,
    tensors: &[PendingTensor],
    mut produce: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut header = BTreeMap::new();
    let mut off = 0usize;
    for t in tensors {
        let n = t.nbytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    while (8 + h.len()) % 8 != 0 {
        h.push(b' ');
    }
    let tmp = path.with_extension("safetensors.partial");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    for (i, t) in tensors.iter().enumerate() {
        let mut counter = CountingWriter {
            inner: &mut w,
            n: 0,
        };
        produce(i, &mut counter)?;
        if counter.n != t.nbytes() {
            return Err(std::io::Error::other(format!(
                "tensor {} produced {} bytes, expected {}",
                t.name,
                counter.n,
                t.nbytes()
            )));
        }
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_file_pages_read_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let c = crate::config::ModelConfig::preset("tiny", Some(1)).unwrap();
        crate::formats::genmodel::generate(
            &c,
            crate::formats::genmodel::GenDType::F32,
            5,
            dir.path(),
            1 << 30,
            |_, _| {},
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let m = crate::model::Model::load(&ck).unwrap();
        let lin = &m.layers[0].experts[0].linear;
        let before = lin.weight_bytes_view().to_vec();
        lin.release_pages();
        assert_eq!(lin.weight_bytes_view(), &before[..]);
    }

    #[test]
    fn index_files_name_only_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (map, why) in [
            (r#"{"a": "../model.safetensors"}"#, "plain name"),
            (r#"{"a": "/etc/passwd"}"#, "plain name"),
            (r#"{"a": ""}"#, "plain name"),
            (r#"{"a": "x\u0000y"}"#, "plain name"),
            // A non-string was silently skipped before.
            (r#"{"a": 7}"#, "not a file name"),
            (r#"{}"#, "names no file"),
        ] {
            std::fs::write(
                d.join("model.safetensors.index.json"),
                format!(r#"{{"weight_map": {map}}}"#),
            )
            .unwrap();
            let e = weight_files(d).unwrap_err().to_string();
            assert!(e.contains(why), "{map}: {e}");
        }
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        assert!(!is_plain_file_name(".."));
    }
}
