import { MoltGhostError, UpstreamUnavailableError, errorFrom, localError } from "./errors.js";
import { readEvents } from "./sse.js";
import { MoltGhostSession, type SessionOptions } from "./session.js";

/** A chat message, as the OpenAI and native formats have it. */
export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool" | (string & {});
  content: string | unknown[];
  name?: string;
  tool_call_id?: string;
}

/** Token counts of one answer. */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

/** A whole answer. */
export interface ChatResponse {
  /** The answer's text. */
  content: string;
  /** Its token counts (what the account is charged). */
  usage: Usage;
  /** Why it ended: `stop`, `length`, `tool_calls`, or `cancelled` (WebSocket). */
  finishReason: string;
  /** The answer's id. */
  id: string;
}

/** Options of one chat request. */
export interface ChatOptions {
  /** Stream the answer (each piece to `onChunk`); the promise still resolves to the whole. */
  stream?: boolean;
  /** Called with each piece of text as it arrives (streamed answers). */
  onChunk?: (text: string) => void;
  /** Aborts the request. */
  signal?: AbortSignal;
  /** The edge's deadline for the answer (504 `timeout` after it); the SDK waits a bit longer. */
  timeoutSeconds?: number;
  /** Skill names the agent may call. */
  tools?: string[];
  temperature?: number;
  maxTokens?: number;
  /** Model name, when the agent serves several. */
  model?: string;
}

/** How the agent client is set up. */
export interface AgentOptions {
  /** The agent's endpoint id (`abc123` in `https://abc123.agent.moltghost.io`). */
  agentId: string;
  /** An API key, `molti_<account>_<token>`. */
  apiKey: string;
  /**
   * The agents' domain, `https://agent.moltghost.io`: the agent's URL is
   * `https://<agentId>.agent.moltghost.io`. An endpoint that already names the agent, or an IP
   * address or `localhost` (with a key scoped to the one agent), is used as it is.
   */
  endpoint?: string;
  /** Tries after the first for retryable errors (default 2). */
  maxRetries?: number;
  /** Longest wait between tries in seconds, `retry-after` included (default 60). */
  maxRetryDelaySeconds?: number;
  /** The SDK's own deadline per try when no `timeoutSeconds` is given (default 600). */
  requestTimeoutSeconds?: number;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

const DEFAULT_ENDPOINT = "https://agent.moltghost.io";

/** The agent's base URL for `endpoint` and `agentId` (see {@link AgentOptions.endpoint}). */
export function agentUrl(endpoint: string, agentId: string): URL {
  const url = new URL(endpoint);
  const host = url.hostname;
  const literal =
    host === "localhost" || /^\d+\.\d+\.\d+\.\d+$/.test(host) || host.startsWith("[");
  if (!literal && !host.startsWith(`${agentId}.`)) url.hostname = `${agentId}.${host}`;
  url.pathname = url.pathname.replace(/\/+$/, "");
  url.search = "";
  url.hash = "";
  return url;
}

/** A client for one agent's endpoint. */
export class MoltGhostAgent {
  /** The agent's base URL. */
  readonly url: URL;
  readonly #key: string;
  readonly #fetch: typeof fetch;
  readonly #maxRetries: number;
  readonly #maxDelay: number;
  readonly #timeout: number;

  constructor(options: AgentOptions) {
    if (!options?.agentId) throw new TypeError("agentId is required");
    if (!options.apiKey) throw new TypeError("apiKey is required");
    this.url = agentUrl(options.endpoint ?? DEFAULT_ENDPOINT, options.agentId);
    this.#key = options.apiKey;
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.#maxRetries = options.maxRetries ?? 2;
    this.#maxDelay = options.maxRetryDelaySeconds ?? 60;
    this.#timeout = options.requestTimeoutSeconds ?? 600;
  }

  /**
   * Asks the agent. `stream: true` delivers the answer piece by piece to `onChunk`; either way
   * the promise resolves to the whole answer with its usage.
   */
  async chat(input: string | ChatMessage[], options: ChatOptions = {}): Promise<ChatResponse> {
    const body = chatBody(input, options);
    const res = await this.#request("POST", "/v1/chat", body, options.signal, options.timeoutSeconds);
    if (!options.stream) {
      const a = (await res.json()) as {
        id: string;
        content: string;
        finish_reason: string;
        usage: Usage;
      };
      return { content: a.content, usage: a.usage, finishReason: a.finish_reason, id: a.id };
    }
    if (!res.body) throw new UpstreamUnavailableError("the answer has no body", streamInfo(res));
    try {
      return await this.#readStream(res, options.onChunk);
    } catch (e) {
      if (e instanceof MoltGhostError) throw e;
      if (options.signal?.aborted) {
        throw localError("aborted", "the request was aborted");
      }
      throw new UpstreamUnavailableError(`the stream broke: ${(e as Error).message}`, streamInfo(res));
    }
  }

  async #readStream(res: Response, onChunk?: (text: string) => void): Promise<ChatResponse> {
    let content = "";
    for await (const ev of readEvents(res.body!)) {
      if (ev.data === "[DONE]") break;
      const data = JSON.parse(ev.data) as Record<string, unknown>;
      if (ev.event === "error" || data.error) throw errorFrom(res.status, data, res.headers);
      if (typeof data.content === "string" && data.content) {
        content += data.content;
        onChunk?.(data.content);
      }
      if (data.done === true) {
        return {
          content,
          usage: data.usage as Usage,
          finishReason: String(data.finish_reason ?? "stop"),
          id: String(data.id ?? ""),
        };
      }
    }
    throw new UpstreamUnavailableError("the stream ended before its last event", streamInfo(res));
  }

  /** Invokes one of the agent's skills with its arguments (`POST /v1/tools`). */
  async tools(
    tool: string,
    args: Record<string, unknown> = {},
    options: { signal?: AbortSignal } = {},
  ): Promise<{ tool: string; result: unknown }> {
    const res = await this.#request("POST", "/v1/tools", { tool, arguments: args }, options.signal);
    return (await res.json()) as { tool: string; result: unknown };
  }

  /** The models the agent serves (`GET /v1/models`, OpenAI's list format). */
  async models(options: { signal?: AbortSignal } = {}): Promise<{ id: string; object: string }[]> {
    const res = await this.#request("GET", "/v1/models", undefined, options.signal);
    return ((await res.json()) as { data: { id: string; object: string }[] }).data;
  }

  /** The agent's state and its pod's reachability (`GET /v1/health`). */
  async health(options: { signal?: AbortSignal } = {}): Promise<{
    agent: string;
    state: string;
    pod: { reachable: boolean; [k: string]: unknown };
    [k: string]: unknown;
  }> {
    const res = await this.#request("GET", "/v1/health", undefined, options.signal);
    return (await res.json()) as never;
  }

  /**
   * Opens a WebSocket session: many messages on one connection, answers streamed as frames.
   * In Node 20 pass the `ws` package (`{ WebSocket }` from `ws`) unless a global exists.
   */
  async session(options: SessionOptions = {}): Promise<MoltGhostSession> {
    const url = new URL(this.url);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.pathname = `${url.pathname.replace(/\/+$/, "")}/ws`;
    return MoltGhostSession.open(url.toString(), this.#key, options);
  }

  /**
   * One request with retries: retryable errors (rate, pause, start-up, timeouts, unreachable)
   * are tried again after exponential back-off with jitter, or after `retry-after` when the
   * edge gave one; `quota_exceeded`, `agent_terminated`, key and input errors never are.
   */
  async #request(
    method: string,
    path: string,
    body: unknown,
    signal?: AbortSignal,
    timeoutSeconds?: number,
  ): Promise<Response> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#once(method, path, body, signal, timeoutSeconds);
      } catch (e) {
        const err = e as MoltGhostError;
        if (!(err instanceof MoltGhostError) || !err.retryable || attempt >= this.#maxRetries) {
          throw err;
        }
        const backoff = Math.min(0.5 * 2 ** attempt, 8) * (0.5 + Math.random() / 2);
        const wait = Math.min(err.retryAfter ?? backoff, this.#maxDelay);
        await sleep(wait * 1000, signal);
      }
    }
  }

  async #once(
    method: string,
    path: string,
    body: unknown,
    signal?: AbortSignal,
    timeoutSeconds?: number,
  ): Promise<Response> {
    // The SDK's own deadline sits a little past the edge's, so the edge's 504 wins.
    const limit = timeoutSeconds !== undefined ? timeoutSeconds + 5 : this.#timeout;
    const timer = AbortSignal.timeout(limit * 1000);
    const both = signal ? AbortSignal.any([signal, timer]) : timer;
    let res: Response;
    try {
      res = await this.#fetch(`${this.url.origin}${this.url.pathname.replace(/\/+$/, "")}${path}`, {
        method,
        headers: {
          authorization: `Bearer ${this.#key}`,
          accept: "application/json, text/event-stream",
          ...(body === undefined ? {} : { "content-type": "application/json" }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: both,
      });
    } catch (e) {
      if (signal?.aborted) {
        throw localError("aborted", "the request was aborted");
      }
      if (timer.aborted) {
        throw localError("timeout", `no answer within ${limit} s`);
      }
      throw localError("connection_error", `cannot reach ${this.url.origin}: ${(e as Error).message}`);
    }
    // 202 is "agent initializing": an error here, not a success.
    if (res.status >= 200 && res.status < 300 && res.status !== 202) return res;
    let parsed: unknown = null;
    try {
      parsed = await res.json();
    } catch {
      // not JSON: described by the status alone
    }
    throw errorFrom(res.status, parsed, res.headers);
  }
}

function chatBody(input: string | ChatMessage[], o: ChatOptions): Record<string, unknown> {
  const messages = typeof input === "string" ? [{ role: "user", content: input }] : input;
  const body: Record<string, unknown> = { messages, stream: Boolean(o.stream) };
  if (o.temperature !== undefined) body.temperature = o.temperature;
  if (o.maxTokens !== undefined) body.max_tokens = o.maxTokens;
  if (o.tools !== undefined) body.tools = o.tools;
  if (o.timeoutSeconds !== undefined) body.timeout_seconds = o.timeoutSeconds;
  if (o.model !== undefined) body.model = o.model;
  return body;
}

/** The native chat request for a message (shared with the WebSocket session). */
export { chatBody };

function streamInfo(res: Response) {
  return {
    status: 502,
    code: "upstream_unavailable",
    type: "api_error",
    requestId: res.headers.get("x-request-id") ?? undefined,
  };
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(t);
        reject(localError("aborted", "the request was aborted"));
      },
      { once: true },
    );
  });
}
