// The official `openai` npm package against the edge, unchanged: a streamed and a whole chat
// completion. MOLTGHOST_BASE_URL is the endpoint's /v1 (http://127.0.0.1:8080/v1 with a key
// scoped to one agent), MOLTGHOST_KEY the key. Prints the streamed text, then one JSON line.
import OpenAI from 'openai';
const client = new OpenAI({ apiKey: process.env.MOLTGHOST_KEY, baseURL: process.env.MOLTGHOST_BASE_URL });
const stream = await client.chat.completions.create({
  model: 'llama3.1-70b',
  messages: [{ role: 'user', content: 'Analyze Q4 sales' }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = '';
let usage = null;
for await (const chunk of stream) {
  const delta = chunk.choices[0]?.delta?.content ?? '';
  text += delta;
  process.stdout.write(delta);
  if (chunk.usage) usage = chunk.usage;
}
const whole = await client.chat.completions.create({
  model: 'llama3.1-70b',
  messages: [{ role: 'user', content: 'Hello' }],
});
let refused = null;
try {
  await new OpenAI({ apiKey: 'molti_nope_nope', baseURL: process.env.MOLTGHOST_BASE_URL, maxRetries: 0 })
    .chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }] });
} catch (e) {
  refused = { status: e.status, code: e.code, type: e.type };
}
console.log('\n' + JSON.stringify({ streamed: text, usage, whole: whole.choices[0].message.content, whole_usage: whole.usage, refused }));
