//! Webhooks in the Standard Webhooks format (<https://www.standardwebhooks.com>):
//! what a delivery carries (`Envelope`), how it is signed (`signing`), which URLs
//! may receive one (`address`) and when a failed one is tried again (`schedule`).
//! The api registers endpoints and checks URLs with these; the workers' delivery
//! task signs and sends with them.

pub mod address;
pub mod schedule;
pub mod signing;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{JobStatus, WebhookEventType};

/// The body of every delivery: `{"type", "timestamp", "data"}`, as the spec lays out.
#[derive(Debug, Serialize)]
pub struct Envelope<T: Serialize> {
    #[serde(rename = "type")]
    pub event_type: WebhookEventType,
    /// When the event happened (RFC 3339, UTC).
    pub timestamp: String,
    pub data: T,
}

impl<T: Serialize> Envelope<T> {
    pub fn new(event_type: WebhookEventType, at: DateTime<Utc>, data: T) -> Self {
        Self { event_type, timestamp: at.to_rfc3339_opts(SecondsFormat::Millis, true), data }
    }

    /// The exact text every attempt sends and signs.
    pub fn to_body(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| unreachable!("an envelope is plain data"))
    }
}

/// `data` of a job's event: what the client needs to fetch the job.
#[derive(Debug, Serialize)]
pub struct JobData<'a> {
    pub object: &'static str,
    pub id: Uuid,
    pub status: JobStatus,
    /// The error's code, for a job that did not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'a str>,
    pub url: String,
}

impl<'a> JobData<'a> {
    pub fn new(id: Uuid, status: JobStatus, error_code: Option<&'a str>) -> Self {
        Self { object: "job", id, status, error_code, url: format!("/v1/jobs/{id}") }
    }
}

/// `data` of a batch's event.
#[derive(Debug, Serialize)]
pub struct BatchData<'a> {
    pub object: &'static str,
    pub id: Uuid,
    pub status: &'a str,
    pub request_counts: RequestCounts,
}

/// A batch's lines at its end, as OpenAI's batch object counts them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// `data` of a test ping.
#[derive(Debug, Serialize)]
pub struct TestData {
    pub object: &'static str,
    pub endpoint_id: Uuid,
}

/// The body of a job's end event.
pub fn job_body(id: Uuid, status: JobStatus, error_code: Option<&str>, at: DateTime<Utc>) -> Option<String> {
    let event_type = WebhookEventType::of_job(status)?;
    Some(Envelope::new(event_type, at, JobData::new(id, status, error_code)).to_body())
}

/// The body of a batch's end event.
pub fn batch_body(
    id: Uuid,
    status: &str,
    counts: RequestCounts,
    at: DateTime<Utc>,
) -> Option<(WebhookEventType, String)> {
    let event_type = WebhookEventType::of_batch(status)?;
    let data = BatchData { object: "batch", id, status, request_counts: counts };
    Some((event_type, Envelope::new(event_type, at, data).to_body()))
}

/// The body of a test ping to `endpoint_id`.
pub fn test_body(endpoint_id: Uuid, at: DateTime<Utc>) -> String {
    Envelope::new(WebhookEventType::WebhookTest, at, TestData { object: "webhook_test", endpoint_id }).to_body()
}

/// The `webhook-id` of a delivery: stable across its attempts, so receivers can drop
/// a repeat.
pub fn message_id(delivery_id: Uuid) -> String {
    format!("msg_{}", delivery_id.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_event_is_the_specs_envelope_with_the_jobs_id_and_status() {
        let id = Uuid::from_u128(7);
        let at = DateTime::parse_from_rfc3339("2026-12-02T10:00:00.5Z").map(|t| t.to_utc()).ok();
        let body = job_body(id, JobStatus::Failed, Some("too_few_models"), at.unwrap_or_default());
        let value: serde_json::Value = serde_json::from_str(body.as_deref().unwrap_or("null")).unwrap_or_default();
        assert_eq!(value["type"], "job.failed");
        assert_eq!(value["timestamp"], "2026-12-02T10:00:00.500Z");
        assert_eq!(value["data"]["id"], id.to_string());
        assert_eq!(value["data"]["status"], "failed");
        assert_eq!(value["data"]["error_code"], "too_few_models");
        assert_eq!(job_body(id, JobStatus::Running, None, Utc::now()), None, "a running job has not ended");
    }
}
