//! The tunnel bridge's CONNECT head parser on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::connect;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(r)) = connect::parse(data) {
        assert!(r.head_len <= data.len());
        assert!(r.port != 0);
        assert!(data[..r.head_len].ends_with(b"\n"));
    }
});
