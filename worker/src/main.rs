//! `grok-worker`: owns one shard of one model replica.

use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "grok-worker",
    version,
    about = "grok-cluster worker: one shard of one model replica, driven by the coordinator",
    after_help = "Examples:\n  grok-worker --coordinator 127.0.0.1:50051 --listen 127.0.0.1:0\n  grok-worker --coordinator 10.0.0.1:50051 --listen 0.0.0.0:50061 --advertise 10.0.0.2:50061 --rank 3\n  grok-worker --coordinator 10.0.0.1:50051 --tls-ca certs/ca.pem --tls-cert certs/worker.pem --tls-key certs/worker.key\n  grok-worker --etcd http://10.0.0.1:2379 --cluster prod --rank 3 --listen 0.0.0.0:50061 --advertise 10.0.0.2:50061\n  grok-worker --coordinator 10.0.0.1:50051 --device cuda:1 --kv-memory 40GiB\n  grok-worker --coordinator 10.0.0.1:50051 --device cuda:0 --gemm-min-rows 256 --gemm-precision bf16"
)]
struct Args {
    /// Coordinator address (HOST:PORT) to register with (static membership).
    #[arg(
        long,
        env = "GROK_COORDINATOR",
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    coordinator: Option<String>,
    /// Announce this worker in etcd (URL[,URL...]) instead: the leading coordinator of
    /// --cluster finds it there, a standby too after a failover. Needs --rank.
    #[arg(long, env = "GROK_ETCD", value_name = "URLS", requires = "rank")]
    etcd: Option<String>,
    /// Cluster name (etcd keys under /grok/NAME/).
    #[arg(long, default_value = "default", env = "GROK_CLUSTER")]
    cluster: String,
    /// etcd user (password: --etcd-password-file or GROK_ETCD_PASSWORD).
    #[arg(long, env = "GROK_ETCD_USER")]
    etcd_user: Option<String>,
    /// File whose first line is the etcd password (never logged).
    #[arg(long, value_name = "FILE")]
    etcd_password_file: Option<std::path::PathBuf>,
    /// CA of etcd's server certificates (https:// endpoints).
    #[arg(long, env = "GROK_ETCD_CA", value_name = "FILE")]
    etcd_ca: Option<std::path::PathBuf>,
    /// Address of this worker's gRPC service (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", env = "GROK_WORKER_LISTEN")]
    listen: SocketAddr,
    /// Address the coordinator and peers use to reach this worker (default: the bound address).
    #[arg(long, env = "GROK_WORKER_ADVERTISE")]
    advertise: Option<String>,
    /// Worker id (default: host name and process id).
    #[arg(long)]
    id: Option<String>,
    /// Ask for this rank (default: the next free one).
    #[arg(long)]
    rank: Option<u32>,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0, env = "GROK_THREADS")]
    threads: usize,
    /// Give up when the coordinator cannot be reached for this long.
    #[arg(long, default_value_t = 60)]
    register_timeout_s: u64,
    /// Select the compute device: cpu, or cuda:N (a build with --features cuda; any layout:
    /// the shard and its KV cache in the GPU's memory; collectives over NCCL when every rank
    /// of the replica has a GPU of its own, else over TCP through the host).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The most memory this worker's KV cache may take (device memory on a GPU, host memory
    /// on a CPU), e.g. 512MiB, 20GiB, 16GB. Without it a GPU worker takes the coordinator's
    /// --kv-memory-fraction of the device less its weights, a CPU worker 512 blocks; a
    /// coordinator's --kv-blocks beyond it is refused at load.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, env = "GROK_KV_MEMORY")]
    kv_memory: Option<u64>,
    /// GPU workers: matrix products of at least this many rows (a prefill chunk's rows, a
    /// large batch, the rows routed to one expert) go through cuBLAS instead of the GEMV
    /// kernels, for bf16 and int8 weights alike; 0 never uses cuBLAS [default: 16 for bf16
    /// weights, 64 for int8]. The GPU check's `gemm` group measures the crossover on a card.
    #[arg(long, value_name = "ROWS")]
    gemm_min_rows: Option<usize>,
    /// GPU workers: how cuBLAS takes the f32 activations: `split` (two bf16 halves, the
    /// GEMV's precision, twice the tensor work) or `bf16` (rounded to bf16, about 2^-9
    /// relative, half the work) [default: split].
    #[arg(long, value_name = "split|bf16", value_parser = ["split", "bf16"])]
    gemm_precision: Option<String>,
    #[command(flatten)]
    member: grok_proto::process::MemberArgs,
}

fn main() {
    grok_proto::process::keep_freed_memory();
    let a = Args::parse();
    let (_telemetry, tls) = grok_proto::process::start_member("grok-worker", "warn", &a.member);
    let cuda_device = match parse_device(&a.device) {
        Ok(Device::Cpu) => None,
        Ok(Device::Cuda(ordinal)) => {
            check_cuda(ordinal);
            Some(ordinal)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if cuda_device.is_none() && (a.gemm_min_rows.is_some() || a.gemm_precision.is_some()) {
        eprintln!(
            "error: --gemm-min-rows and --gemm-precision apply to GPU workers (--device cuda:N)"
        );
        std::process::exit(2);
    }
    let mut gemm = grok_shared::backend::cuda_shapes::GemmSettings::default();
    if let Some(r) = a.gemm_min_rows {
        gemm.min_rows = r;
        gemm.min_rows_int8 = r;
    }
    if a.gemm_precision.as_deref() == Some("bf16") {
        gemm.precision = grok_shared::backend::cuda_shapes::GemmPrecision::Bf16;
    }
    if a.threads > 0 {
        if let Err(e) = grok_shared::threads::init(a.threads) {
            grok_proto::process::exit(1, e);
        }
    }
    let id = a.id.clone().unwrap_or_else(|| {
        let host = grok_proto::process::hostname();
        let host = if host.is_empty() {
            "worker".into()
        } else {
            host
        };
        format!("{host}-{}", std::process::id())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let membership = match (&a.coordinator, &a.etcd) {
        (Some(c), _) => grok_worker::Membership::Coordinator(c.clone()),
        (None, Some(urls)) => match grok_proto::membership::EtcdConfig::new(
            urls,
            &a.cluster,
            a.etcd_user.clone(),
            a.etcd_password_file.clone(),
            std::env::var("GROK_ETCD_PASSWORD").ok(),
            a.etcd_ca.clone(),
        ) {
            Ok(cfg) => grok_worker::Membership::Etcd(cfg),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        },
        (None, None) => {
            eprintln!("error: give --coordinator HOST:PORT or --etcd URLS");
            std::process::exit(2);
        }
    };
    let res = rt.block_on(grok_worker::run(grok_worker::WorkerArgs {
        membership,
        listen: a.listen,
        advertise: a.advertise,
        worker_id: id,
        rank: a.rank,
        register_timeout: Duration::from_secs(a.register_timeout_s),
        cuda_device,
        kv_memory: a.kv_memory,
        gemm,
        tls,
    }));
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A size in bytes: a number with an optional unit (B, KB, MB, GB, TB; KiB, MiB, GiB, TiB).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size such as 512MiB, 20GiB or 16GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "`{s}`: unknown unit `{u}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let b = n * mult;
    if !(b >= 1.0 && b < u64::MAX as f64) {
        return Err(format!("`{s}`: the size must be at least one byte"));
    }
    Ok(b as u64)
}

enum Device {
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<Device, String> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = s.strip_prefix("cuda:") {
        return n
            .parse::<usize>()
            .map(Device::Cuda)
            .map_err(|_| format!("device `{s}`: expected cuda:N with N a device number"));
    }
    if s == "cuda" {
        return Ok(Device::Cuda(0));
    }
    Err(format!("unknown device `{s}` (supported: cpu, cuda:N)"))
}

/// `--device cuda:N`: checks the CUDA libraries and the device before registering; the model
/// is uploaded when the coordinator asks the worker to load.
#[cfg(feature = "cuda")]
fn check_cuda(ordinal: usize) {
    if let Err(e) = grok_shared::backend::cuda::cuda_status() {
        eprintln!("error: cuda:{ordinal}: {e}");
        std::process::exit(1);
    }
    match grok_shared::backend::cuda::device_count() {
        Ok(n) if ordinal < n => {}
        Ok(n) => {
            eprintln!("error: no CUDA device {ordinal}: this machine has {n}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: cuda:{ordinal}: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn check_cuda(ordinal: usize) {
    eprintln!("error: cuda:{ordinal}: this build has no CUDA support (build with --features cuda)");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("16GB"), Ok(16_000_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        for bad in ["", "GiB", "-1GB", "0", "12 parsecs", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
