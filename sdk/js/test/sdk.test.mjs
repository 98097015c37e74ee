// The SDK against a real edge (started by the conformance suite, `proxy/tests/conformance.rs`,
// which sets MOLTGHOST_ENDPOINT, MOLTGHOST_AGENT and MOLTGHOST_KEY), plus its retry policy and
// URL rules on their own. Without the variables the edge tests are skipped, saying so.
import { test } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import {
  MoltGhostAgent,
  agentUrl,
  InvalidApiKeyError,
  InvalidRequestError,
  QuotaExceededError,
  AgentTerminatedError,
  RateLimitedError,
  AbortedError,
  MoltGhostError,
} from "@moltghost/sdk";

const { MOLTGHOST_ENDPOINT: endpoint, MOLTGHOST_AGENT: agentId, MOLTGHOST_KEY: apiKey } =
  process.env;
const live = endpoint && agentId && apiKey;
const skip = live ? false : "set MOLTGHOST_ENDPOINT, MOLTGHOST_AGENT and MOLTGHOST_KEY (a running edge)";
const agent = () => new MoltGhostAgent({ agentId, apiKey, endpoint });

test("the spec's example: a streamed chat, chunks as they come, then the usage", { skip }, async () => {
  const chunks = [];
  const response = await agent().chat("What are my top 3 customers?", {
    stream: true,
    onChunk: (text) => chunks.push(text),
  });
  assert.ok(chunks.length > 1, "several chunks");
  assert.equal(response.content, chunks.join(""));
  assert.ok(response.usage.total_tokens > 0);
  assert.equal(
    response.usage.total_tokens,
    response.usage.prompt_tokens + response.usage.completion_tokens,
  );
  assert.equal(response.finishReason, "stop");
  assert.ok(response.id);
});

test("a whole answer, with the native options", { skip }, async () => {
  const r = await agent().chat([{ role: "user", content: "Hello" }], {
    maxTokens: 3,
    temperature: 0.2,
    tools: ["crm_query"],
    timeoutSeconds: 30,
  });
  assert.equal(r.usage.completion_tokens, 3);
  assert.equal(r.finishReason, "length");
  assert.ok(r.content.length > 0);
});

test("skills, models and health", { skip }, async () => {
  const a = agent();
  const t = await a.tools("crm_query", { top: 3 });
  assert.equal(t.tool, "crm_query");
  assert.deepEqual(t.result.echo, { top: 3 });
  const models = await a.models();
  assert.ok(models.length >= 1 && models[0].id);
  const h = await a.health();
  assert.equal(h.state, "running");
  assert.equal(h.pod.reachable, true);
});

test("typed errors from the edge", { skip }, async () => {
  const bad = new MoltGhostAgent({ agentId, apiKey: "molti_nope_nope", endpoint, maxRetries: 0 });
  await assert.rejects(bad.chat("hi"), (e) => {
    assert.ok(e instanceof InvalidApiKeyError && e instanceof MoltGhostError);
    assert.equal(e.status, 401);
    assert.equal(e.code, "invalid_api_key");
    assert.equal(e.type, "authentication_error");
    assert.ok(e.requestId);
    return true;
  });
  await assert.rejects(agent().chat("hi", { temperature: 7 }), (e) => {
    assert.ok(e instanceof InvalidRequestError);
    assert.match(e.message, /temperature/);
    return true;
  });
  await assert.rejects(agent().tools("no_such_skill"), (e) => e.status === 404);
});

test("an abort signal stops a request", { skip }, async () => {
  const ctl = new AbortController();
  const p = agent().chat("hi", { stream: true, signal: ctl.signal, onChunk: () => ctl.abort() });
  await assert.rejects(p, (e) => e instanceof AbortedError);
});

test("a WebSocket session: several messages, streamed, and cancel", { skip }, async () => {
  const s = await agent().session({ WebSocket });
  const chunks = [];
  const first = await s.chat("Hello!", { onChunk: (t) => chunks.push(t) });
  assert.ok(chunks.length > 1);
  assert.equal(first.content, chunks.join(""));
  assert.ok(first.usage.total_tokens > 0);
  const [a, b] = await Promise.all([s.chat("one", { maxTokens: 2 }), s.chat("two", { maxTokens: 4 })]);
  assert.equal(a.usage.completion_tokens, 2);
  assert.equal(b.usage.completion_tokens, 4);
  await assert.rejects(s.chat("x", { temperature: 9 }), (e) => e instanceof InvalidRequestError);
  const closed = await s.close();
  assert.equal(closed.code, 1000);
  const refused = new MoltGhostAgent({ agentId, apiKey: "molti_nope_nope", endpoint });
  await assert.rejects(refused.session({ WebSocket }), (e) => e instanceof InvalidApiKeyError);
});

/** A fetch that answers from a list, counting calls. */
function scripted(answers) {
  const calls = [];
  const fetch = async (url) => {
    calls.push(String(url));
    const [status, body, headers] = answers[Math.min(calls.length - 1, answers.length - 1)];
    return new Response(JSON.stringify(body), {
      status,
      headers: { "content-type": "application/json", ...headers },
    });
  };
  return { fetch, calls };
}

const err = (code) => ({ error: { message: code, code, type: "t" } });
const ok = {
  id: "msg_1",
  object: "chat.completion",
  created: 1,
  model: "m",
  finish_reason: "stop",
  content: "hi",
  usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
};

test("retries: back-off, retry-after honoured, quota and termination never retried", async () => {
  const base = { agentId: "abc123", apiKey: "molti_a_b", endpoint: "https://agent.example.com" };
  let s = scripted([[403, err("rate_limited"), { "retry-after": "0" }], [200, ok]]);
  const t0 = Date.now();
  const r = await new MoltGhostAgent({ ...base, fetch: s.fetch }).chat("x");
  assert.equal(r.content, "hi");
  assert.equal(s.calls.length, 2);
  assert.ok(Date.now() - t0 < 1000, "retry-after: 0 means at once");
  assert.equal(s.calls[0], "https://abc123.agent.example.com/v1/chat");

  s = scripted([[403, err("rate_limited"), { "retry-after": "0" }]]);
  await assert.rejects(new MoltGhostAgent({ ...base, fetch: s.fetch, maxRetries: 2 }).chat("x"), RateLimitedError);
  assert.equal(s.calls.length, 3, "the first try and two retries");

  for (const [status, code, Class] of [
    [429, "quota_exceeded", QuotaExceededError],
    [410, "agent_terminated", AgentTerminatedError],
    [401, "invalid_api_key", InvalidApiKeyError],
  ]) {
    s = scripted([[status, err(code), { "x-should-retry": "false" }]]);
    await assert.rejects(new MoltGhostAgent({ ...base, fetch: s.fetch, maxRetries: 5 }).chat("x"), Class);
    assert.equal(s.calls.length, 1, `${code} is never retried`);
  }

  // Without retry-after the wait grows exponentially (0.25–0.5 s, then 0.5–1 s).
  s = scripted([[503, err("upstream_unavailable"), {}], [502, err("upstream_unavailable"), {}], [200, ok]]);
  const t1 = Date.now();
  await new MoltGhostAgent({ ...base, fetch: s.fetch }).chat("x");
  const waited = Date.now() - t1;
  assert.ok(waited >= 700 && waited < 3000, `waited ${waited} ms`);
});

test("endpoint rules", () => {
  assert.equal(agentUrl("https://agent.moltghost.io", "abc123").href, "https://abc123.agent.moltghost.io/");
  assert.equal(agentUrl("https://abc123.agent.moltghost.io/", "abc123").href, "https://abc123.agent.moltghost.io/");
  assert.equal(agentUrl("http://127.0.0.1:8080", "abc123").href, "http://127.0.0.1:8080/");
  assert.equal(agentUrl("http://localhost:8080", "abc123").href, "http://localhost:8080/");
});
