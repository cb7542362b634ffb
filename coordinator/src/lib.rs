//! gantry's control plane: queues jobs durably, places them on agents through the pure scheduler
//! in `gantry-core`, records what agents report, and serves people (CLI) and agents over gRPC and
//! HTTP.
//!
//! The coordinator never runs jobs itself, and never trusts a client: specs are validated again
//! here, uploads are verified before they are recorded.

pub mod auth;
pub mod clock;
pub mod control;
mod error;
mod files;
mod fleet;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub(crate) mod http;
mod job_metrics;
pub mod lifecycle;
pub mod limits;
mod logs;
mod objects;
pub mod records;
mod service;
pub mod serving;
pub mod stale;
pub mod store;
pub mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use gantry_proto::v1;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use clock::Clock;
pub use control::{Coordinator, Settings};
pub use error::{Code, Error, Result};

pub struct Config {
    /// Logs and checkpoint files, and the embedded store's file when `store` is `None`.
    pub data_dir: PathBuf,
    pub settings: Settings,
    /// The state store; `None` for the embedded one under `data_dir`.
    pub store: Option<Arc<dyn store::StateStore>>,
    /// Object storage for checkpoint files and logs (`s3://BUCKET[/PREFIX]`); `None` keeps them
    /// in `data_dir` only. Coordinators sharing etcd share checkpoints and logs through it.
    pub object_store: Option<String>,
    /// Tokens the operator made (with auth on), installed at start.
    pub tokens: Vec<auth::tokens::SeedToken>,
    /// Where the certificates come from; `None` serves plaintext (`gantry dev`, `--insecure`).
    pub tls: Option<tls::TlsOptions>,
}

/// Serves until `shutdown` completes. Takes bound listeners so callers (and tests) can bind
/// port 0 and learn the address first.
pub async fn serve(
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut coordinator = match config.store {
        Some(store) => Coordinator::with_store(store, &config.data_dir, config.settings)?,
        None => Coordinator::open(&config.data_dir, config.settings)?,
    };
    if let Some(url) = &config.object_store {
        let objects = objects::Objects::open(url).await?;
        coordinator.files.keep_in(objects.clone());
        coordinator.logs.archive_to(objects);
    }
    if coordinator.settings.auth {
        let written =
            auth::tokens::first_start(&coordinator.tokens, &config.tokens, &config.data_dir, coordinator.now_ms())?;
        if let Some(path) = written {
            info!(path = %path.display(), "first start: the admin token is in this file (readable by its owner only)");
        }
    } else {
        tracing::warn!("auth is off: anyone who reaches these ports can run anything on the fleet");
    }
    if coordinator.settings.auth && config.tls.is_none() {
        // Tokens in plaintext are anyone's on the path, and agents prove who they are with TLS.
        return Err(Error::InvalidArgument("auth needs TLS: give the coordinator TLS settings".into()));
    }
    let tls = match &config.tls {
        Some(options) => Some(tls::ServerTls::load(options, coordinator.now_ms() / 1000)?),
        None => None,
    };
    let coordinator = Arc::new(coordinator);
    info!(
        tls = tls.is_some(),
        grpc = %grpc.local_addr().map_err(Error::io("reading the gRPC address"))?,
        http = %http.local_addr().map_err(Error::io("reading the HTTP address"))?,
        data_dir = %config.data_dir.display(),
        checkpoints = %coordinator.files.describe(),
        "coordinator listening"
    );
    let scheduler = {
        let c = coordinator.clone();
        tokio::spawn(async move { c.run_scheduler().await })
    };
    let log_shipper = coordinator.logs.archived().then(|| {
        let c = coordinator.clone();
        tokio::spawn(async move { ship_logs(&c).await })
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // A coordinator that lost leadership stops serving at once: its writes are refused anyway,
    // and clients and agents then find the new leader.
    let deposed = {
        let c = coordinator.clone();
        async move {
            while !c.store.deposed() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    let was_deposed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let was_deposed = was_deposed.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {}
                _ = deposed => {
                    tracing::error!("lost leadership: stopping");
                    was_deposed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _ = stop_tx.send(true);
        });
    }
    let mut http_stop = stop_rx.clone();
    let http_stopped = async move {
        let _ = http_stop.wait_for(|s| *s).await;
    };
    let router = http::router(coordinator.clone());
    let http_task = match &tls {
        Some(tls) => {
            let listener = tls::TlsListener::new(http, tls.http()?).map_err(Error::io("reading the HTTP address"))?;
            let server = axum::serve(listener, router).with_graceful_shutdown(http_stopped);
            tokio::spawn(async move { server.await })
        }
        None => {
            // Answers go out at once, not held back by Nagle's algorithm for an ACK: inference
            // requests are small and many.
            use axum::serve::ListenerExt;
            let http = http.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let server = axum::serve(http, router).with_graceful_shutdown(http_stopped);
            tokio::spawn(async move { server.await })
        }
    };

    let mut grpc_stop = stop_rx.clone();
    let mut drain_stop = stop_rx;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.grpc()).map_err(Error::tls("the gRPC server's TLS settings"))?;
    }
    let server = builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            v1::gantry_server::GantryServer::new(service::user::UserService { coordinator: coordinator.clone() })
                .max_decoding_message_size(limits::USER_MESSAGE),
            auth::grpc::Authenticate { coordinator: coordinator.clone(), door: auth::grpc::Door::People },
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            v1::agents_server::AgentsServer::new(service::agent::AgentService { coordinator: coordinator.clone() })
                .max_decoding_message_size(limits::AGENT_MESSAGE),
            auth::grpc::Authenticate { coordinator: coordinator.clone(), door: auth::grpc::Door::Agents },
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            v1::join_server::JoinServer::new(service::join::JoinService {
                coordinator: coordinator.clone(),
                authority: tls.as_ref().map(|t| t.authority.clone()),
            })
            .max_decoding_message_size(limits::USER_MESSAGE),
            auth::grpc::Authenticate { coordinator: coordinator.clone(), door: auth::grpc::Door::Join },
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        });
    // Agent sessions and log followers are endless streams: give them a moment, then stop.
    let result = tokio::select! {
        r = server => r,
        _ = async {
            let _ = drain_stop.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        } => Ok(()),
    };
    scheduler.abort();
    let _ = http_task.await;
    if let Some(shipper) = log_shipper {
        shipper.abort();
        // What arrived since the last shipment, unless another coordinator leads by now.
        if !was_deposed.load(std::sync::atomic::Ordering::Relaxed)
            && let Err(e) = coordinator.logs.ship().await
        {
            tracing::warn!(error = %e, "could not ship the last logs to object storage");
        }
    }
    if was_deposed.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::Fenced("another coordinator took over".into()));
    }
    result.map_err(|e| Error::Io { context: "serving gRPC".into(), source: std::io::Error::other(e) })
}

/// Ships logs to object storage soon after they grow: at most every half second, so a busy job
/// makes a few segments a second, not one per batch.
async fn ship_logs(coordinator: &Coordinator) {
    let mut changes = coordinator.logs.subscribe();
    while changes.changed().await.is_ok() {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        changes.mark_unchanged();
        if let Err(e) = coordinator.logs.ship().await {
            tracing::warn!(error = %e, "could not ship logs to object storage; retrying");
        }
    }
}
