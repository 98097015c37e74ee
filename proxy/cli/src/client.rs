//! The admin API client: where the API is, how to authenticate, and its JSON errors made human.

use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::Value;

/// The file `moltghost dev` writes so that the CLI finds the local stack by itself.
pub const DEV_FILE: &str = "dev.json";

/// A CLI failure, with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// The API refused (4xx): exit 1.
    Refused(String),
    /// The API could not be reached or configured: exit 3.
    Unreachable(String),
}

impl Failure {
    /// The process exit code.
    pub fn code(&self) -> u8 {
        match self {
            Self::Refused(_) => 1,
            Self::Unreachable(_) => 3,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(m) | Self::Unreachable(m) => f.write_str(m),
        }
    }
}

/// A connection to one admin API.
pub struct Admin {
    http: reqwest::Client,
    url: String,
    token: String,
}

/// What `moltghost dev` wrote, or the flags and environment.
pub fn dev_file(data_dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(data_dir.join(DEV_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

impl Admin {
    /// Finds the admin API: flags (which clap also fills from `MOLTGHOST_ADMIN_URL` /
    /// `MOLTGHOST_ADMIN_TOKEN`), then the file `moltghost dev` writes in `data_dir`.
    pub fn locate(
        url: Option<String>,
        token: Option<String>,
        data_dir: &Path,
    ) -> Result<Self, Failure> {
        let dev = dev_file(data_dir);
        let from_dev = |k: &str| dev.as_ref().and_then(|d| d[k].as_str()).map(str::to_owned);
        let url = url.or_else(|| from_dev("admin_url")).ok_or_else(|| {
            Failure::Unreachable(format!(
                "no admin API: pass --admin-url (or set MOLTGHOST_ADMIN_URL), or start `moltghost dev` (which writes {})",
                PathBuf::from(data_dir).join(DEV_FILE).display()
            ))
        })?;
        let token = token.or_else(|| from_dev("admin_token")).ok_or_else(|| {
            Failure::Unreachable(
                "no admin token: pass --token or set MOLTGHOST_ADMIN_TOKEN (see `moltghost token`)"
                    .into(),
            )
        })?;
        Self::at(&url, token)
    }

    /// The admin API at `url`, with `token`.
    pub fn at(url: &str, token: String) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// GETs a text resource (`/metrics`).
    pub async fn text(&self, path: &str) -> Result<String, Failure> {
        let unreachable =
            |e: reqwest::Error| Failure::Unreachable(format!("{}{path}: {e}", self.url));
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(unreachable)?;
        resp.error_for_status()
            .map_err(unreachable)?
            .text()
            .await
            .map_err(unreachable)
    }

    /// Calls the API; the JSON answer, or the API's error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            Failure::Unreachable(format!("cannot reach the admin API at {}: {e}", self.url))
        })?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let msg = v
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        let code = v
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("error");
        let err = format!("{msg} ({code}, HTTP {})", status.as_u16());
        Err(if status.is_server_error() {
            Failure::Unreachable(err)
        } else {
            Failure::Refused(err)
        })
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::GET, path, None).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// PATCH with a JSON body.
    pub async fn patch(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(Method::PATCH, path, Some(body)).await
    }
}

/// Percent-encodes a path segment (names are labels, but keep the CLI safe for any input).
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
