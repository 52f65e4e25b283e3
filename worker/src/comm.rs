//! A group's communicator in the worker: the TCP collective, always connected, and on a GPU
//! worker sent an NCCL id for the group, NCCL over it.
//!
//! The ranks of a group must all use the same transport. Each rank that has an id joins the
//! NCCL group, then every rank says over TCP whether it joined; NCCL serves only when all of
//! them did, otherwise the group stays on TCP (and a rank that joined drops its NCCL
//! communicator). A GPU worker whose peers have no NCCL library, or cannot reach each other
//! with it, so serves over TCP instead of failing to load.

use crate::engine::EngineError;
use grok_shared::collective::{CommError, Communicator, TcpComm};
use std::time::Duration;

/// The device stream an NCCL communicator runs on (none without the `cuda` feature).
#[cfg(feature = "cuda")]
pub type NcclStream = std::sync::Arc<grok_shared::backend::cuda::CudaStream>;
/// The device stream an NCCL communicator runs on (none without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub enum NcclStream {}

/// NCCL ids of a rank's groups, as the coordinator sent them (None: that group uses TCP).
#[derive(Clone, Copy, Default)]
pub struct NcclIds {
    pub world: Option<[u8; 128]>,
    pub tp: Option<[u8; 128]>,
}

impl NcclIds {
    /// Checks the ids of a `LoadRequest` (empty: none).
    pub fn parse(world: &[u8], tp: &[u8]) -> Result<Self, CommError> {
        let one = |g: &str, b: &[u8]| {
            (!b.is_empty())
                .then(|| grok_shared::collective::bootstrap::check_id(g, b))
                .transpose()
        };
        Ok(NcclIds {
            world: one("world", world)?,
            tp: one("tp", tp)?,
        })
    }

    pub fn any(&self) -> bool {
        self.world.is_some() || self.tp.is_some()
    }
}

pub struct Comm {
    tcp: TcpComm,
    #[cfg(feature = "cuda")]
    nccl: Option<grok_shared::collective::nccl::NcclComm>,
}

impl Comm {
    /// Joins NCCL group `id` over `tcp`'s group when every rank can (see the module) and
    /// returns the communicator and, when NCCL was asked for and not used, why. Two sums over
    /// TCP keep the ranks in step: first whether each can try (it has the id, a device stream
    /// and the NCCL library), so that no rank waits in NCCL's initialisation for one that never
    /// comes; then whether each joined. Initialisation waits at most half of `timeout`, so a
    /// rank whose join failed at once is still waiting in the second sum when the others
    /// arrive.
    pub fn join(
        tcp: TcpComm,
        id: Option<[u8; 128]>,
        stream: Option<&NcclStream>,
        timeout: Duration,
    ) -> Result<(Comm, Option<String>), EngineError> {
        let w = tcp.world_size();
        #[cfg(feature = "cuda")]
        let (can, why_not): (bool, Option<String>) = match (id, stream) {
            (Some(_), Some(_)) => match grok_shared::collective::nccl::available() {
                Ok(()) => (true, None),
                Err(e) => (false, Some(e.to_string())),
            },
            (Some(_), None) => (false, Some("this worker has no CUDA device".to_string())),
            (None, _) => (false, None),
        };
        #[cfg(not(feature = "cuda"))]
        let (can, why_not): (bool, Option<String>) = {
            let _ = stream;
            (
                false,
                id.map(|_| "this worker was built without CUDA".to_string()),
            )
        };
        let all = |flag: bool| -> Result<bool, EngineError> {
            if w <= 1 {
                return Ok(false);
            }
            let mut v = [flag as u8 as f32];
            tcp.all_reduce_sum(&mut v)?;
            Ok(v[0] as usize == w)
        };
        let asked = id.is_some();
        if !all(can)? {
            let why = why_not.or_else(|| asked.then(|| "a peer cannot use NCCL".to_string()));
            return Ok((Comm::tcp(tcp), why));
        }
        #[cfg(feature = "cuda")]
        let joined = match (id, stream) {
            (Some(id), Some(s)) => grok_shared::collective::nccl::NcclComm::new(
                s.clone(),
                tcp.rank(),
                w,
                id,
                timeout / 2,
            )
            .map_err(|e| format!("joining NCCL: {e}")),
            _ => Err("no NCCL id or device stream".to_string()),
        };
        #[cfg(not(feature = "cuda"))]
        let joined: Result<std::convert::Infallible, String> = {
            let _ = timeout;
            Err("this worker was built without CUDA".to_string())
        };
        let ok = all(joined.is_ok())?;
        #[cfg(not(feature = "cuda"))]
        let _ = ok;
        Ok(match joined {
            #[cfg(feature = "cuda")]
            Ok(c) if ok => (Comm { tcp, nccl: Some(c) }, None),
            #[cfg(feature = "cuda")]
            Ok(c) => {
                c.abort();
                (
                    Comm::tcp(tcp),
                    Some("a peer could not join NCCL".to_string()),
                )
            }
            #[cfg(not(feature = "cuda"))]
            Ok(never) => match never {},
            Err(e) => (Comm::tcp(tcp), Some(e)),
        })
    }

    /// The TCP collective alone.
    pub fn tcp(tcp: TcpComm) -> Comm {
        Comm {
            tcp,
            #[cfg(feature = "cuda")]
            nccl: None,
        }
    }

    /// Closes the NCCL communicator, if any, at once and on this rank alone (NCCL's abort: no
    /// peer takes part); the TCP collective stays. Before a reconnect, so that the old
    /// communicator's device memory is free for the new one.
    pub fn close_nccl(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(c) = self.nccl.take() {
            c.abort();
        }
    }

    /// `"nccl"` or `"tcp"`.
    pub fn transport(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.nccl.is_some() {
            return "nccl";
        }
        "tcp"
    }

    /// Seconds spent in collectives so far (both transports).
    pub fn comm_seconds(&self) -> f64 {
        #[cfg(feature = "cuda")]
        if let Some(n) = &self.nccl {
            return self.tcp.comm_seconds() + n.comm_seconds();
        }
        self.tcp.comm_seconds()
    }

    /// Bytes sent so far (both transports).
    pub fn bytes_sent(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if let Some(n) = &self.nccl {
            return self.tcp.bytes_sent() + n.bytes_sent();
        }
        self.tcp.bytes_sent()
    }

    fn active(&self) -> &dyn Communicator {
        #[cfg(feature = "cuda")]
        if let Some(n) = &self.nccl {
            return n;
        }
        &self.tcp
    }
}

impl Communicator for Comm {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }
    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }
    #[cfg(feature = "cuda")]
    fn nccl(&self) -> Option<&grok_shared::collective::nccl::NcclComm> {
        self.nccl.as_ref()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.active().all_reduce_sum(buf)
    }
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        self.active().all_gather(input, output)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.active().broadcast(buf, root)
    }
    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError> {
        self.active().send(buf, peer)
    }
    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        self.active().recv(buf, peer)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.active().barrier()
    }
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        self.active()
            .all_to_all_v(send, send_counts, recv, recv_counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grok_shared::collective::TcpConfig;
    use std::net::TcpListener;

    fn group(n: usize) -> Vec<TcpComm> {
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let cfg = TcpConfig {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        };
        std::thread::scope(|s| {
            let hs: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let addrs = &addrs;
                    s.spawn(move || TcpComm::connect(r, addrs, l, cfg).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Ranks that cannot join NCCL (here: no device stream) stay on TCP together, say why
    /// when they were asked for NCCL, and the group still sums correctly afterwards.
    #[test]
    fn a_group_that_cannot_all_join_nccl_agrees_on_tcp() {
        for ids in [[true, true], [true, false], [false, false]] {
            let comms = group(2);
            let out: Vec<(Comm, Option<String>)> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .zip(ids)
                    .map(|(c, has)| {
                        s.spawn(move || {
                            let id = has.then_some([7u8; 128]);
                            Comm::join(c, id, None, Duration::from_secs(10)).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for ((c, why), has) in out.iter().zip(ids) {
                assert_eq!(c.transport(), "tcp");
                assert_eq!(why.is_some(), has, "{ids:?}: {why:?}");
            }
            let sums: Vec<f32> = std::thread::scope(|s| {
                let hs: Vec<_> = out
                    .iter()
                    .map(|(c, _)| {
                        s.spawn(move || {
                            let mut b = [c.rank() as f32 + 1.0];
                            c.all_reduce_sum(&mut b).unwrap();
                            b[0]
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(sums, [3.0, 3.0]);
        }
    }

    #[test]
    fn ids_are_checked() {
        let ok = NcclIds::parse(&[1u8; 128], &[]).unwrap();
        assert!(ok.world.is_some() && ok.tp.is_none() && ok.any());
        assert!(!NcclIds::parse(&[], &[]).unwrap().any());
        let e = NcclIds::parse(&[], &[1u8; 5]).err().unwrap().to_string();
        assert!(e.contains("tp") && e.contains("5 bytes"), "{e}");
    }
}
