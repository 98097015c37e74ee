// The spec's SDK example ("3. JavaScript/TypeScript SDK"), as printed, with the agent, key and
// endpoint from the environment (MOLTGHOST_AGENT, MOLTGHOST_KEY, MOLTGHOST_ENDPOINT).
import { MoltGhostAgent } from '@moltghost/sdk';
const agent = new MoltGhostAgent({
  agentId: process.env.MOLTGHOST_AGENT,
  apiKey: process.env.MOLTGHOST_KEY,
  endpoint: process.env.MOLTGHOST_ENDPOINT
});
const response = await agent.chat('What are my top 3 customers?', {
  stream: true,
  onChunk: (text) => console.log(text)
});
console.log('Total tokens:', response.usage.total_tokens);
