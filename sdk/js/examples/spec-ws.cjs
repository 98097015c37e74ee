// The spec's WebSocket example ("2. WebSocket (Real-Time Streaming)"), as printed, with the
// endpoint and key from the environment: MOLTGHOST_WS_URL (ws://127.0.0.1:8080/ws or
// wss://abc123.agent.moltghost.io/ws) and MOLTGHOST_KEY.
const WebSocket = require('ws');
const ws = new WebSocket(
  process.env.MOLTGHOST_WS_URL,
  { headers: { 'Authorization': `Bearer ${process.env.MOLTGHOST_KEY}` } }
);
ws.on('open', () => {
  ws.send(JSON.stringify({
    action: 'message',
    messages: [{ role: 'user', content: 'Hello!' }]
  }));
});
ws.on('message', (data) => {
  const { content, done } = JSON.parse(data);
  if (content) process.stdout.write(content);
  if (done) ws.close();
});
