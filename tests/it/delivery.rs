//! Delivery guarantees: the relay publishes what the fast path missed, and a
//! duplicate delivery of a finished job changes nothing and calls no provider.

use common::{
    db,
    job::{EventData, JobOptions, QueuedData},
    queue::{JobMessage, Publisher, Topology},
};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{Options, TestApp};

#[tokio::test]
async fn the_relay_publishes_a_job_whose_fast_path_publish_never_happened() {
    let app = TestApp::spawn().await;
    let (user_id, key) = app.user_with_key().await;

    // Exactly what an api that crashed between commit and publish leaves behind.
    let mut tx = app.pool.begin().await.expect("begin");
    let id = insert_queued_job(&mut tx, user_id, "hello", &["mock/alpha"]).await;
    db::outbox::insert(&mut *tx, id, 1, None).await.expect("outbox row");
    tx.commit().await.expect("commit");

    let job = app.wait_for_terminal(&key, id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.count("SELECT count(*) FROM outbox WHERE job_id = $1", id).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_duplicate_delivery_of_a_finished_job_changes_nothing() {
    // One delivery at a time: the duplicate is fully handled before the next job starts.
    let app = TestApp::spawn_with(Options { concurrency: 1, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await;
    let before = app.wait_for_terminal(&key, id).await;
    assert_eq!(before["status"], "succeeded");
    let calls = app.mock.calls();
    let events = app.count("SELECT count(*) FROM job_events WHERE job_id = $1", id).await;

    let publisher = Publisher::new(app.config.amqp_url.clone(), Topology::new(&app.config.queue_prefix));
    publisher.publish(&JobMessage::new(id, 1), None).await.expect("publish duplicate");
    publisher.publish(&JobMessage::new(id, 2), None).await.expect("publish duplicate");
    let marker = app.submit_ok(&key, &["mock/gamma"]).await;
    app.wait_for_terminal(&key, marker).await;
    publisher.close().await;

    assert_eq!(app.mock.calls(), calls + 1, "only the marker job may call a provider");
    let after = app.job(&key, id).await;
    assert_eq!(after, before, "a duplicate delivery must not change the job");
    assert_eq!(app.count("SELECT count(*) FROM job_events WHERE job_id = $1", id).await, events);
    assert_eq!(app.count("SELECT count(*) FROM job_steps WHERE job_id = $1", id).await, 2);
    app.stop().await;
}

#[tokio::test]
async fn jobs_accepted_while_rabbitmq_is_down_run_when_it_returns() {
    let app = TestApp::spawn_with(Options { proxied: true, ..Default::default() }).await;
    let broker = &app.proxies.as_ref().expect("proxied").rabbitmq;
    let (_, key) = app.user_with_key().await;
    let first = app.submit_ok(&key, &["mock/alpha"]).await;
    assert_eq!(app.wait_for_terminal(&key, first).await["status"], "succeeded");

    // The broker goes away: the worker loses its consumer, the api its publisher.
    broker.cut();
    let mut accepted = Vec::new();
    for _ in 0..3 {
        accepted.push(app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await);
    }
    for id in &accepted {
        assert_eq!(app.job(&key, *id).await["status"], "queued");
        assert_eq!(app.count("SELECT count(*) FROM outbox WHERE job_id = $1", *id).await, 1);
    }

    // It comes back: the relay publishes, the worker reconnects, nothing was lost.
    broker.restore();
    for id in &accepted {
        let job = app.wait_for_terminal(&key, *id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(app.count("SELECT count(*) FROM outbox WHERE job_id = $1", *id).await, 0);
    }
    app.stop().await;
}

/// A job as a worker that died mid-run leaves it: running, its lease expired, one of
/// its two steps finished.
async fn orphan(app: &TestApp, user_id: Uuid, lease_ends_in_secs: i64) -> Uuid {
    let mut tx = app.pool.begin().await.expect("begin");
    let id = insert_queued_job(&mut tx, user_id, "orphaned", &["mock/alpha", "mock/beta"]).await;
    sqlx::query(
        "UPDATE jobs SET status = 'running', attempts = 1, started_at = now(), lease_owner = $2,
                lease_until = now() + make_interval(secs => $3) WHERE id = $1",
    )
    .bind(id)
    .bind(Uuid::new_v4())
    .bind(lease_ends_in_secs as f64)
    .execute(&mut *tx)
    .await
    .expect("lease");
    let outcome = db::steps::StepOutcome::Succeeded {
        output: "[mock/alpha] done before the crash.",
        input_tokens: 1,
        output_tokens: 6,
        cost_micros: 0,
        cached: false,
    };
    let stage = common::domain::Stage::Initial;
    db::steps::finish(&mut *tx, id, stage, "mock/alpha", &outcome).await.expect("step");
    tx.commit().await.expect("commit");
    id
}

#[tokio::test]
async fn the_reaper_returns_a_dead_workers_job_which_resumes_without_repeating_steps() {
    let app = TestApp::spawn().await;
    let (user_id, key) = app.user_with_key().await;
    let id = orphan(&app, user_id, -1).await;

    let job = app.wait_for_terminal(&key, id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.mock.calls(), 1, "only the unfinished step was called");
    assert_eq!(job["steps"][0]["output"], "[mock/alpha] done before the crash.");
    let queued = app.count("SELECT count(*) FROM job_events WHERE job_id = $1 AND kind = 'queued'", id).await;
    assert_eq!(queued, 2, "the requeue is an event too");
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_of_a_job_leased_to_a_live_worker_is_dropped() {
    let app = TestApp::spawn_with(Options { concurrency: 1, ..Default::default() }).await;
    let (user_id, key) = app.user_with_key().await;
    let id = orphan(&app, user_id, 120).await; // the other worker is alive

    let publisher = Publisher::new(app.config.amqp_url.clone(), Topology::new(&app.config.queue_prefix));
    publisher.publish(&JobMessage::new(id, 2), None).await.expect("publish");
    let marker = app.submit_ok(&key, &["mock/gamma"]).await;
    app.wait_for_terminal(&key, marker).await;
    publisher.close().await;

    assert_eq!(app.mock.calls(), 1, "only the marker job called a provider");
    assert_eq!(app.job(&key, id).await["status"], "running", "left to its owner");
    app.stop().await;
}

#[tokio::test]
async fn a_dead_lettered_job_fails_with_the_reason_and_an_admin_can_replay_it() {
    use lapin::{options::BasicPublishOptions, BasicProperties};

    let app = TestApp::spawn().await;
    let (user_id, key) = app.user_with_key().await;
    let (admin_id, admin) = app.user_with_key().await;
    sqlx::query("UPDATE users SET role = 'admin' WHERE id = $1")
        .bind(admin_id)
        .execute(&app.pool)
        .await
        .expect("promote");
    let id = orphan(&app, user_id, 120).await;
    // Its budget reserved, as a submission does: each end of the job settles it.
    let mut conn = app.pool.acquire().await.expect("connection");
    let today = db::usage::today(&mut *conn).await.expect("today");
    db::usage::reserve(&mut conn, user_id, today, 100).await.expect("reserve");
    sqlx::query("UPDATE jobs SET reserved_day = $2, reserved_tokens = 100 WHERE id = $1")
        .bind(id)
        .bind(today)
        .execute(&mut *conn)
        .await
        .expect("reservation");
    drop(conn);

    // What the broker does with a message past its delivery limit.
    let topology = Topology::new(&app.config.queue_prefix);
    let connection = common::queue::connect(&app.config.amqp_url, "test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    // The worker may not have declared the queues yet: without them the message would vanish.
    topology.declare(&channel).await.expect("declare");
    channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.expect("confirms");
    let payload = serde_json::to_vec(&JobMessage::new(id, 11)).expect("json");
    channel
        .basic_publish(
            topology.dead_exchange.as_str().into(),
            common::queue::ANALYZE_ROUTING_KEY.into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
        .is_ack()
        .then_some(())
        .expect("the broker took the dead letter");
    let _ = connection.close(200, "done".into()).await;

    let failed = app.wait_for_terminal(&key, id).await;
    assert_eq!((failed["status"].as_str(), failed["error"]["code"].as_str()), (Some("failed"), Some("dead_lettered")));

    let listed: Value = app.get(&admin, "/v1/admin/dead-letters").await.json().await.expect("JSON");
    assert_eq!(listed["dead_letters"][0]["job_id"], json!(id));
    crate::support::problem(app.get(&key, "/v1/admin/dead-letters").await, reqwest::StatusCode::FORBIDDEN).await;

    let replay = |who: &str| {
        app.http.post(app.url(&format!("/v1/admin/dead-letters/{id}/replay"))).bearer_auth(who.to_owned()).send()
    };
    crate::support::problem(replay(&key).await.expect("replay"), reqwest::StatusCode::FORBIDDEN).await;
    let replayed = replay(&admin).await.expect("replay");
    assert_eq!(replayed.status(), reqwest::StatusCode::OK);
    let job = app.wait_for_terminal(&key, id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.mock.calls(), 1, "the step finished before the dead letter was not called again");
    // Both ends settled the budget, yet every step's tokens are booked once.
    let (used, reserved): (i64, i64) =
        sqlx::query_as("SELECT used, reserved FROM usage_daily WHERE user_id = $1 AND day = $2")
            .bind(user_id)
            .bind(today)
            .fetch_one(&app.pool)
            .await
            .expect("usage");
    let steps: i64 = sqlx::query_scalar(
        "SELECT sum(input_tokens + output_tokens)::bigint FROM job_steps WHERE job_id = $1 AND status = 'succeeded'",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .expect("steps");
    assert_eq!((used, reserved), (steps, 0));
    crate::support::problem(replay(&admin).await.expect("replay"), reqwest::StatusCode::NOT_FOUND).await;
    app.stop().await;
}

/// A queued job and its `queued` event, written the way the api writes them.
async fn insert_queued_job(tx: &mut sqlx::PgConnection, user_id: Uuid, prompt: &str, models: &[&str]) -> Uuid {
    let id = Uuid::now_v7();
    let models: Vec<String> = models.iter().map(|m| (*m).to_owned()).collect();
    let new_job = db::jobs::NewJob {
        id,
        user_id,
        pattern: "direct",
        prompt,
        models: &models,
        options: &JobOptions::default(),
        chat: None,
        batch_id: None,
        reserved_tokens: 0,
        reserved_day: None,
        timeout_secs: 600,
    };
    testkit::jobs::insert(&mut *tx, &new_job).await.expect("insert job");
    let queued = EventData::Queued(QueuedData::accepted("direct", &models));
    db::events::append(&mut *tx, id, &queued).await.expect("queued event");
    id
}
