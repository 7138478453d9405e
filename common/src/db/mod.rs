//! PostgreSQL access, one module per table family. Functions take `impl PgExecutor`
//! (or a transaction) so the caller decides what commits together.

pub mod api_keys;
pub mod batches;
pub mod events;
pub mod files;
pub mod idempotency;
pub mod jobs;
pub mod outbox;
pub mod refresh_tokens;
pub mod retention;
pub mod steps;
pub mod usage;
pub mod users;
pub mod webhooks;

use std::{str::FromStr, time::Duration};

use sqlx::{
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Postgres,
};

use crate::backoff::Backoff;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// A lazily connecting pool of at most `size` connections (`ULTRA_DB_POOL_SIZE` for
/// the product): start-up does not fail while PostgreSQL is briefly away, and lost
/// connections are replaced on the next acquire.
pub fn connect_lazy(database_url: &str, size: u32) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(database_url)?.application_name("ultra");
    Ok(PgPoolOptions::new().max_connections(size).acquire_timeout(Duration::from_secs(5)).connect_lazy_with(options))
}

/// Creates the database if it does not exist, then applies pending migrations.
/// Safe to run from many processes at once: creation tolerates losing the race, and
/// sqlx's migrator holds a PostgreSQL advisory lock while it migrates.
pub async fn prepare(database_url: &str, pool: &PgPool) -> Result<(), sqlx::Error> {
    if !Postgres::database_exists(database_url).await? {
        if let Err(err) = Postgres::create_database(database_url).await {
            // 42P04 duplicate_database: another process created it first.
            let raced = matches!(&err, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P04"));
            if !raced {
                return Err(err);
            }
        }
    }
    MIGRATOR.run(pool).await.map_err(sqlx::Error::from)
}

/// Whether an error is a unique-constraint violation (23505), e.g. a duplicate email.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Connects and prepares the database at start-up, retrying with back-off for up to
/// `STARTUP_PATIENCE` while PostgreSQL comes up (containers start in any order).
pub async fn connect_and_prepare(
    database_url: &str,
    size: u32,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<PgPool, sqlx::Error> {
    const STARTUP_PATIENCE: Duration = Duration::from_secs(60);
    let pool = connect_lazy(database_url, size)?;
    let deadline = tokio::time::Instant::now() + STARTUP_PATIENCE;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let Err(err) = prepare(database_url, &pool).await else {
            return Ok(pool);
        };
        let delay = backoff.next_delay();
        if tokio::time::Instant::now() + delay >= deadline || shutdown.is_cancelled() {
            return Err(err);
        }
        tracing::warn!(error = %err, "database not ready; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Err(err),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
