//! The worker's own health endpoints, for orchestrators probing worker replicas.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use common::{health, redis::RedisHandle};
use poem::{
    get, handler, http::StatusCode, listener::TcpAcceptor, web::Json, EndpointExt, IntoResponse, Response, Route,
    Server,
};
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct HealthState {
    pub pool: PgPool,
    pub redis: RedisHandle,
    pub consuming: Arc<AtomicBool>,
    /// `ULTRA_METRICS_TOKEN`: required of scrapes when set.
    pub metrics_token: Option<String>,
}

pub fn routes(state: HealthState) -> impl poem::Endpoint {
    Route::new().at("/health/live", get(live)).at("/health/ready", get(ready)).at("/metrics", get(metrics)).data(state)
}

/// Serves the health endpoints on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    state: HealthState,
    shutdown: CancellationToken,
) -> std::io::Result<JoinHandle<std::io::Result<()>>> {
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let server = Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?);
    tracing::info!(%address, "worker health listening");
    Ok(tokio::spawn(
        async move { server.run_with_graceful_shutdown(routes(state), shutdown.cancelled_owned(), None).await },
    ))
}

/// Prometheus metrics of this worker process.
#[handler]
fn metrics(req: &poem::Request, state: poem::web::Data<&HealthState>) -> Response {
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    if !common::metrics::authorized(state.metrics_token.as_deref(), authorization) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    common::metrics::render().with_content_type(common::metrics::CONTENT_TYPE).into_response()
}

#[handler]
fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

#[handler]
async fn ready(state: poem::web::Data<&HealthState>) -> Response {
    let consuming = state.consuming.load(Ordering::Relaxed);
    let (postgres, rabbitmq, redis) = tokio::join!(
        health::probe_postgres(&state.pool),
        health::probe(async {
            if consuming {
                Ok(())
            } else {
                Err("not consuming")
            }
        }),
        health::probe(state.redis.ping()),
    );
    let report = health::readiness(postgres, rabbitmq, redis);
    let status = if report.can_accept_work() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Json(report).with_status(status).into_response()
}
