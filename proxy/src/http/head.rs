//! The request head's HTTP rules that Pingora's parser does not enforce.
//!
//! Framing (RFC 9112 §6): a request carries at most one `Content-Length`, not both
//! `Content-Length` and `Transfer-Encoding` (a smuggling attempt, §6.3: the connection must close
//! after the answer), and no transfer coding but `chunked` (the edge decodes no other, §6.1).
//! Identity: an HTTP/1.1 request names its host exactly once (§3.2), and no request carries two
//! `Authorization` headers (which one would count is a guess an attacker could exploit).
//! `CONNECT` asks for a tunnel (RFC 9110 §9.3.6), which the edge never offers: it gets the
//! JSON 405 here (Pingora, left to itself, answers an empty one) and the connection closes.

use pingora_http::RequestHeader;
use pingora_proxy::Session;

use crate::error::EdgeError;

/// Checks `session`'s request head; a head whose framing is in doubt also ends the connection.
pub fn check(session: &mut Session) -> Result<(), EdgeError> {
    if session.req_header().method == http::Method::CONNECT {
        session.set_keepalive(None);
        return Err(EdgeError::MethodNotAllowed {
            allow: "GET, HEAD, POST",
        });
    }
    if let Err(e) = framing(session.req_header()) {
        session.set_keepalive(None);
        return Err(e);
    }
    identity(session.req_header())
}

fn count(head: &RequestHeader, name: &str) -> usize {
    head.headers.get_all(name).iter().count()
}

fn framing(head: &RequestHeader) -> Result<(), EdgeError> {
    let lengths = count(head, "content-length");
    let codings: Vec<&[u8]> = head
        .headers
        .get_all("transfer-encoding")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if lengths > 1 {
        return Err(EdgeError::InvalidRequest(
            "send one Content-Length header, not several".into(),
        ));
    }
    if lengths == 1 && !codings.is_empty() {
        return Err(EdgeError::InvalidRequest(
            "send Content-Length or Transfer-Encoding, not both".into(),
        ));
    }
    let only_chunked = match codings.as_slice() {
        [] => true,
        [one] => one.trim_ascii().eq_ignore_ascii_case(b"chunked"),
        _ => false,
    };
    if !only_chunked {
        return Err(EdgeError::InvalidRequest(
            "the only Transfer-Encoding accepted is chunked".into(),
        ));
    }
    Ok(())
}

fn identity(head: &RequestHeader) -> Result<(), EdgeError> {
    if head.version == http::Version::HTTP_11 && count(head, "host") != 1 {
        return Err(EdgeError::InvalidRequest(
            "an HTTP/1.1 request must carry exactly one Host header".into(),
        ));
    }
    if count(head, "authorization") > 1 {
        return Err(EdgeError::InvalidRequest(
            "send one Authorization header, not several".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Version;

    fn head(version: Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("GET", b"/v1/models", None).unwrap();
        h.set_version(version);
        for (k, v) in headers {
            h.append_header(k.to_string(), *v).unwrap();
        }
        h
    }

    #[test]
    fn http_1_1_names_its_host_once_and_a_request_carries_one_key() {
        let ok = head(
            Version::HTTP_11,
            &[("host", "a"), ("authorization", "Bearer x")],
        );
        assert!(identity(&ok).is_ok());
        assert!(identity(&head(Version::HTTP_11, &[])).is_err());
        assert!(identity(&head(Version::HTTP_11, &[("host", "a"), ("host", "b")])).is_err());
        // HTTP/1.0 may omit Host; HTTP/2 carries :authority instead.
        assert!(identity(&head(Version::HTTP_10, &[])).is_ok());
        assert!(identity(&head(Version::HTTP_2, &[])).is_ok());
        let two_keys = head(
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("authorization", "Bearer x"),
                ("authorization", "Bearer y"),
            ],
        );
        let e = identity(&two_keys).unwrap_err();
        assert_eq!((e.status(), e.code()), (400, "invalid_request"));
    }

    #[test]
    fn one_framing_only() {
        let v = Version::HTTP_11;
        for ok in [
            vec![],
            vec![("content-length", "5")],
            vec![("transfer-encoding", "chunked")],
            vec![("transfer-encoding", " Chunked ")],
        ] {
            assert!(framing(&head(v, &ok)).is_ok(), "{ok:?}");
        }
        for bad in [
            vec![("content-length", "5"), ("content-length", "5")],
            vec![("content-length", "5"), ("transfer-encoding", "chunked")],
            vec![("transfer-encoding", "gzip, chunked")],
            vec![
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
            vec![("transfer-encoding", "identity")],
        ] {
            let e = framing(&head(v, &bad)).unwrap_err();
            assert_eq!(e.status(), 400, "{bad:?}");
        }
    }
}
