//! The stages of an analysis: `initial` (every model answers the prompt), `meta`
//! (every model that answered revises in view of the others), `synthesis` (one model
//! writes the final answer; if it fails, the next takes over). A stage goes on with
//! the models that answered while at least `min_models` remain.

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    backoff::Backoff,
    db::{jobs::Job, steps::Step},
    domain::{ErrorCode, Stage},
    job::{Answer, Failure, JobError, JobResult},
    patterns::{render, PatternSpec, PromptTooLong},
    queue::DELAY_TIERS,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{step, JobContext, PipelineError};

/// How the stages ended: a result, the error the job fails with, or a transient
/// failure worth another run after the delay.
pub enum StagesOutcome {
    Succeeded(JobResult),
    Failed(JobError),
    Retry(Duration),
}

pub struct Stages<'a> {
    pub ctx: &'a Arc<JobContext>,
    pub job: &'a Job,
    pub pattern: &'a PatternSpec,
    /// Steps a previous delivery finished: reused, never called again.
    pub done: &'a HashMap<(Stage, String), Step>,
    pub cancel: &'a CancellationToken,
    /// Runs a job may have before transient failures are final.
    pub max_attempts: u32,
    /// The quorum when a job sets none.
    pub default_min_models: u32,
}

impl Stages<'_> {
    pub async fn run(&self) -> Result<StagesOutcome, PipelineError> {
        let job = self.job;
        // More than the job's models asks for every one of them.
        let min_models = job.options.quorum(self.default_min_models, job.models.len());
        let mut failures = Vec::new();

        let prompts = job.models.iter().map(|m| (m.clone(), Ok(job.prompt.clone()))).collect();
        let initial = self.stage(Stage::Initial, prompts, &mut failures).await?;
        if let Some(delay) = self.retry_delay(&failures) {
            return Ok(StagesOutcome::Retry(delay));
        }
        if initial.len() < min_models {
            return Ok(too_few(Stage::Initial, initial.len(), min_models, failures));
        }

        let mut current = initial.clone();
        let mut meta = None;
        if let Some(template) = &self.pattern.meta_template {
            let prompts = current
                .iter()
                .map(|(model, own)| {
                    let others = listing(current.iter().filter(|(m, _)| m != model));
                    let prompt = render(
                        template,
                        &[("original_prompt", &job.prompt), ("own_response", own), ("other_responses", &others)],
                        self.prompt_limit(model),
                    );
                    (model.clone(), prompt)
                })
                .collect();
            let revised = self.stage(Stage::Meta, prompts, &mut failures).await?;
            if let Some(delay) = self.retry_delay(&failures) {
                return Ok(StagesOutcome::Retry(delay));
            }
            if revised.len() < min_models {
                return Ok(too_few(Stage::Meta, revised.len(), min_models, failures));
            }
            meta = Some(answers(revised.clone()));
            current = revised;
        }

        let mut synthesis = None;
        if let Some(template) = &self.pattern.synthesis_template {
            let responses = listing(current.iter());
            let values = [("original_prompt", job.prompt.as_str()), ("responses", responses.as_str())];
            // The requested model first (one from outside the job's models writes the
            // synthesis only), then the others in the job's order.
            let wanted = job.options.synthesis_model.clone();
            let mut candidates: Vec<String> = current.iter().map(|(m, _)| m.clone()).collect();
            candidates.sort_by_key(|m| Some(m) != wanted.as_ref());
            if let Some(outsider) = wanted.filter(|w| !job.models.contains(w)) {
                candidates.insert(0, outsider);
            }
            for model in &candidates {
                let prompt = render(template, &values, self.prompt_limit(model));
                let outcome = self.stage(Stage::Synthesis, vec![(model.clone(), prompt)], &mut failures).await?;
                if let Some((model, output)) = outcome.into_iter().next() {
                    synthesis = Some(Answer { model, output });
                    break;
                }
            }
            if synthesis.is_none() {
                if let Some(delay) = self.retry_delay(&failures) {
                    return Ok(StagesOutcome::Retry(delay));
                }
                let message = "every model that could write the synthesis failed";
                return Ok(StagesOutcome::Failed(JobError {
                    failures,
                    ..JobError::new(ErrorCode::SynthesisFailed, message)
                }));
            }
        }

        Ok(StagesOutcome::Succeeded(JobResult {
            answers: answers(initial),
            meta,
            output: synthesis.as_ref().map(|s| s.output.clone()),
            synthesis,
            failures,
        }))
    }

    /// If a failure so far was transient and the job has runs left: how long to wait
    /// before the next run. Exponential backoff from one second (capped at two
    /// minutes) with jitter, and never sooner than a provider's `Retry-After` (up to
    /// the longest delay queue), rounded up to the delay queue that will carry the
    /// message (`queued_delay`): that is the wait the `queued` event reports. The
    /// steps that succeeded are kept; only the failed ones run again.
    fn retry_delay(&self, failures: &[Failure]) -> Option<Duration> {
        if self.job.attempts as u32 >= self.max_attempts {
            return None;
        }
        let transient: Vec<&Failure> = failures.iter().filter(|f| f.error.retryable).collect();
        if transient.is_empty() || self.cancel.is_cancelled() {
            return None;
        }
        let asked = transient.iter().filter_map(|f| f.error.retry_after_ms).max().map(Duration::from_millis);
        let jittered = RETRY_BACKOFF.delay((self.job.attempts.max(1) - 1) as u32);
        Some(queued_delay(asked.map_or(jittered, |asked| asked.max(jittered))))
    }

    /// The longest prompt worth rendering for `model`: its context window at four
    /// characters a token (the provider guard then checks the exact fit).
    fn prompt_limit(&self, model: &str) -> usize {
        self.ctx
            .catalog
            .get(model)
            .map_or(usize::MAX, |spec| (spec.context_window as usize).saturating_mul(common::patterns::CHARS_PER_TOKEN))
    }

    /// Runs one stage's steps concurrently; the answers in the job's model order, the
    /// failures appended to `failures`.
    async fn stage(
        &self,
        stage: Stage,
        prompts: Vec<(String, Result<String, PromptTooLong>)>,
        failures: &mut Vec<Failure>,
    ) -> Result<Vec<(String, String)>, PipelineError> {
        let runs = prompts.iter().map(|(model, prompt)| {
            let previous = self.done.get(&(stage, model.clone()));
            let span = tracing::info_span!("step", %stage, model = model.as_str());
            let prompt = prompt.as_deref().map_err(|too_long| *too_long);
            step::run(self.ctx, self.job, stage, model, prompt, previous, self.cancel).instrument(span)
        });
        let results = futures::future::join_all(runs).await;
        let mut answers = Vec::new();
        for ((model, _), result) in prompts.into_iter().zip(results) {
            match result? {
                Ok(output) => answers.push((model, output)),
                Err(error) => failures.push(Failure { model, stage, error }),
            }
        }
        Ok(answers)
    }
}

/// The longest delay queue: a longer delay waits this long.
const LONGEST_DELAY: Duration = DELAY_TIERS[DELAY_TIERS.len() - 1];

/// A job's next run after a transient failure waits from one second, doubling with
/// each run it has had, up to two minutes.
const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));

/// How long a retry published for `delay` really waits: the TTL of the delay queue
/// that carries it, the shortest tier that covers `delay` or else the longest (as
/// `Topology::delay_queue` picks). A job told it waits 1.4 s would come back after 5.
fn queued_delay(delay: Duration) -> Duration {
    DELAY_TIERS.iter().copied().find(|tier| *tier >= delay).unwrap_or(LONGEST_DELAY)
}

/// `- model: answer` lines, for templates.
fn listing<'a>(answers: impl Iterator<Item = &'a (String, String)>) -> String {
    answers.map(|(model, text)| format!("- {model}: {text}")).collect::<Vec<_>>().join("\n")
}

fn answers(answers: Vec<(String, String)>) -> Vec<Answer> {
    answers.into_iter().map(|(model, output)| Answer { model, output }).collect()
}

fn too_few(stage: Stage, answered: usize, needed: usize, failures: Vec<Failure>) -> StagesOutcome {
    let message = format!("{answered} models answered at the {stage} stage; at least {needed} needed");
    StagesOutcome::Failed(JobError { failures, ..JobError::new(ErrorCode::TooFewModels, message) })
}

#[cfg(test)]
mod delay_tests {
    use common::queue::Topology;

    use super::*;

    #[test]
    fn a_retry_reports_the_delay_of_the_queue_that_carries_it() {
        let topology = Topology::new("t.");
        for (wanted_ms, waits_s) in
            [(1, 1), (1_000, 1), (1_367, 5), (5_000, 5), (29_000, 30), (90_000, 120), (600_000, 120)]
        {
            let wanted = Duration::from_millis(wanted_ms);
            let reported = queued_delay(wanted);
            assert_eq!(reported, Duration::from_secs(waits_s), "{wanted_ms} ms");
            // The relay, given the reported delay, publishes to the same queue it would
            // have for the wanted one, the queue whose TTL is the reported delay.
            assert_eq!(topology.delay_queue(reported), topology.delay_queue(wanted));
            assert_eq!(topology.delay_queue(reported), format!("t.ultra.delay.{waits_s}s"));
        }
    }
}
