//! The one back-off policy for retrying something that failed: the wait doubles from
//! a first delay up to a cap, and each wait is drawn from the upper half of its step
//! ("equal jitter"), so processes that lost a dependency at the same moment do not
//! all come back in the same instant, and none retries sooner than half the step.

use std::time::Duration;

/// Doubling back-off with equal jitter: the n-th wait (from 0) lies in `[s/2, s]`,
/// where `s` is `first` doubled n times, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    /// Waits handed out since the last reset: the next one's step.
    attempt: u32,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, attempt: 0 }
    }

    /// The wait before the next attempt; the one after it is drawn from twice the step
    /// (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Starts again from `first`, after an attempt that succeeded.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The wait before retry `attempt` (0 for the first), for a caller that counts its
    /// attempts itself (a job's runs are counted in its row).
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self.first.saturating_mul(2u32.saturating_pow(attempt)).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn within_step(delay: Duration, step: Duration) -> bool {
        (step / 2..=step).contains(&delay)
    }

    #[test]
    fn waits_double_from_the_first_within_their_jitter() {
        let mut backoff = Backoff::new(FIRST, MAX);
        for step_ms in [100, 200, 400, 800, 1_600, 3_200] {
            let (delay, step) = (backoff.next_delay(), Duration::from_millis(step_ms));
            assert!(within_step(delay, step), "{delay:?} is not within the upper half of {step:?}");
        }
    }

    #[test]
    fn waits_stop_growing_at_the_cap() {
        let mut backoff = Backoff::new(FIRST, MAX);
        // Far past the cap, and past where doubling would overflow.
        for _ in 0..100 {
            backoff.next_delay();
        }
        let delay = backoff.next_delay();
        assert!(within_step(delay, MAX), "{delay:?}");
        assert!(within_step(backoff.delay(u32::MAX), MAX));
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let backoff = Backoff::new(FIRST, MAX);
        let delays: HashSet<Duration> = (0..20).map(|_| backoff.delay(3)).collect();
        assert!(delays.len() > 1, "twenty draws were all {delays:?}");
        assert!(delays.iter().all(|d| within_step(*d, Duration::from_millis(800))), "{delays:?}");
    }

    #[test]
    fn a_reset_starts_again_from_the_first() {
        let mut backoff = Backoff::new(FIRST, MAX);
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        let delay = backoff.next_delay();
        assert!(within_step(delay, FIRST), "{delay:?}");
    }
}
