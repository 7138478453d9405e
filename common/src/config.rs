//! Ultra's flags and environment variables (`ULTRA_*` plus the conventional
//! `DATABASE_URL`, `AMQP_URL`, `REDIS_URL`), parsed by clap. Every default works
//! against the local services of a developer's machine. `problems` lists what is wrong
//! with them, including everything production refuses; `common::settings` loads them
//! with the configuration file and checks the whole once.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};

/// Where Ultra runs. Production refuses unsafe settings instead of warning about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    Development,
    Production,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line: for log shippers.
    Json,
    /// Human-readable lines: for a terminal.
    Pretty,
}

/// Defaults a benchmark or tool needs too (`ultra-bench` raises the file limits for
/// large runs and sizes its own pool like a process's).
pub const DEFAULT_FILE_MAX_BYTES: usize = 50 * 1024 * 1024;
pub const DEFAULT_BATCH_MAX_LINES: usize = 50_000;
pub const DEFAULT_DB_POOL_SIZE: u32 = 20;

/// Deliberately not `Debug`: the URLs carry passwords, and nothing should print them.
#[derive(Clone, Args)]
pub struct Config {
    /// `development` or `production` (production refuses unsafe settings).
    #[arg(long = "env", env = "ULTRA_ENV", value_enum, default_value = "development", global = true)]
    pub environment: Environment,

    /// PostgreSQL, the system of record. The database is created if it is missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/ultra",
        global = true
    )]
    pub database_url: String,

    /// RabbitMQ, which carries job pointers to the workers: one URL, or a cluster's nodes
    /// separated by commas (each connection takes the first that answers).
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    pub amqp_url: String,

    /// Redis, for live event fan-out (losing it loses no data).
    #[arg(long, env = "REDIS_URL", hide_env_values = true, default_value = "redis://127.0.0.1:6379", global = true)]
    pub redis_url: String,

    /// Address the api listens on.
    #[arg(long, env = "ULTRA_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: SocketAddr,

    /// Address a standalone worker serves its health checks on.
    #[arg(long, env = "ULTRA_WORKER_LISTEN", default_value = "127.0.0.1:8081", global = true)]
    pub worker_listen: SocketAddr,

    /// Jobs one worker process runs at once; also its RabbitMQ prefetch.
    #[arg(long, env = "ULTRA_WORKER_CONCURRENCY", default_value_t = 16, global = true)]
    pub concurrency: u16,

    /// Prefix for every exchange and queue name (lets tests and tenants share a broker).
    #[arg(long, env = "ULTRA_QUEUE_PREFIX", default_value = "", global = true)]
    pub queue_prefix: String,

    /// Prefix for every Redis key and channel.
    #[arg(long, env = "ULTRA_REDIS_PREFIX", default_value = "ultra", global = true)]
    pub redis_prefix: String,

    /// Simulated latency of the mock provider, per call.
    #[arg(long, env = "ULTRA_MOCK_LATENCY_MS", default_value_t = 250, global = true)]
    pub mock_latency_ms: u64,

    /// Longest prompt accepted, in characters.
    #[arg(long, env = "ULTRA_MAX_PROMPT_CHARS", default_value_t = 32_768, global = true)]
    pub max_prompt_chars: usize,

    /// Most models one job may name.
    #[arg(long, env = "ULTRA_MAX_MODELS_PER_JOB", default_value_t = 10, global = true)]
    pub max_models_per_job: usize,

    /// How long in-flight jobs may finish after SIGTERM before they are left for redelivery.
    #[arg(long, env = "ULTRA_SHUTDOWN_GRACE_SECS", default_value_t = 30, global = true)]
    pub shutdown_grace_secs: u64,

    /// How often the outbox relay looks for jobs the fast-path publish missed.
    #[arg(long, env = "ULTRA_RELAY_INTERVAL_MS", default_value_t = 1_000, global = true)]
    pub relay_interval_ms: u64,

    /// Longest silence on an event stream before a heartbeat comment is sent.
    #[arg(long, env = "ULTRA_SSE_HEARTBEAT_SECS", default_value_t = 10, global = true)]
    pub sse_heartbeat_secs: u64,

    /// An event stream with nothing to send for this long is closed (clients resume
    /// with `Last-Event-ID`).
    #[arg(long, env = "ULTRA_SSE_IDLE_SECS", default_value_t = 300, global = true)]
    pub sse_idle_secs: u64,

    /// When set, `/metrics` (api and worker) answers only requests bearing this token
    /// (`Authorization: Bearer …`). Production requires it: the api's port is public.
    #[arg(long, env = "ULTRA_METRICS_TOKEN", hide_env_values = true, global = true)]
    pub metrics_token: Option<String>,

    /// Log prompt text at debug level (worker). Off by default: prompts are user data.
    #[arg(long, env = "ULTRA_LOG_PROMPTS", default_value_t = false, global = true)]
    pub log_prompts: bool,

    /// Log format; defaults to `pretty` on a terminal and `json` elsewhere.
    #[arg(long, env = "ULTRA_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    /// JWT signing keys as `kid:secret` pairs separated by commas, newest first: the
    /// newest signs, all verify (rotation). Secrets of at least 32 bytes. Unset in
    /// development means a built-in key, which production refuses.
    #[arg(long, env = "ULTRA_JWT_KEYS", hide_env_values = true, global = true)]
    pub jwt_keys: Option<String>,

    /// `iss` of the access tokens this deployment issues and accepts.
    #[arg(long, env = "ULTRA_JWT_ISSUER", default_value = "ultra", global = true)]
    pub jwt_issuer: String,

    /// `aud` of the access tokens this deployment issues and accepts.
    #[arg(long, env = "ULTRA_JWT_AUDIENCE", default_value = "ultra-api", global = true)]
    pub jwt_audience: String,

    /// Lifetime of an access token.
    #[arg(long, env = "ULTRA_ACCESS_TOKEN_TTL_SECS", default_value_t = 900, global = true)]
    pub access_token_ttl_secs: u64,

    /// Lifetime of a refresh token (each refresh issues a new one).
    #[arg(long, env = "ULTRA_REFRESH_TOKEN_TTL_SECS", default_value_t = 30 * 24 * 3600, global = true)]
    pub refresh_token_ttl_secs: u64,

    /// The models a `ultra/<pattern>` chat completion runs when its request names none
    /// (comma-separated catalog ids). Empty: the catalog's models that have a key, in
    /// catalog order, as many as the caller's tier allows.
    #[arg(long, env = "ULTRA_DEFAULT_MODELS", value_delimiter = ',', global = true)]
    pub default_models: Vec<String>,

    /// Largest file `POST /openai/v1/files` accepts, in bytes.
    #[arg(long, env = "ULTRA_FILE_MAX_BYTES", default_value_t = DEFAULT_FILE_MAX_BYTES, global = true)]
    pub file_max_bytes: usize,

    /// Most lines (requests) one batch input file may hold.
    #[arg(long, env = "ULTRA_BATCH_MAX_LINES", default_value_t = DEFAULT_BATCH_MAX_LINES, global = true)]
    pub batch_max_lines: usize,

    /// The share of one worker's slots (`ULTRA_WORKER_CONCURRENCY`) that batch lines,
    /// every batch together, may hold at once, in percent (at least one slot).
    /// Lower keeps interactive latency nearer idle on a busy machine; higher runs
    /// batches faster (docs/BENCHMARKS.md, `ultra-bench batch`).
    #[arg(long, env = "ULTRA_BATCH_SLOTS_PERCENT", default_value_t = 20, global = true)]
    pub batch_slots_percent: u32,

    /// Browser origins allowed by CORS, comma-separated (none by default).
    #[arg(long, env = "ULTRA_CORS_ORIGINS", value_delimiter = ',', global = true)]
    pub cors_origins: Vec<String>,

    /// Longest a request handler may run before the client gets 503 (streams excepted).
    #[arg(long, env = "ULTRA_REQUEST_TIMEOUT_SECS", default_value_t = 30, global = true)]
    pub request_timeout_secs: u64,

    /// A connection must send a whole request head within this long of opening (on a
    /// kept-alive HTTP/1.1 connection: of its previous response), or it is closed.
    #[arg(long, env = "ULTRA_HEADER_TIMEOUT_SECS", default_value_t = 5, global = true)]
    pub header_timeout_secs: u64,

    /// A connection that reads and writes nothing for this long is closed, once its
    /// requests in flight have finished (keep it above the SSE heartbeat and the
    /// request timeout).
    #[arg(long, env = "ULTRA_IDLE_TIMEOUT_SECS", default_value_t = 60, global = true)]
    pub idle_timeout_secs: u64,

    /// Open connections one api process keeps at most; past it a new connection is
    /// answered 503 and closed at once. The file-descriptor limit must exceed it.
    #[arg(long, env = "ULTRA_MAX_CONNECTIONS", default_value_t = 20_000, global = true)]
    pub max_connections: usize,

    /// Reverse proxies in front of the api (addresses or CIDR blocks, comma-separated):
    /// only their `X-Forwarded-For` / `Forwarded` hops are believed.
    #[arg(long, env = "ULTRA_TRUSTED_PROXIES", value_delimiter = ',', global = true)]
    pub trusted_proxies: Vec<String>,

    /// The header the trusted proxies write the client's address in:
    /// `x-forwarded-for` or `forwarded` (RFC 7239). The other is ignored.
    #[arg(long, env = "ULTRA_FORWARDED_HEADER", default_value = "x-forwarded-for", global = true)]
    pub forwarded_header: String,

    /// Clients connect to the api directly, with no reverse proxy in front: lets
    /// production start without `ULTRA_TRUSTED_PROXIES`.
    #[arg(long, env = "ULTRA_DIRECT_CLIENTS", default_value_t = false, global = true)]
    pub direct_clients: bool,

    /// `max_tokens` assumed for a job that sets none (its budget reservation).
    #[arg(long, env = "ULTRA_DEFAULT_MAX_TOKENS", default_value_t = 1024, global = true)]
    pub default_max_tokens: u32,

    /// Answers a stage needs to go on, when a job does not say (`options.min_models`);
    /// never more than the job's models.
    #[arg(long, env = "ULTRA_MIN_MODELS", default_value_t = 1, global = true)]
    pub min_models: u32,

    /// Runs of a job before transient provider failures stop being retried.
    #[arg(long, env = "ULTRA_MAX_ATTEMPTS", default_value_t = 4, global = true)]
    pub max_attempts: u32,

    /// A job's deadline when it asks for none (`options.timeout_s`), in seconds.
    #[arg(long, env = "ULTRA_DEFAULT_JOB_TIMEOUT_SECS", default_value_t = 600, global = true)]
    pub default_job_timeout_secs: u32,

    /// How long an `Idempotency-Key` is remembered.
    #[arg(long, env = "ULTRA_IDEMPOTENCY_RETENTION_SECS", default_value_t = 86_400, global = true)]
    pub idempotency_retention_secs: u64,

    /// How long an ended job's events are kept (the job and its steps stay), and
    /// ended webhook deliveries.
    #[arg(long, env = "ULTRA_EVENT_RETENTION_DAYS", default_value_t = 30, global = true)]
    pub event_retention_days: u32,

    /// How long refresh tokens are kept after they expire (for reuse detection).
    #[arg(long, env = "ULTRA_REFRESH_TOKEN_RETENTION_DAYS", default_value_t = 7, global = true)]
    pub refresh_token_retention_days: u32,

    /// How long files (batch inputs and results) are kept.
    #[arg(long, env = "ULTRA_FILE_RETENTION_DAYS", default_value_t = 30, global = true)]
    pub file_retention_days: u32,

    /// How long daily usage rows are kept.
    #[arg(long, env = "ULTRA_USAGE_RETENTION_DAYS", default_value_t = 400, global = true)]
    pub usage_retention_days: u32,

    /// How long a cached answer (`options.cache: true`) is kept.
    #[arg(long, env = "ULTRA_CACHE_TTL_SECS", default_value_t = 86_400, global = true)]
    pub cache_ttl_secs: u64,

    /// PostgreSQL connections one pool holds at most (`ultra all` has two pools).
    #[arg(long, env = "ULTRA_DB_POOL_SIZE", default_value_t = DEFAULT_DB_POOL_SIZE, global = true)]
    pub db_pool_size: u32,

    /// Deliver webhooks to private, loopback and link-local addresses too (a receiver on
    /// this machine or its network). Production refuses it: see docs/OPERATIONS.md.
    #[arg(long, env = "ULTRA_WEBHOOK_ALLOW_PRIVATE", default_value_t = false, global = true)]
    pub webhook_allow_private: bool,

    /// The waits between a webhook delivery's attempts (`5s,5m,…`; units ms, s, m, h);
    /// after the last one it has failed. The default is the spec's, about a day.
    #[arg(long, env = "ULTRA_WEBHOOK_RETRY_SCHEDULE", default_value = crate::webhooks::schedule::DEFAULT, global = true)]
    pub webhook_retry_schedule: String,

    /// Longest a webhook attempt may take, connection included, before it counts as failed.
    #[arg(long, env = "ULTRA_WEBHOOK_TIMEOUT_SECS", default_value_t = 15, global = true)]
    pub webhook_timeout_secs: u64,

    /// Deliveries in flight to one endpoint at once, across every worker: a slow
    /// receiver holds this many, never the others'.
    #[arg(long, env = "ULTRA_WEBHOOK_ENDPOINT_CONCURRENCY", default_value_t = 8, global = true)]
    pub webhook_endpoint_concurrency: u32,

    /// Deliveries in flight in one worker process at once.
    #[arg(long, env = "ULTRA_WEBHOOK_CONCURRENCY", default_value_t = 64, global = true)]
    pub webhook_concurrency: u32,

    /// An endpoint whose every attempt has failed for this long is disabled (its
    /// owner re-enables it with PATCH). Five days by default.
    #[arg(long, env = "ULTRA_WEBHOOK_DISABLE_AFTER_SECS", default_value_t = 432_000, global = true)]
    pub webhook_disable_after_secs: u64,

    /// After `rotate-secret`, how long the previous secret still signs beside the new.
    #[arg(long, env = "ULTRA_WEBHOOK_ROTATION_GRACE_SECS", default_value_t = 86_400, global = true)]
    pub webhook_rotation_grace_secs: u64,

    /// Optional TOML file: `[tiers.<name>]`, `[providers.<name>]`, `[[models]]` and
    /// `[patterns.<name>]`.
    #[arg(long, env = "ULTRA_CONFIG_FILE", global = true)]
    pub config_file: Option<std::path::PathBuf>,
}

/// The development signing key used when `ULTRA_JWT_KEYS` is unset. Public by
/// definition, so production refuses it.
pub const DEVELOPMENT_JWT_KEY: (&str, &str) = ("dev", "ultra-development-signing-key-not-for-production");

/// Shortest JWT secret accepted (HS256 wants at least the hash's 32 bytes).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// One JWT signing key.
#[derive(Clone)]
pub struct JwtKey {
    pub kid: String,
    pub secret: Vec<u8>,
}

impl Config {
    /// Parses a configuration from environment variables alone (used by tests and tools
    /// that embed Ultra); flags work the same way through the binary's parser.
    pub fn from_env() -> Result<Self, clap::Error> {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        <Wrapper as clap::Parser>::try_parse_from(["ultra"]).map(|w| w.config)
    }

    /// The JWT keys, newest first. Errors name the problem, never a secret.
    pub fn jwt_keys(&self) -> Result<Vec<JwtKey>, String> {
        let Some(raw) = self.jwt_keys.as_deref().filter(|raw| !raw.trim().is_empty()) else {
            let (kid, secret) = DEVELOPMENT_JWT_KEY;
            return Ok(vec![JwtKey { kid: kid.to_owned(), secret: secret.as_bytes().to_vec() }]);
        };
        let mut keys = Vec::new();
        for (index, entry) in raw.split(',').enumerate() {
            let Some((kid, secret)) = entry.trim().split_once(':') else {
                return Err(format!("ULTRA_JWT_KEYS entry {} is not `kid:secret`", index + 1));
            };
            if kid.is_empty() || keys.iter().any(|k: &JwtKey| k.kid == kid) {
                return Err(format!("ULTRA_JWT_KEYS entry {} has an empty or repeated kid", index + 1));
            }
            if secret.len() < MIN_JWT_SECRET_BYTES {
                return Err(format!("ULTRA_JWT_KEYS key `{kid}` is shorter than {MIN_JWT_SECRET_BYTES} bytes"));
            }
            keys.push(JwtKey { kid: kid.to_owned(), secret: secret.as_bytes().to_vec() });
        }
        Ok(keys)
    }

    pub fn access_token_ttl(&self) -> Duration {
        Duration::from_secs(self.access_token_ttl_secs)
    }

    pub fn refresh_token_ttl(&self) -> Duration {
        Duration::from_secs(self.refresh_token_ttl_secs)
    }

    pub fn idempotency_retention(&self) -> Duration {
        Duration::from_secs(self.idempotency_retention_secs)
    }

    /// How long each kind of housekeeping row is kept.
    pub fn retention(&self) -> crate::db::retention::Retention {
        let days = |n: u32| Duration::from_secs(u64::from(n) * 86_400);
        crate::db::retention::Retention {
            idempotency_keys: self.idempotency_retention(),
            job_events: days(self.event_retention_days),
            refresh_tokens: days(self.refresh_token_retention_days),
            usage_days: days(self.usage_retention_days),
            files: days(self.file_retention_days),
            webhook_deliveries: days(self.event_retention_days),
        }
    }

    pub fn sse_heartbeat(&self) -> Duration {
        Duration::from_secs(self.sse_heartbeat_secs)
    }

    pub fn sse_idle(&self) -> Duration {
        Duration::from_secs(self.sse_idle_secs)
    }

    pub fn cache_ttl(&self) -> Duration {
        Duration::from_secs(self.cache_ttl_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The trusted reverse proxies (blank entries ignored). Errors name the entry.
    pub fn trusted_proxies(&self) -> Result<Vec<crate::cidr::Cidr>, String> {
        let entries = self.trusted_proxies.iter().map(|entry| entry.trim()).filter(|entry| !entry.is_empty());
        let parse = |entry: &str| entry.parse::<crate::cidr::Cidr>().map_err(|e| format!("ULTRA_TRUSTED_PROXIES: {e}"));
        entries.map(parse).collect()
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn relay_interval(&self) -> Duration {
        Duration::from_millis(self.relay_interval_ms)
    }

    pub fn mock_latency(&self) -> Duration {
        Duration::from_millis(self.mock_latency_ms)
    }

    /// How many of one worker's slots batch lines may hold at once (at least one).
    pub fn batch_slots(&self) -> i64 {
        (i64::from(self.concurrency) * i64::from(self.batch_slots_percent) / 100).max(1)
    }

    pub fn is_production(&self) -> bool {
        self.environment == Environment::Production
    }

    /// The waits between a webhook's attempts (`problems` refuses a schedule that
    /// does not parse, so the default stands in only for unchecked settings).
    pub fn webhook_schedule(&self) -> crate::webhooks::schedule::Schedule {
        crate::webhooks::schedule::Schedule::parse(&self.webhook_retry_schedule).unwrap_or_default()
    }

    /// Everything wrong with these settings on their own, each naming its variable:
    /// values out of range, and in production every unsafe setting. `Settings::load`
    /// adds the configuration file's problems and reports them all at once.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.concurrency == 0 {
            problems.push("ULTRA_WORKER_CONCURRENCY must be at least 1".to_owned());
        }
        if self.max_models_per_job == 0 {
            problems.push("ULTRA_MAX_MODELS_PER_JOB must be at least 1".to_owned());
        }
        if self.file_max_bytes == 0 || self.batch_max_lines == 0 {
            problems.push("ULTRA_FILE_MAX_BYTES and ULTRA_BATCH_MAX_LINES must be at least 1".to_owned());
        }
        if !(1..=100).contains(&self.batch_slots_percent) {
            problems.push("ULTRA_BATCH_SLOTS_PERCENT must be between 1 and 100".to_owned());
        }
        if self.db_pool_size == 0 {
            problems.push("ULTRA_DB_POOL_SIZE must be at least 1".to_owned());
        }
        // Durations that mean nothing at zero (or that a timer refuses) are refused
        // here rather than quietly raised where they are used.
        for (name, secs) in [
            ("ULTRA_ACCESS_TOKEN_TTL_SECS", self.access_token_ttl_secs),
            ("ULTRA_REFRESH_TOKEN_TTL_SECS", self.refresh_token_ttl_secs),
            ("ULTRA_IDEMPOTENCY_RETENTION_SECS", self.idempotency_retention_secs),
            ("ULTRA_SSE_HEARTBEAT_SECS", self.sse_heartbeat_secs),
            ("ULTRA_SSE_IDLE_SECS", self.sse_idle_secs),
            ("ULTRA_CACHE_TTL_SECS", self.cache_ttl_secs),
            ("ULTRA_REQUEST_TIMEOUT_SECS", self.request_timeout_secs),
            ("ULTRA_HEADER_TIMEOUT_SECS", self.header_timeout_secs),
            ("ULTRA_IDLE_TIMEOUT_SECS", self.idle_timeout_secs),
            ("ULTRA_DEFAULT_JOB_TIMEOUT_SECS", u64::from(self.default_job_timeout_secs)),
            ("ULTRA_WEBHOOK_TIMEOUT_SECS", self.webhook_timeout_secs),
            ("ULTRA_WEBHOOK_DISABLE_AFTER_SECS", self.webhook_disable_after_secs),
            ("ULTRA_WEBHOOK_ENDPOINT_CONCURRENCY", u64::from(self.webhook_endpoint_concurrency)),
            ("ULTRA_WEBHOOK_CONCURRENCY", u64::from(self.webhook_concurrency)),
        ] {
            if secs == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        // The relay polls the outbox this often: below 10 ms it would keep PostgreSQL
        // busy for nothing (and tokio's interval refuses zero).
        if self.relay_interval_ms < 10 {
            problems.push("ULTRA_RELAY_INTERVAL_MS must be at least 10".to_owned());
        }
        if let Err(problem) = self.jwt_keys() {
            problems.push(problem);
        }
        if self.max_connections == 0 {
            problems.push("ULTRA_MAX_CONNECTIONS must be at least 1".to_owned());
        }
        if !["x-forwarded-for", "forwarded"].contains(&self.forwarded_header.trim().to_ascii_lowercase().as_str()) {
            problems.push(format!(
                "ULTRA_FORWARDED_HEADER is `{}`: `x-forwarded-for` or `forwarded`",
                self.forwarded_header
            ));
        }
        let trusted_proxies = self.trusted_proxies();
        if let Err(problem) = &trusted_proxies {
            problems.push(problem.clone());
        }
        // AMQP_URL may list a cluster's nodes, comma-separated; each must be an AMQP URL.
        if let Err(node_problems) = crate::queue::nodes::parse(&self.amqp_url) {
            problems.extend(node_problems);
        }
        if let Err(problem) = crate::webhooks::schedule::Schedule::parse(&self.webhook_retry_schedule) {
            problems.push(format!("ULTRA_WEBHOOK_RETRY_SCHEDULE: {problem}"));
        }
        if self.environment == Environment::Production {
            // Every node of the list, each with its own credentials.
            let amqp_nodes: Vec<&str> = self.amqp_url.split(',').map(str::trim).collect();
            for (index, url) in amqp_nodes.iter().copied().enumerate().filter(|(_, url)| !url.is_empty()) {
                let name =
                    if amqp_nodes.len() > 1 { format!("AMQP_URL node {}", index + 1) } else { "AMQP_URL".to_owned() };
                if url.contains("guest:guest@") {
                    problems.push(format!("{name} uses RabbitMQ's default guest credentials"));
                } else if url_has_no_password(url) {
                    problems.push(format!("{name} has no credentials (RabbitMQ would take it as guest)"));
                } else if url_password(url).is_some_and(is_default_password) {
                    problems.push(format!("{name} uses a default or example password"));
                }
            }
            if url_has_no_password(&self.database_url) {
                problems.push("DATABASE_URL has no password".to_owned());
            }
            if url_has_no_password(&self.redis_url) {
                problems.push(
                    "REDIS_URL has no password (Redis holds stream tickets, the shared cache and live events)"
                        .to_owned(),
                );
            }
            for (name, url) in [("DATABASE_URL", &self.database_url), ("REDIS_URL", &self.redis_url)] {
                if url_password(url).is_some_and(is_default_password) {
                    problems.push(format!("{name} uses a default or example password"));
                }
            }
            if self.jwt_keys.as_deref().is_none_or(|k| k.trim().is_empty()) {
                problems.push("ULTRA_JWT_KEYS is not set (the built-in development key is public)".to_owned());
            } else if self.jwt_keys().is_ok_and(|keys| {
                keys.iter().any(|k| k.secret == DEVELOPMENT_JWT_KEY.1.as_bytes() || k.secret.starts_with(b"change-me"))
            }) {
                problems.push("ULTRA_JWT_KEYS uses the known development key or an example value".to_owned());
            }
            match self.metrics_token.as_deref().map(str::trim) {
                Some(token) if token.starts_with("change-me") => {
                    problems.push("ULTRA_METRICS_TOKEN is an example value".to_owned())
                }
                Some(token) if token.len() >= 16 => {}
                _ => problems.push(
                    "ULTRA_METRICS_TOKEN is not set (16 characters at least): /metrics would be public".to_owned(),
                ),
            }
            if self.webhook_allow_private {
                problems.push(
                    "ULTRA_WEBHOOK_ALLOW_PRIVATE lets any user make Ultra call addresses inside its network".to_owned(),
                );
            }
            if self.cors_origins.iter().any(|o| o.trim() == "*") {
                problems.push("ULTRA_CORS_ORIGINS allows any origin (`*`); list the origins".to_owned());
            }
            // Behind a proxy, every client would share the proxy's per-IP limits.
            if trusted_proxies.is_ok_and(|proxies| proxies.is_empty()) && !self.direct_clients {
                problems.push(
                    "ULTRA_TRUSTED_PROXIES is not set: list the reverse proxies in front of the api, or set \
                     ULTRA_DIRECT_CLIENTS=true if clients connect to it directly"
                        .to_owned(),
                );
            }
        }
        problems
    }
}

/// The password in a URL's user-info part, if any.
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (userinfo, _) = rest.rsplit_once('@')?;
    userinfo.split_once(':').map(|(_, password)| password)
}

/// Passwords that ship in images, tutorials and our own `.env.example`.
fn is_default_password(password: &str) -> bool {
    let password = password.to_ascii_lowercase();
    ["postgres", "password", "redis", "rabbitmq", "secret", "admin", "ultra"].contains(&password.as_str())
        || password.starts_with("change-me")
}

/// `scheme://host` or `scheme://user@host`: no (or an empty) password in the
/// user-info part.
fn url_has_no_password(url: &str) -> bool {
    url_password(url).is_none_or(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The checks as a whole (with the configuration file) are tested in `settings`.

    #[test]
    fn password_detection() {
        assert!(url_has_no_password("postgres://postgres@localhost/db"));
        assert!(!url_has_no_password("postgres://u:p@localhost/db"));
        assert!(url_has_no_password("postgres://localhost/db"));
        assert!(!url_has_no_password("redis://:s3cret@redis:6379"));
        assert!(url_has_no_password("redis://user:@redis:6379"));
    }

    #[test]
    fn a_zero_duration_is_a_problem_not_a_second() {
        let mut config = Config::from_env().expect("defaults parse");
        assert_eq!(config.problems(), Vec::<String>::new());
        config.sse_idle_secs = 0;
        config.relay_interval_ms = 5;
        assert_eq!(
            config.problems(),
            ["ULTRA_SSE_IDLE_SECS must be at least 1", "ULTRA_RELAY_INTERVAL_MS must be at least 10"]
        );
    }

    #[test]
    fn batch_lines_hold_their_share_of_a_worker_and_at_least_one_slot() {
        let mut config = Config::from_env().expect("defaults parse");
        config.concurrency = 16;
        config.batch_slots_percent = 25;
        assert_eq!(config.batch_slots(), 4);
        config.concurrency = 2;
        assert_eq!(config.batch_slots(), 1, "never none");
        config.batch_slots_percent = 0;
        assert_eq!(config.problems(), ["ULTRA_BATCH_SLOTS_PERCENT must be between 1 and 100"]);
    }
}
