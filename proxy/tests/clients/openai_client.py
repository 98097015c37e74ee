"""Drives the edge with the official `openai` Python package, as a user would.

Usage: openai_client.py BASE_URL HOST API_KEY [SCOPED_KEY]

HOST names the agent for API_KEY (an account-wide key); SCOPED_KEY, a key scoped to that one
agent, is used without any Host, as the README's snippet does.
Prints one line per check and exits non-zero on the first failure.
"""
import sys

import openai
from openai import OpenAI

base_url, host = sys.argv[1], sys.argv[2]
api_key = sys.argv[3]
scoped_key = sys.argv[4] if len(sys.argv) > 4 else None


def client(agent_host):
    headers = {"Host": agent_host} if agent_host else {}
    return OpenAI(api_key=api_key, base_url=base_url, default_headers=headers, max_retries=0)


c = client(host)
messages = [{"role": "user", "content": "Analyze Q4 sales"}]

# Non-streaming chat.
r = c.chat.completions.create(model="llama3.1-70b", messages=messages)
assert r.choices[0].message.content.startswith("Hello!"), r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
print("ok chat non-streaming:", r.choices[0].message.content)

# Streaming chat, exactly as the spec prints it.
response = c.chat.completions.create(model="llama3.1-70b", messages=messages, stream=True)
text = ""
for chunk in response:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
assert text.startswith("Hello! I'm ready to help"), text
print("ok chat streaming:", text)

# Streaming with usage requested by the client.
response = c.chat.completions.create(
    model="llama3.1-70b", messages=messages, stream=True, stream_options={"include_usage": True}
)
usage = [ch.usage for ch in response if ch.usage]
assert len(usage) == 1 and usage[0].completion_tokens == 16, usage
print("ok chat streaming usage:", usage[0])

# Text completions, both ways.
r = c.completions.create(model="llama3.1-70b", prompt="Say hi", max_tokens=4)
assert r.choices[0].text == "Hello! I'm ready to", r
s = "".join(ch.choices[0].text for ch in c.completions.create(model="m", prompt="hi", stream=True) if ch.choices)
assert s.startswith("Hello!"), s
print("ok completions")

models = c.models.list()
assert models.data[0].id == "llama3.1-70b", models
print("ok models")

# Errors surface as the SDK's matching exceptions.
expect = {
    "paused1": openai.InternalServerError,  # 503
    "gone1": openai.APIStatusError,  # 410
    "down1": openai.InternalServerError,  # 502
    "nosuch": openai.NotFoundError,  # 404
}
for agent, exc in expect.items():
    try:
        client(host.replace(host.split(".")[0], agent, 1)).chat.completions.create(model="m", messages=messages)
    except exc as e:
        assert e.body and "code" in e.body, e.body
        print(f"ok {agent}: {type(e).__name__} {e.status_code} {e.body['code']}")
    else:
        raise AssertionError(f"{agent}: no {exc.__name__}")

try:
    c.chat.completions.create(model="m", messages=messages, extra_headers={"x-mock-status": "400"})
except openai.BadRequestError as e:
    print("ok bad request:", e.status_code)

# A stream broken by the runtime ends with an error event, which the SDK raises.
try:
    for _ in c.chat.completions.create(
        model="m", messages=messages, stream=True, extra_headers={"x-mock-abort-after": "3"}
    ):
        pass
except openai.APIError as e:
    print("ok broken stream raises:", type(e).__name__, e.message)
else:
    raise AssertionError("a broken stream did not raise")
if scoped_key:
    plain = OpenAI(api_key=scoped_key, base_url=base_url, max_retries=0)
    text = "".join(
        ch.choices[0].delta.content or ""
        for ch in plain.chat.completions.create(model="llama3.1-70b", messages=messages, stream=True)
        if ch.choices
    )
    assert text.startswith("Hello!"), text
    print("ok scoped key without Host:", text[:20])

try:
    OpenAI(api_key="molti_nobody_" + "x" * 40, base_url=base_url, max_retries=0).models.list()
except openai.AuthenticationError as e:
    assert e.body["code"] == "invalid_api_key", e.body
    print("ok bad key: AuthenticationError 401")
else:
    raise AssertionError("a bad key was accepted")
print("all openai checks passed")
