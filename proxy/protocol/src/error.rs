//! The edge's one error type and the one place it maps to the spec's status/code/type table.
//!
//! Every refusal the edge makes, from any phase or from the WebSocket bridge, is an [`EdgeError`];
//! [`EdgeError::status`], [`EdgeError::code`], [`EdgeError::kind`] and [`EdgeError::headers`]
//! are the table, and [`EdgeError::to_json`] is the body clients see:
//! `{"error":{"message","code","type"}}`.

use std::borrow::Cow;
use std::fmt;

/// Everything the edge can refuse a request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeError {
    /// Missing, malformed, unknown, revoked, expired or out-of-scope key. One message for all,
    /// so the answer never says which.
    InvalidApiKey,
    /// The plan's request rate is exceeded; `retry_after` in seconds.
    RateLimited {
        /// Seconds until a request would be admitted again.
        retry_after: u64,
        /// 403 as the spec says, or 429 where the operator configured it.
        status: u16,
    },
    /// The key's concurrent-stream cap is reached.
    TooManyStreams {
        /// The plan's cap.
        limit: u32,
        /// 403 or 429, as for the rate.
        status: u16,
    },
    /// The account's monthly token quota is used up.
    QuotaExceeded,
    /// The agent is paused.
    AgentPaused,
    /// The agent is starting.
    AgentInitializing,
    /// The agent is gone for good.
    AgentTerminated,
    /// `timeout_seconds` or the route deadline passed.
    Timeout,
    /// The request is malformed; the message says what is wrong.
    InvalidRequest(Cow<'static, str>),
    /// The body is larger than the configured maximum.
    BodyTooLarge {
        /// The configured maximum in bytes.
        limit: usize,
    },
    /// No agent at this host, or no such route.
    NotFound(Cow<'static, str>),
    /// The route exists but not for this method; `allow` lists the methods it takes.
    MethodNotAllowed {
        /// Methods the route accepts, for the `allow` header.
        allow: &'static str,
    },
    /// The pod or runtime could not be reached or broke its response.
    UpstreamUnavailable(Cow<'static, str>),
    /// The runtime refused the request with a 4xx of its own; status and its message.
    Upstream {
        /// The runtime's status (4xx).
        status: u16,
        /// The runtime's message, or a summary.
        message: String,
    },
    /// An admin request without a valid token.
    Unauthenticated(Cow<'static, str>),
    /// An admin token without the scope the call needs.
    Forbidden(Cow<'static, str>),
    /// The change conflicts with the current state (a taken name, a terminated agent).
    Conflict(Cow<'static, str>),
    /// The client went away before the answer was complete. Never written (there is nobody to
    /// write to); logged with nginx's 499.
    ClientClosed,
    /// A policy plugin reset the stream (`proxy_close_stream`). Never written, as Envoy resets
    /// the stream: the connection is dropped (cut mid-answer); logged with nginx's 444.
    StreamReset,
    /// A policy plugin denied the request.
    Denied {
        /// Status chosen by the plugin.
        status: u16,
        /// Message chosen by the plugin.
        message: String,
    },
    /// A policy plugin whose fail policy is `closed` failed (trapped, ran past its deadline or
    /// its memory limit, or is backing off after doing so).
    PluginFailed(Cow<'static, str>),
    /// A policy plugin paused the answer to see it whole, and it outgrew what the plugin may
    /// hold back (its `buffer_kb`).
    PluginBufferFull {
        /// The plugin.
        plugin: String,
        /// Its limit in bytes.
        limit: usize,
    },
    /// Plain HTTP on an edge configured to redirect it: the same URL over HTTPS.
    HttpsRequired {
        /// The `https://` URL to use instead.
        location: String,
    },
    /// The pod sidecar refused a request whose caller identity did not verify.
    InvalidIdentity(Cow<'static, str>),
    /// The pod sidecar could not reach the agent runtime beside it.
    RuntimeUnreachable(Cow<'static, str>),
    /// The client took longer than its deadline to send the request (its body); the message
    /// says which deadline.
    RequestTimeout(Cow<'static, str>),
    /// The edge holds as many client connections as it is configured to; this one is refused.
    Overloaded,
    /// The edge cannot record usage (its journal cannot be written): a metered request is
    /// refused rather than served unrecorded.
    LedgerUnavailable,
    /// The edge's share of the account's quota (its lease) is used up and the store did not
    /// answer its request for more within `limits.lease_wait`.
    QuotaUnavailable,
}

impl EdgeError {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidApiKey => 401,
            Self::RateLimited { status, .. } | Self::TooManyStreams { status, .. } => *status,
            Self::QuotaExceeded => 429,
            Self::AgentPaused => 503,
            Self::AgentInitializing => 202,
            Self::AgentTerminated => 410,
            Self::Timeout => 504,
            Self::InvalidRequest(_) => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::UpstreamUnavailable(_) => 502,
            Self::Upstream { status, .. } | Self::Denied { status, .. } => *status,
            Self::ClientClosed => 499,
            Self::StreamReset => 444,
            Self::Unauthenticated(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Conflict(_) => 409,
            Self::PluginFailed(_) => 503,
            Self::PluginBufferFull { .. } => 502,
            Self::HttpsRequired { .. } => 308,
            Self::InvalidIdentity(_) => 401,
            Self::RuntimeUnreachable(_) => 502,
            Self::RequestTimeout(_) => 408,
            Self::Overloaded | Self::LedgerUnavailable | Self::QuotaUnavailable => 503,
        }
    }

    /// The machine-readable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidApiKey => "invalid_api_key",
            Self::RateLimited { .. } | Self::TooManyStreams { .. } => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::AgentPaused => "agent_paused",
            Self::AgentInitializing => "agent_initializing",
            Self::AgentTerminated => "agent_terminated",
            Self::Timeout => "timeout",
            Self::InvalidRequest(_) => "invalid_request",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::Upstream { status, .. } => match status {
                404 => "not_found",
                _ => "invalid_request",
            },
            Self::Denied { .. } => "policy_denied",
            Self::ClientClosed => "client_closed",
            Self::StreamReset => "stream_reset",
            Self::Unauthenticated(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Conflict(_) => "conflict",
            Self::PluginFailed(_) => "plugin_failed",
            Self::PluginBufferFull { .. } => "answer_too_large",
            Self::HttpsRequired { .. } => "https_required",
            Self::InvalidIdentity(_) => "invalid_identity",
            Self::RuntimeUnreachable(_) => "runtime_unreachable",
            Self::RequestTimeout(_) => "request_timeout",
            Self::Overloaded => "overloaded",
            Self::LedgerUnavailable => "ledger_unavailable",
            Self::QuotaUnavailable => "quota_unavailable",
        }
    }

    /// The error's `type`, the class a client can branch on.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 if matches!(self, Self::Forbidden(_)) => "permission_error",
            403 | 429 => "rate_limit_error",
            409 => "conflict_error",
            202 | 503 => "service_unavailable",
            410 => "gone",
            408 | 504 => "timeout_error",
            502 => "upstream_error",
            _ => "invalid_request_error",
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> Cow<'_, str> {
        match self {
            Self::InvalidApiKey => {
                "Invalid API key: check the key in the Authorization header".into()
            }
            Self::RateLimited { retry_after, .. } => {
                format!("Rate limit exceeded: retry in {retry_after}s or upgrade the plan").into()
            }
            Self::TooManyStreams { limit, .. } => {
                format!("Too many concurrent streams for this key (limit {limit})").into()
            }
            Self::QuotaExceeded => "Monthly token quota exceeded".into(),
            Self::AgentPaused => "Agent is paused".into(),
            Self::AgentInitializing => "Agent is initializing: retry in 60s".into(),
            Self::AgentTerminated => {
                "Agent is terminated: this endpoint is permanently gone".into()
            }
            Self::Timeout => {
                "The request timed out: increase timeout_seconds or reduce the prompt".into()
            }
            Self::InvalidRequest(m)
            | Self::NotFound(m)
            | Self::UpstreamUnavailable(m)
            | Self::Unauthenticated(m)
            | Self::Forbidden(m)
            | Self::Conflict(m)
            | Self::PluginFailed(m)
            | Self::InvalidIdentity(m)
            | Self::RuntimeUnreachable(m)
            | Self::RequestTimeout(m) => m.as_ref().into(),
            Self::Overloaded => "The edge is at its connection limit: retry in a moment".into(),
            Self::LedgerUnavailable => {
                "The edge cannot record usage right now: retry in a moment".into()
            }
            Self::QuotaUnavailable => {
                "The edge cannot reach the account's quota right now: retry in a moment".into()
            }
            Self::HttpsRequired { .. } => "use https://".into(),
            Self::BodyTooLarge { limit } => {
                format!("Request body exceeds the limit of {limit} bytes").into()
            }
            Self::MethodNotAllowed { allow } => format!("Method not allowed: use {allow}").into(),
            Self::Upstream { message, .. } | Self::Denied { message, .. } => {
                message.as_str().into()
            }
            Self::ClientClosed => "The client closed the connection".into(),
            Self::StreamReset => "A policy plugin reset the stream".into(),
            Self::PluginBufferFull { plugin, limit } => format!(
                "The answer is larger than policy plugin `{plugin}` may hold back ({limit} bytes)"
            )
            .into(),
        }
    }

    /// False for the errors that are never written to the client: it went away, or a plugin
    /// reset the stream. The connection is dropped instead.
    pub fn is_written(&self) -> bool {
        !matches!(self, Self::ClientClosed | Self::StreamReset)
    }

    /// Extra response headers this error carries (beyond content type and request id).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::RateLimited { retry_after, .. } => vec![("retry-after", retry_after.to_string())],
            Self::TooManyStreams { .. } | Self::Overloaded | Self::QuotaUnavailable => {
                vec![("retry-after", "1".into())]
            }
            Self::QuotaExceeded | Self::AgentTerminated => vec![("x-should-retry", "false".into())],
            Self::AgentPaused => vec![("retry-after", "60".into())],
            Self::AgentInitializing => vec![("retry-after", "60".into())],
            Self::LedgerUnavailable => vec![("retry-after", "5".into())],
            Self::MethodNotAllowed { allow } => vec![("allow", (*allow).into())],
            Self::HttpsRequired { location } => vec![("location", location.clone())],
            _ => Vec::new(),
        }
    }

    /// The JSON body: `{"error":{"message","code","type"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {"message": self.message(), "code": self.code(), "type": self.kind()}
        })
    }

    /// The body as bytes, ready to write.
    pub fn body(&self) -> bytes::Bytes {
        bytes::Bytes::from(self.to_json().to_string())
    }

    /// The same error as a server-sent event, for a stream whose headers were already sent.
    pub fn to_sse_event(&self) -> bytes::Bytes {
        bytes::Bytes::from(format!("event: error\ndata: {}\n\n", self.to_json()))
    }
}

impl fmt::Display for EdgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code(), self.status(), self.message())
    }
}

impl std::error::Error for EdgeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_spec() {
        let rows = [
            (EdgeError::InvalidApiKey, 401, "invalid_api_key"),
            (
                EdgeError::RateLimited {
                    retry_after: 60,
                    status: 403,
                },
                403,
                "rate_limited",
            ),
            (EdgeError::QuotaExceeded, 429, "quota_exceeded"),
            (EdgeError::QuotaUnavailable, 503, "quota_unavailable"),
            (EdgeError::AgentPaused, 503, "agent_paused"),
            (EdgeError::AgentInitializing, 202, "agent_initializing"),
            (EdgeError::AgentTerminated, 410, "agent_terminated"),
            (EdgeError::Timeout, 504, "timeout"),
            (
                EdgeError::UpstreamUnavailable("x".into()),
                502,
                "upstream_unavailable",
            ),
        ];
        for (e, status, code) in rows {
            assert_eq!(e.status(), status);
            assert_eq!(e.code(), code);
            assert_eq!(e.to_json()["error"]["code"], code);
        }
        assert_eq!(EdgeError::AgentPaused.kind(), "service_unavailable");
        assert_eq!(EdgeError::AgentPaused.message(), "Agent is paused");
        assert!(EdgeError::QuotaExceeded
            .headers()
            .contains(&("x-should-retry", "false".into())));
    }

    #[test]
    fn bodies_once_built_by_hand_come_from_the_table() {
        let redirect = EdgeError::HttpsRequired {
            location: "https://a.example/v1/models".into(),
        };
        assert_eq!(redirect.status(), 308);
        assert_eq!(
            redirect.to_json(),
            serde_json::json!({"error": {"message": "use https://", "code": "https_required", "type": "invalid_request_error"}})
        );
        assert_eq!(
            redirect.headers(),
            vec![("location", "https://a.example/v1/models".to_string())]
        );
        let identity = EdgeError::InvalidIdentity("no caller identity".into());
        assert_eq!(
            (identity.status(), identity.code(), identity.kind()),
            (401, "invalid_identity", "authentication_error")
        );
        let runtime = EdgeError::RuntimeUnreachable("connection refused".into());
        assert_eq!(
            (runtime.status(), runtime.code(), runtime.kind()),
            (502, "runtime_unreachable", "upstream_error")
        );
    }

    #[test]
    fn slow_clients_and_a_full_edge() {
        let slow = EdgeError::RequestTimeout("the request body did not arrive in time".into());
        assert_eq!(
            (slow.status(), slow.code(), slow.kind()),
            (408, "request_timeout", "timeout_error")
        );
        let full = EdgeError::Overloaded;
        assert_eq!(
            (full.status(), full.code(), full.kind()),
            (503, "overloaded", "service_unavailable")
        );
        assert_eq!(full.headers(), vec![("retry-after", "1".to_string())]);
        let unrecorded = EdgeError::LedgerUnavailable;
        assert_eq!(
            (unrecorded.status(), unrecorded.code(), unrecorded.kind()),
            (503, "ledger_unavailable", "service_unavailable")
        );
    }
}
