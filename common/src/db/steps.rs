//! `job_steps`: one row per provider call `(job, stage, model)`. Writes are upserts,
//! so a redelivered job rewrites nothing it already finished.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{
    domain::{Stage, StepStatus},
    events::JobEvent,
    job::{EventData, StepCompletedData, StepError, StepFailedData, StepStartedData, Usage},
};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Step {
    pub job_id: Uuid,
    pub stage: Stage,
    pub model: String,
    pub status: StepStatus,
    pub output: Option<String>,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    #[sqlx(json(nullable))]
    pub error: Option<StepError>,
    pub cost_micros: i64,
    pub cached: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step's outcome once its provider call has returned.
#[derive(Debug, Clone)]
pub enum StepOutcome<'a> {
    Succeeded { output: &'a str, input_tokens: i32, output_tokens: i32, cost_micros: i64, cached: bool },
    Failed { error: &'a StepError },
}

impl StepOutcome<'_> {
    /// The event that announces it: `step.completed` or `step.failed`.
    fn event(&self, stage: Stage, model: &str) -> EventData {
        let model = model.to_owned();
        match self {
            StepOutcome::Succeeded { output, input_tokens, output_tokens, cost_micros, cached } => {
                EventData::StepCompleted(StepCompletedData {
                    stage,
                    model,
                    output: (*output).to_owned(),
                    usage: Usage { input_tokens: *input_tokens, output_tokens: *output_tokens },
                    cost_usd: *cost_micros as f64 / 1e6,
                    cached: *cached,
                })
            }
            StepOutcome::Failed { error } => {
                EventData::StepFailed(StepFailedData { stage, model, error: (*error).clone() })
            }
        }
    }
}

/// The input and output tokens of a job's paid calls (a cached answer cost nothing
/// and counts nothing): what a chat completion reports as its `usage`.
pub async fn paid_usage(ex: impl PgExecutor<'_>, job_id: Uuid) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT coalesce(sum(input_tokens), 0)::bigint, coalesce(sum(output_tokens), 0)::bigint
           FROM job_steps WHERE job_id = $1 AND NOT cached",
    )
    .bind(job_id)
    .fetch_one(ex)
    .await
}

/// A job's steps in pipeline order, and within a stage in the order the job names its models.
pub async fn list(ex: impl PgExecutor<'_>, job_id: Uuid) -> Result<Vec<Step>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.job_id, s.stage, s.model, s.status, s.output, s.input_tokens, s.output_tokens, s.error,
                s.cost_micros, s.cached, s.started_at, s.finished_at
           FROM job_steps s JOIN jobs j ON j.id = s.job_id
          WHERE s.job_id = $1
          ORDER BY array_position(ARRAY['initial', 'meta', 'synthesis'], s.stage), array_position(j.models, s.model)",
    )
    .bind(job_id)
    .fetch_all(ex)
    .await
}

/// Marks a step running, with its `step.started` event, in one statement. `None` if
/// the step had already succeeded (another delivery finished it): nothing is written.
pub async fn start(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    stage: Stage,
    model: &str,
) -> Result<Option<JobEvent>, sqlx::Error> {
    let event = EventData::StepStarted(StepStartedData { stage, model: model.to_owned() });
    let sql = format!(
        "WITH write AS (
            INSERT INTO job_steps (job_id, stage, model, status) VALUES ($1, $2, $3, 'running')
            ON CONFLICT (job_id, stage, model) DO UPDATE
               SET status = 'running', output = NULL, error = NULL, started_at = now(), finished_at = NULL
             WHERE job_steps.status <> 'succeeded'
            RETURNING 1
         ), {}",
        super::events::append_if_written(4, 5)
    );
    let query = sqlx::query_as(&sql).bind(job_id).bind(stage).bind(model);
    let written = super::events::bind_event(query, &event).fetch_optional(ex).await?;
    Ok(written.map(|(seq, created_at)| JobEvent::new(job_id, seq, event, created_at)))
}

/// Records a finished provider call with its event, in one statement. A step that
/// already succeeded keeps its result: `None`, nothing written.
pub async fn finish(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    stage: Stage,
    model: &str,
    outcome: &StepOutcome<'_>,
) -> Result<Option<JobEvent>, sqlx::Error> {
    let event = outcome.event(stage, model);
    let (status, output, input_tokens, output_tokens, error, cost_micros, cached) = match outcome {
        StepOutcome::Succeeded { output, input_tokens, output_tokens, cost_micros, cached } => (
            StepStatus::Succeeded,
            Some(*output),
            Some(*input_tokens),
            Some(*output_tokens),
            None,
            *cost_micros,
            *cached,
        ),
        StepOutcome::Failed { error } => {
            (StepStatus::Failed, None, None, None, Some(sqlx::types::Json(*error)), 0, false)
        }
    };
    let sql = format!(
        "WITH write AS (
            INSERT INTO job_steps (job_id, stage, model, status, output, input_tokens, output_tokens, error,
                                   cost_micros, cached, finished_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
            ON CONFLICT (job_id, stage, model) DO UPDATE
               SET status = EXCLUDED.status, output = EXCLUDED.output, input_tokens = EXCLUDED.input_tokens,
                   output_tokens = EXCLUDED.output_tokens, error = EXCLUDED.error,
                   cost_micros = EXCLUDED.cost_micros, cached = EXCLUDED.cached, finished_at = now()
             WHERE job_steps.status <> 'succeeded'
            RETURNING 1
         ), {}",
        super::events::append_if_written(11, 12)
    );
    let query = sqlx::query_as(&sql)
        .bind(job_id)
        .bind(stage)
        .bind(model)
        .bind(status)
        .bind(output)
        .bind(input_tokens)
        .bind(output_tokens)
        .bind(error)
        .bind(cost_micros)
        .bind(cached);
    let written = super::events::bind_event(query, &event).fetch_optional(ex).await?;
    Ok(written.map(|(seq, created_at)| JobEvent::new(job_id, seq, event, created_at)))
}
