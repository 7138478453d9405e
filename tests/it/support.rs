//! `TestApp`: the real api and worker, in this process, on a free port, with their
//! own database, queue names and Redis prefix — and a client whose helpers speak
//! the api as a user would.

use std::{sync::Arc, time::Duration};

use common::{apikey, db, Config, Settings};
use reqwest::{header::CONTENT_TYPE, Response, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::providers::{MockProvider, Providers};

use crate::{proxy::Proxy, services};

/// How long a test waits for anything before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Options {
    /// Run a worker in-process.
    pub worker: bool,
    pub mock_latency_ms: u64,
    pub concurrency: u16,
    pub amqp_url: Option<String>,
    pub redis_url: Option<String>,
    pub sse_heartbeat_secs: u64,
    pub sse_idle_secs: u64,
    pub idempotency_retention_secs: u64,
    /// Runs of a job before transient failures are final (1: no retries, the default
    /// in tests so that failures are immediate).
    pub max_attempts: u32,
    /// Reach PostgreSQL, RabbitMQ and Redis through proxies the test can cut.
    pub proxied: bool,
    pub cors_origins: Vec<String>,
    /// Contents of a configuration file (TOML), e.g. extra tiers.
    pub config_toml: Option<String>,
    /// `ULTRA_METRICS_TOKEN`.
    pub metrics_token: Option<String>,
    /// `ULTRA_TRUSTED_PROXIES`.
    pub trusted_proxies: Vec<String>,
    /// `ULTRA_HEADER_TIMEOUT_SECS` (the default when `None`).
    pub header_timeout_secs: Option<u64>,
    /// `ULTRA_MAX_CONNECTIONS` (the default when `None`).
    pub max_connections: Option<usize>,
    /// `ULTRA_FILE_MAX_BYTES`.
    pub file_max_bytes: Option<usize>,
    /// `ULTRA_WEBHOOK_ALLOW_PRIVATE`: receivers on this machine.
    pub webhook_allow_private: bool,
    /// `ULTRA_WEBHOOK_RETRY_SCHEDULE` (the spec's, about a day, when `None`).
    pub webhook_retry_schedule: Option<String>,
    /// `ULTRA_WEBHOOK_ENDPOINT_CONCURRENCY`.
    pub webhook_endpoint_concurrency: Option<u32>,
    /// `ULTRA_WEBHOOK_DISABLE_AFTER_SECS`.
    pub webhook_disable_after_secs: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            worker: true,
            mock_latency_ms: 50,
            concurrency: 4,
            amqp_url: None,
            redis_url: None,
            sse_heartbeat_secs: 10,
            sse_idle_secs: 300,
            idempotency_retention_secs: 86_400,
            max_attempts: 1,
            proxied: false,
            cors_origins: Vec::new(),
            config_toml: None,
            metrics_token: None,
            trusted_proxies: Vec::new(),
            header_timeout_secs: None,
            max_connections: None,
            file_max_bytes: None,
            webhook_allow_private: false,
            webhook_retry_schedule: None,
            webhook_endpoint_concurrency: None,
            webhook_disable_after_secs: None,
        }
    }
}

pub struct Proxies {
    pub postgres: Proxy,
    pub rabbitmq: Proxy,
    pub redis: Proxy,
}

pub struct TestApp {
    pub config: Arc<Config>,
    /// What the app was started with (`config` is its `settings.config`).
    pub settings: Arc<Settings>,
    pub base: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub mock: Arc<MockProvider>,
    /// With `Options::proxied`: the app's own routes to each service.
    pub proxies: Option<Proxies>,
    db_name: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        if std::env::var_os("ULTRA_TEST_LOG").is_some() {
            common::telemetry::init(Some(common::config::LogFormat::Pretty)).shutdown();
        }
        services::require_all().await;
        let (database_url, db_name) = services::create_database().await;
        let prefix = services::unique_prefix();
        let mut config = Config::from_env().expect("default configuration");
        config.database_url = database_url.clone();
        config.amqp_url = options.amqp_url.clone().unwrap_or_else(services::amqp_url);
        config.redis_url = options.redis_url.clone().unwrap_or_else(services::redis_url);
        let proxies = if options.proxied {
            let (postgres, database_url) = Proxy::start_for_url(&config.database_url).await;
            let (rabbitmq, amqp_url) = Proxy::start_for_url(&config.amqp_url).await;
            let (redis, redis_url) = Proxy::start_for_url(&config.redis_url).await;
            (config.database_url, config.amqp_url, config.redis_url) = (database_url, amqp_url, redis_url);
            Some(Proxies { postgres, rabbitmq, redis })
        } else {
            None
        };
        config.queue_prefix = format!("{prefix}.");
        config.redis_prefix = prefix;
        config.mock_latency_ms = options.mock_latency_ms;
        config.concurrency = options.concurrency;
        config.sse_heartbeat_secs = options.sse_heartbeat_secs;
        config.sse_idle_secs = options.sse_idle_secs;
        config.idempotency_retention_secs = options.idempotency_retention_secs;
        config.max_attempts = options.max_attempts;
        config.relay_interval_ms = 200;
        config.cors_origins = options.cors_origins.clone();
        config.metrics_token = options.metrics_token.clone();
        config.trusted_proxies = options.trusted_proxies.clone();
        config.header_timeout_secs = options.header_timeout_secs.unwrap_or(config.header_timeout_secs);
        config.max_connections = options.max_connections.unwrap_or(config.max_connections);
        config.file_max_bytes = options.file_max_bytes.unwrap_or(config.file_max_bytes);
        config.webhook_allow_private = options.webhook_allow_private;
        if let Some(schedule) = &options.webhook_retry_schedule {
            config.webhook_retry_schedule = schedule.clone();
        }
        config.webhook_endpoint_concurrency =
            options.webhook_endpoint_concurrency.unwrap_or(config.webhook_endpoint_concurrency);
        config.webhook_disable_after_secs =
            options.webhook_disable_after_secs.unwrap_or(config.webhook_disable_after_secs);
        if let Some(toml) = &options.config_toml {
            let path = std::env::temp_dir().join(format!("ultra-test-{db_name}.toml"));
            std::fs::write(&path, toml).expect("write config file");
            config.config_file = Some(path);
        }
        config.shutdown_grace_secs = 5;
        let settings = match Settings::load(config) {
            Ok(settings) => Arc::new(settings),
            Err(err) => panic!("{err}"),
        };
        let config = Arc::new(settings.config.clone());

        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
        let base = format!("http://{}", listener.local_addr().expect("local address"));
        let mock = Arc::new(MockProvider::new(config.mock_latency()));
        let mut tasks = vec![tokio::spawn(api::run(settings.clone(), listener, shutdown.clone()))];
        if options.worker {
            // A configuration file may define real (wiremock) providers: then the worker
            // uses what it configures; otherwise the counted mock.
            let worker = match options.config_toml {
                Some(_) => worker::Worker::new(settings.clone()),
                None => worker::Worker::new(settings.clone()).with_providers(Providers::new(mock.clone())),
            };
            tasks.push(tokio::spawn(worker.run(None, shutdown.clone())));
        }
        // The test's own pool goes straight to the database, whatever the proxies do.
        let pool = db::connect_lazy(&database_url, 20).expect("test pool");
        let http = reqwest::Client::new();
        let app = Self { config, settings, base, http, pool, mock, proxies, db_name, shutdown, tasks };
        app.wait_until_serving().await;
        app
    }

    async fn wait_until_serving(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Ok(response) = self.http.get(self.url("/health/live")).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the api did not start");
    }

    /// Another api process's worth of the same app: same database, broker names and
    /// Redis prefix, its own port. Stops with the app.
    pub async fn spawn_second_api(&mut self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
        let base = format!("http://{}", listener.local_addr().expect("local address"));
        self.tasks.push(tokio::spawn(api::run(self.settings.clone(), listener, self.shutdown.clone())));
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.http.get(format!("{base}/health/live")).send().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "second api did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        base
    }

    /// Registers a user with a password; returns the response.
    pub async fn register(&self, email: &str, password: &str) -> Response {
        let body = json!({ "email": email, "password": password });
        self.http.post(self.url("/v1/auth/register")).json(&body).send().await.expect("register")
    }

    /// Logs in; returns the response.
    pub async fn login(&self, email: &str, password: &str) -> Response {
        let body = json!({ "email": email, "password": password });
        self.http.post(self.url("/v1/auth/login")).json(&body).send().await.expect("login")
    }

    /// A registered, logged-in user: (email, password, tokens).
    pub async fn account(&self) -> (String, String, Value) {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let password = "correct horse battery staple".to_owned();
        assert_eq!(self.register(&email, &password).await.status(), StatusCode::CREATED);
        let tokens = self.login(&email, &password).await;
        assert_eq!(tokens.status(), StatusCode::OK);
        (email, password, tokens.json().await.expect("tokens"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A new user and an API key for them, in the `enterprise` tier so that tier
    /// limits stay out of the way of tests about something else.
    pub async fn user_with_key(&self) -> (Uuid, String) {
        self.user_in_tier("enterprise").await
    }

    pub async fn user_in_tier(&self, tier: &str) -> (Uuid, String) {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let user = db::users::create(&self.pool, &email, "user").await.expect("create user");
        db::users::update_admin(&self.pool, user.id, Some(tier), None).await.expect("set tier");
        let key = apikey::generate();
        db::api_keys::insert(&self.pool, user.id, "test", &key.prefix, &key.hash).await.expect("create key");
        (user.id, key.secret)
    }

    pub async fn get(&self, key: &str, path: &str) -> Response {
        self.http.get(self.url(path)).bearer_auth(key).send().await.expect("GET")
    }

    pub async fn submit(&self, key: &str, body: &Value) -> Response {
        self.http.post(self.url("/v1/analyze")).bearer_auth(key).json(body).send().await.expect("POST /v1/analyze")
    }

    /// Submits continuing the caller's trace (`traceparent`).
    pub async fn submit_traced(&self, key: &str, body: &Value, traceparent: &str) -> Response {
        let request = self.http.post(self.url("/v1/analyze")).bearer_auth(key).header("traceparent", traceparent);
        request.json(body).send().await.expect("POST /v1/analyze")
    }

    /// Submits a valid job and returns its id.
    pub async fn submit_ok(&self, key: &str, models: &[&str]) -> Uuid {
        let response = self.submit(key, &json!({ "prompt": "Why is the sky blue?", "models": models })).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.expect("JSON body");
        body["id"].as_str().and_then(|id| id.parse().ok()).expect("job id")
    }

    pub async fn job(&self, key: &str, id: Uuid) -> Value {
        let response = self.get(key, &format!("/v1/jobs/{id}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("JSON body")
    }

    /// Polls the job until it is terminal.
    pub async fn wait_for_terminal(&self, key: &str, id: Uuid) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let job = self.job(key, id).await;
            if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or_default()) {
                return job;
            }
            assert!(tokio::time::Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens a job's event stream.
    pub async fn events(&self, key: &str, id: Uuid, last_event_id: Option<&str>) -> Response {
        let mut request = self.http.get(self.url(&format!("/v1/jobs/{id}/events"))).bearer_auth(key);
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last);
        }
        request.send().await.expect("GET events")
    }

    pub async fn count(&self, sql: &str, job_id: Uuid) -> i64 {
        sqlx::query_scalar(sql).bind(job_id).fetch_one(&self.pool).await.expect("count")
    }

    /// Stops the app and removes its database, queues and exchanges.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            match tokio::time::timeout(PATIENCE, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => panic!("a component failed: {err:#}"),
                Ok(Err(err)) => panic!("a component panicked: {err}"),
                Err(_) => panic!("a component did not shut down"),
            }
        }
        self.pool.close().await;
        services::drop_database(&self.db_name).await;
        services::delete_topology(&self.config.queue_prefix).await;
        drop(self.proxies);
    }
}

/// Asserts a problem+json response and returns its body.
pub async fn problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let content_type =
        response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().is_some_and(|t| t.starts_with("https://")), "{body}");
    body
}

/// The fields a validation problem names.
pub fn fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map_or_else(Vec::new, |errors| errors.iter().filter_map(|e| e["field"].as_str().map(str::to_owned)).collect())
}

/// Closes this test's own broker connections, as an operator's `rabbitmqctl
/// close_connection` would.
pub fn close_broker_connections(prefix: &str) -> usize {
    testkit::queue::close_connections(prefix).expect("rabbitmqctl (the broker's own tool) must be installed")
}

/// An OpenAI-compatible server's streamed answer: one chunk of `text`, then `[DONE]`.
pub fn openai_answer(text: &str) -> wiremock::ResponseTemplate {
    let chunk = json!({ "choices": [{ "index": 0, "delta": { "content": text }, "finish_reason": "stop" }] });
    wiremock::ResponseTemplate::new(200)
        .insert_header("content-type", "text/event-stream")
        .set_body_string(format!("data: {chunk}\n\ndata: [DONE]\n\n"))
}
