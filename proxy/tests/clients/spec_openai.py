"""The spec's Python example ("1. OpenAI-Compatible REST API"), as printed, with the base URL and
key from the environment (MOLTGHOST_BASE_URL, MOLTGHOST_KEY). Prints the streamed text."""
import os

from openai import OpenAI

client = OpenAI(
    api_key=os.environ["MOLTGHOST_KEY"],
    base_url=os.environ["MOLTGHOST_BASE_URL"],
)
response = client.chat.completions.create(
    model="llama3.1-70b",
    messages=[{"role": "user", "content": "Analyze Q4 sales"}],
    stream=True,
)
for chunk in response:
    print(chunk.choices[0].delta.content, end="")
