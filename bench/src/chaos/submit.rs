//! The chaos benchmark's clients: they submit every job until it is accepted, through
//! outages, as a careful client would. A job counts only when answered `202`.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::bail;

/// Concurrent submitting clients.
const CLIENTS: usize = 8;
/// How long one submit is retried before the run gives up on it: far longer than an
/// outage (`--down-s` is at most 60 s).
pub(super) const SUBMIT_PATIENCE: Duration = Duration::from_secs(120);
/// The longest `Retry-After` honoured at once; patience bounds the total.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Back-off of retries without a `Retry-After`: the first, and the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The shortest wait between two tries, whatever `Retry-After` says.
const MIN_WAIT: Duration = Duration::from_millis(50);

/// What the submitting clients saw, counted as it happens: the restarts take their
/// turns by `accepted`.
#[derive(Debug, Default, serde::Serialize)]
pub(super) struct SubmitTally {
    /// Jobs accepted (`202`), each counted once however many tries it took.
    pub(super) accepted: AtomicUsize,
    /// `503`: a dependency is away (the database), retried after `Retry-After`.
    unavailable: AtomicUsize,
    /// Those `503`s that came without `Retry-After`.
    unavailable_without_retry_after: AtomicUsize,
    /// `409`: a retry arrived while its own first try was still being processed.
    in_progress: AtomicUsize,
    /// Other `5xx` and `429` answers, retried.
    other_refusals: AtomicUsize,
    /// No connection: the request was never sent.
    refused_connections: AtomicUsize,
    /// Sent, but no answer came: ambiguous, so the retry's `Idempotency-Key` returns
    /// the job if the first try created it.
    lost_answers: AtomicUsize,
}

impl SubmitTally {
    pub(super) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The retries in one line, for the report.
    pub(super) fn retries(&self) -> String {
        let get = |counter: &AtomicUsize| counter.load(Ordering::Relaxed);
        format!(
            "{} after 503 ({} without Retry-After), {} after 409, {} after other refusals, \
             {} refused connections, {} lost answers",
            get(&self.unavailable),
            get(&self.unavailable_without_retry_after),
            get(&self.in_progress),
            get(&self.other_refusals),
            get(&self.refused_connections),
            get(&self.lost_answers)
        )
    }
}

fn bump(counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What one submitting client sends.
#[derive(Clone)]
struct SubmitClient {
    http: reqwest::Client,
    url: String,
    key: String,
    body: serde_json::Value,
    tally: Arc<SubmitTally>,
}

/// Submits `jobs` jobs with `CLIENTS` clients, each job until it is accepted.
pub(super) async fn submit_all(
    base: String,
    key: String,
    models: Vec<String>,
    jobs: usize,
    tally: Arc<SubmitTally>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let body = crate::analyze_body(&models);
    let submit = SubmitClient { http, url: format!("{base}/v1/analyze"), key, body, tally };
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let submit = submit.clone();
        clients.spawn(async move {
            for n in (client..jobs).step_by(CLIENTS) {
                submit.job(n).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    Ok(())
}

impl SubmitClient {
    /// Submits job `n` until it is accepted, retrying what a client should: `503` and
    /// `429` after their `Retry-After`, `409` (its own earlier try still in progress),
    /// other `5xx`, and requests that got no answer. Every try carries the same
    /// `Idempotency-Key`, so a try whose answer was lost and its retry make one job.
    async fn job(&self, n: usize) -> anyhow::Result<()> {
        let idempotency_key = format!("chaos-{n}");
        let give_up = Instant::now() + SUBMIT_PATIENCE;
        let mut backoff = common::backoff::Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        loop {
            let sent = self
                .http
                .post(&self.url)
                .bearer_auth(&self.key)
                .header("idempotency-key", &idempotency_key)
                .json(&self.body)
                .send()
                .await;
            let (asked, last) = match sent {
                Ok(response) if response.status() == reqwest::StatusCode::ACCEPTED => {
                    bump(&self.tally.accepted);
                    return Ok(());
                }
                Ok(response) => {
                    let status = response.status();
                    (self.refused(response).await?, status.to_string())
                }
                Err(err) => {
                    let counter =
                        if err.is_connect() { &self.tally.refused_connections } else { &self.tally.lost_answers };
                    bump(counter);
                    (None, err.to_string())
                }
            };
            let delay = backoff.next_delay();
            let wait = asked.unwrap_or(delay).max(MIN_WAIT);
            if Instant::now() + wait > give_up {
                bail!("job {n} was not accepted within {} s (last: {last})", SUBMIT_PATIENCE.as_secs());
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Counts a refusal and returns the wait the api asked for; an error when retrying
    /// cannot help (the request itself is wrong).
    async fn refused(&self, response: reqwest::Response) -> anyhow::Result<Option<Duration>> {
        let status = response.status();
        let asked = retry_after(response.headers());
        let counter = if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            if asked.is_none() {
                bump(&self.tally.unavailable_without_retry_after);
            }
            &self.tally.unavailable
        } else if status == reqwest::StatusCode::CONFLICT {
            &self.tally.in_progress
        } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            &self.tally.other_refusals
        } else {
            bail!("submit answered {status}: {}", response.text().await.unwrap_or_default());
        };
        bump(counter);
        Ok(asked)
    }
}

/// `Retry-After` in seconds (the api sends whole seconds, never a date), capped at
/// `MAX_RETRY_AFTER`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_capped() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_static(value));
            retry_after(&headers)
        };
        assert_eq!(with("3"), Some(Duration::from_secs(3)));
        assert_eq!(with("3600"), Some(MAX_RETRY_AFTER));
        assert_eq!(with("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
