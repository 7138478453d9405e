//! When a failed delivery is tried again. The default is the spec's suggestion
//! (Svix's schedule): at once, then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and
//! 10 h — eight attempts over about 27 hours. Each wait is jittered ±20% so that
//! deliveries failed together by one outage do not return together, and is never
//! shorter than the receiver's `Retry-After` (up to a day).

use std::time::Duration;

use rand::Rng;

/// The default `ULTRA_WEBHOOK_RETRY_SCHEDULE`.
pub const DEFAULT: &str = "5s,5m,30m,2h,5h,10h,10h";

/// The longest wait a schedule may hold (a longer one would overflow the jitter).
const MAX_WAIT: Duration = Duration::from_secs(7 * 86_400);

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// The waits after each failed attempt: attempt `n` failed waits `waits[n - 1]`; after
/// the last the delivery has failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    waits: Vec<Duration>,
}

impl Schedule {
    /// `5s,5m,2h`: each wait a number and a unit (`ms`, `s`, `m`, `h`), at most a week.
    pub fn parse(text: &str) -> Result<Self, String> {
        let waits = text
            .split(',')
            .map(|part| {
                parse_duration(part.trim())
                    .filter(|wait| *wait <= MAX_WAIT)
                    .ok_or_else(|| format!("`{}` is not a duration like 5s, of at most a week", part.trim()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { waits })
    }

    /// Attempts a delivery gets, the first included.
    pub fn attempts(&self) -> i32 {
        i32::try_from(self.waits.len()).unwrap_or(i32::MAX - 1) + 1
    }

    /// How long after failed attempt `attempt` (1-based) to try again, or `None` if it
    /// was the last; `retry_after` is the receiver's wish.
    pub fn next(&self, attempt: i32, retry_after: Option<Duration>) -> Option<Duration> {
        let wait = *self.waits.get(usize::try_from(attempt).ok()?.checked_sub(1)?)?;
        let jittered = wait.mul_f64(rand::rng().random_range(0.8..=1.2));
        Some(jittered.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER)))
    }
}

impl Default for Schedule {
    /// The spec's schedule.
    fn default() -> Self {
        Self::parse(DEFAULT).unwrap_or_else(|_| unreachable!("the default schedule parses"))
    }
}

fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(number.checked_mul(3_600)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_eight_attempts_over_about_a_day() {
        let schedule = Schedule::parse(DEFAULT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(schedule.attempts(), 8);
        let total: Duration = schedule.waits.iter().sum();
        assert_eq!(total, Duration::from_secs(5 + 300 + 1_800 + 7_200 + 18_000 + 36_000 + 36_000));
        let first = schedule.next(1, None).unwrap_or_default();
        assert!((4_000..=6_000).contains(&first.as_millis()), "{first:?}");
        assert_eq!(schedule.next(8, None), None, "the eighth attempt is the last");
    }

    #[test]
    fn retry_after_lengthens_a_wait_up_to_a_day() {
        let schedule = Schedule::parse("1s").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(schedule.next(1, Some(Duration::from_secs(60))), Some(Duration::from_secs(60)));
        assert_eq!(schedule.next(1, Some(Duration::from_secs(10 * 86_400))), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn a_schedule_is_numbers_with_units() {
        assert_eq!(
            Schedule::parse("100ms, 2s").map(|s| s.waits),
            Ok(vec![Duration::from_millis(100), Duration::from_secs(2)])
        );
        for bad in ["", "5", "s", "5d", "5s,,1s", "-1s", "200h", "99999999999999999h"] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
