//! The CONNECT request Pingora sends to the edge's in-process tunnel bridge: which pod, which
//! port inside its tunnel. Parsed here, free of I/O, so that it can be fuzzed.

/// The header naming the pod a CONNECT is for (its tunnel id).
pub const POD_HEADER: &str = "x-moltghost-pod";

/// Longest CONNECT head the bridge reads.
pub const MAX_HEAD: usize = 8 * 1024;

/// A parsed CONNECT head.
#[derive(Debug, PartialEq, Eq)]
pub struct ConnectRequest<'a> {
    /// The target's port (the host is the pod's address inside the tunnel).
    pub port: u16,
    /// The pod's tunnel id, from [`POD_HEADER`].
    pub pod: &'a str,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
}

/// Parses a CONNECT head from the start of `buf`: `Ok(None)` while incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<ConnectRequest<'_>>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("CONNECT head too long"),
        Err(_) => return Err("malformed CONNECT head"),
    };
    if req.method != Some("CONNECT") {
        return Err("expected CONNECT");
    }
    let target = req.path.ok_or("CONNECT without a target")?;
    let port = target
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or("CONNECT target without a port")?;
    let pod = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(POD_HEADER))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .ok_or("CONNECT without a pod")?;
    Ok(Some(ConnectRequest {
        port,
        pod,
        head_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_pingora_sends() {
        let head = b"CONNECT 10.7.0.2:80 HTTP/1.1\r\nhost: 10.7.0.2:80\r\nx-moltghost-pod: abc@127.0.0.1:51820\r\n\r\nrest";
        let r = parse(head).unwrap().unwrap();
        assert_eq!(r.port, 80);
        assert_eq!(r.pod, "abc@127.0.0.1:51820");
        assert_eq!(&head[r.head_len..], b"rest");
        assert_eq!(parse(b"CONNECT 10.7.0.2:80 HTTP/1.1\r\n").unwrap(), None);
        assert!(parse(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(b"CONNECT 10.7.0.2 HTTP/1.1\r\nx-moltghost-pod: a\r\n\r\n").is_err());
        assert!(parse(b"CONNECT 10.7.0.2:80 HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(&[b'a'; MAX_HEAD + 1]).is_err());
    }
}
