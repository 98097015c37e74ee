import { MoltGhostError, errorFrom, localError } from "./errors.js";
import type { ChatMessage, ChatOptions, ChatResponse, Usage } from "./agent.js";
import { chatBody } from "./agent.js";

/** The WebSocket API both the browsers' `WebSocket` and the `ws` package offer. */
interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: never) => void): void;
}

/** A WebSocket constructor: the global one (browsers, Node 22+) or the `ws` package's. */
export type WebSocketConstructor = new (
  url: string,
  protocols?: string | string[],
  options?: unknown,
) => SocketLike;

/** How a session opens. */
export interface SessionOptions {
  /** The WebSocket class to use (default: the global one; in Node 20 pass `ws`'s). */
  WebSocket?: WebSocketConstructor;
  /** Aborts the connection attempt. */
  signal?: AbortSignal;
}

/** Per-message options: the chat options a WebSocket message carries. */
export type SessionChatOptions = Omit<ChatOptions, "stream" | "signal"> & { signal?: AbortSignal };

interface Pending {
  content: string;
  onChunk?: (text: string) => void;
  resolve: (r: ChatResponse) => void;
  reject: (e: MoltGhostError) => void;
}

/**
 * A WebSocket to the agent (`/ws`): send messages, get streamed answers, in order. The key
 * travels in the `Authorization` header where the WebSocket class allows headers (the `ws`
 * package), else in the `bearer.<key>` subprotocol beside `moltghost` (browsers).
 */
export class MoltGhostSession {
  readonly #socket: SocketLike;
  readonly #pending: Pending[] = [];
  #closed?: MoltGhostError;
  /** Resolves when the socket has closed, with its close code. */
  readonly closed: Promise<{ code: number; reason: string }>;

  private constructor(socket: SocketLike) {
    this.#socket = socket;
    this.closed = new Promise((resolve) => {
      socket.addEventListener("close", ((ev: { code: number; reason: string }) => {
        const err = localError(
          "connection_error",
          `the WebSocket closed (${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`,
        );
        this.#fail(err);
        resolve({ code: ev.code, reason: ev.reason });
      }) as never);
    });
    socket.addEventListener("message", ((ev: { data: unknown }) => this.#onFrame(ev.data)) as never);
  }

  /** Opens the socket; rejects with the edge's error (e.g. 401) when it refuses. */
  static async open(url: string, key: string, options: SessionOptions): Promise<MoltGhostSession> {
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new TypeError("no WebSocket class: pass { WebSocket } from the `ws` package");
    }
    const node = WS !== (globalThis as { WebSocket?: unknown }).WebSocket;
    const socket = node
      ? new WS(url, ["moltghost"], { headers: { authorization: `Bearer ${key}` } })
      : new WS(url, ["moltghost", `bearer.${key}`]);
    await new Promise<void>((resolve, reject) => {
      const abort = () => {
        socket.close();
        reject(localError("aborted", "the session was aborted while opening"));
      };
      options.signal?.addEventListener("abort", abort, { once: true });
      socket.addEventListener("open", (() => resolve()) as never);
      // `ws` reports the refused handshake's status and body (an EventEmitter event, not a DOM
      // one); browsers say nothing more than "error".
      const emitter = socket as unknown as {
        on?: (type: string, cb: (req: { destroy(): void }, res: NodeLikeResponse) => void) => void;
        terminate?: () => void;
      };
      emitter.on?.("unexpected-response", (req, res) => {
        readAll(res).then((text) => {
          let body: unknown = null;
          try {
            body = JSON.parse(text);
          } catch {
            // described by the status alone
          }
          reject(errorFrom(res.statusCode, body, { get: (n) => header(res, n) }));
          req.destroy();
          emitter.terminate?.();
        }, reject);
      });
      socket.addEventListener("error", (() =>
        reject(
          localError("connection_error", `cannot open ${url}`),
        )) as never);
    });
    return new MoltGhostSession(socket);
  }

  /** Sends a message; resolves with the whole answer once its `done` frame arrives. */
  chat(input: string | ChatMessage[], options: SessionChatOptions = {}): Promise<ChatResponse> {
    if (this.#closed) return Promise.reject(this.#closed);
    const body = { action: "message", ...chatBody(input, { ...options, stream: true }) };
    return new Promise((resolve, reject) => {
      this.#pending.push({ content: "", onChunk: options.onChunk, resolve, reject });
      options.signal?.addEventListener("abort", () => this.cancel(), { once: true });
      this.#socket.send(JSON.stringify(body));
    });
  }

  /** Stops the answer in progress (it resolves with `finishReason: "cancelled"`). */
  cancel(): void {
    if (!this.#closed && this.#pending.length > 0) {
      this.#socket.send(JSON.stringify({ action: "cancel" }));
    }
  }

  /** Closes the socket (1000); pending messages reject. */
  close(): Promise<{ code: number; reason: string }> {
    this.#socket.close(1000);
    return this.closed;
  }

  #onFrame(data: unknown): void {
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(typeof data === "string" ? data : String(data)) as Record<string, unknown>;
    } catch {
      return;
    }
    const head = this.#pending[0];
    if (frame.error) {
      const status = STATUS[(frame.error as { code?: string }).code ?? ""] ?? 400;
      const err = errorFrom(status, frame);
      // An error frame answers the oldest message, or (none pending) precedes a close.
      if (head) {
        this.#pending.shift();
        head.reject(err);
      } else {
        this.#closed ??= err;
      }
      return;
    }
    if (!head) return;
    if (typeof frame.content === "string" && frame.content) {
      head.content += frame.content;
      head.onChunk?.(frame.content);
    }
    if (frame.done === true) {
      this.#pending.shift();
      head.resolve({
        content: head.content,
        usage: frame.usage as Usage,
        finishReason: String(frame.finish_reason ?? "stop"),
        id: String(frame.id ?? ""),
      });
    }
  }

  #fail(err: MoltGhostError): void {
    this.#closed ??= err;
    for (const p of this.#pending.splice(0)) p.reject(this.#closed);
  }
}

/** The HTTP status of each error code, for error frames (which carry no status). */
const STATUS: Record<string, number> = {
  invalid_api_key: 401,
  rate_limited: 403,
  quota_exceeded: 429,
  agent_paused: 503,
  agent_initializing: 202,
  agent_terminated: 410,
  timeout: 504,
  invalid_request: 400,
  request_too_large: 413,
  upstream_unavailable: 502,
  plugin_failed: 503,
};

interface NodeLikeResponse {
  statusCode: number;
  headers: Record<string, string | string[] | undefined>;
  on(event: string, cb: (chunk?: unknown) => void): void;
}

function header(res: NodeLikeResponse, name: string): string | null {
  const v = res.headers[name.toLowerCase()];
  return Array.isArray(v) ? (v[0] ?? null) : (v ?? null);
}

function readAll(res: NodeLikeResponse): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = "";
    res.on("data", (c) => (text += String(c)));
    res.on("end", () => resolve(text));
    res.on("error", (e) => reject(e));
  });
}
