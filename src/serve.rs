//! The long-running modes. Each binds its listener, then runs until SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;
use common::{shutdown, Settings};
use tokio::net::TcpListener;

pub async fn api(settings: Arc<Settings>) -> anyhow::Result<()> {
    let listener = bind(settings.config.listen).await?;
    api::run(settings, listener, shutdown::on_signal()).await
}

pub async fn worker(settings: Arc<Settings>) -> anyhow::Result<()> {
    let listener = bind_health(settings.config.worker_listen).await?;
    worker::run(settings, Some(listener), shutdown::on_signal()).await
}

/// Api and worker pool in one process, sharing one shutdown signal. If either fails,
/// the other is stopped too.
pub async fn all(settings: Arc<Settings>) -> anyhow::Result<()> {
    let listener = bind(settings.config.listen).await?;
    let shutdown = shutdown::on_signal();
    let stop_on_error = |result: anyhow::Result<()>| {
        if result.is_err() {
            shutdown.cancel();
        }
        result
    };
    let (api, worker) =
        tokio::join!(async { stop_on_error(api::run(settings.clone(), listener, shutdown.clone()).await) }, async {
            stop_on_error(worker::run(settings.clone(), None, shutdown.clone()).await)
        },);
    api.and(worker)
}

/// Several workers may share a host: if the health port is taken, take a free one on
/// the same interface (and say which) rather than refuse to start.
async fn bind_health(address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(address).await {
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = bind(std::net::SocketAddr::new(address.ip(), 0)).await?;
            tracing::warn!(wanted = %address, using = ?listener.local_addr().ok(), "health port in use; serving health on a free port");
            Ok(listener)
        }
        other => other.with_context(|| format!("cannot listen on {address}")),
    }
}

async fn bind(address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))
}
