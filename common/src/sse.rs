//! Server-Sent Events read from bytes as they arrive
//! (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
//! The worker reads providers' streams with it, and `ultra-bench` the api's: one
//! parser, so a stream reads the same in both.

/// One event: its `event` field, and its `data` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SseMessage {
    pub event: Option<String>,
    pub data: String,
}

/// An event-stream parser fed with the body's chunks as they come. A `\r\n` or a
/// multi-byte character split across two chunks survives.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Raw bytes, line ends made `\n`: a multi-byte character may be split across
    /// chunks, so text is decoded only once a whole event (ending in ASCII newlines)
    /// has arrived.
    buffer: Vec<u8>,
    /// The last byte seen was `\r`: a `\n` opening the next chunk belongs to it.
    after_cr: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a chunk of the body, with `\r\n` and a lone `\r` turned into `\n` —
    /// also when a `\r\n` pair is split across chunks. (`\r` never occurs inside a
    /// UTF-8 sequence.)
    pub fn push(&mut self, chunk: &[u8]) {
        for &byte in chunk {
            match byte {
                b'\r' => {
                    self.buffer.push(b'\n');
                    self.after_cr = true;
                }
                b'\n' if self.after_cr => self.after_cr = false,
                _ => {
                    self.buffer.push(byte);
                    self.after_cr = false;
                }
            }
        }
    }

    /// The body has ended: a last event without its blank line still counts.
    pub fn finish(&mut self) {
        self.buffer.extend_from_slice(b"\n\n");
    }

    /// Removes and returns the first complete event; comments (`: ping`), ids, retry
    /// hints and empty blocks are passed over.
    pub fn next_event(&mut self) -> Option<SseMessage> {
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let bytes: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&bytes);
            let mut message = SseMessage::default();
            let mut has_data = false;
            for line in block.lines() {
                let (field, value) =
                    line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
                match field {
                    "event" => message.event = Some(value.to_owned()),
                    "data" => {
                        if has_data {
                            message.data.push('\n');
                        }
                        message.data.push_str(value);
                        has_data = true;
                    }
                    _ => {} // comments, ids, retry hints
                }
            }
            if has_data || message.event.is_some() {
                return Some(message);
            }
        }
        None
    }
}

/// Why reading an event stream stopped early.
#[derive(Debug)]
pub enum ReadError<E> {
    /// No byte arrived for the whole idle limit.
    Idle,
    /// The body failed.
    Broken(E),
}

/// The events of a body that arrives in chunks, failing with `Idle` if no byte comes
/// for `idle`. The stream ends when the body does (the last event is flushed); whether
/// that was a proper end is the caller's to judge.
pub fn read<C, E>(
    body: futures::stream::BoxStream<'static, Result<C, E>>,
    idle: std::time::Duration,
) -> futures::stream::BoxStream<'static, Result<SseMessage, ReadError<E>>>
where
    C: AsRef<[u8]> + Send + 'static,
    E: Send + 'static,
{
    use futures::StreamExt;
    struct State<C, E> {
        body: futures::stream::BoxStream<'static, Result<C, E>>,
        events: Decoder,
        done: bool,
    }
    let state = State { body, events: Decoder::new(), done: false };
    futures::stream::unfold(state, move |mut state| async move {
        loop {
            if let Some(message) = state.events.next_event() {
                return Some((Ok(message), state));
            }
            if state.done {
                return None;
            }
            match tokio::time::timeout(idle, state.body.next()).await {
                Err(_) => {
                    state.done = true;
                    return Some((Err(ReadError::Idle), state));
                }
                Ok(None) => {
                    state.done = true;
                    state.events.finish();
                }
                Ok(Some(Err(err))) => {
                    state.done = true;
                    return Some((Err(ReadError::Broken(err)), state));
                }
                Ok(Some(Ok(chunk))) => state.events.push(chunk.as_ref()),
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(bytes: &[u8]) -> Decoder {
        let mut decoder = Decoder::new();
        decoder.push(bytes);
        decoder
    }

    #[test]
    fn events_are_parsed_across_lines() {
        let mut events =
            decoder(b": comment\n\nevent: message_start\ndata: {\"a\":1}\n\ndata: one\ndata: two\n\ndata: [DONE]\n");
        assert_eq!(
            events.next_event(),
            Some(SseMessage { event: Some("message_start".into()), data: "{\"a\":1}".into() })
        );
        assert_eq!(events.next_event(), Some(SseMessage { event: None, data: "one\ntwo".into() }));
        assert_eq!(events.next_event(), None, "incomplete until its blank line");
        events.push(b"\n");
        assert_eq!(events.next_event().map(|m| m.data), Some("[DONE]".into()));
    }

    #[test]
    fn crlf_split_across_chunks_still_separates_events() {
        let mut events = decoder(b"data: A\r\n\r");
        events.push(b"\ndata: B\r\n\r\n");
        assert_eq!(events.next_event().map(|m| m.data), Some("A".into()));
        assert_eq!(events.next_event().map(|m| m.data), Some("B".into()));
    }

    #[test]
    fn a_character_split_across_chunks_survives() {
        let event = "data: caf\u{e9} \u{1f600}\n\n".as_bytes();
        let mut events = decoder(&event[..9]); // ends inside the two bytes of `é`
        assert_eq!(events.next_event(), None);
        events.push(&event[9..]);
        assert_eq!(events.next_event().map(|m| m.data), Some("caf\u{e9} \u{1f600}".into()));
    }

    #[test]
    fn a_last_event_without_its_blank_line_counts_once_the_body_ends() {
        let mut events = decoder(b"data: last");
        assert_eq!(events.next_event(), None);
        events.finish();
        assert_eq!(events.next_event().map(|m| m.data), Some("last".into()));
        assert_eq!(events.next_event(), None);
    }
}
