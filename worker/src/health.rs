//! The worker's own health endpoints, for orchestrators probing worker replicas.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use common::{health, redis::RedisHandle};
use poem::{get, handler, http::StatusCode, web::Json, EndpointExt, IntoResponse, Response, Route};
use sqlx::PgPool;

#[derive(Clone)]
pub struct HealthState {
    pub pool: PgPool,
    pub redis: RedisHandle,
    pub consuming: Arc<AtomicBool>,
}

pub fn routes(state: HealthState) -> impl poem::Endpoint {
    Route::new().at("/health/live", get(live)).at("/health/ready", get(ready)).data(state)
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
