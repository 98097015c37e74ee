//! The usage journal's reader on arbitrary bytes: never panics, and every row it keeps starts a
//! line at the offset it reports, offsets growing, so a shipment's positions are sound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost::ledger::rows_at;

fuzz_target!(|data: &[u8]| {
    let Some(end) = data.iter().rposition(|b| *b == b'\n') else {
        return;
    };
    let complete = &data[..=end];
    let start = 1_000;
    let rows = rows_at(start, complete);
    let mut last = None;
    for (at, row) in &rows {
        let i = (at - start) as usize;
        assert!(i < complete.len());
        assert!(i == 0 || complete[i - 1] == b'\n', "a row not at a line start");
        assert!(last.is_none_or(|l| l < *at), "offsets must grow");
        last = Some(*at);
        // The line at that offset is the row.
        let line_end = i + complete[i..].iter().position(|b| *b == b'\n').unwrap();
        let parsed: moltghost::store::UsageRow =
            serde_json::from_slice(&complete[i..line_end]).unwrap();
        assert_eq!(&parsed, row);
    }
});
