//! Connections served by hyper: every one but those the lean event-stream path takes.
//! poem's `Server` builds hyper's connections without a timer, so hyper's header
//! timeout never runs and nothing closes an idle connection; the api serves them
//! itself instead, with both.

use std::{convert::Infallible, io, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use poem::{
    endpoint::BoxEndpoint,
    http::{self, uri::Scheme},
    web::{LocalAddr, RemoteAddr},
    Endpoint, Request,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{activity::Watched, prefixed::Prefixed};

/// hyper's connection settings, shared by every connection.
pub type Builder = auto::Builder<TokioExecutor>;

/// HTTP/2 streams one connection may have open at once (hyper's default, which poem
/// lifts).
const H2_STREAMS_AT_ONCE: u32 = 200;
/// Streams a client may reset before its connection is closed (the "rapid reset"
/// defence; poem's setting).
const H2_PENDING_RESETS: usize = 20;
/// Largest HTTP/2 header list accepted (poem's setting).
const H2_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// An HTTP/1.1 request head must be whole within `header_timeout` of hyper starting
/// to wait for it — which, after a response on a kept-alive connection, is at once:
/// so the same deadline closes an idle keep-alive connection.
pub fn builder(header_timeout: Duration) -> Builder {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS_AT_ONCE)
        .max_pending_accept_reset_streams(H2_PENDING_RESETS)
        .max_header_list_size(H2_HEADER_LIST_BYTES);
    builder
}

/// Serves `socket` (its first bytes already read) with `app` until the client leaves,
/// the connection has been quiet for `idle_timeout`, or `shutdown`. The last two
/// close it gracefully — requests in flight finish; a connection still quiet for
/// another `idle_timeout` after that is dropped.
pub async fn serve(
    socket: Prefixed,
    builder: &Builder,
    app: &Arc<BoxEndpoint<'static>>,
    (local, remote): (LocalAddr, RemoteAddr),
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) {
    let (socket, activity) = Watched::new(socket);
    let app = app.clone();
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let (app, local, remote) = (app.clone(), local.clone(), remote.clone());
        async move {
            let response = app.get_response(Request::from((request, local, remote, Scheme::HTTP))).await;
            Ok::<_, Infallible>(http::Response::<BoxBody<Bytes, io::Error>>::from(response))
        }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), service);
    let mut connection = std::pin::pin!(connection);
    let opened = Instant::now();
    // When the connection was asked to close.
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = shutdown.cancelled(), if closing.is_none() => {
                closing = Some(Instant::now());
                connection.as_mut().graceful_shutdown();
            }
            () = activity.quiet_for(idle_timeout, closing.unwrap_or(opened)) => {
                if closing.is_some() {
                    return;
                }
                closing = Some(Instant::now());
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
