//! NCCL between GPU workers (feature `cuda`): the same [`Communicator`] as the TCP ring, on
//! cudarc's NCCL binding.
//!
//! Bootstrap is control plane (see [`super::bootstrap`]): the group's first rank makes the
//! unique id ([`unique_id`]), the coordinator hands it to every member over gRPC, each builds
//! its communicator with [`NcclComm::new`].
//!
//! NCCL blocks forever on a peer that is gone; here every operation waits with a deadline:
//! the stream is polled together with `ncclCommGetAsyncError`, and past the deadline (or on an
//! asynchronous error) the communicator is aborted and every later call is [`CommError::Broken`].
//! Initialisation, which cannot be polled, runs on a helper thread under the same deadline.
//!
//! The [`Communicator`] methods take host slices (staged through device buffers); the forward
//! pass on a GPU reaches the communicator through [`Communicator::nccl`] and uses the device
//! buffers directly ([`NcclComm::all_reduce_device`], [`NcclComm::send_device`],
//! [`NcclComm::recv_device`]): no host round trip.

use super::{check_all_to_all, check_gather, check_peer, check_root, CommError, Communicator};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The raw communicator; NCCL allows it on any thread as long as calls do not overlap (the
/// mutex around it sees to that).
struct Raw(sys::ncclComm_t);
// SAFETY: see above; the pointer is only used under `NcclComm::inner`'s lock.
unsafe impl Send for Raw {}

struct Inner {
    comm: Option<Raw>,
    broken: Option<CommError>,
}

pub struct NcclComm {
    inner: Mutex<Inner>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Nanoseconds spent in operations (issue to completion) and bytes this rank sent.
    nanos: AtomicU64,
    bytes: AtomicU64,
}

/// Makes a unique id (on the group's first rank): the 128 bytes every member needs.
pub fn unique_id() -> Result<[u8; 128], CommError> {
    nccl_present()?;
    let id =
        result::get_uniqueid().map_err(|e| CommError::Io(format!("ncclGetUniqueId: {e:?}")))?;
    let mut out = [0u8; 128];
    for (o, c) in out.iter_mut().zip(id.internal.iter()) {
        *o = *c as u8;
    }
    Ok(out)
}

/// Whether NCCL can be loaded here (an error saying why not).
pub fn available() -> Result<(), CommError> {
    nccl_present()
}

/// NCCL is loaded at run time; its absence is an error, never cudarc's panic.
fn nccl_present() -> Result<(), CommError> {
    crate::backend::cuda::nccl_status().map_err(|e| CommError::Io(e.to_string()))
}

fn nccl_err(op: &str, e: result::NcclError) -> CommError {
    CommError::Io(format!("{op}: {e:?}"))
}

impl NcclComm {
    /// Joins the group `id` as `rank` of `world` on `stream`'s device; every member must call
    /// this within `timeout`.
    pub fn new(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: [u8; 128],
        timeout: Duration,
    ) -> Result<Self, CommError> {
        if rank >= world {
            return Err(CommError::Usage(format!(
                "rank {rank} of a group of {world}"
            )));
        }
        nccl_present()?;
        let mut internal = [0 as core::ffi::c_char; 128];
        for (i, b) in internal.iter_mut().zip(id.iter()) {
            *i = *b as core::ffi::c_char;
        }
        let ctx = stream.context().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (|| {
                ctx.bind_to_thread()
                    .map_err(|e| CommError::Io(format!("binding the CUDA context: {e}")))?;
                let mut comm = std::mem::MaybeUninit::uninit();
                // SAFETY: comm is written by ncclCommInitRank before it is read.
                unsafe {
                    result::comm_init_rank(
                        comm.as_mut_ptr(),
                        world as i32,
                        sys::ncclUniqueId { internal },
                        rank as i32,
                    )
                    .map_err(|e| nccl_err("ncclCommInitRank", e))?;
                    Ok(Raw(comm.assume_init()))
                }
            })();
            let _ = tx.send(r);
        });
        let raw = match rx.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(_) => {
                return Err(CommError::Timeout {
                    peer: if rank == 0 { 1.min(world - 1) } else { 0 },
                    addr: None,
                    ms: timeout.as_millis() as u64,
                })
            }
        };
        Ok(NcclComm {
            inner: Mutex::new(Inner {
                comm: Some(raw),
                broken: None,
            }),
            stream,
            rank,
            world,
            timeout,
            nanos: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    /// Seconds spent in this communicator's operations so far (each from its issue to its
    /// completion on the stream, so the compute queued before it on the stream counts too).
    pub fn comm_seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Bytes this rank has sent so far (for an all-reduce, the ring's `2 (w - 1) / w` of the
    /// buffer; NCCL's own algorithm may move a different amount).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn count(&self, t: Instant, bytes: usize) {
        self.nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The stream this communicator's operations run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Runs `op` on the communicator, then waits for the stream with the deadline; aborts the
    /// communicator on a timeout or an asynchronous NCCL error.
    fn run(
        &self,
        what: &str,
        op: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &g.broken {
            return Err(CommError::Broken(Box::new(e.clone_shallow())));
        }
        let comm = g
            .comm
            .as_ref()
            .map(|r| r.0)
            .ok_or_else(|| CommError::Io("the communicator was closed".into()))?;
        let res = (|| {
            op(comm, self.stream.cu_stream() as sys::cudaStream_t)?;
            let ev = self
                .stream
                .record_event(None)
                .map_err(|e| CommError::Io(format!("{what}: recording an event: {e}")))?;
            let start = Instant::now();
            loop {
                match ev.try_is_complete() {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => return Err(CommError::Io(format!("{what}: {e}"))),
                }
                let mut async_err = sys::ncclResult_t::ncclSuccess;
                // SAFETY: comm is a live communicator; async_err is a valid out pointer.
                unsafe { sys::ncclCommGetAsyncError(comm, &mut async_err) };
                if async_err != sys::ncclResult_t::ncclSuccess
                    && async_err != sys::ncclResult_t::ncclInProgress
                {
                    return Err(CommError::Peer {
                        peer: if self.rank == 0 {
                            1.min(self.world - 1)
                        } else {
                            0
                        },
                        addr: None,
                        why: format!("{what}: NCCL reported {async_err:?}"),
                    });
                }
                if start.elapsed() > self.timeout {
                    return Err(CommError::Timeout {
                        peer: if self.rank == 0 {
                            1.min(self.world - 1)
                        } else {
                            0
                        },
                        addr: None,
                        ms: self.timeout.as_millis() as u64,
                    });
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        })();
        if let Err(e) = &res {
            if !matches!(e, CommError::Usage(_)) {
                // SAFETY: comm is live; after the abort it is never used again.
                unsafe { sys::ncclCommAbort(comm) };
                g.comm = None;
                g.broken = Some(e.clone_shallow());
            }
        }
        res
    }

    /// In-place sum over the group of the first `n` elements of a device buffer (on this
    /// communicator's stream, so ordered after the kernels that wrote it).
    pub fn all_reduce_device(&self, buf: &mut CudaSlice<f32>, n: usize) -> Result<(), CommError> {
        use cudarc::driver::DevicePtrMut;
        if n > buf.len() {
            return Err(CommError::Usage(format!(
                "all_reduce of {n} elements from a buffer of {}",
                buf.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let (ptr, _rec) = buf.device_ptr_mut(&self.stream);
        let ptr = ptr as *mut core::ffi::c_void;
        self.run("all_reduce", |comm, s| {
            // SAFETY: ptr addresses at least n f32 on this communicator's device, in place.
            unsafe {
                result::all_reduce(
                    ptr,
                    ptr,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    s,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("ncclAllReduce", e))
        })?;
        self.count(t, 2 * (self.world - 1) * n * 4 / self.world);
        Ok(())
    }

    /// Sends the first `n` elements of a device buffer to `peer`. Unlike the TCP collective's
    /// buffered send this returns once the peer has received them.
    pub fn send_device(
        &self,
        buf: &CudaSlice<f32>,
        n: usize,
        peer: usize,
    ) -> Result<(), CommError> {
        use cudarc::driver::DevicePtr;
        check_peer(self.rank, self.world, peer, "send")?;
        if n > buf.len() {
            return Err(CommError::Usage(format!(
                "send of {n} elements from a buffer of {}",
                buf.len()
            )));
        }
        let t = Instant::now();
        let (ptr, _rec) = buf.device_ptr(&self.stream);
        let ptr = ptr as *mut core::ffi::c_void;
        self.run("send", |comm, s| {
            // SAFETY: ptr addresses at least n f32 on this device.
            unsafe {
                result::send(
                    ptr,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    peer as i32,
                    comm,
                    s,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("ncclSend", e))
        })?;
        self.count(t, n * 4);
        Ok(())
    }

    /// Receives `n` elements from `peer` into the start of a device buffer.
    pub fn recv_device(
        &self,
        buf: &mut CudaSlice<f32>,
        n: usize,
        peer: usize,
    ) -> Result<(), CommError> {
        use cudarc::driver::DevicePtrMut;
        check_peer(self.rank, self.world, peer, "recv")?;
        if n > buf.len() {
            return Err(CommError::Usage(format!(
                "recv of {n} elements into a buffer of {}",
                buf.len()
            )));
        }
        let t = Instant::now();
        let (ptr, _rec) = buf.device_ptr_mut(&self.stream);
        let ptr = ptr as *mut core::ffi::c_void;
        self.run("recv", |comm, s| {
            // SAFETY: ptr addresses at least n f32 on this device.
            unsafe {
                result::recv(
                    ptr,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    peer as i32,
                    comm,
                    s,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("ncclRecv", e))
        })?;
        self.count(t, 0);
        Ok(())
    }

    fn staged(
        &self,
        what: &str,
        host: &mut [f32],
        out_len: usize,
        op: impl FnOnce(
            *mut core::ffi::c_void,
            *mut core::ffi::c_void,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<(), CommError>,
        out: Option<&mut [f32]>,
    ) -> Result<(), CommError> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let t = Instant::now();
        let sent = host.len() * 4;
        let io = |e: cudarc::driver::DriverError| self.fail(CommError::Io(format!("{what}: {e}")));
        // Never an empty allocation (a rank may send or receive nothing in an all-to-all).
        let src = if host.is_empty() {
            self.stream.alloc_zeros::<f32>(1)
        } else {
            self.stream.clone_htod(&*host)
        }
        .map_err(io)?;
        let mut dst = self.stream.alloc_zeros::<f32>(out_len.max(1)).map_err(io)?;
        {
            let (s, _r1) = src.device_ptr(&self.stream);
            let (d, _r2) = dst.device_ptr_mut(&self.stream);
            let (s, d) = (s as *mut core::ffi::c_void, d as *mut core::ffi::c_void);
            self.run(what, |comm, st| op(s, d, comm, st))?;
        }
        let target: &mut [f32] = match out {
            Some(o) => o,
            None => host,
        };
        if !target.is_empty() {
            self.stream
                .memcpy_dtoh(&dst.slice(..target.len()), target)
                .map_err(io)?;
        }
        self.stream.synchronize().map_err(io)?;
        self.count(t, sent);
        Ok(())
    }
}

impl NcclComm {
    /// Closes the communicator on this rank alone (`ncclCommAbort`: no peer takes part, unlike
    /// a destroy, which may wait for the other ranks of the node).
    pub fn abort(self) {
        drop(self)
    }

    /// Marks the communicator broken by `e` and aborts it (a failure before NCCL was called
    /// on this rank still leaves it unusable: its peers may be inside the operation).
    fn fail(&self, e: CommError) -> CommError {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = g.comm.take() {
            // SAFETY: no operation of this rank is in flight; the communicator is not used
            // again.
            unsafe { sys::ncclCommAbort(r.0) };
        }
        if g.broken.is_none() {
            g.broken = Some(e.clone_shallow());
        }
        e
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = g.comm.take() {
            // SAFETY: no operation is in flight (they all wait for completion); abort frees
            // this rank's resources without waiting for the others.
            unsafe { sys::ncclCommAbort(r.0) };
        }
    }
}

impl CommError {
    /// A copy for keeping (the error types hold only plain data).
    fn clone_shallow(&self) -> CommError {
        match self {
            CommError::Peer { peer, addr, why } => CommError::Peer {
                peer: *peer,
                addr: *addr,
                why: why.clone(),
            },
            CommError::Timeout { peer, addr, ms } => CommError::Timeout {
                peer: *peer,
                addr: *addr,
                ms: *ms,
            },
            CommError::Connect { peer, addr, why } => CommError::Connect {
                peer: *peer,
                addr: *addr,
                why: why.clone(),
            },
            CommError::Protocol { peer, addr, why } => CommError::Protocol {
                peer: *peer,
                addr: *addr,
                why: why.clone(),
            },
            CommError::Usage(s) => CommError::Usage(s.clone()),
            CommError::Io(s) => CommError::Io(s.clone()),
            CommError::Broken(e) => CommError::Broken(Box::new(e.clone_shallow())),
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn nccl(&self) -> Option<&NcclComm> {
        Some(self)
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        self.staged(
            "all_reduce",
            buf,
            n,
            |s, d, comm, st| {
                // SAFETY: s and d address n f32 on this device.
                unsafe {
                    result::all_reduce(
                        s,
                        d,
                        n,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        st,
                    )
                }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclAllReduce", e))
            },
            None,
        )
    }
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_gather(self.world, input.len(), output.len())?;
        if input.is_empty() {
            return Ok(());
        }
        let n = input.len();
        let mut inp = input.to_vec();
        let total = output.len();
        self.staged(
            "all_gather",
            &mut inp,
            total,
            |s, d, comm, st| {
                // SAFETY: s holds n f32, d world * n.
                unsafe { result::all_gather(s, d, n, sys::ncclDataType_t::ncclFloat32, comm, st) }
                    .map(|_| ())
                    .map_err(|e| nccl_err("ncclAllGather", e))
            },
            Some(output),
        )
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        check_root(self.world, root)?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        self.staged(
            "broadcast",
            buf,
            n,
            |s, d, comm, st| {
                // SAFETY: s and d address n f32 on this device.
                unsafe {
                    result::broadcast(
                        s,
                        d,
                        n,
                        sys::ncclDataType_t::ncclFloat32,
                        root as i32,
                        comm,
                        st,
                    )
                }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclBroadcast", e))
            },
            None,
        )
    }
    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError> {
        check_peer(self.rank, self.world, peer, "send")?;
        let mut b = buf.to_vec();
        let n = b.len();
        self.staged(
            "send",
            &mut b,
            0,
            |s, _d, comm, st| {
                // SAFETY: s holds n f32 on this device.
                unsafe {
                    result::send(
                        s,
                        n,
                        sys::ncclDataType_t::ncclFloat32,
                        peer as i32,
                        comm,
                        st,
                    )
                }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclSend", e))
            },
            Some(&mut []),
        )
    }
    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        check_peer(self.rank, self.world, peer, "recv")?;
        let n = buf.len();
        let mut zeros = vec![0f32; n];
        self.staged(
            "recv",
            &mut zeros,
            n,
            |_s, d, comm, st| {
                // SAFETY: d holds n f32 on this device.
                unsafe {
                    result::recv(
                        d,
                        n,
                        sys::ncclDataType_t::ncclFloat32,
                        peer as i32,
                        comm,
                        st,
                    )
                }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclRecv", e))
            },
            Some(buf),
        )
    }
    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [0f32; 1];
        self.all_reduce_sum(&mut one)
    }
    /// Every part as an `ncclSend`/`ncclRecv` pair inside one group (NCCL runs them together,
    /// so no order of the ranks' calls deadlocks); this rank's own part is copied on the host.
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        check_all_to_all(
            self.rank,
            self.world,
            send.len(),
            send_counts,
            recv.len(),
            recv_counts,
        )?;
        let (so, ro) = (super::offsets(send_counts), super::offsets(recv_counts));
        let (rank, world) = (self.rank, self.world);
        let mut host = send.to_vec();
        let total = recv.len();
        let own = send[so[rank]..so[rank + 1]].to_vec();
        self.staged(
            "all_to_all_v",
            &mut host,
            total,
            |s, d, comm, st| {
                let f = sys::ncclDataType_t::ncclFloat32;
                result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
                let mut res = Ok(());
                for j in (0..world).filter(|&j| j != rank) {
                    // SAFETY: s holds the send buffer and d the receive buffer on this device;
                    // the offsets and counts stay inside them (checked above).
                    let r = unsafe {
                        result::send(
                            (s as *mut f32).add(so[j]) as *mut core::ffi::c_void,
                            send_counts[j],
                            f,
                            j as i32,
                            comm,
                            st,
                        )
                        .and_then(|_| {
                            result::recv(
                                (d as *mut f32).add(ro[j]) as *mut core::ffi::c_void,
                                recv_counts[j],
                                f,
                                j as i32,
                                comm,
                                st,
                            )
                        })
                    };
                    if let Err(e) = r {
                        res = Err(nccl_err("ncclSend/ncclRecv", e));
                        break;
                    }
                }
                let end = result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
                res.and(end.map(|_| ()))
            },
            Some(recv),
        )?;
        recv[ro[rank]..ro[rank + 1]].copy_from_slice(&own);
        Ok(())
    }
}
