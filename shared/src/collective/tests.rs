//! One conformance suite run against every communicator, plus the TCP failure cases.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

const LENS: [usize; 6] = [0, 1, 3, 7, 1000, 4099];
/// Operation deadline in the conformance runs (only reached when something is wrong).
const SUITE_TIMEOUT: Duration = Duration::from_secs(10);

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The input of `rank` for test `tag` and length `len`: never zero, both signs, magnitudes
/// from 1/16 to 16.
fn data(rank: usize, len: usize, tag: u64) -> Vec<f32> {
    let mut g =
        Rng(((rank as u64) << 48) ^ ((len as u64) << 16) ^ tag.wrapping_mul(0x2545_F491_4F6C_DD1D));
    (0..len)
        .map(|_| {
            let sign = if g.next() & 1 == 0 { 1.0 } else { -1.0 };
            (sign * (g.unit() * 8.0 - 4.0).exp2()) as f32
        })
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// A factory of groups of one implementation.
trait Group: Communicator + Sized + 'static {
    fn group(world: usize, timeout: Duration) -> Vec<Self>;
}

impl Group for LocalComm {
    fn group(world: usize, timeout: Duration) -> Vec<Self> {
        let mut g = local_group(world);
        g.iter_mut().for_each(|c| c.set_timeout(timeout));
        g
    }
}

impl Group for TcpComm {
    fn group(world: usize, timeout: Duration) -> Vec<Self> {
        tcp_group(
            world,
            TcpConfig {
                timeout,
                connect_timeout: Duration::from_secs(10),
            },
        )
    }
}

fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs = ls
        .iter()
        .map(|l| l.local_addr().expect("local_addr"))
        .collect();
    (ls, addrs)
}

/// A TCP group on 127.0.0.1, each rank connected from its own thread.
fn tcp_group(world: usize, cfg: TcpConfig) -> Vec<TcpComm> {
    let (ls, addrs) = listeners(world);
    std::thread::scope(|s| {
        let addrs = &addrs;
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| s.spawn(move || TcpComm::connect(r, addrs, l, cfg)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("connect thread").expect("connect"))
            .collect()
    })
}

/// Runs `f` on every rank, each in its own thread.
fn on_each<C: Communicator, R: Send>(comms: &[C], f: impl Fn(&C) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = comms.iter().map(|c| s.spawn(move || f(c))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// Runs `f` on every rank, each in its own thread owning its communicator.
fn on_each_owned<C: Communicator + 'static, R: Send + 'static>(
    comms: Vec<C>,
    f: impl Fn(C) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

/// What one rank saw: its all-reduce results (compared across ranks) and failed checks.
struct Report {
    reduced: Vec<Vec<u32>>,
    failures: Vec<String>,
}

fn is_usage<T>(r: Result<T, CommError>) -> bool {
    matches!(r, Err(CommError::Usage(_)))
}

/// Every operation at every length on one rank. Checks never panic (a panicking rank would
/// leave the others waiting); a communication error ends the run.
fn conformance_rank<C: Communicator>(c: &C, arrived: &AtomicUsize) -> Result<Report, CommError> {
    let (r, w) = (c.rank(), c.world_size());
    let mut failures = Vec::new();
    let mut reduced = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(format!("rank {r} of {w}: {what}"));
        }
    };
    for n in LENS {
        // all_reduce_sum against a float64 sum.
        let inputs: Vec<Vec<f32>> = (0..w).map(|q| data(q, n, 1)).collect();
        let mut buf = inputs[r].clone();
        c.all_reduce_sum(&mut buf)?;
        for i in 0..n {
            let exact: f64 = inputs.iter().map(|x| x[i] as f64).sum();
            let abs: f64 = inputs.iter().map(|x| (x[i] as f64).abs()).sum();
            let tol = w as f64 * f32::EPSILON as f64 * abs;
            let err = (buf[i] as f64 - exact).abs();
            check(
                err <= tol,
                format!(
                    "all_reduce len {n} [{i}]: {} vs {exact} (err {err:e} > {tol:e})",
                    buf[i]
                ),
            );
        }
        reduced.push(bits(&buf));

        // all_gather: every block exactly.
        let input = data(r, n, 2);
        let mut out = vec![f32::NAN; w * n];
        c.all_gather(&input, &mut out)?;
        for q in 0..w {
            check(
                bits(&out[q * n..(q + 1) * n]) == bits(&data(q, n, 2)),
                format!("all_gather len {n}: block {q} differs"),
            );
        }

        // broadcast from every root.
        for root in 0..w {
            let tag = 100 + root as u64;
            let mut b = data(r, n, tag);
            c.broadcast(&mut b, root)?;
            check(
                bits(&b) == bits(&data(root, n, tag)),
                format!("broadcast len {n} from root {root} differs"),
            );
        }

        // send/recv around the ring, both ways.
        if w > 1 {
            let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
            let mut got = vec![f32::NAN; n];
            c.send(&data(r, n, 3), next)?;
            c.recv(&mut got, prev)?;
            check(
                bits(&got) == bits(&data(prev, n, 3)),
                format!("recv len {n} from {prev} differs"),
            );
            c.send(&data(r, n, 4), prev)?;
            c.recv(&mut got, next)?;
            check(
                bits(&got) == bits(&data(next, n, 4)),
                format!("recv len {n} from {next} differs"),
            );
        }
    }

    // all_to_all_v with uneven and empty parts: rank i sends rank j `a2a_count(i, j, n)`
    // elements, each naming its sender, receiver and place.
    for n in [0usize, 1, 5, 33] {
        let send_counts: Vec<usize> = (0..w).map(|j| a2a_count(r, j, n)).collect();
        let recv_counts: Vec<usize> = (0..w).map(|i| a2a_count(i, r, n)).collect();
        let send: Vec<f32> = (0..w)
            .flat_map(|j| (0..send_counts[j]).map(move |k| a2a_value(r, j, k)))
            .collect();
        let mut got = vec![f32::NAN; recv_counts.iter().sum()];
        c.all_to_all_v(&send, &send_counts, &mut got, &recv_counts)?;
        let want: Vec<f32> = (0..w)
            .flat_map(|i| (0..recv_counts[i]).map(move |k| a2a_value(i, r, k)))
            .collect();
        check(
            bits(&got) == bits(&want),
            format!("all_to_all_v (n {n}) received {got:?}, want {want:?}"),
        );
    }

    // barrier: after round k every rank has arrived k times.
    for round in 1..=3 {
        arrived.fetch_add(1, Ordering::SeqCst);
        c.barrier()?;
        let seen = arrived.load(Ordering::SeqCst);
        check(
            seen >= round * w,
            format!("barrier round {round}: only {seen} arrivals"),
        );
    }

    // Argument errors are found before anything is sent and leave the communicator usable.
    check(
        is_usage(c.send(&[1.0], r)),
        "send to self is not a usage error".into(),
    );
    check(
        is_usage(c.recv(&mut [0.0], w)),
        "recv from rank w is not a usage error".into(),
    );
    check(
        is_usage(c.broadcast(&mut [0.0], w)),
        "broadcast from rank w is not a usage error".into(),
    );
    let mut short = vec![0.0; w * 3 - 1];
    check(
        is_usage(c.all_gather(&[1.0; 3], &mut short)),
        "all_gather into a short output is not a usage error".into(),
    );
    let zeros = vec![0usize; w];
    let mut one_off = zeros.clone();
    one_off[(r + 1) % w] = 1;
    check(
        is_usage(c.all_to_all_v(&[], &zeros[1..], &mut [], &zeros)),
        "all_to_all_v with too few counts is not a usage error".into(),
    );
    check(
        is_usage(c.all_to_all_v(&[], &one_off, &mut [], &zeros)),
        "all_to_all_v with counts beyond the buffer is not a usage error".into(),
    );
    let mut to_self = zeros.clone();
    to_self[r] = 1;
    check(
        is_usage(c.all_to_all_v(&[1.0], &to_self, &mut [], &zeros)),
        "all_to_all_v with a self part of two sizes is not a usage error".into(),
    );
    let mut ones = vec![1.0f32; 5];
    c.all_reduce_sum(&mut ones)?;
    check(
        ones.iter().all(|&x| x == w as f32),
        format!("all_reduce after usage errors: {ones:?}"),
    );
    Ok(Report { reduced, failures })
}

/// Elements rank `i` sends rank `j` in the all-to-all of size class `n` (some parts empty).
fn a2a_count(i: usize, j: usize, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (i * 3 + j * 5 + n) % 7
    }
}

/// Element `k` of the part rank `i` sends rank `j` (exact in f32).
fn a2a_value(i: usize, j: usize, k: usize) -> f32 {
    (i * 10_000 + j * 100 + k) as f32
}

fn conformance<C: Group>(world: usize) {
    let comms = C::group(world, SUITE_TIMEOUT);
    for (r, c) in comms.iter().enumerate() {
        assert_eq!((c.rank(), c.world_size()), (r, world));
    }
    let arrived = AtomicUsize::new(0);
    let reports: Vec<Report> = on_each(&comms, |c| conformance_rank(c, &arrived))
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("world {world}, rank {r}: {e}")))
        .collect();
    let failures: Vec<&String> = reports.iter().flat_map(|x| &x.failures).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    for (r, rep) in reports.iter().enumerate() {
        assert!(
            rep.reduced == reports[0].reduced,
            "world {world}: all_reduce bits of rank {r} differ from rank 0"
        );
    }
}

macro_rules! conformance_tests {
    ($($name:ident: $ty:ty, $world:expr;)*) => {
        $(#[test]
        fn $name() {
            conformance::<$ty>($world);
        })*
    };
}

conformance_tests! {
    local_conformance_w1: LocalComm, 1;
    local_conformance_w2: LocalComm, 2;
    local_conformance_w3: LocalComm, 3;
    local_conformance_w4: LocalComm, 4;
    local_conformance_w8: LocalComm, 8;
    tcp_conformance_w1: TcpComm, 1;
    tcp_conformance_w2: TcpComm, 2;
    tcp_conformance_w3: TcpComm, 3;
    tcp_conformance_w4: TcpComm, 4;
    tcp_conformance_w8: TcpComm, 8;
}

#[test]
fn single_rank_conformance() {
    let arrived = AtomicUsize::new(0);
    let rep = conformance_rank(&SingleRank, &arrived).expect("single rank");
    assert!(rep.failures.is_empty(), "{:#?}", rep.failures);
}

#[test]
fn chunks_cover_the_buffer() {
    for w in 1..=9 {
        for n in [0, 1, 2, 5, 8, 9, 17, 4099] {
            let mut next = 0;
            for i in 0..w {
                let c = chunk(i, n, w);
                assert_eq!(c.start, next);
                next = c.end;
            }
            assert_eq!(next, n);
        }
    }
}

/// Ranks calling different lengths or operations get a protocol error naming the peer.
fn mismatch_is_an_error<C: Group>() {
    let errs = on_each(&C::group(2, Duration::from_secs(5)), |c| {
        let mut buf = vec![1.0f32; 10 + 2 * c.rank()];
        c.all_reduce_sum(&mut buf)
    });
    for (r, e) in errs.into_iter().enumerate() {
        match e {
            Err(CommError::Protocol { peer, why, .. }) => {
                assert_eq!(peer, 1 - r);
                assert!(why.contains("all_reduce_sum"), "{why}");
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
    let errs = on_each(&C::group(2, Duration::from_secs(5)), |c| {
        let mut out = [0.0f32; 8];
        if c.rank() == 0 {
            c.all_gather(&[1.0; 4], &mut out)
        } else {
            c.all_reduce_sum(&mut out[..4])
        }
    });
    for (r, e) in errs.into_iter().enumerate() {
        assert!(
            matches!(&e, Err(CommError::Protocol { peer, .. }) if *peer == 1 - r),
            "rank {r}: {e:?}"
        );
    }
}

/// Rank 0 expects 3 elements from rank 1, which sends 2: rank 0's error names rank 1 and says
/// what it expected.
fn all_to_all_mismatch_is_an_error<C: Group>() {
    let errs = on_each(&C::group(2, Duration::from_secs(5)), |c| {
        let r = c.rank();
        let (send_counts, recv_counts) = if r == 0 {
            (vec![0, 1], vec![0, 3])
        } else {
            (vec![2, 0], vec![1, 0])
        };
        let send = vec![1.0; send_counts.iter().sum()];
        let mut recv = vec![0.0; recv_counts.iter().sum()];
        c.all_to_all_v(&send, &send_counts, &mut recv, &recv_counts)
    });
    match &errs[0] {
        Err(CommError::Protocol { peer: 1, why, .. }) => {
            assert!(why.contains("all_to_all_v") && why.contains('3'), "{why}")
        }
        other => panic!("rank 0: {other:?}"),
    }
    // Rank 1 got the one element it expected: its call may well have succeeded.
    let _ = &errs[1];
}

/// A group of 3 with a 500 ms deadline where rank 1 is up but never calls the collective
/// (silent until the other two are done, bounded so the test cannot hang) and ranks 0 and 2
/// run `op`: each rank's result and time.
fn with_a_silent_rank_1<C: Group>(
    op: fn(&C) -> Result<(), CommError>,
) -> Vec<(Result<(), CommError>, Duration)> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
    on_each_owned(C::group(3, Duration::from_millis(500)), move |c| {
        let start = Instant::now();
        if c.rank() == 1 {
            let rx = done_rx.lock().unwrap();
            for _ in 0..2 {
                let _ = rx.recv_timeout(Duration::from_secs(10));
            }
            return (Ok(()), start.elapsed());
        }
        let r = op(&c);
        let _ = done_tx.send(());
        (r, start.elapsed())
    })
}

/// Rank 1 never calls the all-to-all: the others time out naming it, within the deadline.
fn all_to_all_silent_peer_times_out<C: Group>() {
    let results = with_a_silent_rank_1::<C>(|c| {
        let counts = vec![4usize; 3];
        let mut recv = vec![0.0; 12];
        c.all_to_all_v(&[1.0; 12], &counts, &mut recv, &counts)
    });
    for r in [0, 2] {
        let (res, t) = &results[r];
        let e = res.as_ref().expect_err("must fail");
        assert_eq!(e.peer(), Some(1), "rank {r}: {e}");
        assert!(*t < Duration::from_secs(3), "rank {r}: {t:?}");
    }
}

/// Rank 1 is up but never calls the collective: rank 2 (which receives from it) times out
/// naming it, and nobody waits much longer than the deadline.
fn silent_peer_times_out<C: Group>() {
    let results = with_a_silent_rank_1::<C>(|c| {
        let mut buf = data(c.rank(), 1000, 7);
        c.all_reduce_sum(&mut buf)
    });
    let (r2, t2) = &results[2];
    assert!(
        matches!(
            r2,
            Err(CommError::Timeout {
                peer: 1,
                ms: 500,
                ..
            })
        ),
        "rank 2: {r2:?}"
    );
    assert!(
        *t2 >= Duration::from_millis(450) && *t2 < Duration::from_secs(3),
        "{t2:?}"
    );
    let (r0, t0) = &results[0];
    let e0 = r0.as_ref().expect_err("rank 0 must fail");
    assert!(matches!(e0.peer(), Some(1 | 2)), "rank 0: {e0:?}");
    assert!(*t0 < Duration::from_secs(3), "{t0:?}");
}

/// Rank 2 drops its communicator while ranks 0 and 1 are inside an all-reduce: both fail
/// naming rank 2, well before the deadline.
fn dead_peer_is_reported<C: Group>() {
    let results = on_each_owned(C::group(3, Duration::from_secs(8)), |c| {
        let start = Instant::now();
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(200));
            drop(c);
            return (Ok(()), start.elapsed());
        }
        let mut buf = data(c.rank(), 1000, 8);
        let r = c.all_reduce_sum(&mut buf);
        (r, start.elapsed())
    });
    for (r, (res, t)) in results.iter().enumerate().take(2) {
        let e = res.as_ref().expect_err("must fail");
        assert_eq!(e.peer(), Some(2), "rank {r}: {e}");
        assert!(*t < Duration::from_secs(4), "rank {r} took {t:?}: {e}");
    }
}

macro_rules! generic_tests {
    ($($name:ident => $f:ident;)*) => {
        mod failures {
            use super::*;
            $(mod $name {
                use super::*;
                #[test]
                fn local() {
                    $f::<LocalComm>();
                }
                #[test]
                fn tcp() {
                    $f::<TcpComm>();
                }
            })*
        }
    };
}

generic_tests! {
    mismatch => mismatch_is_an_error;
    silent_peer => silent_peer_times_out;
    dead_peer => dead_peer_is_reported;
    all_to_all_mismatch => all_to_all_mismatch_is_an_error;
    all_to_all_silent_peer => all_to_all_silent_peer_times_out;
}

#[test]
fn tcp_dead_peer_breaks_the_communicator() {
    let results = on_each_owned(
        tcp_group(
            2,
            TcpConfig {
                timeout: Duration::from_secs(8),
                connect_timeout: Duration::from_secs(5),
            },
        ),
        |c| {
            if c.rank() == 1 {
                drop(c);
                return None;
            }
            let mut buf = vec![1.0f32; 100];
            let first = c.all_reduce_sum(&mut buf);
            let again = c.all_reduce_sum(&mut buf);
            Some((first, again, c.peer_addrs()[1]))
        },
    );
    let (first, again, addr) = results[0].as_ref().expect("rank 0");
    let e = first.as_ref().expect_err("must fail");
    assert!(matches!(e, CommError::Peer { peer: 1, .. }), "{e:?}");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
    match again {
        Err(CommError::Broken(inner)) => assert_eq!(inner.peer(), Some(1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tcp_peer_that_never_starts() {
    let cfg = TcpConfig {
        timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
    };
    // Nothing listens on `dead` (a port bound and released).
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (mut ls, addrs) = listeners(1);
    let live = addrs[0];
    let t0 = Instant::now();
    // Rank 0 waits for rank 1, which never connects.
    let waiting = std::thread::spawn(move || TcpComm::connect(0, &[live, dead], ls.remove(0), cfg));
    // Rank 1 tries to reach rank 0, which is not there.
    let (mut ls1, a1) = listeners(1);
    let dialing = TcpComm::connect(1, &[dead, a1[0]], ls1.remove(0), cfg);
    let waiting = waiting.join().unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    for (e, peer) in [(waiting.err(), 1), (dialing.err(), 0)] {
        let e = e.expect("connect must fail");
        match &e {
            CommError::Connect { peer: p, addr, .. } => {
                assert_eq!(*p, peer);
                assert_eq!(*addr, dead);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains(&dead.to_string()), "{e}");
    }
}

fn fake_peer(addr: SocketAddr, rank: usize, world: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&tcp::hello(rank, world)).unwrap();
    s
}

#[test]
fn tcp_bad_handshakes() {
    let cfg = TcpConfig {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
    };
    // A rank that rank 0 should not hear from.
    let (mut ls, addrs) = listeners(3);
    let a = addrs[0];
    let _fake = std::thread::spawn(move || fake_peer(a, 7, 3));
    let e = TcpComm::connect(0, &addrs, ls.remove(0), cfg)
        .err()
        .expect("wrong rank");
    assert!(matches!(e, CommError::Protocol { peer: 7, .. }), "{e:?}");

    // The same rank twice.
    let (mut ls, addrs) = listeners(3);
    let a = addrs[0];
    let _fakes = std::thread::spawn(move || (fake_peer(a, 1, 3), fake_peer(a, 1, 3)));
    let e = TcpComm::connect(0, &addrs, ls.remove(0), cfg)
        .err()
        .expect("duplicate");
    assert!(
        matches!(&e, CommError::Protocol { peer: 1, why, .. } if why.contains("twice")),
        "{e:?}"
    );

    // Another world size.
    let (mut ls, addrs) = listeners(2);
    let a = addrs[0];
    let _fake = std::thread::spawn(move || fake_peer(a, 1, 5));
    let e = TcpComm::connect(0, &addrs, ls.remove(0), cfg)
        .err()
        .expect("world");
    assert!(matches!(e, CommError::Protocol { peer: 1, .. }), "{e:?}");

    // A stranger is ignored; the real rank 1 still gets in.
    let (ls, addrs) = listeners(2);
    let a = addrs[0];
    let mut stranger = TcpStream::connect(a).unwrap();
    stranger
        .write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let comms = std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = &addrs;
                s.spawn(move || TcpComm::connect(r, addrs, l, cfg))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect::<Vec<_>>()
    });
    let sums = on_each(&comms, |c| {
        let mut b = [c.rank() as f32 + 1.0];
        c.all_reduce_sum(&mut b).map(|_| b[0])
    });
    assert!(
        sums.iter().all(|s| matches!(s, Ok(x) if *x == 3.0)),
        "{sums:?}"
    );
}

/// A ring all-reduce of `n` floats at world `world`; inputs are small integers, so every
/// sum is exact and can be checked without float64.
fn big_all_reduce(world: usize, n: usize) -> Vec<(TcpComm, f64)> {
    let comms = tcp_group(world, TcpConfig::default());
    let ok = on_each(&comms, |c| {
        let r = c.rank();
        let mut buf: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + r * 13) % 101) as f32 - 50.0)
            .collect();
        let t = Instant::now();
        c.all_reduce_sum(&mut buf).expect("all_reduce");
        let secs = t.elapsed().as_secs_f64();
        let bad = (0..n)
            .filter(|&i| {
                let want: i64 = (0..world)
                    .map(|q| ((i * 7 + q * 13) % 101) as i64 - 50)
                    .sum();
                buf[i] != want as f32
            })
            .count();
        (bad, secs)
    });
    for (r, (bad, _)) in ok.iter().enumerate() {
        assert_eq!(*bad, 0, "rank {r}: {bad} wrong sums");
    }
    comms
        .into_iter()
        .zip(ok.into_iter().map(|(_, s)| s))
        .collect()
}

#[test]
fn tcp_large_all_reduce() {
    let (world, n) = (4, 4 << 20);
    for (c, secs) in big_all_reduce(world, n) {
        // Each rank sends 2 (w - 1) / w of the buffer plus 2 (w - 1) headers.
        let payload = 2 * (world as u64 - 1) * (n as u64 / world as u64) * 4;
        let sent = c.bytes_sent();
        assert!(
            sent >= payload && sent <= payload + 1024,
            "rank {}: {sent}",
            c.rank()
        );
        assert!(c.comm_seconds() > 0.0 && c.comm_seconds() >= secs * 0.5);
    }
}
