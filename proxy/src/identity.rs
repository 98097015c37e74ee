//! The edge's identity key (Ed25519): it signs the caller identity that pods receive, and its
//! public half is served as a JWKS by the admin API.

use std::path::Path;

use base64::Engine;
use ed25519_dalek::SigningKey;

/// The edge's Ed25519 key.
pub struct IdentityKey {
    signing: SigningKey,
    kid: String,
}

impl IdentityKey {
    /// The key from `MOLTGHOST_IDENTITY_KEY` (hex seed), else the data directory's
    /// `identity_key` (created on first start).
    pub fn load(data_dir: &Path) -> std::io::Result<Self> {
        let seed_hex = crate::secrets::load_or_create(
            None,
            "MOLTGHOST_IDENTITY_KEY",
            data_dir,
            "identity_key",
        )?;
        let seed: [u8; 32] = hex::decode(seed_hex.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| std::io::Error::other("identity key: expected 64 hex characters"))?;
        let signing = SigningKey::from_bytes(&seed);
        let kid = hex::encode(
            &sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
                signing.verifying_key().as_bytes(),
            ))[..8],
        );
        Ok(Self { signing, kid })
    }

    /// The public key as a JSON Web Key Set.
    pub fn jwks(&self) -> serde_json::Value {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.signing.verifying_key().as_bytes());
        serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid, "x": x}]})
    }
}
