//! The pod sidecar's request-head parser and rewriter on arbitrary bytes: a rewritten head
//! parses again, keeps its body length, and carries no `x-moltghost-*` header but ours.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::head;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(h)) = head::parse(data) else {
        return;
    };
    assert!(h.len <= data.len());
    let mut out = Vec::new();
    head::rewrite(
        &h,
        &[
            ("x-moltghost-account", "acc\r\nx: y"),
            ("x-moltghost-agent", "a"),
        ],
        &mut out,
    );
    let again = match head::parse(&out) {
        Ok(Some(again)) => again,
        // The sidecar's own limit, reached by what it added: the runtime still gets a valid head.
        Err(head::HeadError::TooLarge) if h.headers.len() + 2 > head::MAX_HEADERS - 8 => return,
        other => panic!("a rewritten head does not parse: {other:?}"),
    };
    assert_eq!(again.body_len, h.body_len);
    assert_eq!(again.len, out.len());
    assert!(again.identity.is_none());
    let ours: Vec<_> = again
        .headers
        .iter()
        .filter(|(n, _)| n.to_ascii_lowercase().starts_with("x-moltghost-"))
        .collect();
    assert_eq!(ours.len(), 1, "only the agent header survives: {ours:?}");
});
