//! The Ultra REST api: authenticates, validates and accepts analyze jobs, serves
//! their status and event streams, the model catalog, health and the OpenAPI
//! document. It owns two background tasks: the outbox relay and the event hub.

pub mod auth;
pub mod body;
pub mod client_ip;
pub mod console;
pub mod error;
pub mod hub;
pub mod jobs;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod middleware;
pub mod openai;
pub mod openapi;
pub mod problems;
pub mod queues;
pub mod relay;
pub mod routes;
pub mod state;
pub mod stream;

use std::sync::Arc;

use anyhow::Context;
use common::{Config, Settings};
use poem::{endpoint::BoxEndpoint, EndpointExt, Route};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{auth::middleware::Gate, body::BodyLimit, client_ip::ClientIps, state::AppState};

/// Serves the api on `listener` until `shutdown` is cancelled, then stops accepting,
/// ends open streams, lets in-flight requests finish (up to the grace period) and
/// closes its connections.
pub async fn run(settings: Arc<Settings>, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = Arc::new(AppState::build(&settings, shutdown.clone()).await?);
    common::metrics::install();
    let app = endpoint(&state)?;

    // Background tasks stop with their own token, after the server has drained.
    let background = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let redis_client = state.redis.client().clone();
    tasks.spawn(state.hub.clone().run(redis_client, settings.config.redis_prefix.clone(), background.clone()));
    tasks.spawn(state.hub.clone().run_rechecks(state.pool.clone(), background.clone()));
    tasks.spawn(relay::run(state.clone(), background.clone()));
    tasks.spawn(openai::feeder::run(state.clone(), background.clone()));

    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%address, "api listening");
    let limits = crate::listener::Limits::from_config(&settings.config);
    let served = crate::listener::serve(listener, app, limits, shutdown.clone()).await;

    background.cancel();
    while tasks.join_next().await.is_some() {}
    state.publisher.close().await;
    state.pool.close().await;
    tracing::info!("api stopped");
    served.context("api server failed")
}

/// The whole HTTP application: the OpenAPI service, the documents, `/metrics`, and the
/// middleware around them.
fn endpoint(state: &Arc<AppState>) -> anyhow::Result<Arc<BoxEndpoint<'static>>> {
    let config = &state.config;
    let client_ips = ClientIps::new(
        config.trusted_proxies().map_err(anyhow::Error::msg)?,
        config.forwarded_header.parse().map_err(anyhow::Error::msg)?,
    );
    let service = routes::service(state.clone());
    let choices = openapi::Choices {
        models: state.catalog.models().map(|m| m.id.as_str()).collect(),
        patterns: state.patterns.iter().map(|(name, _)| name).collect(),
        tiers: state.tiers.names().collect(),
        max_prompt_chars: config.max_prompt_chars,
        max_models: config.max_models_per_job,
    };
    let document = openapi::finish(&service.spec(), &choices).context("the OpenAPI document")?;
    // Swagger UI shows the served document, not poem-openapi's unfinished one.
    let swagger_html = service.swagger_ui_html().replace(&service.spec(), &document);
    let swagger = || {
        let html = swagger_html.clone();
        poem::endpoint::make_sync(move |_| poem::web::Html(html.clone()))
    };
    // Blank entries must not turn into "no list", which CORS would read as "any origin".
    let cors_origins: Vec<String> =
        config.cors_origins.iter().map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect();
    let undocumented = [
        ("/docs", "GET"),
        ("/docs/", "GET"),
        ("/openapi.json", "GET"),
        ("/metrics", "GET"),
        ("/openai/v1/models/{owner}/{rest}", "GET"),
        ("/", "GET"),
        ("/assets/{hash}/{name}", "GET"),
    ];
    let routes = Arc::new(metrics::RouteTemplates::from_spec(&document, &undocumented));
    let api_routes = Route::new()
        .at("/docs", poem::get(swagger()))
        .at("/docs/", poem::get(swagger()))
        .at(
            "/openapi.json",
            poem::get(poem::endpoint::make_sync({
                let document = document.clone();
                move |_| poem::Response::builder().content_type("application/json").body(document.clone())
            })),
        )
        .at("/metrics", poem::get(metrics::endpoint))
        .at(openai::MODEL_BY_UNENCODED_ID, poem::get(openai::models::retrieve_unencoded))
        .nest("/", service);
    let console = Arc::new(console::Console::new());
    let app = console
        .clone()
        .serve(api_routes)
        .with(console::Root(console))
        .with(middleware::RequestTimeout(config.request_timeout()))
        .with(Gate::new(client_ips))
        .with(openai::error::OpenAiErrors)
        .with_if(!cors_origins.is_empty(), middleware::cors(&cors_origins))
        .with(middleware::SecurityHeaders(config.environment))
        .with(middleware::AllowHeader(routes.clone()))
        .with(metrics::HttpMetrics(routes))
        .with(middleware::RequestContext)
        .data(state.clone())
        .data(BodyLimit(body_limit(config)))
        .catch_all_error(error::into_problem);
    Ok(Arc::new(app.boxed()))
}

/// A prompt at the character limit, JSON-escaped at worst, plus room for the rest.
fn body_limit(config: &Config) -> usize {
    config.max_prompt_chars.saturating_mul(6).saturating_add(64 * 1024)
}
