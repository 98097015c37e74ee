//! Routing: which agent a request is for (from `Host`), and which route (from method and path).

use http::Method;

use crate::error::EdgeError;

/// The public routes of an agent endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /v1/chat/completions`: OpenAI chat, passed through.
    ChatCompletions,
    /// `POST /v1/completions`: OpenAI text completions, passed through.
    Completions,
    /// `POST /v1/chat`: the native format, translated.
    Chat,
    /// `POST /v1/tools`: invoke a skill.
    Tools,
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/health`: answered by the edge.
    Health,
    /// `GET /ws`: the WebSocket; each message is a native chat request.
    Ws,
}

impl Route {
    /// The route's path, also its label in logs and metrics.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Chat => "/v1/chat",
            Self::Tools => "/v1/tools",
            Self::Models => "/v1/models",
            Self::Health => "/v1/health",
            Self::Ws => "/ws",
        }
    }

    /// Whether the route takes a request body.
    pub fn has_body(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::Completions | Self::Chat | Self::Tools
        )
    }
}

/// Finds the route for `method` and `path` (query already removed).
pub fn route(method: &Method, path: &str) -> Result<Route, EdgeError> {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let (route, allow) = match path {
        "/v1/chat/completions" => (Route::ChatCompletions, "POST"),
        "/v1/completions" => (Route::Completions, "POST"),
        "/v1/chat" => (Route::Chat, "POST"),
        "/v1/tools" => (Route::Tools, "POST"),
        "/v1/models" => (Route::Models, "GET"),
        "/v1/health" => (Route::Health, "GET"),
        "/ws" => (Route::Ws, "GET"),
        _ => return Err(EdgeError::NotFound(format!("No route for {path}").into())),
    };
    let ok = match allow {
        "POST" => method == Method::POST,
        _ => method == Method::GET || method == Method::HEAD,
    };
    if ok {
        Ok(route)
    } else {
        Err(EdgeError::MethodNotAllowed { allow })
    }
}

/// The endpoint id named by a `Host` header under `agents_domain`, if any:
/// `abc123.agent.localhost:8080` → `abc123`.
pub fn endpoint_from_host<'a>(host: &'a str, agents_domain: &str) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let label = host.get(..host.len().checked_sub(agents_domain.len() + 1)?)?;
    let rest = &host[label.len()..];
    if rest.as_bytes()[0] != b'.'
        || !rest[1..].eq_ignore_ascii_case(agents_domain)
        || label.contains('.')
        || label.is_empty()
    {
        return None;
    }
    Some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(
            endpoint_from_host("abc123.agent.localhost:8080", "agent.localhost"),
            Some("abc123")
        );
        assert_eq!(
            endpoint_from_host("abc123.Agent.Localhost", "agent.localhost"),
            Some("abc123")
        );
        assert_eq!(
            endpoint_from_host("abc123.agent.localhost.", "agent.localhost"),
            Some("abc123")
        );
        assert_eq!(
            endpoint_from_host("agent.localhost", "agent.localhost"),
            None
        );
        assert_eq!(
            endpoint_from_host("a.b.agent.localhost", "agent.localhost"),
            None
        );
        assert_eq!(
            endpoint_from_host("127.0.0.1:8080", "agent.localhost"),
            None
        );
        assert_eq!(
            endpoint_from_host("xagent.localhost", "agent.localhost"),
            None
        );
        assert_eq!(endpoint_from_host("", "agent.localhost"), None);
    }

    #[test]
    fn routes() {
        assert_eq!(route(&Method::POST, "/v1/chat").unwrap(), Route::Chat);
        assert_eq!(route(&Method::POST, "/v1/chat/").unwrap(), Route::Chat);
        assert_eq!(route(&Method::GET, "/v1/chat").unwrap_err().status(), 405);
        assert_eq!(route(&Method::GET, "/nope").unwrap_err().status(), 404);
        assert_eq!(route(&Method::GET, "/v1/health").unwrap(), Route::Health);
    }
}
