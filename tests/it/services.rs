//! The real services the tests run against, and per-test isolation on each: a
//! database cloned from a migrated template, a random queue-name prefix and a
//! random Redis key prefix. URLs come from `DATABASE_URL`, `AMQP_URL` and
//! `REDIS_URL`, defaulting to the local ports; a service that does not answer stops
//! the test with one message saying what to start.

use std::{str::FromStr, time::Duration};

use common::db::MIGRATOR;
use sha2::{Digest, Sha256};
use sqlx::{postgres::PgConnectOptions, ConnectOptions, Connection, Executor, PgConnection};
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unreachable(service: &str, url_var: &str, err: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is not reachable ({err}). The tests need real PostgreSQL, RabbitMQ and Redis: \
         start them (`bash .ci/run` starts the local ones) or point {url_var} at running servers."
    )
}

/// Fails fast, with a clear message, if any service is missing.
pub async fn require_all() {
    if let Err(err) = admin_connection().await {
        unreachable("PostgreSQL", "DATABASE_URL", err);
    }
    let amqp = tokio::time::timeout(Duration::from_secs(5), common::queue::connect(&amqp_url(), "ultra-tests")).await;
    match amqp {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "ok".into()).await;
        }
        Ok(Err(err)) => unreachable("RabbitMQ", "AMQP_URL", err),
        Err(_) => unreachable("RabbitMQ", "AMQP_URL", "timed out"),
    }
    let redis = common::redis::RedisHandle::new(&redis_url()).unwrap_or_else(|e| unreachable("Redis", "REDIS_URL", e));
    if let Err(err) = redis.ping().await {
        unreachable("Redis", "REDIS_URL", err);
    }
}

fn server_options() -> PgConnectOptions {
    PgConnectOptions::from_str(&database_url()).expect("DATABASE_URL is a valid PostgreSQL URL")
}

async fn admin_connection() -> Result<PgConnection, sqlx::Error> {
    server_options().database("postgres").connect().await
}

/// Name of the migrated template for the current migrations: a new migration means
/// a new template, never a stale one.
fn template_name() -> String {
    let mut sums = Vec::new();
    for migration in MIGRATOR.iter() {
        sums.extend_from_slice(&migration.version.to_le_bytes());
        sums.extend_from_slice(&migration.checksum);
    }
    let digest = Sha256::digest(&sums);
    format!("ultra_tpl_{}", digest.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>())
}

/// Creates this test's database from the template (making the template first if
/// needed) and returns its URL and name.
pub async fn create_database() -> (String, String) {
    let template = template_name();
    let mut admin = admin_connection().await.unwrap_or_else(|e| unreachable("PostgreSQL", "DATABASE_URL", e));
    // One test process builds the template; the others wait on this lock.
    admin.execute("SELECT pg_advisory_lock(727274)").await.expect("advisory lock");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&template)
        .fetch_one(&mut admin)
        .await
        .expect("query pg_database");
    if !exists {
        // Built under a temporary name and renamed when complete, so a crash never
        // leaves a half-migrated template behind.
        let building = format!("{template}_building");
        admin.execute(format!(r#"DROP DATABASE IF EXISTS "{building}" WITH (FORCE)"#).as_str()).await.expect("drop");
        admin.execute(format!(r#"CREATE DATABASE "{building}""#).as_str()).await.expect("create template");
        let mut conn = server_options().database(&building).connect().await.expect("connect to template");
        MIGRATOR.run(&mut conn).await.expect("migrate template");
        conn.close().await.expect("close template connection");
        admin.execute(format!(r#"ALTER DATABASE "{building}" RENAME TO "{template}""#).as_str()).await.expect("rename");
        // Templates of earlier migration sets are no longer of use: drop those no one
        // is copying (without FORCE, a template in use stays).
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'ultra\\_tpl\\_%' AND datname <> $1",
        )
        .bind(&template)
        .fetch_all(&mut admin)
        .await
        .expect("list templates");
        for name in stale {
            let _ = admin.execute(format!(r#"DROP DATABASE IF EXISTS "{name}""#).as_str()).await;
        }
    }
    admin.execute("SELECT pg_advisory_unlock(727274)").await.expect("advisory unlock");

    let name = format!("ultra_t_{}", Uuid::new_v4().simple());
    let create = format!(r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#);
    let mut attempts = 0;
    while let Err(err) = admin.execute(create.as_str()).await {
        // 55006: the template is briefly in use by a concurrent copy.
        attempts += 1;
        assert!(attempts < 50, "cannot create test database: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = server_options().database(&name).to_url_lossy().to_string();
    (url, name)
}

pub async fn drop_database(name: &str) {
    if let Ok(mut admin) = admin_connection().await {
        let _ = admin.execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str()).await;
    }
}

/// A prefix unique to one test, for queue names and Redis keys.
pub fn unique_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Removes a test's queues and exchanges.
pub async fn delete_topology(prefix: &str) {
    let _ = testkit::queue::delete_topology(&common::queue::Topology::new(prefix), &amqp_url()).await;
}
