//! The `sse` benchmark's subscriber: a minimal HTTP/1.1 event-stream reader on a raw
//! connection. Ten thousand of them share two cores with the api they measure, so a
//! general HTTP client's per-frame work would be measured as delivery latency. It
//! reads just what the api answers a stream request with: a head, then SSE frames in
//! a chunked (or connection-delimited) body.

use std::time::Duration;

use anyhow::{bail, Context};
use common::sse::Decoder;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A read that waits longer than this fails the stream (heartbeats come sooner).
const IDLE: Duration = Duration::from_secs(60);

pub struct EventStreamReader {
    socket: TcpStream,
    /// Bytes read and not yet decoded.
    raw: Vec<u8>,
    /// The decoded body, split into events by the parser the worker uses.
    events: Decoder,
    chunked: bool,
    /// The body has ended (last chunk, or the connection closed).
    ended: bool,
}

impl EventStreamReader {
    /// Opens `GET path` on `address` with a bearer `key`; fails unless it answers 200.
    pub async fn open(address: &str, path: &str, key: &str) -> anyhow::Result<Self> {
        let mut socket = TcpStream::connect(address).await.with_context(|| format!("connect to {address}"))?;
        socket.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
        );
        socket.write_all(request.as_bytes()).await?;
        let mut reader =
            Self { socket, raw: Vec::with_capacity(4096), events: Decoder::new(), chunked: false, ended: false };
        let head_end = loop {
            if let Some(at) = find(&reader.raw, b"\r\n\r\n") {
                break at;
            }
            if !reader.read().await? {
                bail!("the connection closed before the response head");
            }
        };
        let head = String::from_utf8_lossy(&reader.raw[..head_end]).to_ascii_lowercase();
        let status = head.lines().next().unwrap_or_default().to_owned();
        if !status.starts_with("http/1.1 200") {
            bail!("the stream was refused: {status}");
        }
        reader.chunked = head.lines().any(|line| line.replace(' ', "") == "transfer-encoding:chunked");
        reader.raw.drain(..head_end + 4);
        Ok(reader)
    }

    /// The `data` of the next event that has one, or `None` once the stream has ended.
    pub async fn next_data(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(data) = self.take_event() {
                return Ok(Some(data));
            }
            if self.ended {
                return Ok(None);
            }
            if self.decode()? || self.ended {
                continue;
            }
            if !self.read().await? {
                if self.chunked {
                    bail!("the stream was cut before its last chunk");
                }
                self.ended = true;
            }
        }
    }

    /// The data of the first whole event decoded so far that has any (comments and
    /// `retry:` hints are passed over).
    fn take_event(&mut self) -> Option<String> {
        std::iter::from_fn(|| self.events.next_event()).find(|event| !event.data.is_empty()).map(|event| event.data)
    }

    /// Moves whole chunks (or, without chunking, everything) from `raw` to the
    /// parser; whether it moved any bytes.
    fn decode(&mut self) -> anyhow::Result<bool> {
        if !self.chunked {
            let moved = !self.raw.is_empty();
            self.events.push(&self.raw);
            self.raw.clear();
            return Ok(moved);
        }
        let mut moved = false;
        while let Some(line_end) = find(&self.raw, b"\r\n") {
            let line = std::str::from_utf8(&self.raw[..line_end]).context("chunk size")?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16)
                .with_context(|| format!("chunk size {line:?}"))?;
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return Ok(moved);
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return Ok(moved); // the rest of this chunk is still on its way
            }
            self.events.push(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
            moved = true;
        }
        Ok(moved)
    }

    /// Reads more; false when the connection has closed.
    async fn read(&mut self) -> anyhow::Result<bool> {
        let read = tokio::time::timeout(IDLE, self.socket.read_buf(&mut self.raw)).await;
        Ok(read.context("no byte arrived for a minute")?? > 0)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `response` in pieces of `piece` bytes, then closes.
    async fn serve(response: &'static [u8], piece: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            for part in response.chunks(piece) {
                socket.write_all(part).await.expect("write");
                socket.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        address
    }

    async fn all_data(address: &str) -> anyhow::Result<Vec<String>> {
        let mut reader = EventStreamReader::open(address, "/", "k").await?;
        let mut data = Vec::new();
        while let Some(d) = reader.next_data().await? {
            data.push(d);
        }
        Ok(data)
    }

    #[tokio::test]
    async fn reads_events_across_chunks_and_reads() {
        let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            b\r\nretry: 10\n\n\r\n3\r\n:\n\n\r\n10\r\nid: 1\ndata: {\"a\"\r\n4\r\n:1}\n\r\n\
            1\r\n\n\r\n0\r\n\r\n";
        for piece in [1, 7, 4096] {
            assert_eq!(
                all_data(&serve(response, piece).await).await.expect("events"),
                ["{\"a\":1}"],
                "pieces of {piece}"
            );
        }
    }

    #[tokio::test]
    async fn a_refusal_or_a_cut_stream_is_an_error() {
        let refused = serve(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n", 4096).await;
        assert!(all_data(&refused).await.expect_err("refused").to_string().contains("429"));
        let cut = serve(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n", 4096).await;
        assert!(all_data(&cut).await.is_err());
    }
}
