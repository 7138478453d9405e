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
use poem::{error::ResponseError, http::StatusCode, IntoResponse, Response};
use poem_openapi::{
    param::Header,
    payload::Json,
    registry::{MetaHeader, MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::{ToJSON, Type},
    ApiResponse, OpenApi,
};
use uuid::Uuid;

use super::{
    error::{self, OpenAiProblems},
    models,
    objects::{
        AssistantMessage, AssistantRole, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, ChunkTag,
        CompletionTag, CompletionUsage, Delta, ErrorResponse, FinishReason,
    },
    request::{ChatRequest, Refusal},
};
use crate::{
    auth::{BearerAuth, Principal},
    body::JsonBody,
    error::ApiError,
    jobs::{self, Idempotency, Submission},
    problems::{ALWAYS, BODY, CONFLICT, NOT_FOUND, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
    stream::{frame::SseBody, job_items, stream_permit, StreamItem},
};

/// The header naming the job a completion is.
const JOB_ID_HEADER: &str = "x-ultra-job-id";

/// The refusals a completion request can meet before its job exists.
type Refusals = OpenAiProblems<{ ALWAYS | UNAUTHORIZED | BODY | NOT_FOUND | CONFLICT }>;

pub struct ChatApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/openai/v1", tag = "ApiTags::OpenAi")]
impl ChatApi {
    /// Create a chat completion (OpenAI)
    ///
    /// The request becomes a job like any other (listed in `GET /v1/jobs`, with its
    /// event stream); the answer is read from the job. A client that goes away does
    /// not cancel the job.
    #[oai(path = "/chat/completions", method = "post", operation_id = "openai_create_chat_completion")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: JsonBody<ChatRequest>,
        /// Makes a retried request safe: the same key with the same body answers from
        /// the original job; with another body, 400; while the first is in progress, 409.
        #[oai(name = "Idempotency-Key", validator(max_length = 255, pattern = "^[ \t]*[!-~]+[ \t]*$"))]
        idempotency_key: Header<Option<String>>,
        trace: poem::web::Data<&TraceContext>,
    ) -> ChatAnswer {
        let answer = complete(&self.state, &auth.0, body.0, idempotency_key.0, trace.0).await;
        ChatAnswer(match answer {
            Ok(response) => response,
            Err(Refusal::UnknownModel(model)) => models::not_found(&model),
            Err(Refusal::Invalid(err)) => err.as_response(),
        })
    }
}

/// A completion's answer, whichever way it went: the completion, its stream, or an
/// OpenAI error (a refusal, or the failure of the job).
pub struct ChatAnswer(Response);

impl IntoResponse for ChatAnswer {
    fn into_response(self) -> Response {
        self.0
    }
}

impl ApiResponse for ChatAnswer {
    fn meta() -> MetaResponses {
        let job_id = || MetaHeader {
            name: JOB_ID_HEADER.to_owned(),
            description: Some("The job the completion is (`GET /v1/jobs/{id}`).".to_owned()),
            required: true,
            deprecated: false,
            schema: Uuid::schema_ref(),
        };
        let error = |content| vec![MetaMediaType { content_type: "application/json", schema: content }];
        let mut responses = vec![MetaResponse {
            description: "The completion: whole, or with `stream: true` as server-sent events (`data:` frames \
                          each a `ChatCompletionChunk`, or an `OpenAiError` if the job fails, then `data: [DONE]`).",
            status: Some(200),
            status_range: None,
            content: vec![
                MetaMediaType { content_type: "application/json", schema: ChatCompletion::schema_ref() },
                MetaMediaType { content_type: "text/event-stream", schema: ChatCompletionChunk::schema_ref() },
            ],
            headers: vec![job_id()],
        }];
        responses.extend(Refusals::meta().responses);
        responses.push(MetaResponse {
            description: "The job ended without an answer: every model failed (the first one's reason is given).",
            status: Some(502),
            status_range: None,
            content: error(ErrorResponse::schema_ref()),
            headers: vec![job_id()],
        });
        MetaResponses { responses }
    }

    fn register(registry: &mut Registry) {
        ChatCompletion::register(registry);
        ChatCompletionChunk::register(registry);
        Refusals::register(registry);
    }
}

async fn complete(
    state: &Arc<AppState>,
    principal: &Principal,
    request: ChatRequest,
    idempotency_key: Option<String>,
    trace: &TraceContext,
) -> Result<Response, Refusal> {
    let key = idempotency_key.map(jobs::check_idempotency_key).transpose()?;
    // A stream slot is taken before anything is accepted (as on `/v1/analyze`).
    let permit = if request.wants_stream() { Some(stream_permit(state, principal)?) } else { None };
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
    let job = jobs::submit(state, submission).await?;
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
        let (status, body) = failure(ended.error.as_ref());
        return Ok(error::response(status, &body));
    };
    let usage = usage(state, job.id).await?;
    Ok(Json(completion(job, answering, result, usage)).into_response())
}

/// OpenAI's `chat.completion` for a job that succeeded with `result`.
pub(super) fn completion(
    job: &Job,
    answering: &Answering,
    result: &JobResult,
    usage: CompletionUsage,
) -> ChatCompletion {
    let message = AssistantMessage { role: AssistantRole::Assistant, content: answering.answer(result), refusal: None };
    ChatCompletion {
        id: job.id,
        object: CompletionTag::Completion,
        created: job.created_at.timestamp(),
        model: answering.model.clone(),
        choices: vec![Choice { index: 0, message, logprobs: None, finish_reason: FinishReason::Stop }],
        usage,
        system_fingerprint: None,
    }
}

/// The tokens of the job's paid calls (cached answers cost nothing and count nothing).
async fn usage(state: &AppState, job_id: Uuid) -> Result<CompletionUsage, ApiError> {
    let (input, output) = db::steps::paid_usage(&state.pool, job_id).await?;
    Ok(CompletionUsage::new(input, output))
}

/// Why a job did not answer, as OpenAI's error: the provider's throttling as a 429,
/// a prompt too long for a model as a 400, anything else as a 502 from upstream.
pub(super) fn failure(error: Option<&JobError>) -> (StatusCode, ErrorResponse) {
    let Some(error) = error else {
        let body = ErrorResponse::new("the job ended without an answer", "server_error", None, Some("failed"));
        return (StatusCode::BAD_GATEWAY, body);
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
    (status, ErrorResponse::new(message, kind, None, Some(&code.to_string())))
}

/// The streamed answer: `data:` chunks as the answering step writes, the last with
/// `finish_reason`, then the usage if asked, then `[DONE]`.
fn chunks(state: Arc<AppState>, job: &Job, answering: Answering, include_usage: bool) -> BoxStream<'static, Bytes> {
    let chunker = Chunker { id: job.id, created: job.created_at.timestamp(), model: answering.model.clone() };
    let first = chunker.delta(Delta { role: Some(AssistantRole::Assistant), content: Some(String::new()) }, None);
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
                    s.pending.push_back(data(&ErrorResponse::new(
                        "the server is shutting down; the job goes on (GET /v1/jobs/{id})",
                        "server_error",
                        None,
                        Some("unavailable"),
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
            let delta = Delta { role: None, content: Some(text.to_owned()) };
            self.pending.push_back(self.chunker.delta(delta, None));
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
                self.pending.push_back(data(&failure(ended.error.as_ref()).1));
                return;
            }
        };
        if !self.catch_up(&answer) {
            // The text streamed was a writer's that another replaced: say so rather
            // than leave the client with an answer that is not the job's.
            let message = "the streamed answer was superseded; read the job's result at GET /v1/jobs/{id}";
            self.pending.push_back(data(&ErrorResponse::new(message, "server_error", None, Some("superseded"))));
            return;
        }
        self.pending.push_back(self.chunker.delta(Delta::default(), Some(FinishReason::Stop)));
        if self.include_usage {
            match usage(&self.state, self.job_id).await {
                Ok(usage) => self.pending.push_back(self.chunker.usage(usage)),
                Err(err) => tracing::warn!(job_id = %self.job_id, error = %err, "cannot read the job's usage"),
            }
        }
        self.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}

/// Builds `chat.completion.chunk` frames.
struct Chunker {
    id: Uuid,
    created: i64,
    model: String,
}

impl Chunker {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<CompletionUsage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id,
            object: ChunkTag::Chunk,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage,
        }
    }

    fn delta(&self, delta: Delta, finish_reason: Option<FinishReason>) -> Bytes {
        let choice = ChunkChoice { index: 0, delta, logprobs: None, finish_reason };
        data(&self.chunk(vec![choice], None))
    }

    fn usage(&self, usage: CompletionUsage) -> Bytes {
        data(&self.chunk(Vec::new(), Some(usage)))
    }
}

/// One SSE `data:` frame (JSON holds no newline).
fn data(value: &impl ToJSON) -> Bytes {
    Bytes::from(format!("data: {}\n\n", value.to_json_string()))
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
