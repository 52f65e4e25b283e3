//! The MoE with its routing on the device: the kernels' wrappers (the plan, the gather, the
//! grouped GEMV of a layer's experts, the gated sum); [`super::Cuda`]'s `moe_routed` runs them.

use super::device::{err, Cuda, CudaBuf};
use super::ops::{i32_of, launch, need_len, rows_shape, DeviceLinear, DeviceWeights};
use super::{shapes, CudaBackend, CudaError};
use crate::model::{Device, Expert, ModelError, MoeShape, RoutingStats};
use cudarc::driver::{CudaSlice, PushKernelArg};
use shapes::{GemvWeights, LaunchShape};
use std::sync::Arc;

/// Device addresses of one matrix of each of a layer's local experts, in slot order, for the
/// grouped GEMV (`ws`; `ss`: int8 scales).
pub struct GroupedLinear {
    pub ws: CudaSlice<u64>,
    pub ss: Option<CudaSlice<u64>>,
    pub out_features: usize,
    pub in_features: usize,
    pub kind: GemvWeights,
}

/// The MoE with its routing on the device.
impl CudaBackend {
    /// Collects the device addresses of `lins` (one per slot; all of one shape and kind) for
    /// [`CudaBackend::gemv_grouped`]. The matrices must outlive every launch that uses them.
    pub fn group_linears(&self, lins: &[&DeviceLinear]) -> Result<GroupedLinear, CudaError> {
        use cudarc::driver::DevicePtr;
        let op = "group_linears";
        let first = lins
            .first()
            .ok_or_else(|| CudaError::invalid(op, "no matrices"))?;
        let (out, k, kind) = (first.out_features, first.in_features, first.kind());
        let stream = self.stream().clone();
        let (mut ws, mut ss) = (Vec::new(), Vec::new());
        for l in lins {
            if (l.out_features, l.in_features, l.kind()) != (out, k, kind) {
                return Err(CudaError::invalid(
                    op,
                    format!(
                        "[{} x {}] {} beside [{out} x {k}] {}",
                        l.out_features,
                        l.in_features,
                        l.kind().name(),
                        kind.name()
                    ),
                ));
            }
            match &l.weights {
                DeviceWeights::Bf16(w) => ws.push(w.device_ptr(&stream).0),
                DeviceWeights::I8 { q, scales, .. } => {
                    ws.push(q.device_ptr(&stream).0);
                    ss.push(scales.device_ptr(&stream).0);
                }
            }
        }
        Ok(GroupedLinear {
            ws: self.upload("expert weight addresses", &ws)?,
            ss: if ss.is_empty() {
                None
            } else {
                Some(self.upload("expert scale addresses", &ss)?)
            },
            out_features: out,
            in_features: k,
            kind,
        })
    }

    /// The plan of a `t`-row pass over `ne` experts from the router's `choice` and `gates`
    /// (`[t, k]`): see `moe_plan_i32`. `routed` is `[layers, ne]`, `served` `[ne]`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_plan(
        &self,
        choice: &CudaSlice<i32>,
        gates: &CudaSlice<f32>,
        (t, k, ne): (usize, usize, usize),
        (li, local): (usize, u32),
        counts: &mut CudaSlice<i32>,
        rows: &mut CudaSlice<i32>,
        g: &mut CudaSlice<f32>,
        pos: &mut CudaSlice<i32>,
        routed: &mut CudaSlice<u64>,
        served: &mut CudaSlice<u64>,
    ) -> Result<(), CudaError> {
        let op = "moe_plan_i32";
        if t == 0 || ne == 0 || ne > shapes::MOE_DEVICE_MAX_EXPERTS || k == 0 || k > ne {
            return Err(CudaError::invalid(
                op,
                format!("{t} rows, top-{k} of {ne} experts"),
            ));
        }
        need_len(op, "choice", choice.len(), t * k)?;
        need_len(op, "gates", gates.len(), t * k)?;
        need_len(op, "counts", counts.len(), ne)?;
        need_len(op, "rows", rows.len(), ne * t)?;
        need_len(op, "g", g.len(), ne * t)?;
        need_len(op, "pos", pos.len(), t * ne)?;
        need_len(op, "routed", routed.len(), (li + 1) * ne)?;
        need_len(op, "served", served.len(), ne)?;
        let (t_i, k_i, ne_i, li_i) = (i32_of(op, "t", t)?, k as i32, ne as i32, li as i32);
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(choice)
            .arg(gates)
            .arg(&t_i)
            .arg(&k_i)
            .arg(&ne_i)
            .arg(&li_i)
            .arg(&local)
            .arg(counts)
            .arg(rows)
            .arg(g)
            .arg(pos)
            .arg(routed)
            .arg(served);
        launch(
            op,
            b,
            LaunchShape {
                grid: (1, 1, 1),
                block: (32, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    /// Each slot's rows of `src` (`[t, d]`) into `dst` (`[slots, t, d]`, rows past a slot's
    /// count untouched): see `moe_gather_f32`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gather(
        &self,
        src: &CudaSlice<f32>,
        ids: &CudaSlice<i32>,
        counts: &CudaSlice<i32>,
        rows: &CudaSlice<i32>,
        (t, d, slots, ne): (usize, usize, usize, usize),
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let op = "moe_gather_f32";
        let mut shape = rows_shape(op, t)?;
        shape.grid.1 = slots as u32;
        need_len(op, "src", src.len(), t * d)?;
        need_len(op, "ids", ids.len(), slots)?;
        need_len(op, "counts", counts.len(), ne)?;
        need_len(op, "dst", dst.len(), slots * t * d)?;
        need_len(op, "rows", rows.len(), ne * t)?;
        let (t_i, d_i) = (i32_of(op, "t", t)?, i32_of(op, "d", d)?);
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(src)
            .arg(ids)
            .arg(counts)
            .arg(rows)
            .arg(&t_i)
            .arg(dst)
            .arg(&d_i);
        launch(op, b, shape)
    }

    /// `y[s] = x[s] · W_sᵀ` for every slot `s` of `g`, over `counts[ids[s]]` rows of at most
    /// `t` (<= 64): the tensor-core GEMV's arithmetic, each slot's weights read only when a row
    /// chose it.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_grouped(
        &self,
        gl: &GroupedLinear,
        ids: &CudaSlice<i32>,
        counts: &CudaSlice<i32>,
        slots: usize,
        t: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (out, k) = (gl.out_features, gl.in_features);
        let name = shapes::gemv_grouped_kernel_name(gl.kind, t.max(1));
        let shape = shapes::gemv_grouped_shape(out, k, t, slots, gl.kind)
            .map_err(|e| CudaError::invalid(&name, e.0))?;
        need_len(&name, "weights", gl.ws.len(), slots)?;
        if let Some(ss) = &gl.ss {
            need_len(&name, "scales", ss.len(), slots)?;
        }
        need_len(&name, "ids", ids.len(), slots)?;
        need_len(&name, "x", x.len(), slots * t * k)?;
        need_len(&name, "y", y.len(), slots * t * out)?;
        let (t_i, out_i, k_i) = (
            i32_of(&name, "t", t)?,
            i32_of(&name, "out", out)?,
            i32_of(&name, "in", k)?,
        );
        let nb = match (&gl.ss, gl.kind) {
            (None, GemvWeights::Bf16) => 0,
            (Some(_), GemvWeights::I8 { nb }) => nb as i32,
            _ => return Err(CudaError::invalid(&name, "scales do not match the weights")),
        };
        let mut b = self.stream().launch_builder(self.func(&name)?);
        b.arg(&gl.ws);
        if let Some(ss) = &gl.ss {
            b.arg(ss).arg(&nb);
        }
        b.arg(ids)
            .arg(counts)
            .arg(&t_i)
            .arg(x)
            .arg(y)
            .arg(&out_i)
            .arg(&k_i);
        launch(&name, b, shape)
    }

    /// `m[r] += Σ_s g · y[s]` over the slots row `r` chose, in slot order: see
    /// `moe_combine_f32`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(
        &self,
        m: &mut CudaSlice<f32>,
        ids: &CudaSlice<i32>,
        (slots, ne, t, d): (usize, usize, usize, usize),
        pos: &CudaSlice<i32>,
        g: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let op = "moe_combine_f32";
        let shape = rows_shape(op, t)?;
        need_len(op, "m", m.len(), t * d)?;
        need_len(op, "ids", ids.len(), slots)?;
        need_len(op, "pos", pos.len(), t * ne)?;
        need_len(op, "g", g.len(), ne * t)?;
        need_len(op, "y", y.len(), slots * t * d)?;
        let (s_i, ne_i, t_i, d_i) = (
            slots as i32,
            ne as i32,
            i32_of(op, "t", t)?,
            i32_of(op, "d", d)?,
        );
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(m)
            .arg(ids)
            .arg(&s_i)
            .arg(&ne_i)
            .arg(pos)
            .arg(g)
            .arg(y)
            .arg(&t_i)
            .arg(&d_i);
        launch(op, b, shape)
    }
}

/// A layer's local experts for the grouped GEMV: their indices (slot order) and each matrix's
/// addresses, and the bit mask of the indices.
pub(super) struct MoeGroup {
    pub(super) ids: CudaSlice<i32>,
    pub(super) local: u32,
    pub(super) linear: GroupedLinear,
    pub(super) linear_v: GroupedLinear,
    pub(super) linear_1: GroupedLinear,
}

/// Routed tokens `[layers, experts]` and served rows `[experts]` counted on the device.
pub(super) struct MoeStats {
    pub(super) routed: CudaSlice<u64>,
    pub(super) served: CudaSlice<u64>,
    pub(super) layers: usize,
    pub(super) experts: usize,
    pub(super) dirty: bool,
}

impl Cuda {
    /// The grouped matrices of `experts` (made once per set of experts and addresses).
    pub(super) fn moe_group(&self, experts: &[Expert<Cuda>]) -> Result<Arc<MoeGroup>, ModelError> {
        // The key holds everything a group holds: indices, addresses and shapes (a matrix
        // uploaded at a freed one's address with the same shape gives the same group).
        let mut key = Vec::with_capacity(experts.len() * 16);
        for e in experts {
            key.push(e.index as u64);
            for l in [&e.linear, &e.linear_v, &e.linear_1] {
                let (w, s) = l.addresses(self.be.stream());
                let nb = match l.kind() {
                    GemvWeights::Bf16 => 0,
                    GemvWeights::I8 { nb } => nb as u64,
                };
                key.extend([w, s, l.out_features as u64, l.in_features as u64, nb]);
            }
        }
        let mut groups = self.moe_groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = groups.get(&key) {
            return Ok(g.clone());
        }
        let be = &self.be;
        let ids: Vec<i32> = experts.iter().map(|e| e.index as i32).collect();
        let group = |f: fn(&Expert<Cuda>) -> &DeviceLinear| {
            let v: Vec<&DeviceLinear> = experts.iter().map(f).collect();
            be.group_linears(&v).map_err(err)
        };
        let g = Arc::new(MoeGroup {
            ids: be.upload("expert indices", &ids).map_err(err)?,
            local: experts.iter().fold(0u32, |m, e| m | (1u32 << e.index)),
            linear: group(|e| &e.linear)?,
            linear_v: group(|e| &e.linear_v)?,
            linear_1: group(|e| &e.linear_1)?,
        });
        groups.insert(key, g.clone());
        Ok(g)
    }

    /// Passes of at most the rows the GEMV takes at once (64) and fewer than cuBLAS would take
    /// for an expert, over at most 32 experts of one shape with distinct indices: the router's
    /// choices stay on the device; one plan kernel lists each expert's
    /// rows, one gather, one grouped GEMV per expert matrix (an expert no row chose reads no
    /// weights) and one gated sum in the experts' order, so the result is `moe_local`'s, bit
    /// for bit (the GEMV gives a row the same bits in any batch).
    pub(super) fn moe_on_device(
        &self,
        router: &CudaSlice<f32>,
        experts: &[Expert<Cuda>],
        xn: &CudaBuf,
        sh: MoeShape,
    ) -> Result<Option<CudaBuf>, ModelError> {
        let (t, d, ne, k) = (sh.rows, sh.emb, sh.experts, sh.k);
        let Some(first) = experts.first() else {
            return Ok(None);
        };
        let shape = |l: &DeviceLinear| (l.out_features, l.in_features, l.kind());
        let mut seen = 0u64;
        let grouped = experts.iter().all(|e| {
            let fresh = e.index < 64 && seen & (1 << e.index) == 0;
            seen |= 1u64 << e.index.min(63);
            fresh
                && shape(&e.linear) == shape(&first.linear)
                && shape(&e.linear_v) == shape(&first.linear_v)
                && shape(&e.linear_1) == shape(&first.linear_1)
        });
        if !self.device_routing
            || !grouped
            || t == 0
            || t > super::shapes::GEMV_MAX_ROWS
            || ne > super::shapes::MOE_DEVICE_MAX_EXPERTS
            || k == 0
            || k > ne
            || experts.iter().any(|e| e.index >= ne)
            || [&first.linear, &first.linear_v, &first.linear_1]
                .iter()
                .any(|l| self.gemm.uses(t, l.kind()))
        {
            return Ok(None);
        }
        let g = self.moe_group(experts)?;
        let be = &self.be;
        let (gates, choice) = self.router_choices(router, xn, (t, d, ne, k))?;
        // The plan writes every count and position; a list's entries past its count are never
        // read.
        let un = |what: &str, n: usize| be.uninit::<f32>(what, n.max(1)).map_err(err);
        let ui = |what: &str, n: usize| be.uninit::<i32>(what, n.max(1)).map_err(err);
        let (mut counts, mut rows, mut gv, mut pos) = (
            ui("expert rows", ne)?,
            ui("expert row lists", ne * t)?,
            un("expert gates", ne * t)?,
            ui("row positions", t * ne)?,
        );
        {
            let mut st = self.moe_stats.lock().unwrap_or_else(|p| p.into_inner());
            if st
                .as_ref()
                .is_none_or(|s| s.layers != sh.layers || s.experts != ne)
            {
                *st = Some(MoeStats {
                    routed: be
                        .zeros::<u64>("routed counts", sh.layers * ne)
                        .map_err(err)?,
                    served: be.zeros::<u64>("served counts", ne).map_err(err)?,
                    layers: sh.layers,
                    experts: ne,
                    dirty: false,
                });
            }
            let st = st.as_mut().expect("set above");
            be.moe_plan(
                &choice,
                &gates,
                (t, k, ne),
                (sh.layer, g.local),
                &mut counts,
                &mut rows,
                &mut gv,
                &mut pos,
                &mut st.routed,
                &mut st.served,
            )
            .map_err(err)?;
            st.dirty = true;
        }
        let ns = experts.len();
        let f = g.linear.out_features;
        // Rows past an expert's count stay unwritten: the GEMV reads only the rows below it and
        // the gated sum only their positions.
        let mut xs = un("expert inputs", ns * t * d)?;
        be.moe_gather(&xn.s, &g.ids, &counts, &rows, (t, d, ns, ne), &mut xs)
            .map_err(err)?;
        let (mut a, mut b) = (
            un("expert hidden", ns * t * f)?,
            un("expert gate", ns * t * f)?,
        );
        be.gemv_grouped(&g.linear, &g.ids, &counts, ns, t, &xs, &mut a)
            .map_err(err)?;
        be.gemv_grouped(&g.linear_v, &g.ids, &counts, ns, t, &xs, &mut b)
            .map_err(err)?;
        let mut o = un("expert activations", ns * t * f)?;
        be.gelu_gate(&a, &b, &mut o, ns * t * f).map_err(err)?;
        let mut y = un("expert outputs", ns * t * d)?;
        be.gemv_grouped(&g.linear_1, &g.ids, &counts, ns, t, &o, &mut y)
            .map_err(err)?;
        let mut m = self.zeros(t * d)?;
        be.moe_combine(&mut m.s, &g.ids, (ns, ne, t, d), &pos, &gv, &y)
            .map_err(err)?;
        Ok(Some(m))
    }

    pub(super) fn take_device_routing_stats(&self) -> Result<Option<RoutingStats>, ModelError> {
        let mut st = self.moe_stats.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = st.as_mut().filter(|s| s.dirty) else {
            return Ok(None);
        };
        let be = &self.be;
        let routed = be.download("routed counts", &st.routed).map_err(err)?;
        let served = be.download("served counts", &st.served).map_err(err)?;
        for s in [&mut st.routed, &mut st.served] {
            be.stream()
                .memset_zeros(s)
                .map_err(|e| ModelError::Device(format!("resetting the expert counts: {e}")))?;
        }
        st.dirty = false;
        Ok(Some(RoutingStats { routed, served }))
    }
}
