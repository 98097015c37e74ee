//! API key syntax: `molti_<account-id>_<token>`, and the `Authorization: Bearer` header.

/// Every key starts with this.
pub const KEY_PREFIX: &str = "molti_";
/// Length of the random token: 40 base62 characters, about 238 bits.
pub const TOKEN_LEN: usize = 40;
/// The token alphabet (no `_`, which separates the parts).
pub const TOKEN_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The parts of a well-formed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    /// The owning account's id.
    pub account_id: &'a str,
    /// The secret token.
    pub token: &'a str,
}

/// True for an account id: 1–32 of `a-z0-9`.
pub fn is_account_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Splits a key into its parts, or `None` when it is not a MoltGhost key.
pub fn parse_key(key: &str) -> Option<ParsedKey<'_>> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (account_id, token) = rest.split_once('_')?;
    let ok = is_account_id(account_id)
        && token.len() == TOKEN_LEN
        && token.bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then_some(ParsedKey { account_id, token })
}

/// The credential of an `Authorization` header value: `Bearer <credential>` (scheme case-
/// insensitive, as RFC 9110 says).
pub fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, cred) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| cred.trim())
        .filter(|c| !c.is_empty())
}

/// The shown-once key's recognisable start, safe to list: `molti_acct_AbCdEf…`.
pub fn display_prefix(key: &str) -> String {
    match parse_key(key) {
        Some(p) => format!("{KEY_PREFIX}{}_{}…", p.account_id, &p.token[..6]),
        None => "…".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_strictly() {
        let key = format!("molti_abc123_{}", "x".repeat(TOKEN_LEN));
        assert_eq!(parse_key(&key).unwrap().account_id, "abc123");
        assert!(parse_key("molti_abc123_xyz789").is_none());
        assert!(parse_key(&key.replace("abc123", "ABC")).is_none());
        assert!(parse_key(&format!("{key}_")).is_none());
        assert!(parse_key("sk-whatever").is_none());
        assert!(display_prefix(&key).starts_with("molti_abc123_xxxxxx"));
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(b"Bearer molti_x"), Some("molti_x"));
        assert_eq!(bearer(b"bearer   molti_x "), Some("molti_x"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(&[0xff, 0x20, 0x41]), None);
    }
}
