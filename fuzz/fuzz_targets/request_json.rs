//! Request handling on arbitrary input: native chat parsing and translation, the pass-through
//! JSON check, the runtime-answer translation, routing and host parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::chat::{self, NativeChatRequest};
use moltghost_protocol::routing;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = NativeChatRequest::parse(data) {
        // Whatever parses translates to valid JSON with the same messages.
        let out: serde_json::Value = serde_json::from_slice(&req.to_openai()).expect("valid JSON");
        assert_eq!(
            out["messages"].as_array().map(Vec::len),
            Some(req.messages.len())
        );
    }
    let _ = chat::check_json_object(data);
    let _ = chat::answer_from_openai(data, "fuzz", None);
    let billed = chat::Billed {
        usage: chat::Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
        },
        estimated: true,
    };
    if let Ok(answer) = chat::answer_from_openai(data, "fuzz", Some(billed)) {
        // The client is told what was billed, whatever the runtime said.
        let v: serde_json::Value = serde_json::from_slice(&answer).expect("valid JSON");
        assert_eq!(
            (
                v["usage"]["tokens"].as_u64(),
                v["usage"]["estimated"].as_bool()
            ),
            (Some(3), Some(true))
        );
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = routing::route(&http::Method::POST, s);
        if let Some(id) = routing::endpoint_from_host(s, "agent.localhost") {
            assert!(!id.is_empty() && !id.contains('.'));
        }
    }
});
