//! Server-Sent Events: the full story of a job, resumable with `Last-Event-ID`.

use common::{
    domain::JobStatus,
    job::{EventData, StartedData},
};
use reqwest::StatusCode;
use serde_json::Value;

use crate::{
    sse::{Frame, SseReader},
    support::{problem, Options, TestApp},
};

const STORY: [&str; 7] =
    ["queued", "started", "step.started", "step.started", "step.completed", "step.completed", "succeeded"];

fn kinds(events: &[crate::sse::SseEvent]) -> Vec<String> {
    events.iter().map(|e| e.event.clone().unwrap_or_default()).collect()
}

fn ids(events: &[crate::sse::SseEvent]) -> Vec<i64> {
    events.iter().map(|e| e.id.as_deref().and_then(|id| id.parse().ok()).expect("numeric id")).collect()
}

#[tokio::test]
async fn a_live_stream_tells_the_whole_story_and_ends() {
    let app = TestApp::spawn_with(Options { mock_latency_ms: 300, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await;

    // Opened while the job runs: replay and live events must join without a seam.
    let all = SseReader::new(app.events(&key, id, None).await).collect_events().await;
    let (tokens, events): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| e.event.as_deref() == Some("token"));
    let mut kinds = kinds(&events);
    kinds[2..6].sort(); // the two models run concurrently
    let mut story = STORY.map(str::to_owned).to_vec();
    story[2..6].sort();
    assert_eq!(kinds, story);
    assert_eq!(ids(&events), (1..=7).collect::<Vec<_>>());
    for event in &events {
        assert_eq!(event.data["job_id"], Value::String(id.to_string()));
        assert_eq!(event.data["seq"].as_i64(), event.id.as_deref().and_then(|i| i.parse().ok()));
    }
    let completed = events.iter().find(|e| e.event.as_deref() == Some("step.completed")).expect("a completed step");
    assert!(completed.data["data"]["output"].as_str().is_some_and(|o| o.starts_with("[mock/")));

    // Every model's answer also streamed in as tokens (live only: no `id:`), adding up
    // to exactly the text its `step.completed` carries.
    assert!(tokens.iter().all(|t| t.id.is_none()));
    for completed in events.iter().filter(|e| e.event.as_deref() == Some("step.completed")) {
        let model = completed.data["data"]["model"].as_str().expect("model");
        let streamed: String = tokens
            .iter()
            .filter(|t| t.data["model"] == model)
            .map(|t| t.data["delta"].as_str().expect("delta"))
            .collect();
        assert_eq!(streamed, completed.data["data"]["output"].as_str().expect("output"), "{model}");
    }
    app.stop().await;
}

#[tokio::test]
async fn last_event_id_resumes_with_nothing_missed_or_repeated() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await;
    app.wait_for_terminal(&key, id).await;

    let all = SseReader::new(app.events(&key, id, None).await).collect_events().await;
    assert_eq!(ids(&all), (1..=7).collect::<Vec<_>>());

    for resume_after in [0, 1, 3, 6] {
        let rest = SseReader::new(app.events(&key, id, Some(&resume_after.to_string())).await).collect_events().await;
        assert_eq!(ids(&rest), ((resume_after + 1)..=7).collect::<Vec<_>>(), "after {resume_after}");
        assert_eq!(kinds(&rest), kinds(&all[resume_after as usize..]));
    }
    // After the terminal event there is nothing more: 204, which stops an EventSource.
    assert_eq!(app.events(&key, id, Some("7")).await.status(), StatusCode::NO_CONTENT);
    problem(app.events(&key, id, Some("seven")).await, StatusCode::BAD_REQUEST).await;
    app.stop().await;
}

#[tokio::test]
async fn an_idle_stream_gets_heartbeats() {
    let app =
        TestApp::spawn_with(Options { mock_latency_ms: 4_000, sse_heartbeat_secs: 1, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    let mut reader = SseReader::new(app.events(&key, id, None).await);
    let mut heartbeats = 0;
    let mut kinds = Vec::new();
    while let Some(frame) = reader.next_frame().await {
        match frame {
            Frame::Comment => heartbeats += 1,
            Frame::Event(event) => kinds.push(event.event.unwrap_or_default()),
            Frame::Retry(_) => {}
        }
    }
    assert!(heartbeats >= 2, "expected heartbeats during a 4 s step, got {heartbeats}");
    assert_eq!(kinds.last().map(String::as_str), Some("succeeded"));
    app.stop().await;
}

/// A mock model that streams its answer 20 tokens a second.
const SLOW_MOCK: &str = r#"
[providers.mock]
kind = "mock"
mock_latency_ms = 0
mock_tokens_per_second = 20

[[models]]
id = "mock/slow"
provider = "mock"
upstream = "slow"
"#;

#[tokio::test]
async fn a_client_joining_mid_step_gets_a_snapshot_then_the_rest() {
    let app = TestApp::spawn_with(Options { config_toml: Some(SLOW_MOCK.to_owned()), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/slow"]).await;

    // Wait until part of the answer exists, so the joining client is owed a snapshot.
    let redis = common::redis::RedisHandle::new(&app.config.redis_url).expect("redis");
    let partial =
        common::events::partial_key(&app.config.redis_prefix, id, common::domain::Stage::Initial, "mock/slow");
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    while redis.get_string(&partial).await.ok().flatten().is_none_or(|t| t.len() < 10) {
        assert!(tokio::time::Instant::now() < deadline, "no tokens were streamed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let all = SseReader::new(app.events(&key, id, None).await).collect_events().await;
    let snapshot = all.iter().find(|e| e.event.as_deref() == Some("snapshot")).expect("a snapshot");
    let mut text = snapshot.data["text"].as_str().expect("text").to_owned();
    let after: Vec<_> = all.iter().skip_while(|e| e.event.as_deref() != Some("snapshot")).skip(1).collect();
    for token in after.iter().filter(|e| e.event.as_deref() == Some("token")) {
        assert_eq!(token.data["index"].as_u64(), Some(text.len() as u64), "tokens continue where the snapshot ends");
        text.push_str(token.data["delta"].as_str().expect("delta"));
    }
    let completed = all.iter().find(|e| e.event.as_deref() == Some("step.completed")).expect("completed");
    assert_eq!(text, completed.data["data"]["output"].as_str().expect("output"));
    assert_eq!(ids(&all.iter().filter(|e| e.id.is_some()).cloned().collect::<Vec<_>>()), (1..=5).collect::<Vec<_>>());
    app.stop().await;
}

#[tokio::test]
async fn streams_start_with_a_retry_hint_and_can_come_with_the_submission() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let response = app
        .http
        .post(app.url("/v1/analyze"))
        .bearer_auth(&key)
        .header("accept", "text/event-stream")
        .json(&serde_json::json!({ "prompt": "Why is the sky blue?", "models": ["mock/alpha"] }))
        .send()
        .await
        .expect("submit");
    assert!(response.headers()["location"].to_str().expect("ascii").starts_with("/v1/jobs/"));
    let mut reader = SseReader::new(response);
    assert!(matches!(reader.next_frame().await, Some(Frame::Retry(2_000))), "retry: comes first");
    let events = reader.collect_events().await;
    let lifecycle: Vec<_> = events.iter().filter(|e| e.id.is_some()).cloned().collect();
    assert_eq!(ids(&lifecycle), (1..=5).collect::<Vec<_>>());
    assert_eq!(lifecycle.last().and_then(|e| e.event.as_deref()), Some("succeeded"));
    app.stop().await;
}

#[tokio::test]
async fn a_browser_streams_with_a_ticket_and_is_told_to_stop_after_the_end() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let (_, other) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    app.wait_for_terminal(&key, id).await;

    let issue = |who: &str, job: uuid::Uuid| {
        app.http.post(app.url(&format!("/v1/jobs/{job}/stream-ticket"))).bearer_auth(who.to_owned()).send()
    };
    problem(issue(&other, id).await.expect("issue"), StatusCode::NOT_FOUND).await;
    let ticket: Value = issue(&key, id).await.expect("issue").json().await.expect("JSON");
    assert_eq!(ticket["expires_in"], 60);
    let url = app.url(ticket["url"].as_str().expect("url"));

    // No Authorization header, as an EventSource would.
    let events = SseReader::new(app.http.get(&url).send().await.expect("stream")).collect_events().await;
    let last = events.last().expect("events");
    assert_eq!(last.event.as_deref(), Some("succeeded"));
    // The EventSource reconnects to the same URL with the last id it saw: the story
    // is over, and 204 tells it to stop (a 401 would only be an error).
    let reconnect = app.http.get(&url).header("Last-Event-ID", last.id.clone().expect("id")).send().await;
    let reconnect = reconnect.expect("reconnect");
    assert_eq!(reconnect.status(), StatusCode::NO_CONTENT);
    assert!(reconnect.headers().get("content-length").is_none_or(|v| v == "0"));
    // One that dropped mid-story resumes with the same ticket, nothing missed or repeated.
    let resumed = SseReader::new(app.http.get(&url).header("Last-Event-ID", "2").send().await.expect("resume"));
    let resumed = resumed.collect_events().await;
    assert_eq!(ids(&resumed), (3..=5).collect::<Vec<_>>());
    // A forged ticket is refused.
    let forged = format!("{}x", ticket["url"].as_str().expect("url"));
    problem(app.http.get(app.url(&forged)).send().await.expect("stream"), StatusCode::UNAUTHORIZED).await;

    // A ticket is bound to its job.
    let second = app.submit_ok(&key, &["mock/alpha"]).await;
    let ticket: Value = issue(&key, id).await.expect("issue").json().await.expect("JSON");
    let elsewhere = app.url(&format!("/v1/jobs/{second}/events?ticket={}", ticket["ticket"].as_str().expect("ticket")));
    problem(app.http.get(&elsewhere).send().await.expect("stream"), StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

#[tokio::test]
async fn idle_streams_close_and_open_streams_are_limited_by_tier() {
    let mut options = Options { worker: false, ..Default::default() };
    options.sse_idle_secs = 1;
    let app = TestApp::spawn_with(options).await;
    let (_, key) = app.user_in_tier("free").await; // five streams at once
    let id = app.submit_ok(&key, &["mock/alpha"]).await; // no worker: it stays queued

    let started = std::time::Instant::now();
    let events = SseReader::new(app.events(&key, id, None).await).collect_events().await;
    assert_eq!(events.len(), 1, "the queued event, then silence");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "an idle stream is closed");

    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(app.events(&key, id, None).await);
    }
    assert!(open.iter().all(|r| r.status() == StatusCode::OK));
    let refused = problem(app.events(&key, id, None).await, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(refused["type"], "https://ultra.dev/problems/stream-limit");
    // Streams that end (here: idle for a second) give their slots back.
    drop(open);
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert_eq!(app.events(&key, id, None).await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_stream_on_one_api_process_sees_jobs_run_anywhere() {
    let mut app = TestApp::spawn().await;
    let second = app.spawn_second_api().await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await;
    let response =
        app.http.get(format!("{second}/v1/jobs/{id}/events")).bearer_auth(&key).send().await.expect("stream");
    let events = SseReader::new(response).collect_events().await;
    let lifecycle: Vec<_> = events.iter().filter(|e| e.id.is_some()).cloned().collect();
    assert_eq!(ids(&lifecycle), (1..=7).collect::<Vec<_>>());
    app.stop().await;
}

#[tokio::test]
async fn a_live_event_whose_predecessor_was_never_published_arrives_in_order() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await; // seq 1, and no worker to add more
    let mut reader = SseReader::new(app.events(&key, id, None).await);
    let first = loop {
        if let Some(Frame::Event(event)) = reader.next_frame().await {
            break event;
        }
    };
    assert_eq!(first.id.as_deref(), Some("1"));

    // Seq 2 is committed but its Redis publish is lost; seq 3 is committed and published.
    let redis = common::redis::RedisHandle::new(&app.config.redis_url).expect("redis");
    let publisher = common::events::EventPublisher::new(redis, app.config.redis_prefix.clone());
    let append = |data: EventData| {
        let pool = app.pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("begin");
            let event = common::db::events::append(&mut tx, id, &data).await.expect("append");
            tx.commit().await.expect("commit");
            event
        }
    };
    let _lost = append(EventData::Started(StartedData { attempt: 1 })).await;
    let third = append(EventData::ended(JobStatus::Failed, None, None)).await;
    publisher.publish(&third).await;

    // The stream sees 3 arrive after 1, reads the gap from PostgreSQL, and sends 2 then 3.
    let rest = reader.collect_events().await;
    let lifecycle: Vec<_> = rest.iter().filter(|e| e.id.is_some()).cloned().collect();
    assert_eq!(ids(&lifecycle), [2, 3]);
    assert_eq!(kinds(&lifecycle), ["started", "failed"]);
    app.stop().await;
}

#[tokio::test]
async fn a_stream_is_chunked_http_that_ends_with_the_job_even_when_asked_in_pieces() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    // A fresh connection whose first request opens the stream, its head sent in two
    // writes: the api's own event-stream path waits for the whole head.
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.expect("connect");
    socket.write_all(format!("GET /v1/jobs/{id}/events HTTP/1.1\r\n").as_bytes()).await.expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let rest = format!("Host: {address}\r\nAuthorization: Bearer {key}\r\n\r\n");
    socket.write_all(rest.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    tokio::time::timeout(crate::support::PATIENCE, socket.read_to_end(&mut received))
        .await
        .expect("the stream ends with the job, and the connection with it")
        .expect("read");
    let received = String::from_utf8(received).expect("UTF-8");
    let (head, body) = received.split_once("\r\n\r\n").expect("a head");
    let head = head.to_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    let fields = [
        "content-type: text/event-stream",
        "transfer-encoding: chunked",
        "connection: close",
        "date: ",
        "x-request-id: ",
    ];
    for field in fields {
        assert!(head.contains(field), "{field} missing from {head}");
    }
    assert!(body.contains("event: succeeded"), "{body}");
    assert!(body.ends_with("\r\n0\r\n\r\n"), "the last chunk ends the body: {body}");
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_gives_its_stream_back_at_once() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_in_tier("free").await; // five streams at once
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(app.events(&key, id, None).await);
    }
    problem(app.events(&key, id, None).await, StatusCode::TOO_MANY_REQUESTS).await;
    drop(open); // the streams are idle for minutes yet: only leaving frees them
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while app.events(&key, id, None).await.status() != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "a stream slot came back within a second of the clients leaving");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.stop().await;
}

/// Transactions committed in the test's database so far (PostgreSQL's own count).
async fn transactions(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&app.pool)
        .await
        .expect("pg_stat_database")
}

#[tokio::test]
async fn quiet_streams_on_one_job_cost_one_database_check_not_one_each() {
    // Without Redis, every stream used to poll PostgreSQL twice a second on its own.
    let options =
        Options { mock_latency_ms: 16_000, redis_url: Some("redis://127.0.0.1:1".into()), ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    let mut readers = Vec::new();
    for _ in 0..40 {
        readers.push(SseReader::new(app.events(&key, id, None).await));
    }
    let streams: Vec<_> = readers.into_iter().map(|r| tokio::spawn(r.collect_events())).collect();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await; // replays done
    let before = transactions(&app).await;
    tokio::time::sleep(std::time::Duration::from_secs(10)).await; // the step is still running
    let spent = transactions(&app).await - before;
    // 40 streams polling on their own: ~800 queries. One check per job: ~20, with the
    // worker's own polling and the opening requests whose statistics PostgreSQL
    // reports late (up to 10 s) on top.
    assert!(spent < 350, "{spent} transactions in 10 s for 40 quiet streams on one job");
    // And every stream still gets the whole story, from the database.
    for stream in streams {
        let events = stream.await.expect("stream task");
        let lifecycle: Vec<_> = events.iter().filter(|e| e.id.is_some()).cloned().collect();
        assert_eq!(ids(&lifecycle), (1..=5).collect::<Vec<_>>());
        assert_eq!(lifecycle.last().and_then(|e| e.event.as_deref()), Some("succeeded"));
    }
    app.stop().await;
}
