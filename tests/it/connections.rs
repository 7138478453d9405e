//! What a connection may hold: one that does not send a whole request head in time is
//! closed (a slowloris), so is a kept-alive one left idle, and past the cap new
//! connections are refused at once — while everyone else is served.

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::support::{Options, TestApp};

/// The header timeout these tests run with (the default is 5 s).
const HEADER_TIMEOUT_SECS: u64 = 1;
/// How long past its deadline a connection may take to be seen closed.
const SLACK: Duration = Duration::from_secs(3);
/// Half-open connections wanted; fewer if the open-file limit is low.
const HALF_OPEN: usize = 2_000;
/// Connections opened at once (the listen backlog is 1,024).
const CONNECT_BATCH: usize = 250;

fn header_timeout() -> Duration {
    Duration::from_secs(HEADER_TIMEOUT_SECS)
}

fn address(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Whether the server closes `socket` by `deadline`: reading ends (end of file or a
/// reset). Whatever it says first is read past.
async fn closed_by(mut socket: TcpStream, deadline: Instant) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Half-open connections to open: both ends live in this process, beside the other
/// tests' connections, so the open-file limit must hold twice as many and room to
/// spare. It is 20,000 on the development machine: all 2,000 are opened there.
fn half_open_connections() -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
        line.trim_start_matches("Max open files").split_whitespace().next()?.parse::<usize>().ok()
    });
    let Some(limit) = limit else { return HALF_OPEN };
    let affordable = limit.saturating_sub(4_000) / 2;
    if affordable < HALF_OPEN {
        eprintln!("open-file limit {limit}: opening {} half-open connections, not {HALF_OPEN}", affordable.max(100));
    }
    affordable.clamp(100, HALF_OPEN)
}

/// Connects and sends half a request head: every other one would be an event stream
/// (the api's own path), the rest anything else (hyper's).
async fn half_open(address: &str, n: usize) -> TcpStream {
    let mut socket = TcpStream::connect(address).await.expect("connect");
    let half = if n.is_multiple_of(2) {
        format!("GET /v1/jobs/{}/events HTTP/1.1\r\nHost: ultra\r\nAccept: text/ev", uuid::Uuid::now_v7())
    } else {
        "POST /v1/analyze HTTP/1.1\r\nHost: ultra\r\nContent-Type: appl".to_owned()
    };
    socket.write_all(half.as_bytes()).await.expect("write half a head");
    socket
}

/// Reads one response off `socket` (with a length, or chunked); returns its head,
/// lower-cased.
async fn read_response(socket: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let body = &received[end + 4..];
            let length = head.lines().find_map(|line| line.strip_prefix("content-length:"));
            let whole = match length.and_then(|value| value.trim().parse::<usize>().ok()) {
                Some(length) => body.len() >= length,
                None => body.ends_with(b"0\r\n\r\n"),
            };
            if whole {
                return head;
            }
        }
        let read = tokio::time::timeout(SLACK, socket.read(&mut buffer)).await.expect("a response").expect("read");
        assert!(read > 0, "closed mid-response: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buffer[..read]);
    }
}

#[tokio::test]
async fn half_sent_heads_are_closed_after_the_header_timeout_while_others_are_served() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        header_timeout_secs: Some(HEADER_TIMEOUT_SECS),
        ..Default::default()
    })
    .await;
    let (_, key) = app.user_with_key().await;
    let address = address(&app);
    let wanted = half_open_connections();
    let mut sockets = Vec::with_capacity(wanted);
    let numbers: Vec<usize> = (0..wanted).collect();
    for batch in numbers.chunks(CONNECT_BATCH) {
        sockets.extend(join_all(batch.iter().map(|n| half_open(&address, *n))).await);
    }
    let all_sent = Instant::now();

    // While they hang, everyone else is served.
    let live = app.http.get(app.url("/health/live")).send().await.expect("live");
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(app.get(&key, "/v1/models").await.status(), StatusCode::OK);

    // Then the api closes every one of them.
    let deadline = all_sent + header_timeout() + SLACK;
    let closed = join_all(sockets.into_iter().map(|socket| closed_by(socket, deadline))).await;
    let still_open = closed.iter().filter(|closed| !**closed).count();
    assert_eq!(still_open, 0, "{still_open} of {wanted} half-open connections outlived the header timeout");

    // And it still serves, with every slot free again.
    assert_eq!(app.get(&key, "/v1/models").await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_once_idle_for_the_header_timeout() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        header_timeout_secs: Some(HEADER_TIMEOUT_SECS),
        ..Default::default()
    })
    .await;
    let mut socket = TcpStream::connect(address(&app)).await.expect("connect");
    // Two requests on one connection: it is kept alive between them...
    for _ in 0..2 {
        socket.write_all(b"GET /health/live HTTP/1.1\r\nHost: ultra\r\n\r\n").await.expect("write");
        let head = read_response(&mut socket).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    // ...but not for long once idle.
    let answered = Instant::now();
    assert!(closed_by(socket, answered + header_timeout() + SLACK).await, "an idle connection stayed open");
    assert!(answered.elapsed() >= header_timeout() - Duration::from_millis(100), "closed before its time");
    app.stop().await;
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_refused_at_once_until_slots_free() {
    const CAP: usize = 20;
    let app = TestApp::spawn_with(Options {
        worker: false,
        header_timeout_secs: Some(2),
        max_connections: Some(CAP),
        ..Default::default()
    })
    .await;
    let address = address(&app);
    // Every slot taken by a silent connection (a few more than the cap: one slot may
    // still be held by the client that saw the app start, until it is closed).
    let mut silent = Vec::new();
    for _ in 0..CAP + 5 {
        silent.push(TcpStream::connect(&address).await.expect("connect"));
    }
    let filled = Instant::now();

    // One more is told 503 and closed at once — long before any header timeout.
    let mut refused = TcpStream::connect(&address).await.expect("the kernel still accepts");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), refused.read_to_end(&mut answer))
        .await
        .expect("closed at once")
        .expect("read the refusal");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");

    // The silent ones are closed at their header timeout, and their slots serve again.
    let closed = join_all(silent.into_iter().map(|socket| closed_by(socket, filled + Duration::from_secs(2) + SLACK)));
    assert!(closed.await.into_iter().all(|closed| closed), "a silent connection outlived the header timeout");
    let fresh = reqwest::Client::new();
    let live = fresh.get(app.url("/health/live")).send().await.expect("served again");
    assert_eq!(live.status(), StatusCode::OK);
    app.stop().await;
}
