//! A Redis handle that never blocks the caller for long while Redis is away.
//! Redis only speeds things up in Ultra (live fan-out), so a failure is reported and
//! the handle backs off for a moment instead of stalling every caller on reconnects.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    AsyncCommands, Client, RedisError,
};

/// How long the handle refuses work after a failure before trying Redis again.
const BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct RedisHandle {
    client: Client,
    manager: ConnectionManager,
    started: Instant,
    /// Milliseconds since `started` before which calls fail fast.
    unavailable_until_ms: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisUnavailable {
    #[error("redis is unavailable (backing off after a recent failure)")]
    BackingOff,
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer in time")]
    Timeout,
}

impl RedisHandle {
    /// Parses the URL; connects lazily on first use.
    pub fn new(url: &str) -> Result<Self, RedisError> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self { client, manager, started: Instant::now(), unavailable_until_ms: Arc::new(AtomicU64::new(0)) })
    }

    /// The client, for connections the manager cannot serve (pub/sub).
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn publish(&self, channel: &str, payload: &str) -> Result<(), RedisUnavailable> {
        self.guarded(Duration::from_secs(1), |mut conn| async move { conn.publish::<_, _, ()>(channel, payload).await })
            .await
    }

    /// Runs a Lua script on one key, waiting at most `within`.
    pub async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        key: &str,
        args: &[i64],
        within: Duration,
    ) -> Result<T, RedisUnavailable> {
        self.guarded(within, |mut conn| async move { script.key(key).arg(args).invoke_async(&mut conn).await }).await
    }

    /// Appends to `key` (refreshing its TTL) and publishes `payload` on `channel`, in
    /// one round trip.
    pub async fn append_and_publish(
        &self,
        key: &str,
        text: &str,
        ttl: Duration,
        channel: &str,
        payload: &str,
    ) -> Result<(), RedisUnavailable> {
        let ms = ttl.as_millis().max(1) as u64;
        self.guarded(Duration::from_secs(1), |mut conn| async move {
            redis::pipe()
                .append(key, text)
                .ignore()
                .pexpire(key, ms as i64)
                .ignore()
                .publish(channel, payload)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Several string values at once; missing keys (and an unavailable Redis) are `None`.
    pub async fn get_strings(&self, keys: &[String]) -> Vec<Option<String>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let query = |mut conn: ConnectionManager| async move {
            redis::cmd("MGET").arg(keys).query_async::<Vec<Option<String>>>(&mut conn).await
        };
        self.guarded(Duration::from_millis(500), query).await.unwrap_or_else(|_| vec![None; keys.len()])
    }

    pub async fn get_string(&self, key: &str) -> Result<Option<String>, RedisUnavailable> {
        self.guarded(Duration::from_millis(500), |mut conn| async move { conn.get::<_, Option<String>>(key).await })
            .await
    }

    pub async fn set_string(&self, key: &str, value: &str, ttl: Duration) -> Result<(), RedisUnavailable> {
        let ms = ttl.as_millis().max(1) as u64;
        self.guarded(Duration::from_secs(1), |mut conn| async move { conn.pset_ex::<_, _, ()>(key, value, ms).await })
            .await
    }

    /// Makes an existing `key` expire at `unix_ms` (milliseconds since the epoch); a
    /// missing key stays missing.
    pub async fn expire_at(&self, key: &str, unix_ms: i64) -> Result<(), RedisUnavailable> {
        self.guarded(Duration::from_secs(1), |mut conn| async move { conn.pexpire_at::<_, ()>(key, unix_ms).await })
            .await
    }

    /// Sets `key` for `ttl` (a shared, self-expiring flag).
    pub async fn set_flag(&self, key: &str, ttl: Duration) -> Result<(), RedisUnavailable> {
        let ms = ttl.as_millis().max(1) as u64;
        self.guarded(Duration::from_secs(1), |mut conn| async move { conn.pset_ex::<_, _, ()>(key, 1, ms).await }).await
    }

    pub async fn clear_flag(&self, key: &str) -> Result<(), RedisUnavailable> {
        self.guarded(Duration::from_secs(1), |mut conn| async move { conn.del::<_, ()>(key).await }).await
    }

    /// Which of `keys` are set; an unavailable Redis answers "none".
    pub async fn flags(&self, keys: &[String]) -> Vec<bool> {
        self.get_strings(keys).await.into_iter().map(|v| v.is_some()).collect()
    }

    /// How long each of `keys` has left to live: `None` for a missing key, one
    /// without an expiry, or an unavailable Redis.
    pub async fn remaining_ttls(&self, keys: &[String]) -> Vec<Option<Duration>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let query = |mut conn: ConnectionManager| async move {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("PTTL").arg(key);
            }
            pipe.query_async::<Vec<i64>>(&mut conn).await
        };
        match self.guarded(Duration::from_millis(500), query).await {
            Ok(ttls) => ttls.into_iter().map(|ms| u64::try_from(ms).ok().map(Duration::from_millis)).collect(),
            Err(_) => vec![None; keys.len()],
        }
    }

    pub async fn ping(&self) -> Result<(), RedisUnavailable> {
        // The readiness probe must see the truth now, not the back-off's memory of it.
        let mut conn = self.manager.clone();
        let pong = tokio::time::timeout(Duration::from_secs(1), redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map_err(|_| RedisUnavailable::Timeout)?;
        self.record(pong.map(drop).map_err(RedisUnavailable::from))
    }

    async fn guarded<T, F, Fut>(&self, within: Duration, op: F) -> Result<T, RedisUnavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        if self.now_ms() < self.unavailable_until_ms.load(Ordering::Relaxed) {
            return Err(RedisUnavailable::BackingOff);
        }
        let result = match tokio::time::timeout(within, op(self.manager.clone())).await {
            Ok(result) => result.map_err(RedisUnavailable::from),
            Err(_) => Err(RedisUnavailable::Timeout),
        };
        self.record(result)
    }

    fn record<T>(&self, result: Result<T, RedisUnavailable>) -> Result<T, RedisUnavailable> {
        if result.is_err() {
            let until = self.now_ms() + BACKOFF.as_millis() as u64;
            self.unavailable_until_ms.store(until, Ordering::Relaxed);
        }
        result
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}
