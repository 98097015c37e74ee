//! An HTTP request's way through the edge: transport, route, admission, then either an answer
//! of the edge's own (`/v1/health`), the WebSocket bridge (`/ws`), or the pipeline's stages
//! in order: prepare → open → relay → conclude.

mod health;
mod transport;

use bytes::Bytes;
use pingora_proxy::Session;
use tokio::time::Instant;

use crate::error::EdgeError;
use crate::pipeline::accounting::Outcome;
use crate::pipeline::prepare::Preparation;
use crate::pipeline::respond::Responder;
use crate::pipeline::{Downstream, Pipeline, RequestCtx};
use crate::plugins::Verdict;
use crate::routing::{self, Route};
use crate::{body, lifecycle};

/// Serves one HTTP request. `Err` is the error to answer with (or, once a response header went
/// out, the reason the connection is dropped).
pub async fn serve(
    p: &Pipeline,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), EdgeError> {
    check_head(session.req_header())?;
    if transport::redirected(p, session, ctx).await? {
        return Ok(());
    }
    let now = Instant::now();
    let head = session.req_header();
    let route = routing::route(&head.method, head.uri.path())?;
    ctx.record.route = Some(route);
    let admission = p.admit(head, route, ctx)?;
    p.rate(&admission, ctx)?;
    match route {
        Route::Health => return health::serve(p, session, ctx, &admission.agent).await,
        Route::Ws => {
            lifecycle::gate(admission.agent.state)?;
            return crate::websocket::serve(p, session, ctx, admission).await;
        }
        _ => lifecycle::gate(admission.agent.state)?,
    }
    let cfg = p.cfg();
    let body = body::read(
        session,
        cfg.limits.max_body_bytes,
        cfg.limits.clients.body_timeout,
    )
    .await?;
    // Plugins' changes to the head are made in the session itself, so each stage can wrap it
    // afresh.
    let prepared = match p.prepare(
        &mut Downstream::Http(session),
        ctx,
        &admission,
        route,
        body,
        now,
    )? {
        Preparation::Forward(prepared) => *prepared,
        Preparation::Answered(verdict) => {
            return plugin_answer(&mut Responder::new(session, ctx), verdict).await
        }
    };
    let mut opened = p
        .open(&mut Downstream::Http(session), ctx, &admission, prepared)
        .await?;
    let result = p
        .relay(&mut Responder::new(session, ctx), &mut opened)
        .await;
    p.conclude(ctx, &admission.agent, opened, Outcome::of(&result))
        .await;
    result
}

/// The request head's HTTP rules that Pingora's parser does not enforce (RFC 9112 §3.2, and
/// one credential per request): an HTTP/1.1 request names its host exactly once, and no request
/// carries two `Authorization` headers (which one would count is a guess an attacker could
/// exploit).
fn check_head(head: &pingora_http::RequestHeader) -> Result<(), EdgeError> {
    let count = |name: &str| head.headers.get_all(name).iter().count();
    if head.version == http::Version::HTTP_11 && count("host") != 1 {
        return Err(EdgeError::InvalidRequest(
            "an HTTP/1.1 request must carry exactly one Host header".into(),
        ));
    }
    if count("authorization") > 1 {
        return Err(EdgeError::InvalidRequest(
            "send one Authorization header, not several".into(),
        ));
    }
    Ok(())
}

/// Sends what a plugin decided instead of the runtime's answer: its own local response (its
/// body, or the table's `policy_denied` when it gave none, with its headers), or the
/// fail-closed error.
async fn plugin_answer(resp: &mut Responder<'_>, verdict: Verdict) -> Result<(), EdgeError> {
    let mut local = match verdict {
        Verdict::Respond(local) => local,
        failed @ Verdict::Failed(_) => return Err(failed.into_error()),
    };
    let status = local.status;
    let headers = std::mem::take(&mut local.headers);
    let (content_type, body) = if local.body.is_empty() {
        (
            "application/json",
            Verdict::Respond(local).into_error().body(),
        )
    } else {
        ("text/plain", Bytes::from(local.body))
    };
    let mut h = resp.header(status, content_type);
    for (k, v) in &headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            let _ = h.insert_header(name, value);
        }
    }
    resp.whole(h, body).await
}

#[cfg(test)]
mod tests {
    use super::check_head;
    use pingora_http::RequestHeader;

    fn head(version: http::Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("GET", b"/v1/models", None).unwrap();
        h.set_version(version);
        for (k, v) in headers {
            h.append_header(k.to_string(), *v).unwrap();
        }
        h
    }

    #[test]
    fn http_1_1_names_its_host_once_and_a_request_carries_one_key() {
        use http::Version;
        let ok = head(
            Version::HTTP_11,
            &[("host", "a"), ("authorization", "Bearer x")],
        );
        assert!(check_head(&ok).is_ok());
        assert!(check_head(&head(Version::HTTP_11, &[])).is_err());
        assert!(check_head(&head(Version::HTTP_11, &[("host", "a"), ("host", "b")])).is_err());
        // HTTP/1.0 may omit Host; HTTP/2 carries :authority instead.
        assert!(check_head(&head(Version::HTTP_10, &[])).is_ok());
        assert!(check_head(&head(Version::HTTP_2, &[])).is_ok());
        let two_keys = head(
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("authorization", "Bearer x"),
                ("authorization", "Bearer y"),
            ],
        );
        let e = check_head(&two_keys).unwrap_err();
        assert_eq!((e.status(), e.code()), (400, "invalid_request"));
    }
}
