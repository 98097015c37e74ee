/** One server-sent event: its `event:` name (`message` when absent) and its joined `data:`. */
export interface SseEvent {
  event: string;
  data: string;
}

/**
 * Reads server-sent events from a fetch body, event by event, as they arrive. Lines may end in
 * LF, CRLF or CR and may be split across chunks anywhere (the decoder keeps multi-byte
 * characters whole).
 */
export async function* readEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<SseEvent> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "";
  let data: string[] = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buffer);
        // A lone CR at the end may be the first half of CRLF: wait for the next chunk.
        if (!m || (m[0] === "\r" && m.index === buffer.length - 1 && !done)) break;
        const line = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length > 0) yield { event: event || "message", data: data.join("\n") };
          event = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") data.push(val);
        else if (field === "event") event = val;
      }
      if (done) {
        if (data.length > 0) yield { event: event || "message", data: data.join("\n") };
        return;
      }
    }
  } finally {
    // Early exit (the caller stopped reading or aborted): let the connection go.
    await reader.cancel().catch(() => undefined);
  }
}
