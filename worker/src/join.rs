//! Joining a cluster and serving: bind the listeners, register with the coordinator (or
//! announce in etcd), serve the `Worker` service until shutdown.

use crate::service::Svc;
use crate::{Membership, WorkerArgs};
use anyhow::{bail, Context, Result};
use grok_proto::v1 as pb;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// How long a registration refused because the rank or id is held is retried.
const REGISTER_HELD_RETRY: Duration = Duration::from_secs(6);

/// Runs a worker until the coordinator goes away for good or the process is signalled.
pub async fn run(args: WorkerArgs) -> Result<()> {
    let grpc = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = grpc.local_addr()?;
    let ip = local.ip();
    let world = TcpListener::bind((ip, 0)).context("binding the collective listener")?;
    let tp = TcpListener::bind((ip, 0)).context("binding the collective listener")?;
    let world_addr = world.local_addr()?;
    let tp_addr = tp.local_addr()?;
    let svc = Svc::new((world, tp), args.cuda_device, args.kv_memory, args.gemm);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &args.tls {
        // Only a client with a CA-signed certificate (the coordinator) gets to Load and Step.
        builder = builder
            .tls_config(t.server_config(true)?)
            .context("setting up TLS")?;
    }
    let server = tokio::spawn(
        builder
            .add_service(grok_proto::limited!(pb::worker_server::WorkerServer::new(
                svc.clone()
            )))
            .serve_with_incoming(incoming),
    );
    let advertise = args.advertise.clone().unwrap_or_else(|| local.to_string());
    // Peers reach the collective listeners at the advertised host.
    let host: SocketAddr = advertise
        .parse()
        .with_context(|| format!("--advertise `{advertise}` must be IP:PORT"))?;
    let world_addr = SocketAddr::new(host.ip(), world_addr.port());
    let tp_addr = SocketAddr::new(host.ip(), tp_addr.port());
    let req = pb::RegisterRequest {
        worker_id: args.worker_id.clone(),
        address: advertise.clone(),
        world_comm_address: world_addr.to_string(),
        tp_comm_address: tp_addr.to_string(),
        rank: args.rank.map_or(-1, |r| r as i32),
        device: args
            .cuda_device
            .map_or("cpu".into(), |n| format!("cuda:{n}")),
    };
    match &args.membership {
        Membership::Coordinator(addr) => register(&args, addr, req).await?,
        Membership::Etcd(cfg) => {
            let Some(rank) = args.rank else {
                bail!("--etcd needs --rank: with etcd, every worker names the rank it serves");
            };
            let rec = grok_proto::membership::WorkerRecord {
                id: req.worker_id.clone(),
                address: req.address.clone(),
                world_comm: req.world_comm_address.clone(),
                tp_comm: req.tp_comm_address.clone(),
                rank,
                device: req.device.clone(),
            };
            let (id, cluster) = (args.worker_id.clone(), cfg.cluster.clone());
            tokio::spawn(grok_proto::membership::announce(
                cfg.clone(),
                rec,
                move |st| {
                    if st == "announced" {
                        eprintln!(
                        "worker {id} announced as rank {rank} of cluster `{cluster}` in etcd (grpc {})",
                        req.address
                    );
                    } else {
                        tracing::warn!("etcd: {st}");
                    }
                },
            ));
        }
    }
    tokio::select! {
        r = server => { r??; }
        _ = grok_proto::process::shutdown_signal() => { eprintln!("worker {}: shutting down", args.worker_id); }
    }
    Ok(())
}

/// Registers with the coordinator at `coordinator` (static membership).
async fn register(args: &WorkerArgs, coordinator: &str, req: pb::RegisterRequest) -> Result<()> {
    let tls_on = args.tls.is_some();
    let endpoint = grok_proto::tls::endpoint(coordinator, args.tls.as_ref())?;
    let deadline = tokio::time::Instant::now() + args.register_timeout;
    let mut client = loop {
        match endpoint.connect().await {
            Ok(c) => break grok_proto::limited!(pb::cluster_client::ClusterClient::new(c)),
            Err(e) => {
                let why = grok_proto::tls::error_chain(&e);
                // A certificate problem does not go away by waiting.
                let tls_failure = tls_on && grok_proto::tls::hint(&why, true).is_some();
                if tls_failure || tokio::time::Instant::now() > deadline {
                    bail!(
                        "cannot reach the coordinator at {}: {}",
                        coordinator,
                        grok_proto::tls::explain(why, tls_on)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // A restarted worker may find its rank still held by its former self until the
    // coordinator notices the loss (about a second): retry ALREADY_EXISTS for a while.
    let held_until = tokio::time::Instant::now() + REGISTER_HELD_RETRY;
    let reg = loop {
        match client.register(req.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::AlreadyExists
                    && tokio::time::Instant::now() < held_until =>
            {
                tracing::info!("registration refused ({}); retrying", s.message());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            // A standby coordinator (or one still starting) may lead soon.
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::info!("registration refused ({}); retrying", s.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => bail!(
                "the coordinator at {} refused registration: {}",
                coordinator,
                grok_proto::tls::explain(grok_proto::tls::status_chain(&s), tls_on)
            ),
        }
    };
    eprintln!(
        "worker {} registered as rank {} of {} (grpc {})",
        args.worker_id, reg.rank, reg.world_size, req.address
    );
    Ok(())
}
