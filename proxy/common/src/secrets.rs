//! Server secrets: the API-key HMAC secret, the admin JWT secret and the identity signing key.
//! Each comes from config or the environment; failing that it is generated once and kept in the
//! data directory (mode 0600), which suits one edge. A fleet must give every edge the same.

use std::path::Path;

use boringtun::x25519::StaticSecret;
use hmac::{Hmac, Mac};
use moltghost_tunnel::keys;
use sha2::Sha256;

/// A secret from `configured`, else `$env`, else the file `name` in `data_dir` (created with
/// 32 random bytes, hex, if missing).
pub fn load_or_create(
    configured: Option<&str>,
    env: &str,
    data_dir: &Path,
    name: &str,
) -> std::io::Result<String> {
    if let Some(s) = configured.filter(|s| !s.is_empty()) {
        return Ok(s.to_owned());
    }
    if let Ok(s) = std::env::var(env) {
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let path = data_dir.join(name);
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().to_owned());
    }
    std::fs::create_dir_all(data_dir)?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, &secret)?;
    Ok(secret)
}

/// The WireGuard private key in `configured` (from the config or the environment), else the one kept in
/// `dir/name`, created (readable by its owner only) on first use: the private key never leaves
/// the machine.
pub fn wireguard_key(
    configured: Option<&str>,
    dir: &Path,
    name: &str,
) -> Result<StaticSecret, String> {
    if let Some(s) = configured.filter(|s| !s.trim().is_empty()) {
        return keys::secret(s);
    }
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => keys::secret(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = keys::generate();
            std::fs::create_dir_all(dir)
                .and_then(|()| write_private(&path, &keys::encode(&key.to_bytes())))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

/// Hashes API keys: HMAC-SHA-256 under the server secret. Keys are stored and looked up only as
/// this hash.
#[derive(Clone)]
pub struct KeyHasher {
    keyed: Hmac<Sha256>,
}

impl KeyHasher {
    /// A hasher keyed with `secret`.
    pub fn new(secret: &str) -> Self {
        Self {
            keyed: Hmac::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length"),
        }
    }

    /// The hash of `key`.
    pub fn hash(&self, key: &str) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(…)")
    }
}

/// Makes a new API key for `account_id`: `molti_<account>_<40 base62>`, about 238 random bits.
pub fn new_api_key(account_id: &str) -> String {
    use moltghost_protocol::keys::{KEY_PREFIX, TOKEN_ALPHABET, TOKEN_LEN};
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    let token: String = (0..TOKEN_LEN)
        .map(|_| TOKEN_ALPHABET[rng.gen_range(0..TOKEN_ALPHABET.len())] as char)
        .collect();
    format!("{KEY_PREFIX}{account_id}_{token}")
}

/// A short random lowercase id (account ids, endpoint ids): `len` of `a-z0-9`.
pub fn short_id(len: usize) -> String {
    use rand::Rng;
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    // Start with a letter so ids never look like numbers.
    (0..len)
        .map(|i| ALPHA[rng.gen_range(0..if i == 0 { 26 } else { ALPHA.len() })] as char)
        .collect()
}
