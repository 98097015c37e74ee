//! WireGuard keys: x25519, written as standard base64 the way `wg` writes them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

/// Decodes a 32-byte key from standard base64 (44 characters, as `wg genkey`/`wg pubkey` print).
pub fn decode(s: &str) -> Result<[u8; 32], String> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| "a WireGuard key is 44 characters of standard base64".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "a WireGuard key is 32 bytes (44 characters of base64)".to_string())
}

/// Encodes a 32-byte key as standard base64.
pub fn encode(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// A private key from base64.
pub fn secret(s: &str) -> Result<StaticSecret, String> {
    decode(s).map(StaticSecret::from)
}

/// A public key from base64.
pub fn public(s: &str) -> Result<PublicKey, String> {
    decode(s).map(PublicKey::from)
}

/// The public half of a private key, as base64.
pub fn public_of(secret: &StaticSecret) -> String {
    encode(PublicKey::from(secret).as_bytes())
}

/// A fresh private key.
pub fn generate() -> StaticSecret {
    StaticSecret::random_from_rng(rand::rngs::OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_like_wg() {
        let k = generate();
        let b64 = encode(&k.to_bytes());
        assert_eq!(b64.len(), 44);
        assert_eq!(secret(&b64).unwrap().to_bytes(), k.to_bytes());
        assert!(public("not a key").is_err());
        assert!(public("AAAA").is_err());
        // A known pair from wireguard-tools' documentation style: the public key derives.
        let sk = secret("YNqHwpcAmVj0lVzPSt3oUnL7cRPKB/geYqVfMPr0hHw=").unwrap();
        assert_eq!(public_of(&sk).len(), 44);
    }
}
