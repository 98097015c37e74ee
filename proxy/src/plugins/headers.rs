//! Headers between Pingora's types and the plugins' view (pseudo-headers first, names
//! lowercase), both ways.

use super::abi::Headers;

/// A request header as plugins see it: pseudo-headers (`:method`, `:path`, `:authority`,
/// `:scheme`) first, then every header, names lowercase.
pub fn request_headers(h: &pingora_http::RequestHeader, scheme: &str) -> Headers {
    let mut out = Vec::with_capacity(h.headers.len() + 4);
    out.push((":method".into(), h.method.as_str().as_bytes().to_vec()));
    let path = h.uri.path_and_query().map_or("/", |p| p.as_str());
    out.push((":path".into(), path.as_bytes().to_vec()));
    let authority = h
        .headers
        .get("host")
        .map(|v| v.as_bytes().to_vec())
        .or_else(|| h.uri.authority().map(|a| a.as_str().as_bytes().to_vec()))
        .unwrap_or_default();
    out.push((":authority".into(), authority));
    out.push((":scheme".into(), scheme.as_bytes().to_vec()));
    for (k, v) in h.headers.iter() {
        out.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
    }
    out
}

/// Puts what plugins left of the request's headers back (pseudo-headers are not changeable).
pub fn apply_request_headers(h: &mut pingora_http::RequestHeader, headers: &Headers) {
    let names: Vec<http::HeaderName> = h.headers.keys().cloned().collect();
    for n in names {
        h.remove_header(&n);
    }
    for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            let _ = h.append_header(name, value);
        }
    }
}

/// A response header as plugins see it: `:status`, then every header.
pub fn response_headers(h: &pingora_http::ResponseHeader) -> Headers {
    let mut out = Vec::with_capacity(h.headers.len() + 1);
    out.push((":status".into(), h.status.as_str().as_bytes().to_vec()));
    for (k, v) in h.headers.iter() {
        out.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
    }
    out
}

/// Puts what plugins left of the response's headers back (`:status` included).
pub fn apply_response_headers(h: &mut pingora_http::ResponseHeader, headers: &Headers) {
    let names: Vec<http::HeaderName> = h.headers.keys().cloned().collect();
    for n in names {
        h.remove_header(&n);
    }
    for (k, v) in headers {
        if k == ":status" {
            if let Some(s) = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
            {
                let _ = h.set_status(s);
            }
        } else if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            let _ = h.append_header(name, value);
        }
    }
}
