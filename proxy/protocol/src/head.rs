//! HTTP/1.1 request heads as the pod's sidecar sees them inside the tunnel: parsed to find the
//! caller identity and the body's length, then written out again for the runtime with the
//! edge's `x-moltghost-*` headers replaced by what the sidecar vouches for. Bodies and answers
//! are not touched: they pass as bytes.

/// Longest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 128;

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead<'a> {
    /// Bytes of the head, blank line included.
    pub len: usize,
    /// Method.
    pub method: &'a str,
    /// Request target.
    pub path: &'a str,
    /// Header lines in order.
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// The body's length (`Content-Length`; 0 without one).
    pub body_len: u64,
    /// The connection switches protocols after this request (`Upgrade`, e.g. a WebSocket).
    pub upgrade: bool,
    /// The `x-moltghost-identity` header, if any.
    pub identity: Option<&'a str>,
}

/// Why a head is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x, or malformed.
    Malformed,
    /// Over [`MAX_HEAD`] or [`MAX_HEADERS`].
    TooLarge,
    /// A chunked or otherwise unsized request body (the edge always sends `Content-Length`).
    Unsized,
}

/// Parses a request head from the start of `buf`: `Ok(None)` while incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<RequestHead<'_>>, HeadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge)
        }
        Err(_) => return Err(HeadError::Malformed),
    };
    // Room is kept for the headers the sidecar adds, so that a rewritten head always parses.
    if len > MAX_HEAD - 1024 || req.headers.len() > MAX_HEADERS - 8 {
        return Err(HeadError::TooLarge);
    }
    if req.version != Some(1) {
        return Err(HeadError::Malformed);
    }
    let mut body_len = 0;
    let mut upgrade = false;
    let mut identity = None;
    let mut headers = Vec::with_capacity(req.headers.len());
    let mut lengths = 0;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(HeadError::Malformed)?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::Unsized);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if h.name.eq_ignore_ascii_case("x-moltghost-identity") {
            identity = std::str::from_utf8(h.value).ok();
        }
        headers.push((h.name, h.value));
    }
    if lengths > 1 {
        // Two lengths are a request-smuggling attempt, not a request.
        return Err(HeadError::Malformed);
    }
    Ok(Some(RequestHead {
        len,
        method: req.method.ok_or(HeadError::Malformed)?,
        path: req.path.ok_or(HeadError::Malformed)?,
        headers,
        body_len,
        upgrade,
        identity,
    }))
}

/// Writes `head` for the runtime into `out`: every `x-moltghost-*` header the request carried,
/// and every header `add` names (the pod's `traceparent`), is dropped and `add` takes their
/// place.
pub fn rewrite(head: &RequestHead<'_>, add: &[(&str, &str)], out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let ours = |n: &str| n.len() >= 12 && n[..12].eq_ignore_ascii_case("x-moltghost-");
    let replaced = |n: &str| add.iter().any(|(a, _)| a.eq_ignore_ascii_case(n));
    for (name, value) in &head.headers {
        if ours(name) || replaced(name) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in add {
        // Values come from verified claims; a line break in one would forge a header.
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rewrites_what_the_edge_sends() {
        let raw = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 10.7.0.2:80\r\ncontent-length: 5\r\nx-moltghost-identity: tok\r\nX-Moltghost-Account: forged\r\n\r\nhello";
        let h = parse(raw).unwrap().unwrap();
        assert_eq!(
            (h.method, h.path, h.body_len),
            ("POST", "/v1/chat/completions", 5)
        );
        assert_eq!(h.identity, Some("tok"));
        assert_eq!(&raw[h.len..], b"hello");
        let mut out = Vec::new();
        rewrite(
            &h,
            &[("x-moltghost-account", "acc"), ("x-bad", "a\r\nb: c")],
            &mut out,
        );
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(!text.contains("tok") && !text.contains("forged") && !text.contains("x-bad"));
        assert!(text.contains("x-moltghost-account: acc\r\n"));
        assert_eq!(parse(&out).unwrap().unwrap().body_len, 5);
        let traced = b"GET / HTTP/1.1\r\nTraceparent: edge\r\nhost: x\r\n\r\n";
        let mut out = Vec::new();
        rewrite(
            &parse(traced).unwrap().unwrap(),
            &[("traceparent", "pod")],
            &mut out,
        );
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nhost: x\r\ntraceparent: pod\r\n\r\n"
        );
        assert!(parse(b"GET / HTTP/1.1\r\nhost: x\r\n").unwrap().is_none());
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n").unwrap_err(),
            HeadError::Unsized
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .unwrap_err(),
            HeadError::Malformed
        );
        assert!(
            parse(b"GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n")
                .unwrap()
                .unwrap()
                .upgrade
        );
    }
}
