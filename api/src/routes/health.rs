//! Liveness and readiness, without authentication (for load balancers and orchestrators).

use std::sync::Arc;

use common::{
    catalog::circuit_key,
    health::{self, Readiness},
};
use poem_openapi::{payload::Json, ApiResponse, Object, OpenApi};

use crate::{routes::ApiTags, state::AppState};

#[derive(Debug, Object)]
pub struct Liveness {
    /// Always `ok` while the process serves requests.
    pub status: String,
}

#[derive(ApiResponse)]
pub enum ReadinessResponse {
    /// Ready (`ok`) or ready with reduced service (`degraded`: RabbitMQ or Redis down).
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Cannot accept work (`down`: PostgreSQL unavailable).
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

impl From<Readiness> for ReadinessResponse {
    fn from(report: Readiness) -> Self {
        if report.can_accept_work() {
            ReadinessResponse::Ready(Json(report))
        } else {
            ReadinessResponse::NotReady(Json(report))
        }
    }
}

pub struct HealthApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/health", tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness
    ///
    /// The process is up; checks nothing else.
    #[oai(path = "/live", method = "get", operation_id = "live")]
    async fn live(&self) -> Json<Liveness> {
        Json(Liveness { status: "ok".to_owned() })
    }

    /// Readiness
    ///
    /// Probes PostgreSQL, RabbitMQ and Redis, each with a short timeout.
    #[oai(path = "/ready", method = "get", operation_id = "ready")]
    async fn ready(&self) -> ReadinessResponse {
        let state = &self.state;
        let (postgres, rabbitmq, redis) = tokio::join!(
            health::probe_postgres(&state.pool),
            health::probe(state.publisher.check()),
            health::probe(state.redis.ping()),
        );
        let providers: Vec<&str> = state.catalog.providers().map(|(name, _)| name).collect();
        let keys: Vec<String> = providers.iter().map(|p| circuit_key(&state.config.redis_prefix, p)).collect();
        let open = state.redis.flags(&keys).await;
        let open_circuits =
            providers.into_iter().zip(open).filter(|(_, open)| *open).map(|(p, _)| p.to_owned()).collect();
        health::readiness(postgres, rabbitmq, redis).with_open_circuits(open_circuits).into()
    }
}
