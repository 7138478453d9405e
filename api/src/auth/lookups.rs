//! The cheap per-IP limit in front of credential lookups. A well-formed API key costs
//! a database query to refuse; without a limit ahead of that query, a flood of fake
//! keys would hold the connection pool that real requests need. So each address may
//! fail `FAILURES_PER_MINUTE` credentials a minute (GCRA, bursts of as many), counted
//! in this process and consulted before any lookup: once spent, its requests with a
//! credential get 429 without one. The limit guards this process's own pool, so it
//! is per process and never waits on Redis.
//!
//! A valid credential costs nothing, so a busy client is never held back by its own
//! traffic. While an address has recent failures, each of its lookups holds a slot
//! until it proves valid (then the slot is given back), so a burst of concurrent
//! fakes from it cannot outrun the count.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::Instant,
};

use crate::limits::{Decision, Policy};

/// Credentials an address may fail per minute (the same as its anonymous requests).
const FAILURES_PER_MINUTE: u32 = 60;
/// Addresses tracked before those with nothing outstanding are swept.
const SWEEP_AT: usize = 100_000;

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    Invalid,
    /// The lookup could not answer (the database is down): not the client's fault.
    Undecided,
}

/// A lookup under way; hand it back to [`CredentialLookups::settle`].
#[derive(Debug)]
#[must_use = "a lookup is settled with its outcome"]
pub struct Lookup {
    /// Whether it holds one of the address's slots.
    held: bool,
}

pub struct CredentialLookups {
    policy: Policy,
    buckets: Mutex<Buckets>,
}

impl Default for CredentialLookups {
    fn default() -> Self {
        Self { policy: Policy::per_minute("credentials", FAILURES_PER_MINUTE), buckets: Mutex::default() }
    }
}

impl CredentialLookups {
    /// Asks to look up a credential from `ip`; refused once `ip` has spent its failures.
    pub fn begin(&self, ip: &str) -> Result<Lookup, Decision> {
        let mut buckets = self.lock();
        let now = buckets.now();
        buckets.begin(ip, self.policy, now)
    }

    /// Records what the lookup `ip` began found.
    pub fn settle(&self, ip: &str, lookup: Lookup, outcome: Outcome) {
        let mut buckets = self.lock();
        let now = buckets.now();
        buckets.settle(ip, self.policy, lookup, outcome, now);
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// GCRA per address: the theoretical arrival time of its next failure, in ms since
/// `started`. An address whose time is not in the future has nothing outstanding.
#[derive(Default)]
struct Buckets {
    started: Option<Instant>,
    tat: HashMap<String, i64>,
}

impl Buckets {
    fn now(&mut self) -> i64 {
        self.started.get_or_insert_with(Instant::now).elapsed().as_millis() as i64
    }

    fn begin(&mut self, ip: &str, policy: Policy, now: i64) -> Result<Lookup, Decision> {
        let Some(tat) = self.tat.get_mut(ip).filter(|tat| **tat > now) else {
            return Ok(Lookup { held: false }); // no recent failures: nothing to ration
        };
        let (interval, tolerance) = interval_and_tolerance(policy);
        let next = *tat + interval;
        if next - now > tolerance {
            return Err(refused(policy, *tat - now, next - now - tolerance));
        }
        *tat = next;
        Ok(Lookup { held: true })
    }

    fn settle(&mut self, ip: &str, policy: Policy, lookup: Lookup, outcome: Outcome, now: i64) {
        let (interval, tolerance) = interval_and_tolerance(policy);
        match (lookup.held, outcome) {
            // A held slot already counts the failure; nothing held and nothing failed.
            (true, Outcome::Invalid) | (false, Outcome::Valid | Outcome::Undecided) => {}
            (true, Outcome::Valid | Outcome::Undecided) => {
                if let Some(tat) = self.tat.get_mut(ip) {
                    *tat = (*tat - interval).max(now);
                }
            }
            (false, Outcome::Invalid) => {
                if self.tat.len() >= SWEEP_AT {
                    self.tat.retain(|_, tat| *tat > now);
                }
                let tat = self.tat.entry(ip.to_owned()).or_insert(now);
                *tat = ((*tat).max(now) + interval).min(now + tolerance);
            }
        }
    }
}

/// Milliseconds between failures at the sustained rate, and the burst they may form.
fn interval_and_tolerance(policy: Policy) -> (i64, i64) {
    let interval = (policy.window.as_millis() as i64 / i64::from(policy.limit)).max(1);
    (interval, interval * i64::from(policy.limit))
}

fn refused(policy: Policy, reset_ms: i64, retry_ms: i64) -> Decision {
    let secs = |ms: i64| (ms.max(0) as u64).div_ceil(1000);
    Decision {
        policy,
        allowed: false,
        remaining: 0,
        reset_secs: secs(reset_ms),
        retry_after_secs: secs(retry_ms).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { name: "credentials", limit: 3, window: std::time::Duration::from_secs(3) };

    fn fail(buckets: &mut Buckets, ip: &str, now: i64) -> Result<(), Decision> {
        let lookup = buckets.begin(ip, POLICY, now)?;
        buckets.settle(ip, POLICY, lookup, Outcome::Invalid, now);
        Ok(())
    }

    #[test]
    fn valid_credentials_are_never_counted() {
        let mut buckets = Buckets::default();
        let lookups: Vec<Lookup> = (0..100).map(|_| buckets.begin("a", POLICY, 0).expect("allowed")).collect();
        for lookup in lookups {
            buckets.settle("a", POLICY, lookup, Outcome::Valid, 0);
        }
        assert!(buckets.tat.is_empty());
    }

    #[test]
    fn an_address_that_spent_its_failures_is_refused_before_the_lookup() {
        let mut buckets = Buckets::default();
        for _ in 0..3 {
            fail(&mut buckets, "a", 0).expect("within the burst");
        }
        let refused = buckets.begin("a", POLICY, 0).expect_err("spent");
        assert!(!refused.allowed);
        assert_eq!((refused.policy.name, refused.retry_after_secs), ("credentials", 1));
        assert!(buckets.begin("b", POLICY, 0).is_ok(), "addresses are independent");
        // One failure's worth comes back per interval.
        fail(&mut buckets, "a", 1_000).expect("refilled");
        assert!(buckets.begin("a", POLICY, 1_000).is_err());
    }

    #[test]
    fn while_failures_are_outstanding_concurrent_lookups_hold_slots() {
        let mut buckets = Buckets::default();
        fail(&mut buckets, "a", 0).expect("first failure");
        let first = buckets.begin("a", POLICY, 0).expect("a slot");
        let second = buckets.begin("a", POLICY, 0).expect("the last slot");
        assert!(buckets.begin("a", POLICY, 0).is_err(), "no slot left for a third at once");
        // A valid credential and an undecided lookup give their slots back.
        buckets.settle("a", POLICY, first, Outcome::Valid, 0);
        buckets.settle("a", POLICY, second, Outcome::Undecided, 0);
        let third = buckets.begin("a", POLICY, 0).expect("a slot again");
        buckets.settle("a", POLICY, third, Outcome::Invalid, 0);
        let fourth = buckets.begin("a", POLICY, 0).expect("the last slot");
        buckets.settle("a", POLICY, fourth, Outcome::Invalid, 0);
        assert!(buckets.begin("a", POLICY, 0).is_err(), "three failures spent");
    }

    #[test]
    fn failures_beyond_the_burst_do_not_push_the_refill_away() {
        let mut buckets = Buckets::default();
        // Lookups begun before the first failure was known are all counted when they
        // fail, but never beyond the burst.
        let lookups: Vec<Lookup> = (0..10).map(|_| buckets.begin("a", POLICY, 0).expect("clean")).collect();
        for lookup in lookups {
            buckets.settle("a", POLICY, lookup, Outcome::Invalid, 0);
        }
        assert_eq!(buckets.tat.get("a"), Some(&3_000));
        assert!(buckets.begin("a", POLICY, 999).is_err());
        assert!(buckets.begin("a", POLICY, 1_000).is_ok());
    }
}
