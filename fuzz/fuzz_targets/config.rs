//! The configuration file parser and validator on arbitrary text: it must refuse with a message,
//! never panic; what it accepts must hold its own invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost::config::Config;
use moltghost::upstream::UpstreamTarget;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(c) => {
            assert!(!c.fixed.listen.http.is_empty() && !c.plans.is_empty());
            assert!(c.names.public_url.contains("{id}"));
            assert!(matches!(c.limits.rate_limit_status, 403 | 429));
            for a in &c.agents {
                // What validated round-trips through its display form.
                assert_eq!(
                    UpstreamTarget::parse(&a.upstream.to_string()).as_ref(),
                    Ok(&a.upstream)
                );
            }
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
    let _ = UpstreamTarget::parse(text);
    let _ = serde_json::from_str::<moltghost::store::UsageRow>(text);
});
