/**
 * Errors as the edge reports them: `{"error": {"message", "code", "type"}}` with a status and an
 * `x-request-id`. Each row of the edge's error table has its own class, so callers can
 * `catch (e) { if (e instanceof QuotaExceededError) ... }`.
 */

/** The fields every error carries. */
export interface ErrorInfo {
  /** HTTP status (for WebSocket error frames: the status the same error has over HTTP). */
  status: number;
  /** The edge's error code, e.g. `rate_limited`. */
  code: string;
  /** The error's type, e.g. `rate_limit_error`. */
  type: string;
  /** The request's id (`x-request-id`), when known. */
  requestId?: string;
  /** Seconds to wait before trying again (`retry-after`), when the edge said. */
  retryAfter?: number;
}

/** Any error the edge (or the way to it) reported. */
export class MoltGhostError extends Error {
  readonly status: number;
  readonly code: string;
  readonly type: string;
  readonly requestId?: string;
  readonly retryAfter?: number;

  constructor(message: string, info: ErrorInfo) {
    super(message);
    this.name = new.target.name;
    this.status = info.status;
    this.code = info.code;
    this.type = info.type;
    this.requestId = info.requestId;
    this.retryAfter = info.retryAfter;
  }

  /**
   * Whether trying again later may succeed: never for quota, termination, keys, bad input or a
   * deadline that passed (the same request would wait as long again).
   */
  get retryable(): boolean {
    return RETRYABLE.has(this.code);
  }
}

/** 401 `invalid_api_key`: missing, malformed, unknown, revoked, expired or out-of-scope key. */
export class InvalidApiKeyError extends MoltGhostError {}
/** 403 `rate_limited`: the plan's request rate or concurrent streams exceeded. */
export class RateLimitedError extends MoltGhostError {}
/** 429 `quota_exceeded`: the monthly token quota is used up. */
export class QuotaExceededError extends MoltGhostError {}
/** 503 `agent_paused`: the agent is paused. */
export class AgentPausedError extends MoltGhostError {}
/** 202 `agent_initializing`: the agent is starting. */
export class AgentInitializingError extends MoltGhostError {}
/** 410 `agent_terminated`: the agent is gone for good. */
export class AgentTerminatedError extends MoltGhostError {}
/** 504 `timeout`: `timeout_seconds` or the edge's deadline passed (or the SDK's own). */
export class TimeoutError extends MoltGhostError {}
/** 400 `invalid_request`: malformed JSON or a bad field (the message names it). */
export class InvalidRequestError extends MoltGhostError {}
/** 404 `not_found`: no agent at this endpoint, or no such route. */
export class NotFoundError extends MoltGhostError {}
/** 405 `method_not_allowed`. */
export class MethodNotAllowedError extends MoltGhostError {}
/** 413 `request_too_large`: the body is over the edge's limit. */
export class RequestTooLargeError extends MoltGhostError {}
/** 502 `upstream_unavailable`: the agent's runtime is unreachable or failed. */
export class UpstreamUnavailableError extends MoltGhostError {}
/** A policy plugin refused the request (`policy_denied`, its own status). */
export class PolicyDeniedError extends MoltGhostError {}
/** 503 `plugin_failed`: a policy plugin failed and the edge failed closed. */
export class PluginFailedError extends MoltGhostError {}
/** The edge could not be reached at all (DNS, refused, reset). */
export class ConnectionError extends MoltGhostError {}
/** The caller aborted (its `AbortSignal`). */
export class AbortedError extends MoltGhostError {}

const CLASSES: Record<string, new (message: string, info: ErrorInfo) => MoltGhostError> = {
  invalid_api_key: InvalidApiKeyError,
  rate_limited: RateLimitedError,
  quota_exceeded: QuotaExceededError,
  agent_paused: AgentPausedError,
  agent_initializing: AgentInitializingError,
  agent_terminated: AgentTerminatedError,
  timeout: TimeoutError,
  invalid_request: InvalidRequestError,
  not_found: NotFoundError,
  method_not_allowed: MethodNotAllowedError,
  request_too_large: RequestTooLargeError,
  upstream_unavailable: UpstreamUnavailableError,
  policy_denied: PolicyDeniedError,
  plugin_failed: PluginFailedError,
  connection_error: ConnectionError,
  aborted: AbortedError,
};

const RETRYABLE = new Set([
  "rate_limited",
  "agent_paused",
  "agent_initializing",
  "upstream_unavailable",
  "plugin_failed",
  "connection_error",
]);

/** The typed error for an error body (or frame) and its status and headers. */
export function errorFrom(
  status: number,
  body: unknown,
  headers?: { get(name: string): string | null },
): MoltGhostError {
  const err = (body as { error?: { message?: unknown; code?: unknown; type?: unknown } } | null)
    ?.error;
  const code = typeof err?.code === "string" ? err.code : codeForStatus(status);
  const message =
    typeof err?.message === "string" ? err.message : `the edge answered with status ${status}`;
  const type = typeof err?.type === "string" ? err.type : "api_error";
  const retry = headers?.get("retry-after");
  const retryAfter = retry != null && /^\d+(\.\d+)?$/.test(retry) ? Number(retry) : undefined;
  const info: ErrorInfo = {
    status,
    code,
    type,
    requestId: headers?.get("x-request-id") ?? undefined,
    retryAfter,
  };
  const Class = CLASSES[code] ?? MoltGhostError;
  return new Class(message, info);
}

function codeForStatus(status: number): string {
  switch (status) {
    case 401:
      return "invalid_api_key";
    case 404:
      return "not_found";
    case 429:
      return "quota_exceeded";
    case 504:
      return "timeout";
    default:
      return status >= 500 ? "upstream_unavailable" : "invalid_request";
  }
}

/** An error of the SDK's own (no answer from the edge): `aborted`, `timeout`, `connection_error`. */
export function localError(code: "aborted" | "timeout" | "connection_error", message: string): MoltGhostError {
  const Class = CLASSES[code];
  return new Class(message, { status: 0, code, type: code });
}
