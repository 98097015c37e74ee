//! WebSocket targets (`ws://` and `wss://` URLs): each request is one message on a socket of
//! the target's pool (sockets are kept, as a WebSocket client keeps them), timed like a stream:
//! the first `{"content"}` frame is the first token, the `{"done":true}` frame the end.

use std::sync::Arc;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::measure::{Sample, TokenClock};
use super::run::{has_text, Scenario};

/// An open socket.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a target's sockets are opened.
pub struct Dialer {
    /// `ws(s)://host:port/ws`.
    url: String,
    /// Headers of the upgrade request (key, extras).
    headers: Vec<(String, String)>,
    /// TLS for `wss://`.
    tls: Option<Connector>,
    /// Idle sockets, reused by the next messages.
    pool: tokio::sync::Mutex<Vec<Socket>>,
}

impl Dialer {
    /// A dialer for `base` (`ws://…` or `wss://…`, `/ws` appended); `insecure` accepts any
    /// certificate.
    pub fn new(base: &str, headers: Vec<(String, String)>, insecure: bool) -> Self {
        let tls = base.starts_with("wss://").then(|| {
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
            let config = if insecure {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate))
                    .with_no_client_auth()
            } else {
                let roots = rustls::RootCertStore::from_iter(
                    webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
                );
                builder.with_root_certificates(roots).with_no_client_auth()
            };
            Connector::Rustls(Arc::new(config))
        });
        Self {
            url: format!("{base}/ws"),
            headers,
            tls,
            pool: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    /// Opens a socket whose answers the reference runtime paces as `tokens`, `interval_ms`
    /// apart (the timing headers go with the upgrade: a socket's messages share them).
    async fn connect(&self, tokens: u32, interval_ms: u64) -> Result<Socket, String> {
        let mut req = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let uri = req.uri().clone();
        let host = uri.host().unwrap_or("127.0.0.1").to_owned();
        let port = uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let timing = [
            ("x-mock-ttft-ms".to_owned(), "0".to_owned()),
            ("x-mock-tokens".to_owned(), tokens.to_string()),
            ("x-mock-interval-ms".to_owned(), interval_ms.to_string()),
        ];
        for (k, v) in self.headers.iter().chain(timing.iter()) {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?,
                HeaderValue::from_str(v).map_err(|e| e.to_string())?,
            );
        }
        // `*.localhost` is loopback, as curl has it (glibc does not resolve it).
        let addr = if host.ends_with(".localhost") {
            format!("127.0.0.1:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|_| "connect".to_owned())?;
        let _ = tcp.set_nodelay(true);
        let (socket, _) =
            tokio_tungstenite::client_async_tls_with_config(req, tcp, None, self.tls.clone())
                .await
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(r) => {
                        format!("http {}", r.status().as_u16())
                    }
                    _ => "upgrade".to_owned(),
                })?;
        Ok(socket)
    }

    /// One message as the scenario says, timed by `clock`.
    pub async fn exchange(&self, scenario: Scenario, mut clock: TokenClock) -> Sample {
        let (tokens, interval_ms) = super::run::pacing(scenario);
        let pooled = self.pool.lock().await.pop();
        let mut socket = match pooled {
            Some(s) => s,
            None => match self.connect(tokens, interval_ms).await {
                Ok(s) => s,
                Err(e) => return clock.finish(Some(e)),
            },
        };
        let msg = r#"{"action":"message","messages":[{"role":"user","content":"Hello, agent!"}]}"#;
        if socket.send(Message::text(msg)).await.is_err() {
            return clock.finish(Some("send".into()));
        }
        clock.headers(200);
        let stop_after = match scenario {
            Scenario::Cancel { after_tokens } => after_tokens,
            _ => u32::MAX,
        };
        while let Some(frame) = socket.next().await {
            let at = Instant::now();
            let text = match frame {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(_)) | Err(_) => return clock.finish(Some("closed".into())),
                Ok(_) => continue,
            };
            let data = text.as_bytes();
            if data.starts_with(br#"{"error""#) {
                return clock.finish(Some("error frame".into()));
            }
            if has_text(data) {
                clock.token(at);
                if clock.sample.tokens >= stop_after {
                    return clock.finish(None); // the socket is dropped: the client hangs up
                }
            }
            if data.windows(11).any(|w| w == br#""done":true"#) {
                self.pool.lock().await.push(socket);
                return clock.finish(None);
            }
        }
        clock.finish(Some("closed".into()))
    }
}

/// `--insecure` for `wss://`: any certificate is accepted (self-signed test endpoints).
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
