//! Logs and traces for every binary: `tracing` to stderr as text or JSON, and optionally
//! OpenTelemetry spans exported over OTLP/gRPC (`--otlp-endpoint`).
//!
//! Trace context crosses process boundaries as a W3C `traceparent` string: clients send it in
//! gRPC metadata or an HTTP header, the coordinator puts its step span's context in every
//! `StepPlan`, and each worker parents its step span on it. So one request's trace holds the
//! coordinator's request span, the steps that computed it, and every worker's part of each step.
//!
//! The OTLP exporter runs on a runtime of its own (one thread): the SDK's batch processor
//! exports from a plain thread, and tonic needs a Tokio reactor to send.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "--otlp-endpoint `{0}`: expected an http:// or https:// URL, e.g. http://127.0.0.1:4317"
    )]
    BadEndpoint(String),
    #[error("cannot start the OTLP exporter: {0}")]
    Exporter(String),
}

/// Where logs and traces go.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// `service.name` of the exported spans (grok-coordinator, grok-worker).
    pub service: String,
    /// JSON log lines instead of text.
    pub json: bool,
    /// The log filter when `RUST_LOG` is not set (e.g. "info", "warn").
    pub default_level: String,
    /// OTLP/gRPC collector URL; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
}

/// Keeps the exporter alive; dropping it flushes the spans not yet sent.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// Set once an exporter is installed: without one there is no trace context to pass on, and
/// callers skip that work on their hot paths.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported (an `--otlp-endpoint` was given).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Checks an OTLP endpoint URL.
pub fn check_endpoint(url: &str) -> Result<(), TelemetryError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| TelemetryError::BadEndpoint(url.into()))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(TelemetryError::BadEndpoint(url.into()));
    }
    Ok(())
}

/// Installs the global subscriber: the log layer (filtered by `RUST_LOG`, default
/// `default_level`) and, with an endpoint, the OpenTelemetry layer (this project's spans at
/// info and above, whatever the log filter).
pub fn init(cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.default_level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if cfg.json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let Some(url) = &cfg.otlp_endpoint else {
        let _ = tracing_subscriber::registry().with(fmt).try_init();
        return Ok(Telemetry {
            provider: None,
            runtime: None,
        });
    };
    check_endpoint(url)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = {
        let _g = runtime.enter();
        use opentelemetry_otlp::WithExportConfig;
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(url.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: Arc::new(exporter),
            rt: runtime.handle().clone(),
        })
        .with_resource(
            Resource::builder_empty()
                .with_service_name(cfg.service.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("grok-cluster");
    let ours = Targets::new()
        .with_target("grok_coordinator", LevelFilter::INFO)
        .with_target("grok_worker", LevelFilter::INFO)
        .with_target("grok_shared", LevelFilter::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(ours);
    if tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok()
    {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(Telemetry {
        provider: Some(provider),
        runtime: Some(runtime),
    })
}

/// Runs the OTLP exporter's futures on the exporter's own runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    rt: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let h = self.rt.spawn(async move { inner.export(batch).await });
        async move {
            h.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, r: &Resource) {
        if let Some(i) = Arc::get_mut(&mut self.inner) {
            i.set_resource(r);
        }
    }
}

/// The W3C `traceparent` of a span, or "" when it is not traced (no exporter, or filtered out).
pub fn traceparent(span: &tracing::Span) -> String {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return String::new();
    }
    let mut m: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut m);
    m.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the remote span named by a W3C `traceparent`; a missing or malformed
/// value leaves the span a root (never an error: tracing must not fail a request).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.filter(|t| !t.is_empty()) else {
        return;
    };
    let mut m = HashMap::new();
    m.insert("traceparent".to_string(), tp.to_string());
    let cx = TraceContextPropagator::new().extract(&m);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of `parent` (a span of this process created earlier, e.g. in another
/// task).
pub fn set_parent_span(span: &tracing::Span, parent: &tracing::Span) {
    let cx = parent.context();
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to another span (a step computes many requests: it is the child of one and
/// linked to the others).
pub fn add_link(span: &tracing::Span, other: &tracing::Span) {
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(check_endpoint("https://otel.example:4317/").is_ok());
        for bad in ["127.0.0.1:4317", "http://", "ftp://x:1", ""] {
            let e = check_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains("--otlp-endpoint"), "{e}");
        }
    }

    #[test]
    fn untraced_spans_have_no_traceparent_and_bad_parents_are_ignored() {
        // No OpenTelemetry layer in this test process: nothing to propagate, nothing panics.
        let s = tracing::info_span!("x");
        assert_eq!(traceparent(&s), "");
        set_parent(&s, Some("garbage"));
        set_parent(&s, Some(""));
        set_parent(&s, None);
        add_link(&s, &tracing::info_span!("y"));
    }
}
