//! The WebSocket protocol of `GET /ws`, free of I/O: what a client may send, how a browser
//! carries its key in a subprotocol, and which close code ends a socket for which error.
//!
//! Client → edge (text frames, JSON):
//! - `{"action":"message","messages":[...], ...}`: a native chat request (`/v1/chat`'s fields:
//!   `stream`, `temperature`, `max_tokens`, `tools`, `timeout_seconds`, `model`).
//! - `{"action":"cancel"}`: stop the answer in progress (its `done` frame says `cancelled`).
//!
//! Edge → client: `{"content":"...","done":false}` frames, then `{"done":true,"id",...,
//! "finish_reason","usage"}`; or `{"error":{"message","code","type"}}`.

use serde_json::Value;

use crate::chat::NativeChatRequest;
use crate::error::EdgeError;

/// The subprotocol the edge speaks, chosen when the client offers it.
pub const SUBPROTOCOL: &str = "moltghost";

/// The prefix of the subprotocol that carries a browser's key: `bearer.<key>`.
pub const KEY_PREFIX: &str = "bearer.";

/// What a client's text frame asks for.
#[derive(Debug)]
pub enum ClientMessage {
    /// A chat request to answer.
    Message(Box<NativeChatRequest>),
    /// Stop the answer in progress.
    Cancel,
}

impl ClientMessage {
    /// Parses one text frame; every error names what is wrong.
    pub fn parse(text: &[u8]) -> Result<Self, EdgeError> {
        let v: Value = serde_json::from_slice(text)
            .map_err(|e| EdgeError::InvalidRequest(format!("invalid JSON message: {e}").into()))?;
        let Value::Object(mut fields) = v else {
            return Err(EdgeError::InvalidRequest(
                "a message is a JSON object with an `action`".into(),
            ));
        };
        let action = fields.remove("action");
        match action.as_ref().and_then(Value::as_str) {
            Some("message") => Ok(Self::Message(Box::new(NativeChatRequest::from_value(
                Value::Object(fields),
            )?))),
            Some("cancel") if fields.is_empty() => Ok(Self::Cancel),
            Some("cancel") => Err(EdgeError::InvalidRequest(
                "`cancel` takes no other fields".into(),
            )),
            Some(other) => Err(EdgeError::InvalidRequest(
                format!("unknown action `{other}`: use `message` or `cancel`").into(),
            )),
            None => Err(EdgeError::InvalidRequest(
                "`action` is required: `message` or `cancel`".into(),
            )),
        }
    }
}

/// What a `Sec-WebSocket-Protocol` request header offers: whether it names [`SUBPROTOCOL`], and
/// the key a browser put in a `bearer.<key>` entry.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Offer<'a> {
    /// The client offered [`SUBPROTOCOL`].
    pub moltghost: bool,
    /// The key from a `bearer.<key>` entry.
    pub key: Option<&'a str>,
}

/// Reads the offered subprotocols (comma-separated, possibly over several headers).
pub fn offer<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Offer<'a> {
    let mut offer = Offer::default();
    for value in values {
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        for entry in value.split(',').map(str::trim) {
            if entry == SUBPROTOCOL {
                offer.moltghost = true;
            } else if let Some(key) = entry.strip_prefix(KEY_PREFIX) {
                offer.key.get_or_insert(key);
            }
        }
    }
    offer
}

/// The close code that ends a socket after `err`: the key no longer valid is a policy violation
/// (1008), a paused agent is "try again later" (1013), a terminated one is gone (1001).
pub fn close_code(err: &EdgeError) -> u16 {
    match err {
        EdgeError::InvalidApiKey => 1008,
        EdgeError::AgentPaused | EdgeError::AgentInitializing => 1013,
        EdgeError::AgentTerminated => 1001,
        EdgeError::BodyTooLarge { .. } => 1009,
        _ => 1011,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_with_native_options() {
        let m = ClientMessage::parse(
            br#"{"action":"message","messages":[{"role":"user","content":"Hello!"}],"max_tokens":5,"tools":["crm_query"]}"#,
        )
        .unwrap();
        let ClientMessage::Message(req) = m else {
            panic!("not a message")
        };
        assert_eq!(req.max_tokens, Some(5));
        assert!(matches!(
            ClientMessage::parse(br#"{"action":"cancel"}"#),
            Ok(ClientMessage::Cancel)
        ));
    }

    #[test]
    fn bad_messages_say_why() {
        for (text, needle) in [
            (&b"nope"[..], "invalid JSON"),
            (b"[1]", "JSON object"),
            (b"{}", "`action` is required"),
            (br#"{"action":"dance"}"#, "unknown action"),
            (br#"{"action":"message"}"#, "messages"),
            (
                br#"{"action":"message","messages":[],"x":1}"#,
                "unknown field",
            ),
            (br#"{"action":"cancel","x":1}"#, "no other fields"),
        ] {
            let e = ClientMessage::parse(text).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.message().contains(needle), "{e:?} for {text:?}");
        }
    }

    #[test]
    fn subprotocol_offer_carries_the_key() {
        let o = offer([&b"moltghost, bearer.molti_abc_xyz"[..]]);
        assert_eq!(
            o,
            Offer {
                moltghost: true,
                key: Some("molti_abc_xyz")
            }
        );
        assert_eq!(offer([&b"chat"[..], b"x"]), Offer::default());
        assert_eq!(offer([&[0xff, 0xfe][..]]), Offer::default());
    }
}
