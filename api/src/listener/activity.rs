//! When a connection last moved a byte, so that one gone quiet can be closed. hyper
//! has no idle timeout of its own for HTTP/2 (an HTTP/1.1 connection waiting for its
//! next request is closed by the header timeout instead).

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// The last read or write, in milliseconds since the connection opened.
pub struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Completes once nothing has been read or written for `limit`, counting from
    /// `since` at the earliest.
    pub async fn quiet_for(&self, limit: Duration, since: Instant) {
        loop {
            let last = self.last().max(since);
            tokio::time::sleep_until(last + limit).await;
            if self.last().max(since) == last {
                return;
            }
        }
    }
}

/// A connection that records its [`Activity`].
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub fn new(inner: T) -> (Self, Arc<Activity>) {
        let activity = Arc::new(Activity { opened: Instant::now(), last_ms: AtomicU64::new(0) });
        (Self { inner, activity: activity.clone() }, activity)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn quiet_means_no_byte_either_way_for_the_whole_limit() {
        let (near, mut far) = tokio::io::duplex(64);
        let (mut watched, activity) = Watched::new(near);
        let limit = Duration::from_millis(300);
        let started = Instant::now();
        let quiet = tokio::spawn(async move {
            activity.quiet_for(limit, started).await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        watched.write_all(b"x").await.expect("write");
        tokio::time::sleep(Duration::from_millis(200)).await;
        far.write_all(b"y").await.expect("write");
        let mut byte = [0u8; 1];
        watched.read_exact(&mut byte).await.expect("read");
        let quiet_after = quiet.await.expect("the watcher") - started;
        // The last byte moved at 400 ms or later: quiet no sooner than 300 ms after it.
        assert!(quiet_after >= Duration::from_millis(650), "{quiet_after:?}");
        assert!(quiet_after < Duration::from_secs(5), "{quiet_after:?}");
    }
}
