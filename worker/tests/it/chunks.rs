//! Streams as real networks deliver them: in pieces, with `\r\n` line endings and
//! characters split across packets, and sometimes stalling mid-answer. wiremock sends
//! a body at once, so this uses a raw TCP server that writes the bytes in parts.

use std::time::Duration;

use common::catalog::ProviderKind;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use ultra_worker::providers::{collect, CompletionRequest, ProviderError};

use crate::support::{client, model, spec};

/// Serves one request: a chunked `text/event-stream` response written in `parts`,
/// pausing between them; `stall` keeps the connection open after the last part.
async fn serve(parts: Vec<Vec<u8>>, stall: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else { return };
        let mut request = vec![0u8; 64 * 1024];
        let _ = socket.read(&mut request).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let _ = socket.write_all(head.as_bytes()).await;
        for part in parts {
            let _ = socket.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await;
            let _ = socket.write_all(&part).await;
            let _ = socket.write_all(b"\r\n").await;
            let _ = socket.flush().await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        if stall {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        let _ = socket.write_all(b"0\r\n\r\n").await;
    });
    format!("http://{address}/v1")
}

fn body() -> Vec<u8> {
    let chunk = |text: &str| {
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\r\n\r\n")
    };
    let mut body = String::new();
    body.push_str(&chunk("caf\u{e9} "));
    body.push_str(&chunk("\u{1f600} na\u{ef}ve"));
    body.push_str("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":4}}\r\n\r\n");
    body.push_str("data: [DONE]\r\n\r\n");
    body.into_bytes()
}

#[tokio::test]
async fn text_split_anywhere_is_reassembled_exactly() {
    let bytes = body();
    // Cut inside `é`, inside the emoji, and between `\r` and `\n`.
    let e_acute = bytes.windows(2).position(|w| w == "\u{e9}".as_bytes()).expect("é") + 1;
    let emoji = bytes.windows(4).position(|w| w == "\u{1f600}".as_bytes()).expect("emoji") + 2;
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("crlf") + 1;
    let mut cuts = vec![crlf, e_acute, emoji];
    cuts.sort();
    let mut parts = Vec::new();
    let mut start = 0;
    for cut in cuts {
        parts.push(bytes[start..cut].to_vec());
        start = cut;
    }
    parts.push(bytes[start..].to_vec());

    let base = serve(parts, false).await;
    let spec = spec(ProviderKind::Openai, &base, None);
    let model = model("local", "llama");
    let request = CompletionRequest::new(&model, "hi");
    let completion = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await.expect("complete");
    assert_eq!(completion.text, "caf\u{e9} \u{1f600} na\u{ef}ve");
    assert_eq!((completion.input_tokens, completion.output_tokens), (2, 4));
}

#[tokio::test]
async fn a_stream_that_stalls_mid_answer_times_out() {
    let bytes = body();
    let half = bytes.len() / 2;
    let base = serve(vec![bytes[..half].to_vec()], true).await;
    let spec = spec(ProviderKind::Openai, &base, None); // one second of silence at most
    let model = model("local", "llama");
    let request = CompletionRequest::new(&model, "hi");
    let started = std::time::Instant::now();
    let result = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await;
    assert_eq!(result.err(), Some(ProviderError::Timeout));
    assert!(started.elapsed() < Duration::from_secs(5));
}
