"""The openai SDK against a simulated pod, for tests/sim_pods.rs.

  openai_client.py BASE_URL MODEL SCENARIO [ARG...]

Scenarios (each prints one JSON line):
  shapes                 chat and completions, each non-streaming and streaming with
                         stream_options.include_usage
  completions P1 P2 ...  non-streaming completions of each prompt in turn, their usage
  paced MAX_TOKENS       a streamed chat completion: the arrival time of every content chunk
  disconnect             opens a long stream, reads 3 chunks and closes the connection
"""

import json
import sys
import time

import openai


def usage_dict(usage):
    return usage.model_dump() if usage is not None else None


def shapes(client, model):
    messages = [{"role": "user", "content": "Say something about prefix caches."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=5)
    chat_stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat_chunks = list(chat_stream)
    completion = client.completions.create(model=model, prompt="The router", max_tokens=4)
    completion_stream = client.completions.create(
        model=model,
        prompt="The router",
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    completion_chunks = list(completion_stream)
    return {
        "chat": {
            "object": chat.object,
            "id": chat.id,
            "role": chat.choices[0].message.role,
            "content": chat.choices[0].message.content,
            "finish_reason": chat.choices[0].finish_reason,
            "usage": usage_dict(chat.usage),
        },
        "chat_stream": {
            "objects": sorted({c.object for c in chat_chunks}),
            "roles": [c.choices[0].delta.role for c in chat_chunks if c.choices and c.choices[0].delta.role],
            "contents": [c.choices[0].delta.content for c in chat_chunks if c.choices],
            "finish_reasons": [c.choices[0].finish_reason for c in chat_chunks if c.choices],
            "usage": [usage_dict(c.usage) for c in chat_chunks if c.usage is not None],
            "ids": sorted({c.id for c in chat_chunks}),
        },
        "completion": {
            "object": completion.object,
            "text": completion.choices[0].text,
            "finish_reason": completion.choices[0].finish_reason,
            "usage": usage_dict(completion.usage),
        },
        "completion_stream": {
            "texts": [c.choices[0].text for c in completion_chunks if c.choices],
            "finish_reasons": [c.choices[0].finish_reason for c in completion_chunks if c.choices],
            "usage": [usage_dict(c.usage) for c in completion_chunks if c.usage is not None],
        },
    }


def completions(client, model, prompts):
    results = []
    for prompt in prompts:
        response = client.completions.create(model=model, prompt=prompt, max_tokens=2)
        results.append(usage_dict(response.usage))
    return {"usages": results}


def paced(client, model, max_tokens):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Stream slowly, please."}],
        max_tokens=max_tokens,
        stream=True,
    )
    times = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.monotonic())
    return {"chunk_times": times}


def disconnect(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A very long answer, please."}],
        max_tokens=5000,
        stream=True,
    )
    received = 0
    for _ in stream:
        received += 1
        if received == 3:
            break
    stream.close()
    return {"received": received}


def main():
    base_url, model, scenario, *args = sys.argv[1:]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    if scenario == "shapes":
        result = shapes(client, model)
    elif scenario == "completions":
        result = completions(client, model, args)
    elif scenario == "paced":
        result = paced(client, model, int(args[0]))
    elif scenario == "disconnect":
        result = disconnect(client, model)
    else:
        sys.exit(f"unknown scenario {scenario}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
