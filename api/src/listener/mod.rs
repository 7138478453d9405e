//! The api's connections. Most are served by hyper (HTTP/1 or HTTP/2, [`http`]). A
//! connection whose first request opens a job's event stream is served by
//! [`event_stream`] instead: the request still goes through the whole app (its
//! middleware, authentication, limits, the same handler), but the response is written
//! straight to the socket. hyper keeps about 16 KB of read and write buffers, and
//! its HTTP version detection's state, for as long as a connection lives; an event
//! stream lives for minutes and writes a few hundred bytes at a time, so at ten
//! thousand streams those buffers would be most of the api's memory.
//!
//! What a connection may hold is bounded: a connection that has not sent a whole
//! request head within the header timeout is closed (a slowloris holds nothing for
//! long), one quiet for the idle timeout is closed, and at most `max_connections`
//! are open at once.

mod activity;
mod event_stream;
mod http;
mod prefixed;

use std::{io, sync::Arc, time::Duration};

use common::Config;
use poem::{
    endpoint::BoxEndpoint,
    http::uri::Scheme,
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::prefixed::Prefixed;

/// How long to pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Event streams being opened at once (authenticated, checked, replayed); the rest
/// wait their turn holding little more than their socket. Opening takes database
/// round trips, so when thousands of clients reconnect at once (an api restart) most
/// would only wait on the pool anyway, each holding a request's working memory —
/// and the heap, once grown to that peak, does not shrink.
const OPENINGS_AT_ONCE: usize = 32;

/// What a connection over the cap is told before it is closed (an HTTP/2 client
/// just sees the connection close).
const OVER_CAPACITY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\nconnection: close\r\n\r\n";

/// File descriptors the process needs besides its clients' connections (its pools,
/// the broker, Redis, logs), for the start-up warning.
const OTHER_FILES: u64 = 256;

/// The bounds on the api's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must be whole within this long (see [`http::builder`]).
    pub header_timeout: Duration,
    /// A connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; past it, new ones are refused at once.
    pub max_connections: usize,
    /// How long requests and streams may finish after shutdown.
    pub grace: Duration,
}

impl Limits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            header_timeout: config.header_timeout(),
            idle_timeout: config.idle_timeout(),
            max_connections: config.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            grace: config.shutdown_grace(),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting, lets requests
/// and streams finish for up to the grace period, and drops what is left.
///
/// Connections are accepted with `TCP_NODELAY` (an event stream writes small frames;
/// with Nagle's algorithm on, each frame after the first waits for the client's
/// delayed ACK of the one before — up to 40 ms on Linux). Each connection's first
/// request head is read by a task of its own, so a slow client holds up no one.
///
/// **Decision — over the cap, accept and close.** A connection past
/// `max_connections` is accepted, told `503` and closed at once, rather than left in
/// the kernel's backlog until a slot frees: a client (or its load balancer) learns at
/// once to go elsewhere or back off, instead of hanging in `connect` while the
/// backlog fills and then losing its SYNs; and a flood of new connections cannot
/// push out the ones that get a slot as soon as it frees.
pub async fn serve(
    listener: TcpListener,
    app: Arc<BoxEndpoint<'static>>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let local = LocalAddr(listener.local_addr()?.into());
    warn_if_files_are_short(limits.max_connections);
    let connections = Arc::new(Connections {
        app,
        local,
        openings: Semaphore::new(OPENINGS_AT_ONCE),
        http: http::builder(limits.header_timeout),
        header_timeout: limits.header_timeout,
        idle_timeout: limits.idle_timeout,
        shutdown: shutdown.clone(),
        grace_over: CancellationToken::new(),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tasks = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, say: the listener stays ready and
                    // would fail again at once, so pause instead of spinning.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: too many open");
            refuse(stream);
            continue;
        };
        // Best effort: a connection without it is slower, not wrong.
        let _ = stream.set_nodelay(true);
        tasks.spawn(connections.clone().serve(stream, RemoteAddr(peer.into()), slot));
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(limits.grace, tasks.wait()).await.is_err() {
        connections.grace_over.cancel();
        tasks.wait().await;
    }
    Ok(())
}

/// What every connection's task shares.
struct Connections {
    app: Arc<BoxEndpoint<'static>>,
    local: LocalAddr,
    openings: Semaphore,
    http: http::Builder,
    header_timeout: Duration,
    idle_timeout: Duration,
    shutdown: CancellationToken,
    /// Cancelled when the shutdown grace is over: every connection is dropped.
    grace_over: CancellationToken,
}

impl Connections {
    /// Serves one connection, holding its `slot` until it closes.
    async fn serve(self: Arc<Self>, stream: TcpStream, remote: RemoteAddr, slot: OwnedSemaphorePermit) {
        tokio::select! {
            () = self.sort(stream, remote) => {}
            () = self.grace_over.cancelled() => {}
        }
        drop(slot);
    }

    /// Reads the first request head: an event stream is served here, anything else
    /// by hyper, and a head that is not whole in time not at all.
    async fn sort(&self, stream: TcpStream, remote: RemoteAddr) {
        let head = tokio::select! {
            head = event_stream::read_head(&stream, self.header_timeout) => head,
            () = self.shutdown.cancelled() => return,
        };
        let Ok(head) = head else { return }; // closed before it asked anything
        if event_stream::is_unfinished(&head) {
            // A slowloris, or a client that has gone quiet: either way, close it.
            return;
        }
        let scheme = Scheme::HTTP;
        match event_stream::request(&head, &self.local, &remote, &scheme) {
            Some(request) => {
                drop(head);
                event_stream::serve(stream, request, &self.app, &self.openings, &self.shutdown).await;
            }
            None => {
                let socket = Prefixed::new(head, stream);
                let addresses = (self.local.clone(), remote);
                http::serve(socket, &self.http, &self.app, addresses, self.idle_timeout, &self.shutdown).await;
            }
        }
    }
}

/// Tells a connection over the cap so, and closes it. Best effort and without
/// waiting: the write goes straight to the (empty, non-blocking) socket; tokio's own
/// `try_write` would not try before the reactor has seen the socket writable.
fn refuse(stream: TcpStream) {
    if let Ok(mut stream) = stream.into_std() {
        let _ = std::io::Write::write_all(&mut stream, OVER_CAPACITY);
    }
}

/// Warns when the process may not open `max_connections` sockets: past its
/// file-descriptor limit, accepts fail (and pause) before the cap is reached.
fn warn_if_files_are_short(max_connections: usize) {
    let Some(limit) = open_files_limit() else { return };
    let wanted = max_connections as u64 + OTHER_FILES;
    if limit < wanted {
        tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below ULTRA_MAX_CONNECTIONS plus {OTHER_FILES}: raise `ulimit -n` (or \
             LimitNOFILE) or lower ULTRA_MAX_CONNECTIONS"
        );
    }
}

/// The soft limit on open files, from `/proc/self/limits` (Linux); `None` elsewhere
/// or when unlimited.
fn open_files_limit() -> Option<u64> {
    soft_open_files(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// The soft limit in the `Max open files` line of a `/proc/<pid>/limits` text.
fn soft_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63477                63477                processes \n\
                      Max open files            20000                524288               files     \n";
        assert_eq!(soft_open_files(limits), Some(20_000));
        assert_eq!(soft_open_files("Max open files            unlimited            unlimited            files"), None);
        assert_eq!(soft_open_files(""), None);
    }
}
