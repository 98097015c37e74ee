//! Admin API tokens: HS256 JWTs signed with the admin secret, minted by the CLI and checked by
//! the edge's admin API.

use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// Claims of an admin token.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminClaims {
    /// Who holds the token.
    pub sub: String,
    /// Expiry (Unix seconds), required.
    pub exp: i64,
    /// `read` or `write` (write includes read).
    pub scope: String,
}

/// Mints an admin token signed with `secret`.
pub fn mint_token(
    secret: &str,
    sub: &str,
    scope: &str,
    ttl_seconds: i64,
) -> Result<String, String> {
    let claims = AdminClaims {
        sub: sub.into(),
        exp: crate::now() + ttl_seconds,
        scope: scope.into(),
    };
    let key =
        EncodingKey::from_secret(secret.as_bytes()).map_err(|e| format!("admin secret: {e}"))?;
    jsonwebtoken::encode(&Header::default(), &claims, &key).map_err(|e| format!("cannot sign: {e}"))
}
