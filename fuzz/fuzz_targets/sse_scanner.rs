//! The SSE scanner and the native stream translation, fed arbitrary bytes in arbitrary chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::chat::NativeStream;
use moltghost_protocol::sse::SseScanner;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut scanner = SseScanner::new();
    let mut native = NativeStream::new();
    let mut data_bytes = 0;
    for chunk in rest.chunks(step) {
        scanner.push(chunk);
        while let Ok(Some(ev)) = scanner.next_event() {
            data_bytes += ev.data.len();
            if let Some(out) = native.on_data(&ev.data) {
                assert_eq!(out["done"], false);
            }
        }
    }
    // Data never grows beyond the input it came from.
    assert!(data_bytes <= rest.len());
    let last = native.finish("fuzz", None);
    assert_eq!(last["done"], true);
});
