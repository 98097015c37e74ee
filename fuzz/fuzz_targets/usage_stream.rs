//! Usage extraction on arbitrary input: an SSE stream metered event by event (in arbitrary
//! chunks), a whole answer metered at once, request inspection and the include_usage rewrite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::sse::SseScanner;
use moltghost_protocol::usage::{self, EventKind, StreamMeter};

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let mut scanner = SseScanner::new();
    let mut meter = StreamMeter::new();
    let mut raw_total = 0;
    for chunk in rest.chunks(usize::from(step).max(1)) {
        scanner.push(chunk);
        while let Ok(Some(ev)) = scanner.next_event() {
            raw_total += ev.raw.len();
            let before = meter.completion_tokens();
            if meter.observe(&ev.data) == EventKind::Done {
                assert!(meter.done);
            }
            // Without a reported count, what was delivered never goes down.
            if meter.reported.is_none() {
                assert!(meter.completion_tokens() >= before);
            }
        }
    }
    // Re-framing loses no byte: raw events plus what is still buffered are the input.
    assert_eq!(raw_total + scanner.take_rest().len(), rest.len());
    let _ = usage::usage_of(rest);
    // A whole answer: its usage wins; without one, its text only adds.
    let mut whole = StreamMeter::new();
    whole.observe_answer(rest);
    if whole.reported.is_none() {
        assert_eq!(whole.completion_tokens() == 0, whole.content_bytes == 0);
    }
    let _ = usage::model_of(rest);
    if let Ok(req) = usage::inspect_openai(rest) {
        let _ = req.prompt_estimate();
        if let Ok(body) = usage::request_usage(rest) {
            assert!(usage::inspect_openai(&body)
                .map(|r| r.include_usage)
                .unwrap_or(true));
        }
    }
});
