//! OpenTelemetry export end to end: a tp=2 cluster started with `--otlp-endpoint` sends its
//! spans to an OTLP/gRPC collector run by this test; a request carrying a W3C `traceparent`
//! (gRPC metadata or HTTP header) yields one trace: the coordinator's request span under the
//! caller's span, the step spans under it, and both workers' step spans under those.

use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::formats::genmodel::{self, GenDType};
use grok_tests::cluster::up;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: Vec<(String, String)>,
}

impl Got {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| value(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), value(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Checks the tree of one trace; `None` while spans are still missing.
fn check_trace(spans: &[Got], trace: &str, caller_span: &str) -> Option<String> {
    let t: Vec<&Got> = spans.iter().filter(|s| s.trace == trace).collect();
    let req = t
        .iter()
        .find(|s| s.name == "request" && s.service == "grok-coordinator")?;
    assert_eq!(
        req.parent, caller_span,
        "the request span is the caller's child"
    );
    assert_eq!(req.attr("outcome"), Some("length"), "{req:?}");
    assert_eq!(req.attr("completion_tokens"), Some("4"), "{req:?}");
    let steps: Vec<&&Got> = t
        .iter()
        .filter(|s| s.name == "step" && s.service == "grok-coordinator")
        .collect();
    // A prefill step and three decode steps computed this request.
    if steps.len() < 4 {
        return None;
    }
    assert!(steps.iter().all(|s| s.parent == req.id), "{steps:?}");
    let ranks: Vec<String> = t
        .iter()
        .filter(|s| s.name == "worker.step" && s.service == "grok-worker")
        .inspect(|w| {
            assert!(
                steps.iter().any(|s| s.id == w.parent),
                "a worker's step span hangs under a coordinator step: {w:?}"
            )
        })
        .filter_map(|w| w.attr("rank").map(str::to_string))
        .collect();
    // Every step on both workers.
    for r in ["0", "1"] {
        if ranks.iter().filter(|x| *x == r).count() < steps.len() {
            return None;
        }
    }
    Some(req.id.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_from_the_client_through_the_coordinator_to_each_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let c = ModelConfig::preset("tiny", None).unwrap();
    genmodel::generate(&c, GenDType::F32, 5, &model, 1 << 30, |_, _| {}).unwrap();

    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let svc = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    // Export every 100 ms instead of the default 5 s (read by the child processes).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let cl = tokio::task::spawn_blocking({
        let model = model.clone();
        let otlp = otlp.clone();
        move || {
            up(
                &model,
                &[
                    "--tp",
                    "2",
                    "--http-listen",
                    "127.0.0.1:0",
                    "--otlp-endpoint",
                    &otlp,
                ],
            )
        }
    })
    .await
    .unwrap();

    // gRPC, with the caller's trace context in the metadata.
    let (trace_a, span_a) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut client = pb::inference_client::InferenceClient::connect(cl.endpoint.clone())
        .await
        .unwrap();
    let mut r = tonic::Request::new(pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Ids(pb::TokenIds {
            ids: vec![3, 7, 11],
        })),
        max_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    });
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_a}-{span_a}-01").parse().unwrap(),
    );
    let mut s = client.generate(r).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        n += m.unwrap().ids.len();
    }
    assert_eq!(n, 4);

    // HTTP, with the header.
    let (trace_b, span_b) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let http = cl.http.clone().expect("http address");
    let body = r#"{"model":"m","prompt":[3,7,11],"max_tokens":4,"ignore_eos":true}"#;
    let reply = tokio::task::spawn_blocking(move || {
        let mut t = std::net::TcpStream::connect(&http).unwrap();
        write!(
            t,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\ntraceparent: 00-{trace_b}-{span_b}-01\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        t.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // Both traces arrive whole within a bounded time.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = collector.0.lock().unwrap().clone();
        let a = check_trace(&spans, trace_a, span_a);
        let b = check_trace(&spans, trace_b, span_b);
        if let (Some(a), Some(b)) = (a, b) {
            assert_ne!(a, b);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the traces did not arrive whole within 30 s; got {} spans: {:#?}",
            spans.len(),
            spans
                .iter()
                .map(|s| (&s.service, &s.name, &s.trace, &s.parent))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(cl);
}

#[test]
fn a_bad_otlp_endpoint_is_refused_at_start() {
    for b in ["grok-coordinator", "grok-worker"] {
        let o = grok_tests::cluster::bin(b)
            .args(["--otlp-endpoint", "localhost:4317"])
            .args(if b == "grok-coordinator" {
                vec!["--model", "/nonexistent"]
            } else {
                vec!["--coordinator", "127.0.0.1:1"]
            })
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{b}: {e}");
        assert!(
            e.contains("--otlp-endpoint") && e.contains("http://"),
            "{b}: {e}"
        );
    }
}
