//! What every long-running binary does at start-up and shutdown: logs and traces, the TLS
//! files of a cluster member, the host name, and the shutdown signal.

use crate::telemetry::{Telemetry, TelemetryConfig};
use crate::tls::{Tls, TlsPaths};
use std::path::PathBuf;

/// The flags every cluster member (coordinator, worker) takes for its logs, traces and TLS.
#[derive(clap::Args, Debug, Clone)]
pub struct MemberArgs {
    /// Log format on stderr.
    #[arg(long, value_parser = ["text", "json"], default_value = "text", env = "GROK_LOG_FORMAT")]
    pub log_format: String,
    /// Export OpenTelemetry spans (a request, its steps, each worker's part of a step) to this
    /// OTLP/gRPC collector, e.g. http://127.0.0.1:4317. The batch delay follows
    /// OTEL_BSP_SCHEDULE_DELAY (ms).
    #[arg(long, env = "GROK_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// CA certificate (PEM) that signs the cluster's certificates. With --tls-cert and
    /// --tls-key (all three or none) every gRPC connection of the cluster is mutual TLS: the
    /// coordinator admits only workers with a certificate signed by this CA, workers accept
    /// only such clients, and clients connect with https (`grokctl ... --tls-ca`).
    #[arg(long, env = "GROK_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM, signed by the CA, naming the host others reach it at;
    /// `grokctl certs` makes them). It is also its client certificate.
    #[arg(long, env = "GROK_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM; read from the file, never logged).
    #[arg(long, env = "GROK_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

/// Starts logging (and span export) as `service` and loads the member's TLS files. Exits the
/// process with a message on bad flags (status 2) or unreadable files (status 1): only `main`
/// calls this.
pub fn start_member(
    service: &str,
    default_level: &str,
    a: &MemberArgs,
) -> (Telemetry, Option<Tls>) {
    let telemetry = crate::telemetry::init(&TelemetryConfig {
        service: service.into(),
        json: a.log_format == "json",
        default_level: default_level.into(),
        otlp_endpoint: a.otlp_endpoint.clone(),
    })
    .unwrap_or_else(|e| exit(2, e));
    let paths = TlsPaths::new(a.tls_ca.clone(), a.tls_cert.clone(), a.tls_key.clone());
    if let Err(e) = paths.check_member() {
        exit(2, e);
    }
    let tls = Tls::load(&paths).unwrap_or_else(|e| exit(1, e));
    (telemetry, tls)
}

/// Prints `error: …` and exits with `code`.
pub fn exit(code: i32, e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(code)
}

/// This machine's host name (empty when unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The forward pass allocates and frees buffers of megabytes every layer; glibc would hand
/// them back to the kernel each time (fresh, zeroed pages at the next allocation: page faults
/// and page clearing were an eighth of a prefill). Keeps them in the heap instead. Call at the
/// start of `main`, before other threads.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
