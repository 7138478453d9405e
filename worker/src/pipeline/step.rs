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
    domain::{ErrorCode, Stage, StepStatus},
    job::{Attempt, StepError},
    patterns::PromptTooLong,
};

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
pub type StepResult = Result<String, StepError>;

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

    let Some(started) = db::steps::start(&ctx.pool, job.id, stage, model).await? else {
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
            Err(too_long) => Err(StepError::permanent(
                ErrorCode::ContextTooLong,
                format!("{too_long}: the model's context window cannot hold it"),
            )),
        }
    };
    // Cancelling drops the call: its HTTP request is aborted and its deltas stop.
    let result = tokio::select! {
        result = call => result,
        _ = cancel.cancelled() => {
            let past_deadline = job.deadline_at.is_some_and(|at| at <= chrono::Utc::now());
            let (code, message) = if past_deadline {
                (ErrorCode::DeadlineExceeded, "the job's deadline passed")
            } else {
                (ErrorCode::Cancelled, "the job was cancelled")
            };
            Err(StepError::permanent(code, message))
        }
    };
    let earlier = previous.and_then(|step| step.error.as_ref());
    let result = result.map_err(|error| with_attempts(error, job.attempts, earlier));

    let outcome = match &result {
        Ok(Answer { completion, cost_micros, cached }) => StepOutcome::Succeeded {
            output: &completion.text,
            input_tokens: completion.input_tokens,
            output_tokens: completion.output_tokens,
            cost_micros: *cost_micros,
            cached: *cached,
        },
        Err(error) => StepOutcome::Failed { error },
    };
    // The call is paid for: a brief database hiccup must not throw its answer away.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let first_try = tokio::time::Instant::now();
    let recorded = loop {
        // `None` if another delivery recorded the step first: no second event is written.
        match db::steps::finish(&ctx.pool, job.id, stage, model, &outcome).await {
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
/// earlier runs (from `earlier`, its previous error) and this one, oldest first, the
/// last `ATTEMPTS_KEPT` only. The error's own fields stay as they were.
fn with_attempts(mut error: StepError, attempt: i32, earlier: Option<&StepError>) -> StepError {
    let mut attempts = earlier.map(|e| e.attempts.clone()).unwrap_or_default();
    let message = error.message.chars().take(ATTEMPT_MESSAGE_CHARS).collect();
    attempts.push(Attempt { attempt, code: error.code, message: Some(message) });
    error.attempts = attempts.split_off(attempts.len().saturating_sub(ATTEMPTS_KEPT));
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

async fn call(ctx: &JobContext, job: &Job, stage: Stage, model: &str, prompt: &str) -> Result<Answer, StepError> {
    let Some(spec) = ctx.catalog.get(model) else {
        let message = format!("model `{model}` is not in this worker's catalog");
        return Err(StepError::permanent(ErrorCode::UnknownModel, message));
    };
    let Some(provider) = ctx.providers.for_model(spec) else {
        let message = format!("no provider `{}` configured", spec.provider);
        return Err(StepError::permanent(ErrorCode::NoProvider, message));
    };
    let chat = job.chat.as_ref();
    let request = CompletionRequest {
        model: spec,
        prompt,
        // A chat's first answers read its whole conversation; later stages read their templates.
        messages: chat.filter(|_| stage == Stage::Initial).map_or(&[], |chat| &chat.messages),
        temperature: job.options.temperature,
        top_p: chat.and_then(|chat| chat.top_p),
        // Never more than the model can write: the provider would refuse the call.
        max_tokens: job.options.max_tokens.map(|m| m.min(spec.max_output_tokens)),
        stop: chat.map_or(&[], |chat| &chat.stop),
    };
    let cache_key = job.options.cache.unwrap_or(false).then(|| ctx.cache.key(job.user_id, &request));
    if let Some(key) = &cache_key {
        if let Some(completion) = ctx.cache.get(key).await {
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
        err.to_step_error()
    })?;
    if let Some(key) = &cache_key {
        ctx.cache.put(key, &completion).await; // answers only: errors are never cached
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
        metrics::counter!(metrics_names::PROVIDER_ERRORS, &[model, provider, ("kind", err.code().to_string())])
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

    fn failure(code: ErrorCode, message: &str) -> StepError {
        StepError { retryable: true, ..StepError::permanent(code, message) }
    }

    /// The step's stored error after each run's failure, as the next run finds it.
    fn runs(failures: &[(ErrorCode, &str)]) -> StepError {
        let mut stored: Option<StepError> = None;
        for (i, (code, message)) in failures.iter().enumerate() {
            stored = Some(with_attempts(failure(*code, message), i as i32 + 1, stored.as_ref()));
        }
        stored.expect("at least one failure")
    }

    fn attempt(attempt: i32, code: ErrorCode, message: &str) -> Attempt {
        Attempt { attempt, code, message: Some(message.to_owned()) }
    }

    #[test]
    fn a_failed_step_shows_the_errors_that_led_to_its_last_one() {
        let overloaded = "the provider is overloaded or failing (500): upstream connect error";
        let open = "the circuit breaker for this provider is open";
        let error = runs(&[
            (ErrorCode::Overloaded, overloaded),
            (ErrorCode::Overloaded, overloaded),
            (ErrorCode::CircuitOpen, open),
            (ErrorCode::CircuitOpen, open),
        ]);
        assert_eq!(error.code, ErrorCode::CircuitOpen, "the last error is still the step's error");
        assert!(error.retryable);
        assert_eq!(
            error.attempts,
            [
                attempt(1, ErrorCode::Overloaded, overloaded),
                attempt(2, ErrorCode::Overloaded, overloaded),
                attempt(3, ErrorCode::CircuitOpen, open),
                attempt(4, ErrorCode::CircuitOpen, open),
            ]
        );
    }

    #[test]
    fn the_history_is_bounded() {
        let long = "x".repeat(1_000);
        let error = runs(&[(ErrorCode::Timeout, long.as_str()); 9]);
        assert_eq!(error.attempts.len(), ATTEMPTS_KEPT);
        assert_eq!((error.attempts[0].attempt, error.attempts[4].attempt), (5, 9));
        assert!(error.attempts.iter().all(|a| a.message.as_deref().map(str::len) == Some(ATTEMPT_MESSAGE_CHARS)));
        assert_eq!(error.message.len(), 1_000, "the error's own message is untouched");
    }

    #[test]
    fn a_first_failure_or_an_older_error_without_history_starts_one() {
        let cancelled = StepError::permanent(ErrorCode::Cancelled, "the job was cancelled");
        let older = failure(ErrorCode::Timeout, "the provider did not answer in time");
        for earlier in [None, Some(&older)] {
            let error = with_attempts(cancelled.clone(), 2, earlier);
            assert_eq!(error.attempts, [attempt(2, ErrorCode::Cancelled, "the job was cancelled")]);
        }
    }
}
