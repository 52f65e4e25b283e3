//! The CUDA device of the one forward pass ([`crate::model::Device`]): activations, weights
//! and the paged KV cache in device memory, the kernels of `kernels.cu`. The pass is the CPU's
//! (`model/mod.rs`): the same sharding, collectives, pad masks and routing; the cache's blocks
//! are the coordinator's, as on CPU. Collectives go to NCCL in device memory when the
//! communicator is NCCL, through the host otherwise (the TCP collective of ranks sharing a GPU).
//!
//! f32 checkpoint weights are converted to bf16 on upload (the GEMV kernels read bf16 or int8);
//! norm gains and the router stay f32. Attention computes scores and the softmax in f64 from
//! f32 products (`attn_paged_f32`), so logits agree with the CPU pass within rounding, not bit
//! for bit.

use super::moe::{MoeGroup, MoeStats};
use super::GemmWorkspace;
use super::{
    guarded, CudaBackend, CudaBlas, CudaError, CudaSlice, DeviceLinear, DeviceWeights, GemmSettings,
};
use crate::backend::cpu::{Linear, Weights};
use crate::collective::Communicator;
use crate::model::{
    Cpu, Device, Expert, Heads, Layer, Model, ModelError, MoeShape, RoutingStats, SeqInput,
};
use half::bf16;
use std::ops::Range;
use std::sync::Arc;

/// A weight matrix on the device; f32 weights become bf16 (`converted` says so).
fn upload_lin(
    be: &CudaBackend,
    name: &str,
    lin: &Linear,
    converted: &mut bool,
) -> Result<DeviceLinear, CudaError> {
    if let Weights::F32(w) = &lin.w {
        *converted = true;
        let b: Vec<u16> = w
            .as_slice()
            .iter()
            .map(|v| bf16::from_f32(*v).to_bits())
            .collect();
        return Ok(DeviceLinear {
            out_features: lin.out_features,
            in_features: lin.in_features,
            weights: DeviceWeights::Bf16(be.upload(name, &b)?),
        });
    }
    be.upload_linear(name, lin)
}

pub(super) fn err(e: CudaError) -> ModelError {
    ModelError::Device(e.to_string())
}

/// Device memory a KV cache leaves free for the activations and scratch buffers of a step.
const KV_RESERVE: usize = 1 << 30;

/// One CUDA device (an open context and stream, with the compiled kernels).
#[derive(Clone)]
pub struct Cuda {
    pub be: Arc<CudaBackend>,
    /// The pass's index arrays on the device (positions, slots, block tables), by name: every
    /// layer of a pass asks for the same ones, and they cross to the device once per pass.
    pub(super) pass: Arc<std::sync::Mutex<PassArrays>>,
    /// Which passes take cuBLAS ([`GemmSettings`]).
    pub(super) gemm: GemmSettings,
    /// The cuBLAS handle (on the device's stream), made at the first GEMM; None: cuBLAS could
    /// not be loaded, and every pass takes the GEMV.
    pub(super) blas: Arc<std::sync::OnceLock<Option<CudaBlas>>>,
    /// The GEMM's buffers, kept between passes.
    pub(super) ws: Arc<std::sync::Mutex<GemmWorkspace>>,
    /// The fewest rows whose buffers found no room (usize::MAX: none yet).
    pub(super) gemm_no_room: Arc<std::sync::atomic::AtomicUsize>,
    /// The MoE with its routing on the device: each layer's grouped expert matrices, by the
    /// indices, addresses and shapes of its experts, and the per-expert counts of the step.
    /// Both belong to one model ([`Model::upload`] gives it fresh ones).
    pub(super) moe_groups:
        Arc<std::sync::Mutex<std::collections::HashMap<Vec<u64>, Arc<MoeGroup>>>>,
    pub(super) moe_stats: Arc<std::sync::Mutex<Option<MoeStats>>>,
    /// Whether decode passes keep the router's choices on the device (default true).
    pub(super) device_routing: bool,
}

type PassArrays = std::collections::HashMap<&'static str, (Vec<usize>, Arc<CudaSlice<i32>>)>;

/// Activations: `n` f32 values (the allocation holds at least one).
pub struct CudaBuf {
    pub(super) s: CudaSlice<f32>,
    pub(super) n: usize,
}

/// A shard's paged KV cache on the device: per layer `[blocks · block_size, kv_heads · key_size]`
/// keys (after RoPE) and values, and one visibility flag per slot.
pub struct CudaKv {
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    visible: CudaSlice<i32>,
    num_blocks: usize,
    block_size: usize,
    width: usize,
}

impl CudaKv {
    /// A zeroed cache of `num_blocks` blocks of `block_size` slots for the layers and KV heads
    /// `model` holds.
    pub fn new(
        model: &Model<Cuda>,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let width = model.shard.kv_heads.len() * model.config.key_size;
        let slots = num_blocks
            .checked_mul(block_size)
            .filter(|&s| s > 0 && s.checked_mul(width).is_some())
            .ok_or_else(|| {
                ModelError::Kv(format!(
                    "{num_blocks} blocks of {block_size} slots overflow"
                ))
            })?;
        let be = &model.dev.be;
        // Refuse a cache the device cannot hold beside the weights and a working reserve for
        // the activations, naming how many blocks would fit.
        let per_block = Self::block_bytes(model, block_size) as usize;
        let need = num_blocks.saturating_mul(per_block);
        let (free, _) = be.memory().map_err(err)?;
        let room = free.saturating_sub(KV_RESERVE);
        if need > room {
            return Err(ModelError::Kv(format!(
                "{num_blocks} blocks of {block_size} slots need {:.2} GB of device memory; {:.2} GB is free after the weights, less {:.1} GB kept for activations: at most {} blocks fit (lower --kv-blocks, or leave it unset to size the cache from memory)",
                need as f64 / 1e9,
                free as f64 / 1e9,
                KV_RESERVE as f64 / 1e9,
                room / per_block.max(1)
            )));
        }
        let mut k = Vec::with_capacity(model.layers.len());
        let mut v = Vec::with_capacity(model.layers.len());
        for i in 0..model.layers.len() {
            k.push(
                be.zeros(&format!("layer {i} keys"), slots * width)
                    .map_err(err)?,
            );
            v.push(
                be.zeros(&format!("layer {i} values"), slots * width)
                    .map_err(err)?,
            );
        }
        Ok(CudaKv {
            k,
            v,
            visible: be.zeros("visibility flags", slots).map_err(err)?,
            num_blocks,
            block_size,
            width,
        })
    }

    /// Bytes of device memory one block of `block_size` slots takes for the layers and KV heads
    /// `model` holds (keys and values in f32, a 4-byte flag per slot).
    pub fn block_bytes(model: &Model<Cuda>, block_size: usize) -> u64 {
        let width = model.shard.kv_heads.len() * model.config.key_size;
        crate::model::kv_block_bytes(model.layers.len(), width, block_size, 4)
    }

    /// A cache sized by `sizing`: its fixed block count, or what the device's memory budget
    /// holds beside this worker's weights ([`crate::model::kv_blocks_to_allocate`]).
    pub fn sized(
        model: &Model<Cuda>,
        sizing: &crate::model::KvSizing,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let (free, total) = model.dev.be.memory().map_err(err)?;
        let mem = crate::model::DeviceMemory {
            free: free as u64,
            total: total as u64,
            weights: model.device_weight_bytes() as u64,
            reserve: KV_RESERVE as u64,
        };
        let per_block = Self::block_bytes(model, block_size);
        let n = crate::model::kv_blocks_to_allocate(sizing, per_block, Some(&mem))?;
        Self::new(model, n, block_size)
    }

    /// Bytes of device memory the cache holds.
    pub fn bytes(&self) -> usize {
        let slots = self.num_blocks * self.block_size;
        2 * 4 * slots * self.width * self.k.len() + 4 * slots
    }
}

impl Cuda {
    pub fn new(be: Arc<CudaBackend>) -> Self {
        Cuda {
            be,
            pass: Arc::default(),
            gemm: GemmSettings::default(),
            blas: Arc::default(),
            ws: Arc::default(),
            gemm_no_room: Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
            moe_groups: Arc::default(),
            moe_stats: Arc::default(),
            device_routing: true,
        }
    }

    /// Which passes take cuBLAS from now on.
    pub fn set_gemm(&mut self, g: GemmSettings) {
        self.gemm = g;
    }

    pub fn gemm(&self) -> GemmSettings {
        self.gemm
    }

    /// Device bytes the GEMM's buffers hold.
    pub fn gemm_workspace_bytes(&self) -> usize {
        self.ws.lock().unwrap_or_else(|p| p.into_inner()).bytes()
    }

    /// Whether decode passes keep the router's choices on the device (the MoE's grouped GEMV;
    /// false: every pass copies them to the host, as passes of many rows do).
    pub fn set_device_routing(&mut self, on: bool) {
        self.device_routing = on;
    }

    /// The router's top-`k` gates and experts of each of the `t` rows of `xn` (`[t, k]` each,
    /// on the device; the kernel writes every element, so nothing is zeroed first).
    pub(super) fn router_choices(
        &self,
        router: &CudaSlice<f32>,
        xn: &CudaBuf,
        (t, d, ne, k): (usize, usize, usize, usize),
    ) -> Result<(CudaSlice<f32>, CudaSlice<i32>), ModelError> {
        let be = &self.be;
        let mut gates = be.uninit::<f32>("gates", t * k).map_err(err)?;
        let mut choice = be.uninit::<i32>("experts", t * k).map_err(err)?;
        let mut probs = be.uninit::<f32>("probs", t * ne).map_err(err)?;
        be.router_topk(
            &xn.s,
            router,
            t,
            d,
            ne,
            k,
            &mut gates,
            &mut choice,
            &mut probs,
        )
        .map_err(err)?;
        Ok((gates, choice))
    }

    /// `v` on the device, uploaded only when it differs from the last array of that name
    /// (a pass's positions, slots and tables are the same in every layer).
    fn pass_ints(
        &self,
        what: &'static str,
        v: &[usize],
    ) -> Result<Arc<CudaSlice<i32>>, ModelError> {
        let mut m = self.pass.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((host, dev)) = m.get(what) {
            if host.as_slice() == v {
                return Ok(dev.clone());
            }
        }
        let dev = Arc::new(self.ints(what, v)?);
        m.insert(what, (v.to_vec(), dev.clone()));
        Ok(dev)
    }

    fn ints(&self, what: &str, v: &[usize]) -> Result<CudaSlice<i32>, ModelError> {
        let x: Vec<i32> = v
            .iter()
            .map(|&a| {
                i32::try_from(a).map_err(|_| ModelError::Device(format!("{what} {a} exceeds i32")))
            })
            .collect::<Result<_, _>>()?;
        self.be.upload(what, &x).map_err(err)
    }

    fn floats(&self, what: &str, v: &[f32]) -> Result<CudaSlice<f32>, ModelError> {
        self.be.upload(what, v).map_err(err)
    }
}

impl Device for Cuda {
    type Buf = CudaBuf;
    type Lin = DeviceLinear;
    type Vector = CudaSlice<f32>;
    type Matrix = CudaSlice<f32>;
    type Kv = CudaKv;

    fn len(&self, b: &CudaBuf) -> usize {
        b.n
    }

    fn zeros(&self, n: usize) -> Result<CudaBuf, ModelError> {
        let s = self.be.zeros("activations", n.max(1)).map_err(err)?;
        Ok(CudaBuf { s, n })
    }

    /// Without the memset of [`Device::zeros`]: an uninitialised allocation from the stream's
    /// pool.
    fn scratch(&self, n: usize) -> Result<CudaBuf, ModelError> {
        Ok(CudaBuf {
            s: self
                .be
                .uninit::<f32>("activations", n.max(1))
                .map_err(err)?,
            n,
        })
    }

    fn upload(&self, x: Vec<f32>) -> Result<CudaBuf, ModelError> {
        if x.is_empty() {
            return self.zeros(0);
        }
        let n = x.len();
        Ok(CudaBuf {
            s: self.floats("activations", &x)?,
            n,
        })
    }

    fn download(&self, b: &CudaBuf) -> Result<Vec<f32>, ModelError> {
        if b.n == 0 {
            return Ok(Vec::new());
        }
        let mut v = self.be.download("activations", &b.s).map_err(err)?;
        v.truncate(b.n);
        Ok(v)
    }

    fn with_host<R>(
        &self,
        b: &mut CudaBuf,
        f: impl FnOnce(&mut [f32]) -> R,
    ) -> Result<R, ModelError> {
        let mut h = self.download(b)?;
        let r = f(&mut h);
        if !h.is_empty() {
            let be = &self.be;
            guarded("activations back", || {
                be.stream()
                    .memcpy_htod(&h, &mut b.s)
                    .map_err(super::drv("upload activations"))
            })
            .map_err(err)?;
        }
        Ok(r)
    }

    fn out_features(&self, w: &DeviceLinear) -> usize {
        w.out_features
    }

    fn embed(&self, e: &DeviceLinear, tokens: &[u32], mult: f32) -> Result<CudaBuf, ModelError> {
        let d = e.in_features;
        let mut out = self.scratch(tokens.len() * d)?;
        if tokens.is_empty() {
            return Ok(out);
        }
        let t: Vec<usize> = tokens.iter().map(|&x| x as usize).collect();
        let t = self.ints("tokens", &t)?;
        self.be
            .embed_rows(e, &t, tokens.len(), mult, &mut out.s)
            .map_err(err)?;
        Ok(out)
    }

    fn rms_norm(
        &self,
        x: &CudaBuf,
        gain: &CudaSlice<f32>,
        eps: f64,
        out: &mut CudaBuf,
    ) -> Result<(), ModelError> {
        let rows = x.n / gain.len().max(1);
        if rows == 0 {
            return Ok(());
        }
        self.be
            .rms_norm(&x.s, gain, eps, rows, &mut out.s)
            .map_err(err)
    }

    fn matmul(
        &self,
        w: &DeviceLinear,
        x: &CudaBuf,
        rows: usize,
        out: &mut CudaBuf,
    ) -> Result<(), ModelError> {
        if rows == 0 || self.try_gemm(w, x, rows, out)? {
            return Ok(());
        }
        self.be.linear_rows(w, &x.s, rows, &mut out.s).map_err(err)
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        heads: usize,
        key_size: usize,
        positions: &[usize],
        theta: f64,
    ) -> Result<(), ModelError> {
        let t = positions.len();
        if t == 0 {
            return Ok(());
        }
        let p = self.pass_ints("positions", positions)?;
        self.be
            .rope(&mut x.s, t, heads, key_size, &p, theta)
            .map_err(err)
    }

    fn kv_geometry(&self, kv: &CudaKv) -> (usize, usize) {
        (kv.num_blocks, kv.block_size)
    }

    fn kv_visible(
        &self,
        kv: &mut CudaKv,
        slots: &[usize],
        visible: &[bool],
    ) -> Result<(), ModelError> {
        if slots.is_empty() {
            return Ok(());
        }
        let s = self.ints("slots", slots)?;
        let v: Vec<usize> = visible.iter().map(|&b| b as usize).collect();
        let v = self.ints("flags", &v)?;
        self.be
            .set_flags(&mut kv.visible, &s, &v, slots.len())
            .map_err(err)
    }

    fn kv_write(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        slots: &[usize],
        k: &CudaBuf,
        v: &CudaBuf,
    ) -> Result<(), ModelError> {
        if slots.is_empty() {
            return Ok(());
        }
        let s = self.pass_ints("slots", slots)?;
        let w = kv.width;
        let (kc, vc) = (&mut kv.k[layer], &mut kv.v[layer]);
        self.be
            .kv_write(kc, vc, &k.s, &v.s, &s, slots.len(), w)
            .map_err(err)
    }

    fn attend(
        &self,
        q: &CudaBuf,
        seqs: &[SeqInput],
        rows: &[Range<usize>],
        positions: &[usize],
        kv: &CudaKv,
        layer: usize,
        h: &Heads,
    ) -> Result<CudaBuf, ModelError> {
        let t = positions.len();
        let mut out = self.zeros(t * h.nq * h.ks)?;
        if t == 0 {
            return Ok(out);
        }
        let mut tables = Vec::new();
        let (mut row_end, mut row_tab) = (vec![0usize; t], vec![0usize; t]);
        for (s, r) in seqs.iter().zip(rows) {
            let off = tables.len();
            tables.extend(s.block_table.iter().map(|&b| b as usize));
            for i in r.clone() {
                row_end[i] = s.start_pos + s.tokens.len();
                row_tab[i] = off;
            }
        }
        let max_end = row_end.iter().copied().max().unwrap_or(1);
        let tables = self.pass_ints("block tables", &tables)?;
        let (p, e, o) = (
            self.pass_ints("positions", positions)?,
            self.pass_ints("row ends", &row_end)?,
            self.pass_ints("row tables", &row_tab)?,
        );
        self.be
            .attention_paged(
                &q.s,
                (&kv.k[layer], &kv.v[layer], &kv.visible),
                &tables,
                (&p, &e, &o),
                t,
                max_end,
                kv.block_size,
                (h.nq, h.nkv, h.ks, h.g, h.q0, h.kv0),
                h.mult as f64,
                h.cap as f64,
                &mut out.s,
            )
            .map_err(err)?;
        Ok(out)
    }

    fn add_assign(&self, h: &mut CudaBuf, a: &CudaBuf) -> Result<(), ModelError> {
        if h.n == 0 {
            return Ok(());
        }
        self.be.add_assign(&mut h.s, &a.s, h.n).map_err(err)
    }

    fn route(
        &self,
        router: &CudaSlice<f32>,
        xn: &CudaBuf,
        ne: usize,
        k: usize,
        d: usize,
    ) -> Result<Vec<Vec<(usize, f32)>>, ModelError> {
        let t = xn.n / d.max(1);
        if t == 0 {
            return Ok(Vec::new());
        }
        let be = &self.be;
        let (gates, choice) = self.router_choices(router, xn, (t, d, ne, k))?;
        let ch = be.download("router choices", &choice).map_err(err)?;
        let gs = be.download("router gates", &gates).map_err(err)?;
        Ok((0..t)
            .map(|r| {
                (0..k)
                    .map(|j| (ch[r * k + j] as usize, gs[r * k + j]))
                    .collect()
            })
            .collect())
    }

    fn gather_rows(&self, x: &CudaBuf, rows: &[usize], d: usize) -> Result<CudaBuf, ModelError> {
        let mut out = self.scratch(rows.len() * d)?;
        if rows.is_empty() {
            return Ok(out);
        }
        let idx = self.ints("rows", rows)?;
        self.be
            .gather_rows(&x.s, &idx, rows.len(), d, &mut out.s)
            .map_err(err)?;
        Ok(out)
    }

    fn gelu_gate(&self, a: &mut CudaBuf, b: &CudaBuf) -> Result<(), ModelError> {
        if a.n == 0 {
            return Ok(());
        }
        let mut o = self.scratch(a.n)?;
        self.be.gelu_gate(&a.s, &b.s, &mut o.s, a.n).map_err(err)?;
        *a = o;
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        m: &mut CudaBuf,
        rows: &[usize],
        gates: &[f32],
        y: &CudaBuf,
        d: usize,
    ) -> Result<(), ModelError> {
        if rows.is_empty() {
            return Ok(());
        }
        let idx = self.ints("rows", rows)?;
        let g = self.floats("gates", gates)?;
        self.be
            .scatter_add_rows(&mut m.s, &idx, &g, &y.s, rows.len(), d)
            .map_err(err)
    }

    fn scale(&self, x: &mut CudaBuf, s: f32) -> Result<(), ModelError> {
        if x.n == 0 {
            return Ok(());
        }
        self.be.scale(&mut x.s, s, x.n).map_err(err)
    }

    fn moe_routed(
        &self,
        router: &CudaSlice<f32>,
        experts: &[Expert<Cuda>],
        xn: &CudaBuf,
        sh: MoeShape,
    ) -> Result<Option<CudaBuf>, ModelError> {
        self.moe_on_device(router, experts, xn, sh)
    }

    fn take_routing_stats(&self) -> Result<Option<RoutingStats>, ModelError> {
        self.take_device_routing_stats()
    }

    /// NCCL sums the device buffer in place (its own order of summation, see ARCHITECTURE.md);
    /// another communicator gets the host copy.
    fn all_reduce(
        &self,
        tp: &dyn Communicator,
        buf: &mut CudaBuf,
        d: usize,
    ) -> Result<(), ModelError> {
        match self.nccl_of(tp)? {
            Some(n) => Ok(n.all_reduce_device(&mut buf.s, buf.n)?),
            None => self.with_host(buf, |b| crate::model::all_reduce_rows(tp, b, d))?,
        }
    }

    fn send(&self, comm: &dyn Communicator, buf: &CudaBuf, peer: usize) -> Result<(), ModelError> {
        match self.nccl_of(comm)? {
            Some(n) => Ok(n.send_device(&buf.s, buf.n, peer)?),
            None => {
                let v = self.download(buf)?;
                Ok(comm.send(&v, peer)?)
            }
        }
    }

    fn recv(&self, comm: &dyn Communicator, n: usize, peer: usize) -> Result<CudaBuf, ModelError> {
        match self.nccl_of(comm)? {
            Some(c) => {
                let mut b = self.scratch(n)?;
                c.recv_device(&mut b.s, n, peer)?;
                Ok(b)
            }
            None => {
                let mut v = vec![0f32; n];
                comm.recv(&mut v, peer)?;
                self.upload(v)
            }
        }
    }
}

impl Cuda {
    /// The NCCL communicator behind `comm`, if any. NCCL runs on the stream it was made with;
    /// when that is not this device's stream, the work queued here is finished first.
    fn nccl_of<'a>(
        &self,
        comm: &'a dyn Communicator,
    ) -> Result<Option<&'a crate::collective::nccl::NcclComm>, ModelError> {
        let Some(n) = comm.nccl() else {
            return Ok(None);
        };
        if !Arc::ptr_eq(n.stream(), self.be.stream()) {
            self.be
                .stream()
                .synchronize()
                .map_err(|e| ModelError::Device(format!("synchronising before NCCL: {e}")))?;
        }
        Ok(Some(n))
    }
}

impl Model<Cuda> {
    /// A CPU shard's weights on the device (f32 matrices as bf16; gains and the router f32).
    /// Returns the model and whether f32 weights were converted.
    pub fn upload(cpu: Model<Cpu>, dev: Cuda) -> Result<(Self, bool), ModelError> {
        Self::upload_with_progress(cpu, dev, &mut |_, _| {})
    }

    /// [`Model::upload`], layer by layer: `progress(done, total)` after each layer, and each
    /// matrix's file pages leave the process's resident memory once it is on the device, so no
    /// CPU copy of the shard stays resident.
    pub fn upload_with_progress(
        cpu: Model<Cpu>,
        mut dev: Cuda,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Self, bool), ModelError> {
        // The model's own routing counts and expert groups: clones of `dev` that other models
        // hold keep theirs.
        dev.moe_stats = Arc::default();
        dev.moe_groups = Arc::default();
        let be = dev.be.clone();
        let total = cpu.layers.len() + 1;
        let mut conv = false;
        let lin = |name: &str, l: &Linear, conv: &mut bool| {
            let d = upload_lin(&be, name, l, conv).map_err(err)?;
            l.release_pages();
            Ok::<_, ModelError>(d)
        };
        let vec = |name: &str, v: &[f32]| be.upload(name, v).map_err(err);
        let embed = match &cpu.embed {
            Some(e) => Some(lin("embedding", e, &mut conv)?),
            None => None,
        };
        let final_norm = match &cpu.final_norm {
            Some(n) => Some(vec("final norm", n)?),
            None => None,
        };
        progress(1, total);
        let mut layers = Vec::with_capacity(cpu.layers.len());
        for l in &cpu.layers {
            let i = l.index;
            let nm = |s: &str| format!("layer {i} {s}");
            let mut experts = Vec::with_capacity(l.experts.len());
            for e in &l.experts {
                experts.push(Expert {
                    index: e.index,
                    linear: lin(&nm("linear"), &e.linear, &mut conv)?,
                    linear_v: lin(&nm("linear_v"), &e.linear_v, &mut conv)?,
                    linear_1: lin(&nm("linear_1"), &e.linear_1, &mut conv)?,
                });
            }
            layers.push(Layer {
                index: i,
                pre_attn_norm: vec(&nm("norm"), &l.pre_attn_norm)?,
                post_attn_norm: vec(&nm("norm"), &l.post_attn_norm)?,
                pre_moe_norm: vec(&nm("norm"), &l.pre_moe_norm)?,
                post_moe_norm: vec(&nm("norm"), &l.post_moe_norm)?,
                q: lin(&nm("q"), &l.q, &mut conv)?,
                k: lin(&nm("k"), &l.k, &mut conv)?,
                v: lin(&nm("v"), &l.v, &mut conv)?,
                o: lin(&nm("o"), &l.o, &mut conv)?,
                router: vec(&nm("router"), &l.router)?,
                experts,
            });
            progress(layers.len() + 1, total);
        }
        let ne = cpu.config.num_experts;
        Ok((
            Model {
                config: cpu.config.clone(),
                shard: cpu.shard.clone(),
                dev,
                embed,
                final_norm,
                layers,
                expert_counts: std::sync::Mutex::new(vec![0; cpu.layers.len() * ne]),
                expert_served: std::sync::Mutex::new(vec![0; ne]),
                dispatch: cpu.dispatch.clone(),
            },
            conv,
        ))
    }

    /// Bytes of weights on the device.
    pub fn device_weight_bytes(&self) -> usize {
        let mut b = self.embed.as_ref().map_or(0, |e| e.bytes());
        for l in &self.layers {
            b += l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + 4 * l.router.len();
            for e in &l.experts {
                b += e.linear.bytes() + e.linear_v.bytes() + e.linear_1.bytes();
            }
        }
        b
    }
}
