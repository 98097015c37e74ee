//! The W3C `traceparent` reader on arbitrary text: never a panic, and what it accepts it
//! writes back as a value it reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::trace::TraceParent;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(t) = TraceParent::parse(&text) {
        assert_eq!(TraceParent::parse(&t.header()), Some(t));
    }
});
