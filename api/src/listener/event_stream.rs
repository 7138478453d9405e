//! The lean HTTP/1.1 path for event streams: a `GET /v1/jobs/{id}/events` that is a
//! connection's first request is answered here. The response's head is written as
//! it comes from the app; an event stream's body follows in chunked encoding, each
//! wake-up's frames in one write, until the stream ends or the client goes away. The
//! connection is then closed (`Connection: close`), as `EventSource` expects of a
//! stream. Anything this path does not take is served by hyper.

use std::{
    io,
    time::{Duration, SystemTime},
};

use bytes::{Buf, Bytes};
use futures::{FutureExt, StreamExt};
use poem::{
    endpoint::BoxEndpoint,
    http::{self, header, uri::Scheme, Method, Version},
    web::{LocalAddr, RemoteAddr},
    Body, Endpoint, Request, RequestParts, Response,
};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;

/// A request head longer than this is left to hyper.
const HEAD_LIMIT: usize = 8 * 1024;
/// A request head with more fields than this is left to hyper.
const MAX_HEADERS: usize = 48;
/// Frames ready at once are written together, up to about this many bytes.
const WRITE_BATCH: usize = 16 * 1024;
/// A write that cannot finish in this long (the client has stopped reading) ends
/// the stream.
const WRITE_STALL_LIMIT: Duration = Duration::from_secs(30);
/// Headers of the connection (hop-by-hop), which this path sets itself.
const CONNECTION_HEADERS: [header::HeaderName; 4] =
    [header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH, header::UPGRADE];

/// Reads a connection's first bytes: until they hold a whole request head (or
/// something that cannot become one), the limit is reached, or `wait` has passed.
/// Fails only if the client closed the connection without a byte.
pub async fn read_head(stream: &TcpStream, wait: Duration) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while head.len() < HEAD_LIMIT && is_partial(&head) {
        if tokio::time::timeout_at(deadline, stream.readable()).await.is_err() {
            break;
        }
        head.reserve(HEAD_LIMIT - head.len());
        match stream.try_read_buf(&mut head) {
            Ok(0) if head.is_empty() => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if head.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(head)
}

/// Whether more bytes could complete `head` (httparse's view, bare `\n` line ends
/// included; a head that is already wrong needs no more).
fn is_partial(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    matches!(httparse::Request::new(&mut headers).parse(head), Ok(httparse::Status::Partial))
}

/// Whether `head`, as [`read_head`] left it, still lacks bytes that did not come in
/// time: under the size limit and not yet a whole head (nor a wrong one). A longer
/// head goes to hyper, whose header timeout then applies.
pub fn is_unfinished(head: &[u8]) -> bool {
    head.len() < HEAD_LIMIT && is_partial(head)
}

/// The request, if `head` is exactly one complete `GET` of a job's event stream over
/// HTTP/1.1 without a body; `None` leaves the connection to hyper.
pub fn request(head: &[u8], local: &LocalAddr, remote: &RemoteAddr, scheme: &Scheme) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(length) = parsed.parse(head).ok()? else { return None };
    let path = parsed.path?;
    if length != head.len() || parsed.method != Some("GET") || parsed.version != Some(1) || !is_event_stream(path) {
        return None;
    }
    let mut builder = http::Request::builder().method(Method::GET).uri(path).version(Version::HTTP_11);
    for field in parsed.headers.iter() {
        let name = header::HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        // A body, an upgrade or an expectation: hyper knows what to do with those.
        if [header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::UPGRADE, header::EXPECT].contains(&name) {
            return None;
        }
        builder = builder.header(name, header::HeaderValue::from_bytes(field.value).ok()?);
    }
    let (parts, ()) = builder.body(()).ok()?.into_parts();
    let parts = RequestParts::from((parts, local.clone(), remote.clone(), scheme.clone()));
    Some(Request::from_parts(parts, Body::empty()))
}

/// `/v1/jobs/{id}/events` with the job's id as a hyphenated UUID, with or without a
/// query, without a fragment. Anything else — another route, another spelling of an
/// id — is hyper's, so this path never serves what the router would not.
fn is_event_stream(target: &str) -> bool {
    if target.contains('#') {
        return false;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    path.strip_prefix("/v1/jobs/").and_then(|rest| rest.strip_suffix("/events")).is_some_and(is_hyphenated_uuid)
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, in hex digits.
fn is_hyphenated_uuid(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(at, b)| match at {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Answers `request` on `socket` through `app`, once one of the `openings` is free,
/// then closes the connection. A client that leaves (or speaks again) while waiting
/// for its turn, or a shutdown, ends it without running the app.
pub async fn serve(
    mut socket: TcpStream,
    request: Request,
    app: &BoxEndpoint<'static>,
    openings: &Semaphore,
    shutdown: &CancellationToken,
) {
    let mut probe = [0u8; 1];
    let response = {
        let opening = tokio::select! {
            opening = openings.acquire() => opening,
            _ = socket.peek(&mut probe) => return,
            () = shutdown.cancelled() => return,
        };
        let Ok(_opening) = opening else { return };
        // Boxed so that the app's (large) future is not part of this task for the
        // stream's whole life.
        Box::pin(app.get_response(request)).await
    };
    let _ = respond(&mut socket, response).await;
    let _ = socket.shutdown().await;
}

async fn respond(socket: &mut TcpStream, response: Response) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let is_stream = parts.status == http::StatusCode::OK
        && parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut head =
        format!("HTTP/1.1 {} {}\r\n", parts.status.as_str(), parts.status.canonical_reason().unwrap_or_default())
            .into_bytes();
    for (name, value) in &parts.headers {
        if !CONNECTION_HEADERS.contains(name) {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    drop(parts); // the stream may live for hours: keep nothing it does not need
    head.extend_from_slice(format!("date: {}\r\n", httpdate::fmt_http_date(SystemTime::now())).as_bytes());
    if !is_stream {
        // An error or other short answer: whole, with its length.
        let body = body.into_vec().await.unwrap_or_default();
        // A 204 has no body and no length (RFC 9110 §8.6).
        if status != http::StatusCode::NO_CONTENT {
            head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        head.extend_from_slice(b"connection: close\r\n\r\n");
        head.extend_from_slice(&body);
        return socket.write_all(&head).await;
    }
    head.extend_from_slice(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    socket.write_all(&head).await?;
    drop(head);

    let (mut reader, mut writer) = socket.split();
    let mut frames = body.into_bytes_stream().boxed();
    let mut probe = [0u8; 1];
    // The frames ready at one wake-up; they go out as one chunk, in one write.
    let mut ready: Vec<Bytes> = Vec::new();
    loop {
        let mut next = tokio::select! {
            next = frames.next() => next,
            // The client has nothing to say on a stream: this is it leaving (or
            // misbehaving). Either way the stream ends now and frees what it holds.
            _ = reader.read(&mut probe) => return Ok(()),
        };
        let mut size = 0;
        let ended = loop {
            match next {
                Some(Ok(frame)) => {
                    size += frame.len();
                    ready.push(frame);
                }
                Some(Err(e)) => return Err(e), // no last chunk: the client sees the stream broken
                None => break true,
            }
            if size >= WRITE_BATCH {
                break false;
            }
            match frames.next().now_or_never() {
                Some(more) => next = more,
                None => break false,
            }
        };
        // A client that stops reading would hold its stream (and its slot) forever.
        match tokio::time::timeout(WRITE_STALL_LIMIT, write_chunk(&mut writer, &ready, size, ended)).await {
            Ok(written) => written?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        }
        ready.clear();
        if ended {
            return Ok(());
        }
    }
}

/// Writes `frames` (`size` bytes in all) as one chunk of chunked transfer encoding,
/// followed by the last chunk if the body has `ended`. One frame (the usual case)
/// goes out without being copied.
async fn write_chunk(
    writer: &mut (impl AsyncWrite + Unpin),
    frames: &[Bytes],
    size: usize,
    ended: bool,
) -> io::Result<()> {
    let tail: &[u8] = match (size, ended) {
        (0, true) => return writer.write_all(b"0\r\n\r\n").await,
        (0, false) => return Ok(()), // an empty chunk would end the body
        (_, true) => b"\r\n0\r\n\r\n",
        (_, false) => b"\r\n",
    };
    let mut head = [0u8; 20]; // the size line, without an allocation
    let free = {
        let mut cursor = &mut head[..];
        std::io::Write::write_fmt(&mut cursor, format_args!("{size:x}\r\n"))?;
        cursor.len()
    };
    let head = &head[..head.len() - free];
    if let [frame] = frames {
        let mut chunk = Buf::chain(Buf::chain(head, &frame[..]), tail);
        return writer.write_all_buf(&mut chunk).await;
    }
    let mut chunk = Vec::with_capacity(head.len() + size + tail.len());
    chunk.extend_from_slice(head);
    frames.iter().for_each(|frame| chunk.extend_from_slice(frame));
    chunk.extend_from_slice(tail);
    writer.write_all(&chunk).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses() -> (LocalAddr, RemoteAddr, Scheme) {
        let address: std::net::SocketAddr = "127.0.0.1:1".parse().expect("address");
        (LocalAddr(address.into()), RemoteAddr(address.into()), Scheme::HTTP)
    }

    fn taken(head: &str) -> bool {
        let (local, remote, scheme) = addresses();
        request(head.as_bytes(), &local, &remote, &scheme).is_some()
    }

    #[test]
    fn takes_only_a_whole_bodiless_event_stream_get() {
        let id = "0192f7a0-0000-7000-8000-000000000000";
        assert!(taken(&format!("GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: a\r\n\r\n")));
        assert!(taken(&format!("GET /v1/jobs/{id}/events?ticket=t HTTP/1.1\r\nHost: a\r\n\r\n")));
        assert!(!taken(&format!("GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: a\r\n")), "incomplete");
        assert!(!taken(&format!("GET /v1/jobs/{id}/events HTTP/1.0\r\nHost: a\r\n\r\n")));
        assert!(!taken(&format!("POST /v1/jobs/{id}/events HTTP/1.1\r\nHost: a\r\n\r\n")));
        assert!(!taken(&format!("GET /v1/jobs/{id} HTTP/1.1\r\nHost: a\r\n\r\n")));
        assert!(!taken("GET /v1/jobs//events HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!taken(&format!("GET /v1/jobs/{id}/events HTTP/1.1\r\nContent-Length: 0\r\n\r\n")));
        assert!(!taken(&format!("GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n")));
        assert!(!taken("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }

    #[test]
    fn only_the_event_stream_route_with_a_job_id_is_taken() {
        let id = "0192f7a0-0000-7000-8000-00000000abcd";
        let get = |target: &str| taken(&format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(get(&format!("/v1/jobs/{id}/events")));
        assert!(get(&format!("/v1/jobs/{}/events", id.to_uppercase())));
        assert!(get(&format!("/v1/jobs/{id}/events?ticket=t&x=1")));
        for target in [
            format!("/v1/jobs/{id}/events#fragment"),
            format!("/v1/jobs/{id}/events?ticket=t#fragment"),
            format!("/v1/jobs/{id}#/events"),
            format!("/v1/jobs/{id}/events/"),
            format!("/v1/jobs/{id}/eventsx"),
            format!("/v1/jobs/{id}/cancel/events"),
            format!("/v1/jobs/{id}"),
            format!("/v1/jobs/{}/events", id.replace('-', "")),
            format!("/v1/jobs/{{{id}}}/events"),
            format!("/v1/jobs/urn:uuid:{id}/events"),
            format!("/v1/jobs/{}/events", &id[..35]),
            format!("/v1/jobs/{id}0/events"),
            format!("/v1/jobs/../jobs/{id}/events"),
            format!("//v1/jobs/{id}/events"),
            format!("/v2/jobs/{id}/events"),
            format!("http://a/v1/jobs/{id}/events"),
            "/v1/jobs/0192f7a0-0000-7000-8000-00000000abcg/events".to_owned(),
            "/v1/jobs/0192f7a0+0000-7000-8000-00000000abcd/events".to_owned(),
            "/v1/jobs/%30192f7a0-0000-7000-8000-00000000abcd/events".to_owned(),
            "/v1/jobs/x/events".to_owned(),
        ] {
            assert!(!get(&target), "{target}");
        }
    }

    #[test]
    fn an_unfinished_head_is_partial_and_under_the_limit() {
        assert!(is_unfinished(b""), "nothing sent");
        assert!(is_unfinished(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n"));
        assert!(!is_unfinished(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!is_unfinished(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "HTTP/2 is hyper's at once");
        let long = format!("GET / HTTP/1.1\r\nCookie: {}", "c".repeat(HEAD_LIMIT));
        assert!(!is_unfinished(long.as_bytes()), "a long head is hyper's, under its own deadline");
    }

    #[test]
    fn a_head_is_whole_once_httparse_says_so() {
        assert!(is_partial(b""));
        assert!(is_partial(b"GET /v1/jobs/x/events HTTP/1.1\r\nHost: a\r\n"));
        assert!(!is_partial(b"GET /v1/jobs/x/events HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!is_partial(b"GET /v1/jobs/x/events HTTP/1.1\nHost: a\n\n"), "bare line feeds end it too");
        assert!(!is_partial(b"\x00\x01 not http"), "nor does a wrong head wait for more");
    }

    #[tokio::test]
    async fn ready_frames_go_out_as_one_chunk_and_the_end_as_the_last() {
        let hi = Bytes::from_static(b"data: hi\n\n");
        let mut out = Vec::new();
        write_chunk(&mut out, std::slice::from_ref(&hi), 10, false).await.expect("write");
        write_chunk(&mut out, &[hi.clone(), hi], 20, true).await.expect("write");
        write_chunk(&mut out, &[], 0, false).await.expect("write");
        assert_eq!(out, b"a\r\ndata: hi\n\n\r\n14\r\ndata: hi\n\ndata: hi\n\n\r\n0\r\n\r\n");
        let mut end = Vec::new();
        write_chunk(&mut end, &[], 0, true).await.expect("write");
        assert_eq!(end, b"0\r\n\r\n");
    }
}
