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

/// What plugins changed of the request's pseudo-headers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewrites {
    /// `:method` or `:path` changed (and were applied to the head): the request is routed
    /// again, as Envoy clears its route cache when a plugin edits request headers.
    pub rerouted: bool,
    /// `:authority` changed: the `Host` the runtime is sent (the agent stays the one the key
    /// was admitted for).
    pub authority: Option<String>,
}

/// Puts what plugins left of the request's headers back: the headers, and `:method` and
/// `:path` into the head. `Err` names a pseudo-header a plugin set to something unusable.
pub fn apply_request_headers(
    h: &mut pingora_http::RequestHeader,
    headers: &Headers,
) -> Result<Rewrites, String> {
    let pseudo = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let mut out = Rewrites::default();
    if let Some(m) = pseudo(":method").filter(|m| m.as_slice() != h.method.as_str().as_bytes()) {
        let method = http::Method::from_bytes(m).map_err(|_| "an invalid :method")?;
        h.set_method(method);
        out.rerouted = true;
    }
    let path = h.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Some(p) = pseudo(":path").filter(|p| p.as_slice() != path.as_bytes()) {
        let uri = http::Uri::try_from(p.as_slice())
            .ok()
            .filter(|u| u.scheme().is_none() && u.path().starts_with('/'))
            .ok_or("an invalid :path")?;
        h.set_uri(uri);
        out.rerouted = true;
    }
    let authority = h.headers.get("host").map(|v| v.as_bytes());
    if let Some(a) = pseudo(":authority").filter(|a| Some(a.as_slice()) != authority) {
        out.authority = Some(
            std::str::from_utf8(a)
                .ok()
                .filter(|a| !a.is_empty() && http::uri::Authority::try_from(*a).is_ok())
                .ok_or("an invalid :authority")?
                .to_owned(),
        );
    }
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
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> pingora_http::RequestHeader {
        let mut h = pingora_http::RequestHeader::build("POST", b"/v1/chat?x=1", None).unwrap();
        h.insert_header("host", "abc.agent.localhost").unwrap();
        h
    }

    fn edited(name: &str, value: &str) -> Headers {
        let mut v = request_headers(&head(), "http");
        for (k, val) in v.iter_mut() {
            if k == name {
                *val = value.as_bytes().to_vec();
            }
        }
        v
    }

    #[test]
    fn pseudo_header_edits_are_applied_as_on_envoy() {
        let mut h = head();
        let same = request_headers(&h, "http");
        assert_eq!(
            apply_request_headers(&mut h, &same),
            Ok(Rewrites::default())
        );

        let mut h = head();
        let r = apply_request_headers(&mut h, &edited(":path", "/v1/tools?y=2")).unwrap();
        assert!(r.rerouted);
        assert_eq!(h.uri.path(), "/v1/tools");
        assert_eq!(h.uri.query(), Some("y=2"));

        let mut h = head();
        let r = apply_request_headers(&mut h, &edited(":method", "GET")).unwrap();
        assert!(r.rerouted);
        assert_eq!(h.method, http::Method::GET);

        let mut h = head();
        let r = apply_request_headers(&mut h, &edited(":authority", "inside.svc:8080")).unwrap();
        assert_eq!(r.authority.as_deref(), Some("inside.svc:8080"));
        assert!(!r.rerouted);

        for (name, bad) in [
            (":path", "no-slash"),
            (":path", "http://elsewhere/x"),
            (":method", "G ET"),
            (":authority", ""),
            (":authority", "a b"),
        ] {
            let mut h = head();
            assert!(
                apply_request_headers(&mut h, &edited(name, bad)).is_err(),
                "{name} {bad}"
            );
        }
    }
}
