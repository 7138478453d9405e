//! Rate limits: GCRA (the generic cell rate algorithm) in one atomic Redis Lua script,
//! so every api replica shares one budget per key, and bursts are bounded by the
//! policy — no fixed window that lets 2× through at its edge. If Redis does not
//! answer within 50 ms, the same algorithm runs in-process (per replica) until it
//! does; readiness then reports Redis down, so the api is `degraded`.
//! Headers follow the IETF draft: `RateLimit-Policy` and `RateLimit`.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use common::redis::RedisHandle;
use poem::http::{HeaderMap, HeaderValue};

/// Longest wait for Redis before the in-process limiter decides.
pub const REDIS_BUDGET: Duration = Duration::from_millis(50);
/// Keys tracked by the in-process fallback before stale ones are swept.
const LOCAL_SWEEP_AT: usize = 100_000;

/// `limit` requests per `window`, with bursts of up to `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub name: &'static str,
    pub limit: u32,
    pub window: Duration,
}

impl Policy {
    pub fn per_minute(name: &'static str, limit: u32) -> Self {
        Self { name, limit: limit.max(1), window: Duration::from_secs(60) }
    }

    /// Milliseconds between requests at the sustained rate.
    fn interval_ms(&self) -> i64 {
        (self.window.as_millis() as i64 / i64::from(self.limit)).max(1)
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub policy: Policy,
    pub allowed: bool,
    pub remaining: u32,
    /// Seconds until the full burst is available again.
    pub reset_secs: u64,
    /// Seconds to wait before the next request can pass (0 when allowed).
    pub retry_after_secs: u64,
}

/// Writes every applied policy: `RateLimit-Policy: "general";q=60;w=60, "analyze";q=10;w=60`
/// and `RateLimit: "general";r=59;t=1, "analyze";r=9;t=6`, plus `Retry-After` if any
/// policy refused the request.
pub fn write_headers(decisions: &[Decision], headers: &mut HeaderMap) {
    let join = |item: fn(&Decision) -> String| decisions.iter().map(item).collect::<Vec<_>>().join(", ");
    let policy = join(|d| format!("\"{}\";q={};w={}", d.policy.name, d.policy.limit, d.policy.window.as_secs()));
    let state = join(|d| format!("\"{}\";r={};t={}", d.policy.name, d.remaining, d.reset_secs));
    for (name, value) in [("RateLimit-Policy", policy), ("RateLimit", state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    if let Some(wait) = decisions.iter().filter(|d| !d.allowed).map(|d| d.retry_after_secs).max() {
        headers.insert("Retry-After", HeaderValue::from(wait));
    }
}

impl Decision {
    fn from_gcra(policy: Policy, allowed: bool, remaining: i64, reset_ms: i64, retry_ms: i64) -> Self {
        let secs = |ms: i64| (ms.max(0) as u64).div_ceil(1000);
        Self {
            policy,
            allowed,
            remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
            reset_secs: secs(reset_ms),
            retry_after_secs: if allowed { 0 } else { secs(retry_ms).max(1) },
        }
    }
}

/// GCRA over Redis's clock. KEYS[1]: the bucket; ARGV: interval ms, burst.
/// Returns {allowed, remaining, reset ms, retry-after ms}.
const GCRA_LUA: &str = r"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local tolerance = interval * burst
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, 0, tat - now, new_tat - now - tolerance}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((tolerance - (new_tat - now)) / interval), new_tat - now, 0}
";

pub struct RateLimiter {
    redis: RedisHandle,
    prefix: String,
    script: redis::Script,
    local: Mutex<LocalGcra>,
}

impl RateLimiter {
    pub fn new(redis: RedisHandle, prefix: &str) -> Self {
        Self {
            redis,
            prefix: format!("{prefix}:rl:"),
            script: redis::Script::new(GCRA_LUA),
            local: Mutex::new(LocalGcra::default()),
        }
    }

    /// Counts one request against `key` under `policy`.
    pub async fn check(&self, key: &str, policy: Policy) -> Decision {
        let bucket = format!("{}{}:{key}", self.prefix, policy.name);
        let args = [policy.interval_ms(), i64::from(policy.limit)];
        match self.redis.eval::<(i64, i64, i64, i64)>(&self.script, &bucket, &args, REDIS_BUDGET).await {
            Ok((allowed, remaining, reset, retry)) => {
                Decision::from_gcra(policy, allowed == 1, remaining, reset, retry)
            }
            Err(err) => {
                tracing::debug!(error = %err, "rate limiting in-process while Redis is unavailable");
                let mut local = self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                local.check(&bucket, policy)
            }
        }
    }
}

/// The same algorithm for one process, for when Redis is away.
#[derive(Default)]
struct LocalGcra {
    started: Option<Instant>,
    /// Theoretical arrival time per bucket, in ms since `started`.
    tat: HashMap<String, i64>,
}

impl LocalGcra {
    fn check(&mut self, bucket: &str, policy: Policy) -> Decision {
        let now = self.started.get_or_insert_with(Instant::now).elapsed().as_millis() as i64;
        if self.tat.len() >= LOCAL_SWEEP_AT {
            self.tat.retain(|_, tat| *tat > now);
        }
        let interval = policy.interval_ms();
        let tolerance = interval * i64::from(policy.limit);
        let tat = self.tat.get(bucket).copied().unwrap_or(now).max(now);
        let new_tat = tat + interval;
        if new_tat - now > tolerance {
            return Decision::from_gcra(policy, false, 0, tat - now, new_tat - now - tolerance);
        }
        self.tat.insert(bucket.to_owned(), new_tat);
        Decision::from_gcra(policy, true, (tolerance - (new_tat - now)) / interval, new_tat - now, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_gcra_allows_the_burst_then_the_sustained_rate() {
        let mut gcra = LocalGcra::default();
        let policy = Policy::per_minute("t", 5);
        let decisions: Vec<Decision> = (0..6).map(|_| gcra.check("k", policy)).collect();
        assert!(decisions[..5].iter().all(|d| d.allowed));
        assert_eq!(decisions.iter().map(|d| d.remaining).collect::<Vec<_>>(), [4, 3, 2, 1, 0, 0]);
        assert!(!decisions[5].allowed);
        assert!((1..=12).contains(&decisions[5].retry_after_secs), "{:?}", decisions[5]);
        assert!(gcra.check("other", policy).allowed, "buckets are independent");
    }
}
