/**
 * `@moltghost/sdk`: a client for MoltGhost agent endpoints, for Node 20+ and browsers.
 *
 * ```ts
 * import { MoltGhostAgent } from '@moltghost/sdk';
 * const agent = new MoltGhostAgent({ agentId: 'abc123', apiKey: 'molti_xxxxx',
 *                                    endpoint: 'https://agent.moltghost.io' });
 * const response = await agent.chat('What are my top 3 customers?', {
 *   stream: true, onChunk: (text) => console.log(text) });
 * console.log('Total tokens:', response.usage.total_tokens);
 * ```
 */
export { MoltGhostAgent, agentUrl } from "./agent.js";
export type { AgentOptions, ChatMessage, ChatOptions, ChatResponse, Usage } from "./agent.js";
export { MoltGhostSession } from "./session.js";
export type { SessionOptions, SessionChatOptions, WebSocketConstructor } from "./session.js";
export * from "./errors.js";
export { readEvents } from "./sse.js";
export type { SseEvent } from "./sse.js";
