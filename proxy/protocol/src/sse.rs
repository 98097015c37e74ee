//! An incremental scanner for server-sent events, fed the runtime's body chunk by chunk.
//!
//! It only reads: the edge passes OpenAI streams on byte for byte and uses the scanner to see
//! what went by (the native translation, and usage). Events are cut at a blank line (`\n\n` or
//! `\r\n\r\n`); one event may not exceed [`MAX_EVENT_BYTES`].

use bytes::{Bytes, BytesMut};

/// The largest event the scanner holds; a larger one is a broken stream.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One event: its `event:` name, if any, its `data:` lines joined by `\n`, and the bytes it
/// arrived as (blank line included), to pass on unchanged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` fields, joined by newlines.
    pub data: Vec<u8>,
    /// The event exactly as received.
    pub raw: Bytes,
}

/// The stream broke the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event larger than {MAX_EVENT_BYTES} bytes")]
pub struct EventTooLarge;

/// Scans a byte stream into events.
#[derive(Debug, Default)]
pub struct SseScanner {
    buf: BytesMut,
    searched: usize,
}

impl SseScanner {
    /// A scanner with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes received but not yet part of a complete event.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes not yet part of a complete event (at the end of a stream).
    pub fn take_rest(&mut self) -> Bytes {
        self.searched = 0;
        self.buf.split().freeze()
    }

    /// Adds the next chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event, `Ok(None)` when more input is needed.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, EventTooLarge> {
        let Some((end, skip)) = find_boundary(&self.buf, self.searched) else {
            if self.buf.len() > MAX_EVENT_BYTES {
                return Err(EventTooLarge);
            }
            // Resume the search just before the end: a boundary may straddle chunks.
            self.searched = self.buf.len().saturating_sub(3);
            return Ok(None);
        };
        let raw = self.buf.split_to(end + skip).freeze();
        self.searched = 0;
        let mut ev = parse_event(&raw[..end]);
        ev.raw = raw;
        Ok(Some(ev))
    }
}

/// Position of the first blank line at or after `from`: (end of the event, bytes to skip).
fn find_boundary(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while let Some(p) = memchr::memchr(b'\n', &buf[i..]) {
        let nl = i + p;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some((nl, 2)),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some((nl, 3)),
            _ => {}
        }
        i = nl + 1;
    }
    None
}

/// Parses one event's lines. Comments and keep-alives come out with empty data, so that a
/// relay that re-frames a stream still passes them on.
fn parse_event(raw: &[u8]) -> SseEvent {
    let mut ev = SseEvent::default();
    let mut has_data = false;
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if has_data {
                    ev.data.push(b'\n');
                }
                ev.data.extend_from_slice(value);
                has_data = true;
            }
            b"event" => ev.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut s = SseScanner::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            while let Some(e) = s.next_event().unwrap() {
                out.push(e);
            }
        }
        out
    }

    #[test]
    fn splits_events_across_chunks() {
        let evs = all(&[b"data: {\"a\"", b":1}\n", b"\ndata: [DONE]\n\n"]);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].data, b"{\"a\":1}");
        assert_eq!(evs[1].data, b"[DONE]");
    }

    #[test]
    fn crlf_comments_names_and_multiline() {
        let evs = all(&[b": ping\r\n\r\nevent: error\r\ndata: x\r\ndata: y\r\n\r\n"]);
        assert_eq!(evs.len(), 2);
        assert_eq!(
            (evs[0].data.len(), &evs[0].raw[..]),
            (0, &b": ping\r\n\r\n"[..])
        );
        assert_eq!(
            (evs[1].event.as_deref(), &evs[1].data[..]),
            (Some("error"), &b"x\ny"[..])
        );
        assert_eq!(
            &evs[1].raw[..],
            b"event: error\r\ndata: x\r\ndata: y\r\n\r\n"
        );
    }

    #[test]
    fn boundary_split_between_chunks() {
        let evs = all(&[b"data: a\n", b"\n", b"data: b\r\n\r", b"\n"]);
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn refuses_huge_events() {
        let mut s = SseScanner::new();
        s.push(&vec![b'x'; MAX_EVENT_BYTES + 1]);
        assert!(s.next_event().is_err());
    }
}
