//! `POST /openai/v1/chat/completions`: the request becomes a job like any other (the
//! submit service: idempotency, standing, budget, durable insert), then the answer is
//! read from the job's own event stream — whole once the job ends, or chunk by chunk
//! (`stream: true`) as the answering model writes it. A client that goes away does
//! not cancel the job: it runs to its end and stays readable at `GET /v1/jobs/{id}`.

use std::{collections::VecDeque, sync::Arc};

use bytes::Bytes;
use common::{
    db::{self, jobs::Job},
    domain::{ErrorCode, JobStatus, Stage},
    job::{EndedData, EventData, JobError, JobResult},
    patterns::PatternSpec,
    trace::TraceContext,
};
use futures::{stream::BoxStream, StreamExt};
use poem::{
    error::ResponseError,
    handler,
    http::StatusCode,
    web::{Data, Json},
    Body, IntoResponse, Request, Response,
};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    error, models,
    request::{ChatRequest, Refusal},
};
use crate::{
    auth::Principal,
    body,
    error::ApiError,
    jobs::{self, Accepted, Idempotency, Submission},
    state::AppState,
    stream::{frame::SseBody, job_items, stream_permit, StreamItem},
};

/// The header naming the job a completion is.
const JOB_ID_HEADER: &str = "x-ultra-job-id";

#[handler]
pub async fn completions(
    req: &Request,
    body: Body,
    Data(state): Data<&Arc<AppState>>,
    Data(trace): Data<&TraceContext>,
) -> Response {
    match complete(req, body, state, trace).await {
        Ok(response) => response,
        Err(Refusal::UnknownModel(model)) => models::not_found(&model),
        Err(Refusal::Invalid(err)) => err.as_response(),
    }
}

async fn complete(req: &Request, body: Body, state: &Arc<AppState>, trace: &TraceContext) -> Result<Response, Refusal> {
    let principal = req.extensions().get::<Principal>().cloned().ok_or(ApiError::Unauthorized)?;
    let request: ChatRequest = body::read_json(req, body).await?;
    let key = match req.headers().get("idempotency-key") {
        Some(value) => Some(jobs::check_idempotency_key(value.to_str().unwrap_or_default().to_owned())?),
        None => None,
    };
    // A stream slot is taken before anything is accepted (as on `/v1/analyze`).
    let permit = if request.wants_stream() { Some(stream_permit(state, &principal)?) } else { None };
    let planned = request.plan(state, &principal.tier)?;
    jobs::check_models_can_run(state, &planned.models).await?;
    let answering = Answering::of(&planned.spec, &planned.models, &request.model);
    let traceparent = trace.to_string();
    let submission = Submission {
        user_id: principal.user_id,
        tier: &principal.tier,
        prompt: &planned.prompt,
        models: &planned.models,
        pattern: (&planned.pattern, &planned.spec),
        options: planned.options,
        chat: Some(planned.chat),
        batch_id: None,
        idempotency: key.as_deref().map(|key| Idempotency::new(key, &request)),
        traceparent: &traceparent,
    };
    let job = match jobs::submit(state, submission).await? {
        Accepted::New(job) | Accepted::Replayed(job) => job,
    };
    let mut response = match permit {
        Some(permit) => {
            let chunks = chunks(state.clone(), &job, answering, request.include_usage());
            let frames = chunks.map(move |frame| {
                let _open = &permit;
                frame
            });
            SseBody::<()>::new(frames.boxed(), state.config.sse_heartbeat()).into_response()
        }
        None => whole(state, &job, &answering).await?,
    };
    if let Ok(value) = job.id.to_string().parse() {
        response.headers_mut().insert(JOB_ID_HEADER, value);
    }
    Ok(response)
}

/// Which step writes the answer a completion returns, and how to read it from a result.
pub(super) struct Answering {
    /// The model the request named (`mock/alpha`, `ultra/critique`).
    model: String,
    stage: Stage,
    /// The job's first model: the answer of a pattern without a synthesis.
    first: String,
    /// The step streamed from: fixed, or (for a synthesis, where a failed writer hands
    /// over to the next) the first to write.
    writer: Option<String>,
}

impl Answering {
    pub(super) fn of(spec: &PatternSpec, models: &[String], model: &str) -> Self {
        let first = models.first().cloned().unwrap_or_default();
        let (stage, writer) = if spec.synthesis_template.is_some() {
            (Stage::Synthesis, None)
        } else if spec.meta_template.is_some() {
            (Stage::Meta, Some(first.clone()))
        } else {
            (Stage::Initial, Some(first.clone()))
        };
        Self { model: model.to_owned(), stage, first, writer }
    }

    /// The final answer in a result: the synthesis, or the first model's last answer.
    fn answer(&self, result: &JobResult) -> String {
        let by_first = |answers: &[common::job::Answer]| {
            answers.iter().find(|a| a.model == self.first).or(answers.first()).map(|a| a.output.clone())
        };
        result
            .output
            .clone()
            .or_else(|| result.meta.as_deref().and_then(by_first))
            .or_else(|| by_first(&result.answers))
            .unwrap_or_default()
    }

    /// Whether a step's text is the answer's (a synthesis takes the first writer).
    fn is_writer(&mut self, stage: Stage, model: &str) -> bool {
        if stage != self.stage {
            return false;
        }
        self.writer.get_or_insert_with(|| model.to_owned()) == model
    }
}

/// A job's items from its start until its terminal event, the stream reopened if it
/// ends while the job runs (after `ULTRA_SSE_IDLE_SECS` of quiet); ends early only
/// at shutdown.
fn follow(state: Arc<AppState>, job_id: Uuid) -> BoxStream<'static, StreamItem> {
    struct Following {
        state: Arc<AppState>,
        job_id: Uuid,
        last_seq: i64,
        items: Option<BoxStream<'static, StreamItem>>,
        ended: bool,
    }
    // Subscribed now, not at the first poll: the answer's first tokens are not missed.
    let items = Some(job_items(&state, job_id, 0, false).into_stream());
    let start = Following { state, job_id, last_seq: 0, items, ended: false };
    futures::stream::unfold(start, |mut f| async move {
        loop {
            if f.ended || f.state.shutdown.is_cancelled() {
                return None;
            }
            let (state, job_id, after) = (&f.state, f.job_id, f.last_seq);
            let items = f.items.get_or_insert_with(|| job_items(state, job_id, after, false).into_stream());
            match items.next().await {
                Some(StreamItem::Event(event)) => {
                    f.last_seq = event.value.seq;
                    f.ended = event.value.kind.is_terminal();
                    return Some((StreamItem::Event(event), f));
                }
                Some(item) => return Some((item, f)),
                None => f.items = None,
            }
        }
    })
    .boxed()
}

/// The job's terminal event, once it comes.
async fn ended(state: &Arc<AppState>, job_id: Uuid) -> Result<EndedData, ApiError> {
    let mut items = follow(state.clone(), job_id);
    while let Some(item) = items.next().await {
        if let StreamItem::Event(event) = item {
            if let EventData::Ended(ended) = &event.value.data {
                return Ok(ended.clone());
            }
        }
    }
    Err(ApiError::Unavailable("the server is shutting down; the job goes on".into()))
}

/// The non-streaming answer: the whole completion once the job has ended.
async fn whole(state: &Arc<AppState>, job: &Job, answering: &Answering) -> Result<Response, ApiError> {
    let ended = if job.status.is_terminal() {
        EndedData { status: job.status, result: job.result.clone(), error: job.error.clone() }
    } else {
        ended(state, job.id).await?
    };
    let (Some(result), JobStatus::Succeeded) = (&ended.result, ended.status) else {
        return Ok(failure(ended.error.as_ref()));
    };
    let (input, output) = usage(state, job.id).await?;
    Ok(Json(completion_json(job, answering, result, input, output)).into_response())
}

/// OpenAI's `chat.completion` for a job that succeeded with `result`.
pub(super) fn completion_json(job: &Job, answering: &Answering, result: &JobResult, input: i64, output: i64) -> Value {
    json!({
        "id": job.id,
        "object": "chat.completion",
        "created": job.created_at.timestamp(),
        "model": answering.model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": answering.answer(result), "refusal": null },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage_json(input, output),
        "system_fingerprint": null,
    })
}

fn usage_json(input: i64, output: i64) -> Value {
    json!({ "prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output })
}

/// The tokens of the job's paid calls (cached answers cost nothing and count nothing).
async fn usage(state: &AppState, job_id: Uuid) -> Result<(i64, i64), ApiError> {
    let steps = db::steps::list(&state.pool, job_id).await?;
    let paid = steps.iter().filter(|s| !s.cached);
    Ok(paid.fold((0i64, 0i64), |(i, o), s| {
        (i + i64::from(s.input_tokens.unwrap_or(0)), o + i64::from(s.output_tokens.unwrap_or(0)))
    }))
}

/// Why a job did not answer, as OpenAI's error: the provider's throttling as a 429,
/// a prompt too long for a model as a 400, anything else as a 502 from upstream.
pub(super) fn failure_parts(error: Option<&JobError>) -> (StatusCode, &'static str, String, String) {
    let Some(error) = error else {
        return (StatusCode::BAD_GATEWAY, "server_error", "the job ended without an answer".into(), "failed".into());
    };
    // The first model's reason says more than "too few models answered".
    let cause = error.failures.first().map(|f| format!(" ({}: {})", f.model, f.error.message)).unwrap_or_default();
    let message = format!("{}{cause}", error.message);
    let code = error.failures.first().map_or(error.code, |f| f.error.code);
    let (status, kind) = match code {
        ErrorCode::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "requests"),
        ErrorCode::ContextTooLong | ErrorCode::ContentFiltered => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        _ => (StatusCode::BAD_GATEWAY, "server_error"),
    };
    (status, kind, message, code.to_string())
}

fn failure(error: Option<&JobError>) -> Response {
    let (status, kind, message, code) = failure_parts(error);
    error::response(status, kind, &message, None, Some(&code))
}

/// The streamed answer: `data:` chunks as the answering step writes, the last with
/// `finish_reason`, then the usage if asked, then `[DONE]`.
fn chunks(state: Arc<AppState>, job: &Job, answering: Answering, include_usage: bool) -> BoxStream<'static, Bytes> {
    let chunker =
        Chunker { id: job.id.to_string(), created: job.created_at.timestamp(), model: answering.model.clone() };
    let first = chunker.delta(json!({ "role": "assistant", "content": "" }), None);
    let streaming = Streaming {
        items: follow(state.clone(), job.id),
        state,
        job_id: job.id,
        answering,
        chunker,
        sent: String::new(),
        pending: VecDeque::from([first]),
        done: false,
        include_usage,
    };
    futures::stream::unfold(streaming, |mut s| async move {
        loop {
            if let Some(frame) = s.pending.pop_front() {
                return Some((frame, s));
            }
            if s.done {
                return None;
            }
            match s.items.next().await {
                Some(item) => s.take(item).await,
                None => {
                    s.pending.push_back(data(&error_json(
                        "the server is shutting down; the job goes on (GET /v1/jobs/{id})",
                        "server_error",
                        "unavailable",
                    )));
                    s.done = true;
                }
            }
        }
    })
    .boxed()
}

struct Streaming {
    items: BoxStream<'static, StreamItem>,
    state: Arc<AppState>,
    job_id: Uuid,
    answering: Answering,
    chunker: Chunker,
    /// The answer's text sent so far.
    sent: String,
    pending: VecDeque<Bytes>,
    done: bool,
    include_usage: bool,
}

impl Streaming {
    async fn take(&mut self, item: StreamItem) {
        match item {
            StreamItem::Token(token) => {
                let token = &token.value;
                // A token after a gap (a lagging stream dropped some) waits for the
                // step's full text instead.
                if self.answering.is_writer(token.stage, &token.model) && token.index == self.sent.len() {
                    self.send(&token.delta.clone());
                }
            }
            StreamItem::Snapshot { stage, model, text } => {
                if self.answering.is_writer(stage, &model) {
                    self.catch_up(&text);
                }
            }
            StreamItem::Event(event) => match &event.value.data {
                EventData::StepCompleted(step) if self.answering.is_writer(step.stage, &step.model) => {
                    self.catch_up(&step.output.clone());
                }
                // A synthesis writer that failed before writing hands over to the next.
                EventData::StepFailed(step)
                    if step.stage == Stage::Synthesis
                        && self.answering.stage == Stage::Synthesis
                        && self.answering.writer.as_deref() == Some(step.model.as_str())
                        && self.sent.is_empty() =>
                {
                    self.answering.writer = None;
                }
                EventData::Ended(ended) => self.end(ended.clone()).await,
                _ => {}
            },
        }
    }

    fn send(&mut self, text: &str) {
        if !text.is_empty() {
            self.sent.push_str(text);
            self.pending.push_back(self.chunker.delta(json!({ "content": text }), None));
        }
    }

    /// Sends what `full` has beyond what was sent, if it continues it.
    fn catch_up(&mut self, full: &str) -> bool {
        match full.strip_prefix(self.sent.as_str()) {
            Some(rest) => {
                let rest = rest.to_owned();
                self.send(&rest);
                true
            }
            None => false,
        }
    }

    async fn end(&mut self, ended: EndedData) {
        self.done = true;
        let answer = match (&ended.result, ended.status) {
            (Some(result), JobStatus::Succeeded) => self.answering.answer(result),
            _ => {
                let (_, kind, message, code) = failure_parts(ended.error.as_ref());
                self.pending.push_back(data(&error_json(&message, kind, &code)));
                return;
            }
        };
        if !self.catch_up(&answer) {
            // The text streamed was a writer's that another replaced: say so rather
            // than leave the client with an answer that is not the job's.
            let message = "the streamed answer was superseded; read the job's result at GET /v1/jobs/{id}";
            self.pending.push_back(data(&error_json(message, "server_error", "superseded")));
            return;
        }
        self.pending.push_back(self.chunker.delta(json!({}), Some("stop")));
        if self.include_usage {
            match usage(&self.state, self.job_id).await {
                Ok((input, output)) => self.pending.push_back(self.chunker.usage(usage_json(input, output))),
                Err(err) => tracing::warn!(job_id = %self.job_id, error = %err, "cannot read the job's usage"),
            }
        }
        self.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}

/// Builds `chat.completion.chunk` frames.
struct Chunker {
    id: String,
    created: i64,
    model: String,
}

impl Chunker {
    fn chunk(&self, choices: Value, usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage,
        })
    }

    fn delta(&self, delta: Value, finish_reason: Option<&str>) -> Bytes {
        let choices = json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }]);
        data(&self.chunk(choices, Value::Null))
    }

    fn usage(&self, usage: Value) -> Bytes {
        data(&self.chunk(json!([]), usage))
    }
}

fn error_json(message: &str, kind: &str, code: &str) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })
}

/// One SSE `data:` frame (JSON from serde holds no newline).
fn data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

#[cfg(test)]
mod tests {
    use common::job::Answer;

    use super::*;

    fn answer(model: &str, output: &str) -> Answer {
        Answer { model: model.to_owned(), output: output.to_owned() }
    }

    fn spec(meta: bool, synthesis: bool) -> PatternSpec {
        PatternSpec {
            meta_template: meta.then(|| "m".to_owned()),
            synthesis_template: synthesis.then(|| "s".to_owned()),
            ..PatternSpec::default()
        }
    }

    #[test]
    fn the_answer_is_the_synthesis_else_the_first_models_last_word() {
        let models = ["a".to_owned(), "b".to_owned()];
        let result = JobResult {
            answers: vec![answer("b", "b1"), answer("a", "a1")],
            meta: Some(vec![answer("a", "a2")]),
            synthesis: Some(answer("b", "final")),
            output: Some("final".to_owned()),
            failures: vec![],
        };
        assert_eq!(Answering::of(&spec(true, true), &models, "ultra/critique").answer(&result), "final");
        let no_synthesis = JobResult { output: None, synthesis: None, ..result.clone() };
        assert_eq!(Answering::of(&spec(true, false), &models, "ultra/x").answer(&no_synthesis), "a2");
        let direct = JobResult { meta: None, ..no_synthesis };
        assert_eq!(Answering::of(&spec(false, false), &models, "a").answer(&direct), "a1");
    }

    #[test]
    fn a_synthesis_streams_from_its_first_writer_only() {
        let mut answering = Answering::of(&spec(false, true), &["a".to_owned()], "ultra/x");
        assert!(!answering.is_writer(Stage::Initial, "a"));
        assert!(answering.is_writer(Stage::Synthesis, "b"));
        assert!(!answering.is_writer(Stage::Synthesis, "a"));
    }
}
