//! The edge's identity key (Ed25519): it signs the caller identity that pods receive, and its
//! public half is served as a JWKS by the admin API.

use std::path::Path;

use base64::Engine;
use ed25519_dalek::SigningKey;

/// The edge's Ed25519 key.
pub struct IdentityKey {
    signing: SigningKey,
    encoding: jsonwebtoken::EncodingKey,
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
        let der = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_der(&signing)
            .map_err(|e| std::io::Error::other(format!("identity key: {e}")))?;
        let encoding = jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes());
        Ok(Self {
            signing,
            encoding,
            kid,
        })
    }

    /// The public key as a JSON Web Key Set.
    pub fn jwks(&self) -> serde_json::Value {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.signing.verifying_key().as_bytes());
        serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid, "x": x}]})
    }
}

/// Who a request is for, as the pod receives it (`x-moltghost-identity`, an EdDSA JWT).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallerIdentity {
    /// Issuer: always [`ISSUER`].
    pub iss: String,
    /// The caller's account id.
    pub sub: String,
    /// The caller's API key id (never the key).
    pub key: String,
    /// The agent's endpoint id.
    pub agent: String,
    /// The request id (`x-request-id`).
    pub rid: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expires at (Unix seconds): [`IDENTITY_LIFETIME`] after issue.
    pub exp: i64,
}

/// The issuer every identity token names.
pub const ISSUER: &str = "moltghost-edge";
/// How long an identity token is good for: long enough for clock skew, too short to replay.
pub const IDENTITY_LIFETIME: i64 = 60;

impl IdentityKey {
    /// Signs a caller identity for one request.
    pub fn sign(&self, account: &str, key_id: &str, agent: &str, request_id: &str) -> String {
        let now = crate::now();
        let claims = CallerIdentity {
            iss: ISSUER.to_owned(),
            sub: account.to_owned(),
            key: key_id.to_owned(),
            agent: agent.to_owned(),
            rid: request_id.to_owned(),
            iat: now,
            exp: now + IDENTITY_LIFETIME,
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("Ed25519 signing")
    }
}

/// Checks identity tokens against the edge's JWKS (the pod's side).
pub struct IdentityVerifier {
    keys: Vec<(Option<String>, jsonwebtoken::DecodingKey)>,
    validation: jsonwebtoken::Validation,
}

impl IdentityVerifier {
    /// From a JWKS document (`GET /.well-known/jwks.json` on the admin API). Holds every
    /// Ed25519 key in it, so that a key rotation can overlap.
    pub fn from_jwks(jwks: &str) -> Result<Self, String> {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(jwks).map_err(|e| format!("not a JWKS: {e}"))?;
        let keys = set
            .keys
            .iter()
            .filter_map(|k| {
                jsonwebtoken::DecodingKey::from_jwk(k)
                    .ok()
                    .map(|d| (k.common.key_id.clone(), d))
            })
            .collect::<Vec<_>>();
        if keys.is_empty() {
            return Err("the JWKS holds no usable key".into());
        }
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 5;
        Ok(Self { keys, validation })
    }

    /// The identity in `token`, if one of the keys signed it and it has not expired.
    pub fn verify(&self, token: &str) -> Result<CallerIdentity, String> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("malformed identity: {e}"))?
            .kid;
        let mut last = "no key matches the identity's key id".to_string();
        for (k, key) in &self.keys {
            if kid.is_some() && k.is_some() && *k != kid {
                continue;
            }
            match jsonwebtoken::decode::<CallerIdentity>(token, key, &self.validation) {
                Ok(t) => return Ok(t.claims),
                Err(e) => last = format!("invalid identity: {e}"),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_identity_verifies_against_the_jwks_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = IdentityKey::load(dir.path()).unwrap();
        let verifier = IdentityVerifier::from_jwks(&key.jwks().to_string()).unwrap();
        let token = key.sign("acc_1", "key_1", "agent-1", "req-1");
        let id = verifier.verify(&token).unwrap();
        assert_eq!((id.sub.as_str(), id.key.as_str()), ("acc_1", "key_1"));
        assert_eq!((id.agent.as_str(), id.rid.as_str()), ("agent-1", "req-1"));
        let other = tempfile::tempdir().unwrap();
        let stranger = IdentityKey::load(other.path()).unwrap();
        assert!(verifier.verify(&stranger.sign("a", "b", "c", "d")).is_err());
        assert!(verifier.verify("garbage").is_err());
        let mut forged = token.clone();
        forged.replace_range(forged.len() - 4.., "AAAA");
        assert!(verifier.verify(&forged).is_err());
    }
}
