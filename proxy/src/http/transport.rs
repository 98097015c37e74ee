//! Transport: on a plain-HTTP listener of an edge that terminates TLS, redirect to HTTPS or
//! refuse, as configured.

use pingora_proxy::Session;

use crate::config::PlainHttp;
use crate::error::EdgeError;
use crate::pipeline::respond::Responder;
use crate::pipeline::{Pipeline, RequestCtx};

/// `Ok(true)` when the request was answered with a redirect; `Err` when plain HTTP is refused.
pub async fn redirected(
    p: &Pipeline,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<bool, EdgeError> {
    let cfg = p.cfg();
    let Some(tls) = &cfg.tls else {
        return Ok(false);
    };
    if crate::pipeline::is_tls(session) {
        return Ok(false);
    }
    match tls.plain_http {
        PlainHttp::Serve => Ok(false),
        PlainHttp::Refuse => Err(EdgeError::Forbidden(
            "plain HTTP is refused here: use https://".into(),
        )),
        PlainHttp::Redirect => {
            let req = session.req_header();
            let host = req
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let port = cfg.fixed.listen.https.first().map_or(443, |a| a.port());
            let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
            let location = https_location(host, port, path);
            // The location is built from the client's Host: it must still be a header value.
            if http::HeaderValue::from_str(&location).is_err() {
                return Err(EdgeError::InvalidRequest("invalid Host header".into()));
            }
            let redirect = EdgeError::HttpsRequired { location };
            Responder::new(session, ctx).error(&redirect).await?;
            Ok(true)
        }
    }
}

/// The `https://` URL for `host` (its port, if any, replaced by the HTTPS listener's) and
/// `path`.
fn https_location(host: &str, https_port: u16, path: &str) -> String {
    // A trailing `:port` goes; the colons of a bracketed IPv6 literal stay.
    let host = match host.rsplit_once(':') {
        Some((h, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (h.ends_with(']') || !h.contains(':')) =>
        {
            h
        }
        _ => host,
    };
    if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::https_location;

    #[test]
    fn the_location_keeps_host_and_path_and_takes_the_https_port() {
        assert_eq!(
            https_location("a.example:8080", 443, "/v1/models?x=1"),
            "https://a.example/v1/models?x=1"
        );
        assert_eq!(
            https_location("a.example", 8443, "/"),
            "https://a.example:8443/"
        );
        // An IPv6 literal keeps its brackets; only a trailing port goes.
        assert_eq!(https_location("[::1]", 443, "/"), "https://[::1]/");
        assert_eq!(https_location("[::1]:80", 443, "/"), "https://[::1]/");
    }
}
