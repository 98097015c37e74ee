//! An OpenAI route's whole (not streamed) answer: the runtime's status and headers (hop-by-hop
//! ones dropped), then its body chunk by chunk. The last chunk is held until the answer's usage
//! is settled, so an answer the client has is never unaccounted.

use bytes::Bytes;
use pingora_http::ResponseHeader;

use crate::error::EdgeError;
use crate::forward::{self, Inbound};
use crate::pipeline::open::Opened;
use crate::pipeline::respond::{decorate, Responder};

/// The most of a whole answer the edge copies to read its usage or, without one, its text (when
/// the answer spans chunks).
const MAX_USAGE_COPY: usize = 16 * 1024 * 1024;

/// The runtime's response header, passed on: its status and headers, then the edge's own and
/// the plugins' view. `stream`: the body's length is not known.
pub async fn pass_header(
    resp: &mut Responder<'_>,
    inbound: &Inbound,
    stream: bool,
) -> Result<(), EdgeError> {
    let up = &inbound.header;
    let mut h = ResponseHeader::build_no_case(up.status, Some(up.headers.len() + 8))
        .expect("status from a parsed response");
    for (name, value) in up.headers.iter() {
        if !forward::dropped_downstream(name.as_str()) {
            h.append_header(name.clone(), value.clone())
                .expect("parsed header");
        }
    }
    resp.ctx.filter_response_header(&mut h).await?;
    decorate(&mut h, resp.ctx);
    resp.send_header(h, stream).await
}

/// Relays a whole answer (see the module's doc).
pub async fn relay(resp: &mut Responder<'_>, x: &mut Opened) -> Result<(), EdgeError> {
    let (inbound, guard, accounting) = x.parts();
    pass_header(resp, inbound, false).await?;
    // The usage (or text) is read from the whole answer; it is copied only when it spans chunks.
    let mut spanned: Option<Vec<u8>> = None;
    let mut held: Option<Bytes> = None;
    while let Some(chunk) = inbound.next_chunk(resp.hangup(), guard).await? {
        if let Some(prev) = held.replace(chunk) {
            if accounting.is_some() {
                let copy = spanned.get_or_insert_with(Vec::new);
                if copy.len() + prev.len() <= MAX_USAGE_COPY {
                    copy.extend_from_slice(&prev);
                }
            }
            resp.pass(prev).await?;
        }
    }
    if let Some(a) = accounting {
        let answer = match (spanned.as_mut(), held.as_ref()) {
            (Some(copy), Some(last)) => {
                copy.extend_from_slice(last);
                Some(&copy[..])
            }
            (None, Some(only)) => Some(&only[..]),
            (_, None) => None,
        };
        a.complete(answer);
    }
    match held {
        Some(last) => resp.last(last).await,
        None => resp.finish().await,
    }
}
