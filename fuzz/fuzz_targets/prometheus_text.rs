//! The Prometheus text reader `moltghost top` uses, on arbitrary text: never a panic, and every
//! sample it returns has a well-formed name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::prometheus;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for s in prometheus::parse(&text) {
        assert!(!s.name.is_empty());
        assert!(s
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
    }
});
