//! What plugins hand the edge to decode: a gRPC reply's body (`grpc::unframe`), and the
//! pseudo-headers a plugin rewrote (`apply_request_headers`: `:method`, `:path`,
//! `:authority` as arbitrary bytes). Errors are fine; panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost::plugins::{apply_request_headers, grpc, request_headers};

fuzz_target!(|data: &[u8]| {
    let _ = grpc::unframe(bytes::Bytes::copy_from_slice(data));
    let mut parts = data.splitn(3, |&b| b == 0);
    let mut head = pingora_http::RequestHeader::build("POST", b"/v1/chat", None).unwrap();
    let mut headers = request_headers(&head, "http");
    for name in [":method", ":path", ":authority"] {
        if let Some(value) = parts.next() {
            if let Some(slot) = headers.iter_mut().find(|(k, _)| k == name) {
                slot.1 = value.to_vec();
            }
        }
    }
    if apply_request_headers(&mut head, &headers).is_ok() {
        // What was applied is a head the edge can route and print.
        let _ = head.uri.path_and_query().map(|p| p.as_str().len());
        let _ = head.method.as_str().len();
    }
});
