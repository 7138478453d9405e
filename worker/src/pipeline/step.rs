//! One step: a provider call between two commits. A step that already succeeded is
//! reused, never called again; `step.started` and `step.completed`/`step.failed`
//! are committed with the step row they describe.

use std::{sync::Arc, time::Duration};

use common::{
    backoff::Backoff,
    db::{
        self,
        jobs::Job,
        steps::{Step, StepOutcome},
    },
    domain::{EventKind, Stage, StepStatus},
    patterns::PromptTooLong,
};
use serde_json::{json, Value};

use super::{JobContext, PipelineError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::tokens::TokenRelay;
use crate::providers::{Completion, CompletionRequest, ProviderError};
use common::{
    catalog::ModelSpec,
    metrics::{self as metrics_names, InFlight},
};

/// The step's output, or the error (as stored) that failed it.
pub type StepResult = Result<String, Value>;

pub async fn run(
    ctx: &Arc<JobContext>,
    job: &Job,
    stage: Stage,
    model: &str,
    prompt: Result<&str, PromptTooLong>,
    previous: Option<&Step>,
    cancel: &CancellationToken,
) -> Result<StepResult, PipelineError> {
    if let Some(step) = previous.filter(|s| s.status == StepStatus::Succeeded) {
        tracing::debug!(job_id = %job.id, %stage, model, "step already done; reusing its output");
        return Ok(Ok(step.output.clone().unwrap_or_default()));
    }

    let started = json!({ "stage": stage, "model": model });
    let Some(started) = db::steps::start(&ctx.pool, job.id, stage, model, &started).await? else {
        // Another delivery finished it meanwhile.
        let steps = db::steps::list(&ctx.pool, job.id).await?;
        let output = steps.into_iter().find(|s| s.stage == stage && s.model == model).and_then(|s| s.output);
        return Ok(Ok(output.unwrap_or_default()));
    };
    ctx.events.publish(&started).await;

    if let (true, Ok(prompt)) = (ctx.log_prompts, prompt) {
        tracing::debug!(job_id = %job.id, %stage, model, prompt, "step prompt");
    }
    // A prompt too long to render fails the step for good, without a call.
    let call = async {
        match prompt {
            Ok(prompt) => call(ctx, job, stage, model, prompt).await,
            Err(too_long) => Err(json!({
                "code": "context_too_long",
                "message": format!("{too_long}: the model's context window cannot hold it"),
                "retryable": false,
            })),
        }
    };
    // Cancelling drops the call: its HTTP request is aborted and its deltas stop.
    let result = tokio::select! {
        result = call => result,
        _ = cancel.cancelled() => {
            let past_deadline = job.deadline_at.is_some_and(|at| at <= chrono::Utc::now());
            let (code, message) = if past_deadline {
                ("deadline_exceeded", "the job's deadline passed")
            } else {
                ("cancelled", "the job was cancelled")
            };
            Err(json!({ "code": code, "message": message, "retryable": false }))
        }
    };
    let earlier = previous.and_then(|step| step.error.as_ref());
    let result = result.map_err(|error| with_attempts(error, job.attempts, earlier));

    let (outcome, (kind, data)) = match &result {
        Ok(Answer { completion, cost_micros, cached }) => (
            StepOutcome::Succeeded {
                output: &completion.text,
                input_tokens: completion.input_tokens,
                output_tokens: completion.output_tokens,
                cost_micros: *cost_micros,
                cached: *cached,
            },
            (
                EventKind::StepCompleted,
                json!({
                    "stage": stage, "model": model, "output": completion.text,
                    "usage": { "input_tokens": completion.input_tokens, "output_tokens": completion.output_tokens },
                    "cost_usd": *cost_micros as f64 / 1e6, "cached": cached,
                }),
            ),
        ),
        Err(error) => (
            StepOutcome::Failed { error },
            (EventKind::StepFailed, json!({ "stage": stage, "model": model, "error": error })),
        ),
    };
    // The call is paid for: a brief database hiccup must not throw its answer away.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let first_try = tokio::time::Instant::now();
    let recorded = loop {
        // `None` if another delivery recorded the step first: no second event is written.
        match db::steps::finish(&ctx.pool, job.id, stage, model, &outcome, kind, &data).await {
            Ok(recorded) => break recorded,
            Err(err) if first_try.elapsed() < RECORD_PATIENCE => {
                tracing::warn!(job_id = %job.id, model, error = %err, "cannot record step yet; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(err) => return Err(err.into()),
        }
    };
    if let Some(event) = recorded {
        ctx.events.publish(&event).await;
    }
    ctx.events.forget_partial(job.id, stage, model).await;
    Ok(result.map(|answer| answer.completion.text))
}

/// Most attempts a failed step's error lists: enough to show why it failed (the
/// 500s that opened a circuit, not only the `circuit_open` that ended the job), and
/// bounded, so the row stays small however often a job is retried.
const ATTEMPTS_KEPT: usize = 5;
/// Longest message an attempt keeps in that list.
const ATTEMPT_MESSAGE_CHARS: usize = 300;

/// `error` (this run's, attempt `attempt`) with `attempts`: the step's errors in its
/// earlier runs (from `earlier`, its previous error) and this one, oldest first, each
/// `{attempt, code, message}`, the last `ATTEMPTS_KEPT` only. The error's own fields
/// stay as they were: `attempts` is added, never in their place.
fn with_attempts(mut error: Value, attempt: i32, earlier: Option<&Value>) -> Value {
    let mut attempts: Vec<Value> =
        earlier.and_then(|e| e.get("attempts")).and_then(Value::as_array).cloned().unwrap_or_default();
    let message: Option<String> =
        error.get("message").and_then(Value::as_str).map(|m| m.chars().take(ATTEMPT_MESSAGE_CHARS).collect());
    attempts.push(json!({ "attempt": attempt, "code": error.get("code"), "message": message }));
    let kept = attempts.split_off(attempts.len().saturating_sub(ATTEMPTS_KEPT));
    if let Some(fields) = error.as_object_mut() {
        fields.insert("attempts".to_owned(), Value::Array(kept));
    }
    error
}

/// How long a finished step's result is retried against the database (back-off
/// doubling from 100 ms to 5 s) before the job is handed back for redelivery.
const RECORD_PATIENCE: Duration = Duration::from_secs(10);

/// A provider's answer, what it cost, and whether it came from the cache.
struct Answer {
    completion: Completion,
    cost_micros: i64,
    cached: bool,
}

async fn call(ctx: &JobContext, job: &Job, stage: Stage, model: &str, prompt: &str) -> Result<Answer, Value> {
    let Some(spec) = ctx.catalog.get(model) else {
        return Err(
            json!({ "code": "unknown_model", "message": format!("model `{model}` is not in this worker's catalog") }),
        );
    };
    let Some(provider) = ctx.providers.for_model(spec) else {
        return Err(json!({ "code": "no_provider", "message": format!("no provider `{}` configured", spec.provider) }));
    };
    let request = CompletionRequest {
        model: spec,
        prompt,
        temperature: job.options.get("temperature").and_then(Value::as_f64),
        // Never more than the model can write: the provider would refuse the call.
        max_tokens: job
            .options
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map(|m| u32::try_from(m).unwrap_or(u32::MAX).min(spec.max_output_tokens)),
    };
    let use_cache = job.options.get("cache").and_then(Value::as_bool).unwrap_or(false);
    if use_cache {
        if let Some(completion) = ctx.cache.get(job.user_id, &request).await {
            return Ok(Answer { completion, cost_micros: 0, cached: true });
        }
    }
    let meter = CallMeter::start(stage, spec);
    // The call streams its deltas to the relay; the relay ends when the call does.
    let (deltas, received) = mpsc::unbounded_channel();
    let relay = TokenRelay::new(ctx.events.clone(), job.id, stage, model).run(received);
    let call = provider.complete(&request, move |delta| {
        let _ = deltas.send(delta.to_owned());
    });
    let (result, ()) = tokio::join!(call, relay);
    let completion = result.map_err(|err: ProviderError| {
        tracing::warn!(job_id = %job.id, model, error = %err, retryable = err.is_retryable(), "provider call failed");
        meter.failed(&err);
        err.to_json()
    })?;
    if use_cache {
        ctx.cache.put(job.user_id, &request, &completion).await; // answers only: errors are never cached
    }
    let cost_micros = spec.cost_micros(i64::from(completion.input_tokens), i64::from(completion.output_tokens));
    meter.succeeded(&completion, cost_micros);
    Ok(Answer { completion, cost_micros, cached: false })
}

/// A provider call's metrics: in flight while it lives, then its duration, and its
/// tokens and cost or its error kind. Labels come from the catalog (bounded).
struct CallMeter {
    labels: [(&'static str, String); 3],
    started: std::time::Instant,
    _in_flight: InFlight,
}

impl CallMeter {
    fn start(stage: Stage, spec: &ModelSpec) -> Self {
        let in_flight =
            InFlight::enter(metrics::gauge!(metrics_names::STEPS_IN_FLIGHT, "provider" => spec.provider.clone()));
        let labels = [("stage", stage.to_string()), ("model", spec.id.clone()), ("provider", spec.provider.clone())];
        Self { labels, started: std::time::Instant::now(), _in_flight: in_flight }
    }

    fn finish(&self, outcome: &'static str) {
        let [stage, model, provider] = self.labels.clone();
        metrics::histogram!(metrics_names::STEP_DURATION, &[stage, model, provider, ("outcome", outcome.to_owned())])
            .record(self.started.elapsed().as_secs_f64());
    }

    fn failed(&self, err: &ProviderError) {
        self.finish("failed");
        let [_, model, provider] = self.labels.clone();
        metrics::counter!(metrics_names::PROVIDER_ERRORS, &[model, provider, ("kind", err.code().to_owned())])
            .increment(1);
    }

    fn succeeded(&self, completion: &Completion, cost_micros: i64) {
        self.finish("succeeded");
        let [_, model, provider] = self.labels.clone();
        for (direction, tokens) in [("input", completion.input_tokens), ("output", completion.output_tokens)] {
            let labels = [model.clone(), provider.clone(), ("direction", direction.to_owned())];
            metrics::counter!(metrics_names::TOKENS, &labels).increment(tokens.max(0) as u64);
        }
        metrics::counter!(metrics_names::COST, &[model, provider]).increment(cost_micros.max(0) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: &str, message: &str) -> Value {
        json!({ "code": code, "message": message, "retryable": true })
    }

    /// The step's stored error after each run's failure, as the next run finds it.
    fn runs(failures: &[(&str, &str)]) -> Value {
        failures.iter().enumerate().fold(Value::Null, |earlier, (i, (code, message))| {
            with_attempts(failure(code, message), i as i32 + 1, Some(&earlier).filter(|e| !e.is_null()))
        })
    }

    #[test]
    fn a_failed_step_shows_the_errors_that_led_to_its_last_one() {
        let overloaded = "the provider is overloaded or failing (500): upstream connect error";
        let open = "the circuit breaker for this provider is open";
        let error = runs(&[
            ("overloaded", overloaded),
            ("overloaded", overloaded),
            ("circuit_open", open),
            ("circuit_open", open),
        ]);
        assert_eq!(error["code"], "circuit_open", "the last error is still the step's error");
        assert_eq!(error["retryable"], true);
        assert_eq!(
            error["attempts"],
            json!([
                { "attempt": 1, "code": "overloaded", "message": overloaded },
                { "attempt": 2, "code": "overloaded", "message": overloaded },
                { "attempt": 3, "code": "circuit_open", "message": open },
                { "attempt": 4, "code": "circuit_open", "message": open },
            ])
        );
    }

    #[test]
    fn the_history_is_bounded() {
        let long = "x".repeat(1_000);
        let error = runs(&[("timeout", long.as_str()); 9]);
        let attempts = error["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), ATTEMPTS_KEPT);
        assert_eq!((attempts[0]["attempt"].as_i64(), attempts[4]["attempt"].as_i64()), (Some(5), Some(9)));
        assert!(attempts.iter().all(|a| a["message"].as_str().map(str::len) == Some(ATTEMPT_MESSAGE_CHARS)));
        assert_eq!(error["message"].as_str().map(str::len), Some(1_000), "the error's own message is untouched");
    }

    #[test]
    fn a_first_failure_or_an_older_error_without_history_starts_one() {
        let cancelled = json!({ "code": "cancelled", "message": "the job was cancelled", "retryable": false });
        let older = failure("timeout", "the provider did not answer in time");
        for earlier in [None, Some(&older)] {
            let error = with_attempts(cancelled.clone(), 2, earlier);
            assert_eq!(
                error["attempts"],
                json!([{ "attempt": 2, "code": "cancelled", "message": "the job was cancelled" }])
            );
        }
    }
}
