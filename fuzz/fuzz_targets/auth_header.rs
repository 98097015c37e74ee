//! `Authorization` header and API key parsing on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::keys;

fuzz_target!(|data: &[u8]| {
    if let Some(cred) = keys::bearer(data) {
        assert!(!cred.is_empty() && !cred.starts_with(' '));
        if let Some(k) = keys::parse_key(cred) {
            // A key that parses is exactly prefix, account, separator and token.
            assert_eq!(
                cred.len(),
                keys::KEY_PREFIX.len() + k.account_id.len() + 1 + keys::TOKEN_LEN
            );
            assert!(keys::is_account_id(k.account_id));
            assert!(keys::display_prefix(cred).ends_with('…'));
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = keys::parse_key(s);
    }
});
