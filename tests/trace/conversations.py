"""Multi-turn conversations over shared documents through kvgate, with the openai SDK,
for tests/trace_replay.rs.

  conversations.py BASE_URL MODEL DOCUMENTS CONVERSATIONS TURNS

Each conversation asks TURNS questions about one of DOCUMENTS documents (a shared
prefix), one request after another; odd requests stream with
stream_options.include_usage, even ones do not. Prints one JSON line: every request's
usage as the pod reported it.
"""

import json
import sys

import openai


def document(n):
    return " ".join(f"clause{n}x{w} binds section {(n * 13 + w * 7) % 41}." for w in range(220))


def ask(client, model, messages, stream):
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        return response.choices[0].message.content, response.usage
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next(c.usage for c in chunks if c.usage is not None)
    return text, usage


def main():
    base_url, model, documents, conversations, turns = sys.argv[1:]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    usages = []
    for c in range(int(conversations)):
        doc = c % int(documents)
        messages = [{"role": "system", "content": f"Answer from this contract.\n{document(doc)}"}]
        for t in range(int(turns)):
            messages.append({"role": "user", "content": f"Question {t} of reader {c}: what binds clause{doc}x{t * 5}?"})
            answer, usage = ask(client, model, messages, stream=len(usages) % 2 == 1)
            messages.append({"role": "assistant", "content": answer})
            details = usage.prompt_tokens_details
            usages.append(
                {
                    "prompt_tokens": usage.prompt_tokens,
                    "cached_tokens": details.cached_tokens if details else 0,
                    "completion_tokens": usage.completion_tokens,
                }
            )
    print(json.dumps({"usages": usages}), flush=True)


if __name__ == "__main__":
    main()
