//! TLS termination: certificates chosen by SNI (exact names and `*.` wildcards), reloaded from
//! their files while the edge runs. rustls offers TLS 1.2 and 1.3 only; ALPN offers HTTP/2 and
//! HTTP/1.1.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use std::any::Any;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_rustls::sign::CertifiedKey;
use pingora_rustls::{ClientHello, CryptoProvider, ResolvesServerCert};

/// One certificate and the names it serves.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Host names: exact (`agent.example.com`) or wildcards (`*.agent.example.com`).
    pub names: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

struct Loaded {
    entries: Vec<(Vec<String>, Arc<CertifiedKey>)>,
    stamps: Vec<(Option<SystemTime>, Option<SystemTime>)>,
}

/// Chooses a certificate by SNI; the first one serves clients that send no (or no known) name.
pub struct CertResolver {
    specs: ArcSwap<Vec<CertSpec>>,
    loaded: ArcSwap<Loaded>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("specs", &self.specs)
            .finish()
    }
}

fn stamp(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load(spec: &CertSpec) -> Result<Arc<CertifiedKey>, String> {
    pingora_rustls::install_default_crypto_provider();
    let (cert, key) = (spec.cert.to_string_lossy(), spec.key.to_string_lossy());
    let (chain, key_der) = pingora_rustls::load_certs_and_key_files(&cert, &key)
        .map_err(|e| format!("{cert} / {key}: {e}"))?
        .ok_or_else(|| {
            format!("{cert} / {key}: no certificate or no private key in the PEM files")
        })?;
    let provider = CryptoProvider::get_default().ok_or("no TLS crypto provider")?;
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{key}: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

impl CertResolver {
    /// Loads every certificate; any that fails to load is an error naming its files.
    pub fn new(specs: Vec<CertSpec>) -> Result<Self, String> {
        let loaded = Self::load_all(&specs)?;
        Ok(Self {
            specs: ArcSwap::from_pointee(specs),
            loaded: ArcSwap::from_pointee(loaded),
        })
    }

    fn load_all(specs: &[CertSpec]) -> Result<Loaded, String> {
        let mut entries = Vec::new();
        for s in specs {
            entries.push((s.names.clone(), load(s)?));
        }
        Ok(Loaded {
            entries,
            stamps: specs
                .iter()
                .map(|s| (stamp(&s.cert), stamp(&s.key)))
                .collect(),
        })
    }

    /// Reloads the certificates if any of their files changed. A set that fails to load leaves
    /// the current one serving. Returns whether a new set is in force.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let specs = self.specs.load();
        let now: Vec<_> = specs
            .iter()
            .map(|s| (stamp(&s.cert), stamp(&s.key)))
            .collect();
        if now == self.loaded.load().stamps {
            return Ok(false);
        }
        let next = Self::load_all(&specs)?;
        self.loaded.store(Arc::new(next));
        Ok(true)
    }

    /// Serves a new set of certificates (a config reload); a set that fails to load is refused
    /// and the current one stays.
    pub fn replace(&self, specs: Vec<CertSpec>) -> Result<(), String> {
        let next = Self::load_all(&specs)?;
        self.specs.store(Arc::new(specs));
        self.loaded.store(Arc::new(next));
        Ok(())
    }

    /// The certificate for `name`.
    pub fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.load();
        let found = name.and_then(|n| {
            // Exact names win over wildcards.
            let exact = loaded
                .entries
                .iter()
                .find(|(names, _)| names.iter().any(|p| !p.starts_with("*.") && matches(p, n)));
            exact.or_else(|| {
                loaded
                    .entries
                    .iter()
                    .find(|(names, _)| names.iter().any(|p| matches(p, n)))
            })
        });
        found
            .or_else(|| loaded.entries.first())
            .map(|(_, k)| k.clone())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.for_name(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn names_match_like_certificates_do() {
        assert!(matches("*.agent.example.com", "abc123.agent.example.com"));
        assert!(matches("*.agent.example.com", "ABC123.Agent.Example.com"));
        assert!(!matches("*.agent.example.com", "agent.example.com"));
        assert!(!matches("*.agent.example.com", "a.b.agent.example.com"));
        assert!(matches("agent.example.com", "agent.example.com"));
        assert!(!matches("agent.example.com", "x.agent.example.com"));
    }
}

/// The server name a TLS client asked for (SNI), kept with its connection
/// (`connection.requested_server_name` for plugins).
#[derive(Debug)]
pub struct RequestedServerName(pub Arc<str>);

/// After each handshake, keeps the name the client asked for in the connection's TLS digest,
/// where the request phases find it.
pub struct KeepServerName;

#[async_trait]
impl TlsAccept for KeepServerName {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let name = tls.server_name()?;
        Some(Arc::new(RequestedServerName(name.into())))
    }
}
