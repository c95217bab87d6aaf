"""Drives kvgate with the official openai SDK; prints one JSON result line."""

import json
import sys
import time

import openai

base_url, model, mode = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=20)
messages = [{"role": "user", "content": "Say hello in four tokens."}]
headers = {"x-fake-tokens": "4", "x-fake-cached-tokens": "16"}

if mode == "stream":
    start = time.monotonic()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=dict(headers, **{"x-fake-delay-ms": "100"}),
    )
    pieces, arrivals, usage = [], [], None
    for chunk in stream:
        arrivals.append(time.monotonic() - start)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    print(json.dumps({"content": "".join(pieces), "arrivals": arrivals, "usage": usage}))
elif mode == "complete":
    response = client.chat.completions.create(model=model, messages=messages, extra_headers=headers)
    print(json.dumps({"content": response.choices[0].message.content, "usage": response.usage.model_dump()}))
elif mode == "unknown-model":
    try:
        client.chat.completions.create(model=model, messages=messages)
        print(json.dumps({"error": None}))
    except openai.NotFoundError as e:
        print(json.dumps({"error": "not_found", "status": e.status_code, "code": e.code}))
else:
    sys.exit("unknown mode " + mode)
