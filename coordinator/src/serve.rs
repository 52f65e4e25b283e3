//! The coordinator's servers: gRPC (with standard health and reflection, behind the bearer
//! token for the client services), HTTP, and the membership source, until shutdown.

use crate::api::grpc::Svc;
use crate::cluster::Cluster;
use crate::state::ClusterState;
use anyhow::{Context, Result};
use grok_proto::v1 as pb;
use grok_shared::sync::lock;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Status};

/// Serves until `shutdown` resolves, or `discovery` fails. Prints `listening on ADDR` on
/// stdout once bound.
pub async fn serve(
    shared: Arc<Cluster>,
    discovery: Box<dyn crate::discovery::Discovery>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(shared.cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", shared.cfg.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(discovery = discovery.name(), "membership");
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<String>();
    let run = discovery.run(shared.clone(), addr);
    tokio::spawn(async move {
        if let Err(e) = run.await {
            let _ = fail_tx.send(e.to_string());
        }
    });
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let shutdown = {
        let failed = failed.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                r = fail_rx => if let Ok(why) = r {
                    tracing::error!("{why}");
                    *lock(&failed) = Some(why);
                },
            }
        }
    };
    if let Some(h) = shared.cfg.http_listen {
        let l = tokio::net::TcpListener::bind(h)
            .await
            .with_context(|| format!("cannot listen for HTTP on {h}"))?;
        println!("http listening on {}", l.local_addr()?);
        let _ = std::io::stdout().flush();
        let app = crate::api::http::router(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!("http server stopped: {e}");
            }
        });
    }
    let svc = Svc(shared.clone());
    // Standard gRPC health: "" is liveness (always SERVING while the process runs);
    // "grok.v1.Inference" is readiness (SERVING once every shard is loaded).
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let watched = shared.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ready = watched.state() == ClusterState::Ready;
            if last != Some(ready) {
                let st = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("grok.v1.Inference", st).await;
                last = Some(ready);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    // Reflection in both versions clients speak: v1, and v1alpha (grpcio's reflection client,
    // grpcurl before 1.9, many tools).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grok_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    let mut server = tonic::transport::Server::builder();
    if let Some(t) = &shared.cfg.tls {
        // Client certificates are optional at the handshake (clients share this port with the
        // workers); `register` requires one.
        server = server
            .tls_config(t.server_config(false)?)
            .context("setting up TLS")?;
        tracing::info!("gRPC over TLS; workers need a certificate signed by the cluster's CA");
    }
    server
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(grok_proto::limited!(
            pb::cluster_server::ClusterServer::new(svc.clone())
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            grok_proto::limited!(pb::admin_server::AdminServer::new(svc.clone())),
            auth_check(&shared),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            grok_proto::limited!(pb::inference_server::InferenceServer::new(svc)),
            auth_check(&shared),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    if let Some(why) = lock(&failed).take() {
        anyhow::bail!(why);
    }
    Ok(())
}

/// The client APIs' bearer-token check (a no-op when no token is configured).
#[allow(clippy::result_large_err)]
fn auth_check(shared: &Cluster) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    let token = shared.cfg.api_token.clone();
    move |req: Request<()>| match &token {
        None => Ok(req),
        Some(t) => {
            let h = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if grok_proto::auth::bearer_matches(t, h) {
                Ok(req)
            } else {
                Err(Status::unauthenticated(
                    "missing or wrong bearer token: send `authorization: Bearer <token>`",
                ))
            }
        }
    }
}
