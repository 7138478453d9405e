//! The api's connections. Most are served by poem (hyper: HTTP/1 or HTTP/2). A
//! connection whose first request opens a job's event stream is served by
//! [`event_stream`] instead: the request still goes through the whole app (its
//! middleware, authentication, limits, the same handler), but the response is written
//! straight to the socket. hyper keeps about 16 KB of read and write buffers, and
//! its HTTP version detection's state, for as long as a connection lives; an event
//! stream lives for minutes and writes a few hundred bytes at a time, so at ten
//! thousand streams those buffers would be most of the api's memory.

mod event_stream;
mod prefixed;

use std::{io, sync::Arc, time::Duration};

use poem::{
    endpoint::BoxEndpoint,
    http::uri::Scheme,
    listener::{Acceptor, TcpAcceptor},
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    net::TcpStream,
    sync::{mpsc, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use self::prefixed::Prefixed;

/// How long a new connection may take to send its first request head before it is
/// handed to hyper as it is (hyper then waits for it, as it would have).
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(5);

/// How long to pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Event streams being opened at once (authenticated, checked, replayed); the rest
/// wait their turn holding little more than their socket. Opening takes database
/// round trips, so when thousands of clients reconnect at once (an api restart) most
/// would only wait on the pool anyway, each holding a request's working memory —
/// and the heap, once grown to that peak, does not shrink.
const OPENINGS_AT_ONCE: usize = 32;

type Connection = (Prefixed, LocalAddr, RemoteAddr, Scheme);

/// Accepts the api's connections with `TCP_NODELAY` set (an event stream writes small
/// frames; with Nagle's algorithm on, each frame after the first waits for the
/// client's delayed ACK of the one before — up to 40 ms on Linux). Each connection's
/// first request head is read by a task of its own, so a slow client holds up no one;
/// event streams are served there, everything else is handed to poem.
pub struct ApiAcceptor {
    listener: TcpAcceptor,
    app: Arc<BoxEndpoint<'static>>,
    handed_over: (mpsc::Sender<Connection>, mpsc::Receiver<Connection>),
    tasks: TaskTracker,
    shutdown: CancellationToken,
    openings: Arc<Semaphore>,
}

impl ApiAcceptor {
    /// `tasks` tracks the connections served here; `shutdown` ends their streams.
    pub fn new(
        listener: TcpAcceptor,
        app: Arc<BoxEndpoint<'static>>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let openings = Arc::new(Semaphore::new(OPENINGS_AT_ONCE));
        Self { listener, app, handed_over: mpsc::channel(64), tasks, shutdown, openings }
    }
}

impl Acceptor for ApiAcceptor {
    type Io = Prefixed;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.listener.local_addr()
    }

    async fn accept(&mut self) -> io::Result<Connection> {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (stream, local, remote, scheme) = match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            // Out of file descriptors, say: the listener stays ready and
                            // would fail again at once, so pause instead of spinning.
                            tracing::warn!(error = %err, "cannot accept a connection");
                            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                            continue;
                        }
                    };
                    // Best effort: a connection without it is slower, not wrong.
                    let _ = stream.set_nodelay(true);
                    let sorting = Sorting {
                        app: self.app.clone(),
                        hand_over: self.handed_over.0.clone(),
                        shutdown: self.shutdown.clone(),
                        openings: self.openings.clone(),
                    };
                    self.tasks.spawn(sorting.run(stream, local, remote, scheme));
                }
                Some(connection) = self.handed_over.1.recv() => return Ok(connection),
            }
        }
    }
}

struct Sorting {
    app: Arc<BoxEndpoint<'static>>,
    hand_over: mpsc::Sender<Connection>,
    shutdown: CancellationToken,
    openings: Arc<Semaphore>,
}

impl Sorting {
    async fn run(self, stream: TcpStream, local: LocalAddr, remote: RemoteAddr, scheme: Scheme) {
        let head = tokio::select! {
            head = event_stream::read_head(&stream, FIRST_REQUEST_WAIT) => head,
            () = self.shutdown.cancelled() => return,
        };
        let Ok(head) = head else { return }; // closed before it asked anything
        match event_stream::request(&head, &local, &remote, &scheme) {
            Some(request) => {
                drop(head);
                event_stream::serve(stream, request, &self.app, &self.openings, &self.shutdown).await;
            }
            None => {
                // poem stops taking connections at shutdown; this one then just closes.
                let _ = self.hand_over.send((Prefixed::new(head, stream), local, remote, scheme)).await;
            }
        }
    }
}
