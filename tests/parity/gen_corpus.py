#!/usr/bin/env python3
"""Writes the token-parity corpus: OpenAI request bodies for /v1/chat/completions
and /v1/completions that exercise everything a vLLM pod does to a prompt.

Deterministic: the same inputs give the same corpus. Usage:
    gen_corpus.py --shared ../shared --out corpus.json [--long-docs 3]
"""

import argparse
import ast
import json
import random
from pathlib import Path

SEED = 20251126

PHRASES = [
    "Hello!", "What is the capital of France?", "Explain quicksort in two sentences.",
    "Write a haiku about routers.", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n",
    "¿Dónde está la biblioteca?", "Grüße aus Köln, schöne Straße.", "日本語のテキストを要約してください。",
    "请用中文回答：什么是键值缓存？", "한국어로 대답해 주세요.", "Привет, как дела?", "مرحبا بالعالم",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵", "combining: e\u0301 a\u0308 n\u0303 (decomposed)",
    "precomposed: é ä ñ", "Hangul jamo \u1100\u1161\u11a8 compose", "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, ①②③",
    "zero\u200bwidth\u200dspace and nbsp\u00a0here", "line\u2028separator and\u2029paragraph",
    "control \x01\x02 chars and DEL \x7f", "math: ∑_{i=1}^{n} i² = n(n+1)/2, √2 ≈ 1.414",
    "code: fn main() { println!(\"{:?}\", vec![1, 2, 3]); }", "<html><body>&amp; &lt;tag&gt;</body></html>",
    "JSON: {\"key\": [1, 2.5, null, true]}", "numbers 1234567890 3.14159 -2e10 0x1F",
    "", "   ", "\n", "Repeat repeat repeat repeat repeat repeat.",
    "a" * 300, "The quick brown fox jumps over the lazy dog. " * 8,
]

TRICKY = [
    "literal <|im_start|>user\nfake turn<|im_end|> inside text",
    "a think tag <think>hidden</think> in user text",
    "tool markup <tool_call>{\"name\": \"x\"}</tool_call> typed by a user",
    "<tool_response>\nlooks like a tool response\n</tool_response>",
    "special <|endoftext|> and <|fim_prefix|> tokens",
    "unterminated <|im_start and <think",
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web — returns top results.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
            "threshold": {"type": "number", "default": 0.5, "exclusiveMinimum": 1e-7}}}}},
    {"function": {"name": "no_description", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "bare"}},
    {"type": "function", "function": {
        "name": "nested", "description": "多语言描述 with 😀",
        "parameters": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}},
            "options": {"type": "object", "additionalProperties": {"type": "boolean"}}}},
        "strict": True}},
]

ARGUMENTS = [
    '{"city": "Paris"}',
    '{"city": "Zürich", "unit": "celsius"}',
    '{"query":"kv cache","top_k":5,"threshold":0.25}',
    '{"items": [{"id": 1, "tags": ["a", "b"]}], "options": {"x": true}}',
    '{"big": 12345678901234567890, "small": -0.000001, "exp": 1.5e300, "float": 3.0, "neg": -0}',
    '{"text": "line1\\nline2\\t\\"quoted\\" \\u00e9 \\ud83d\\ude00"}',
    '{"b": 1, "a": 2, "b": 3}',
    '  {"padded": true}  ',
    "not json at all",
    "",
    "[1, 2, 3]",
    '"just a string"',
    "42",
    {"city": "Berlin", "unit": "celsius"},
    {"z": [1.1, 2.0, None, False], "a": {"nested": "é"}},
]


def pick(rng, items):
    return items[rng.randrange(len(items))]


def text(rng):
    return pick(rng, PHRASES + TRICKY) if rng.random() < 0.2 else pick(rng, PHRASES)


def chat(messages, **extra):
    body = {"model": "Qwen/Qwen3-8B", "messages": messages}
    body.update(extra)
    return ("chat", body)


def completion(prompt, **extra):
    body = {"model": "Qwen/Qwen3-8B", "prompt": prompt}
    body.update(extra)
    return ("completion", body)


def tool_call(rng, i, as_dict_chance=0.3):
    tool = pick(rng, TOOLS)
    args = pick(rng, ARGUMENTS)
    if rng.random() < as_dict_chance and isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"id": f"call_{i}", "type": "function", "function": {"name": tool["function"]["name"], "arguments": args}}


def thinking_answer(rng):
    return f"<think>\n{text(rng)}\n</think>\n\n{text(rng)}"


def simple_chats(rng, out):
    for i in range(30):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": text(rng)})
        messages.append({"role": "user", "content": text(rng)})
        kwargs = {}
        if i % 4 == 1:
            kwargs["chat_template_kwargs"] = {"enable_thinking": False}
        elif i % 4 == 2:
            kwargs["chat_template_kwargs"] = {"enable_thinking": True}
        out.append(chat(messages, **kwargs))


def growing_conversations(rng, out):
    for conversation in range(6):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for turn in range(5):
            messages.append({"role": "user", "content": text(rng)})
            thinking = {"chat_template_kwargs": {"enable_thinking": conversation % 2 == 0}}
            out.append(chat(json.loads(json.dumps(messages)), **thinking))
            answer = {"role": "assistant", "content": text(rng)}
            style = (conversation + turn) % 4
            if style == 1:
                answer["content"] = thinking_answer(rng)
            elif style == 2:
                answer["reasoning_content"] = text(rng)
            elif style == 3:
                answer["reasoning"] = text(rng)
            messages.append(answer)
        out.append(chat(messages, add_generation_prompt=False))


def tool_conversations(rng, out):
    for i in range(30):
        tools = rng.sample(TOOLS, rng.randint(1, len(TOOLS)))
        messages = []
        if i % 2 == 0:
            messages.append({"role": "system", "content": text(rng)})
        messages.append({"role": "user", "content": text(rng)})
        calls = [tool_call(rng, f"{i}_{k}") for k in range(rng.randint(1, 3))]
        assistant = {"role": "assistant", "tool_calls": calls}
        assistant["content"] = pick(rng, [None, "", "Let me check.", thinking_answer(rng)])
        if i % 5 == 0:
            assistant["reasoning_content"] = "I should call a tool."
        messages.append(assistant)
        for call in calls:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": pick(rng, [
                '{"temperature": 21.5, "unit": "celsius"}', "no results", "", text(rng)])})
        if i % 3 != 0:
            messages.append({"role": "assistant", "content": text(rng)})
            messages.append({"role": "user", "content": text(rng)})
        kwargs = {"tools": tools}
        if i % 4 == 0:
            kwargs["chat_template_kwargs"] = {"enable_thinking": False}
        out.append(chat(messages, **kwargs))
    # Tools given but never called, and an empty tool list.
    out.append(chat([{"role": "user", "content": "Any tools?"}], tools=TOOLS))
    out.append(chat([{"role": "user", "content": "Empty tools"}], tools=[]))
    out.append(chat([{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}], tools=[TOOLS[0]]))


def content_parts(rng, out):
    part_sets = [
        [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}],
        [{"type": "text", "text": ""}, {"type": "text", "text": "after an empty part"}],
        ["a bare string part", {"type": "text", "text": "and a dict part"}],
        [{"type": "text", "text": None}, {"type": "text", "text": "after a null part"}],
        [],
        [{"type": "input_text", "text": "input_text part"}, {"type": "refusal", "refusal": "I refuse"}],
        [{"type": "text", "text": "日本語"}, {"type": "text", "text": "😀"}],
    ]
    for i, parts in enumerate(part_sets):
        out.append(chat([{"role": "user", "content": parts}]))
        out.append(chat([
            {"role": "system", "content": [{"type": "text", "text": "system as parts"}]},
            {"role": "user", "content": text(rng)},
            {"role": "assistant", "content": parts},
            {"role": "user", "content": "ok"},
        ]))
    out.append(chat([{"role": "user", "content": ""}]))
    out.append(chat([{"role": "user", "content": None}]))
    out.append(chat([{"role": "user"}]))
    out.append(chat([{"role": "user", "content": "hi", "name": "alice"}, {"role": "assistant", "content": "hello", "name": "bot"}]))
    out.append(chat([{"role": "user", "content": "first"}, {"role": "system", "content": "late system"}, {"role": "user", "content": "second"}]))
    out.append(chat([{"role": "developer", "content": "developer role"}, {"role": "user", "content": "x"}]))
    for _ in range(8):
        out.append(chat([{"role": "user", "content": pick(rng, TRICKY)}]))


def generation_controls(rng, out):
    for i in range(6):
        messages = [{"role": "user", "content": text(rng)}, {"role": "assistant", "content": text(rng)}]
        out.append(chat(messages, add_generation_prompt=False))
    finals = ["The answer is", "The answer is ", "Partial answer with trailing newline\n", "简短回答：",
              "<think>\nstarted thinking", "x"]
    for final in finals:
        out.append(chat([{"role": "user", "content": "Continue this."}, {"role": "assistant", "content": final}],
                        add_generation_prompt=False, continue_final_message=True))
    out.append(chat([{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "text", "text": "From parts"}]}],
                    add_generation_prompt=False, continue_final_message=True))
    out.append(chat([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "thinking done", "reasoning_content": "why"}],
                    add_generation_prompt=False, continue_final_message=True))


def template_kwargs(rng, out):
    out.append(chat([{"role": "user", "content": "documents"}], documents=[{"title": "Doc", "text": "Body"}]))
    out.append(chat([{"role": "user", "content": "effort"}], reasoning_effort="none"))
    out.append(chat([{"role": "user", "content": "effort"}], reasoning_effort="high"))
    out.append(chat([{"role": "user", "content": "effort"}], reasoning_effort="low", chat_template_kwargs={"enable_thinking": True}))
    out.append(chat([{"role": "user", "content": "unused kwargs"}], chat_template_kwargs={"custom": [1, 2], "enable_thinking": False}))
    out.append(chat([{"role": "user", "content": "agp in kwargs"}], chat_template_kwargs={"add_generation_prompt": False}))
    out.append(chat([{"role": "user", "content": "special"}], add_special_tokens=True))


def long_documents(shared, count, out):
    docs = []
    for name in ("loogle_longdep_qa.jsonl", "loogle_shortdep_qa.jsonl"):
        with open(Path(shared) / "data" / "traces" / name, encoding="utf-8") as f:
            for line in f:
                docs.append(json.loads(line))
    docs = docs[:count]
    for d, doc in enumerate(docs):
        questions = [qa["Q"] for qa in ast.literal_eval(doc["qa_pairs"])][:3]
        system = {"role": "system", "content": f"Answer questions about the document titled {doc['title']}."}
        messages = [system, {"role": "user", "content": doc["input"] + "\n\nQuestion: " + questions[0]}]
        out.append(chat(json.loads(json.dumps(messages)), chat_template_kwargs={"enable_thinking": d % 2 == 0}))
        for q in questions[1:]:
            messages.append({"role": "assistant", "content": "An answer."})
            messages.append({"role": "user", "content": "Question: " + q})
            out.append(chat(json.loads(json.dumps(messages)), chat_template_kwargs={"enable_thinking": d % 2 == 0}))
    if docs:
        out.append(completion(docs[0]["input"][:20000]))


def completions(rng, out):
    for i in range(14):
        out.append(completion(text(rng)))
    for t in TRICKY:
        out.append(completion(t))
    out.append(completion([text(rng), text(rng)]))
    out.append(completion(["only one"]))
    out.append(completion("no special tokens", add_special_tokens=False))
    out.append(completion([151644, 872, 198, 9707, 151645]))
    out.append(completion([[1, 2, 3], [4, 5]]))
    out.append(completion([0]))


def random_fuzz(rng, out):
    roles = ["user", "assistant", "user", "assistant", "system", "tool"]
    for i in range(40):
        messages = []
        for _ in range(rng.randint(1, 7)):
            role = pick(rng, roles)
            message = {"role": role, "content": text(rng)}
            if role == "assistant" and rng.random() < 0.3:
                message["content"] = thinking_answer(rng)
            if role == "assistant" and rng.random() < 0.2:
                message["tool_calls"] = [tool_call(rng, f"f{i}")]
            if role == "tool":
                message["tool_call_id"] = f"f{i}"
            messages.append(message)
        if messages[-1]["role"] == "assistant" and rng.random() < 0.5:
            out.append(chat(messages, add_generation_prompt=False))
        else:
            extra = {"tools": rng.sample(TOOLS, 2)} if rng.random() < 0.3 else {}
            out.append(chat(messages, **extra))


def custom_templates(rng, out):
    """Requests rendered with the test templates in templates/ instead of Qwen3's (`chatTemplate`)."""
    def add(template, messages, **extra):
        endpoint, body = chat(messages, **extra)
        out.append((endpoint, body, {"chatTemplate": template}))

    for i in range(24):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "  " + text(rng) + "  "})
        for turn in range(rng.randint(1, 8)):
            messages.append({"role": "user", "content": pick(rng, [text(rng), "!" + text(rng), "a secret " + text(rng)])})
            answer = {"role": "assistant", "content": text(rng)}
            if rng.random() < 0.3:
                answer["tool_calls"] = [tool_call(rng, f"t{i}_{turn}", as_dict_chance=0.5)]
            if rng.random() < 0.2:
                answer["reasoning_content"] = text(rng)
            if rng.random() < 0.2:
                answer["name"] = "helper"
            messages.append(answer)
            if "tool_calls" in answer and rng.random() < 0.7:
                messages.append({"role": "tool", "tool_call_id": answer["tool_calls"][0]["id"], "content": text(rng)})
        messages.append({"role": "user", "content": text(rng)})
        extra = {}
        if i % 2 == 0:
            extra["tools"] = rng.sample(TOOLS, rng.randint(1, 3))
        if i % 5 == 0:
            extra["documents"] = [{"title": "First", "text": "A document body that is longer than twenty characters."},
                                  {"text": "untitled and short"}]
        if i % 7 == 0:
            extra["add_generation_prompt"] = False
        add("features.jinja", messages, **extra)
    add("features.jinja", [{"role": "developer", "content": "raises"}, {"role": "user", "content": "x"}])
    add("features.jinja", [{"role": "user", "content": ""}])
    for parts in ([{"type": "text", "text": "a"}, {"type": "text", "text": ""}, "bare"],
                  [{"type": "text", "text": "x"}, {"type": "tool_reference", "name": "search"}], [], "plain string"):
        add("parts.jinja", [{"role": "system", "content": "s"}, {"role": "user", "content": parts},
                            {"role": "tool", "content": parts, "tool_call_id": "c"},
                            {"role": "assistant", "content": None}])
    add("parts.jinja", [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "partial"}]}],
        add_generation_prompt=False, continue_final_message=True)


def template_options(out):
    """Requests to pods started with vLLM's template flags, as kvgate's `models[]` names them:
    `defaultChatTemplateKwargs` (--default-chat-template-kwargs), `chatTemplateContentFormat`
    (--chat-template-content-format) and `chatTemplate` (--chat-template)."""
    def add(options, messages, **extra):
        endpoint, body = chat(messages, **extra)
        out.append((endpoint, body, options))

    user = [{"role": "user", "content": "What is a KV cache?"}]
    parts = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
             {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    no_thinking = {"defaultChatTemplateKwargs": {"enable_thinking": False}}
    add(no_thinking, user)
    add(no_thinking, user, chat_template_kwargs={"enable_thinking": True})
    add(no_thinking, user, chat_template_kwargs={"enable_thinking": None})
    add(no_thinking, user, reasoning_effort="high")
    add(no_thinking, user, add_generation_prompt=False)
    custom = {"chatTemplate": "kwargs.jinja",
              "defaultChatTemplateKwargs": {"greeting": "Grüß Gott", "style": {"tone": "dry", "n": 3, "x": [1.5, None]},
                                            "add_generation_prompt": False, "enable_thinking": True}}
    add(custom, user)
    add(custom, user, chat_template_kwargs={"greeting": "Hola", "style": None})
    add(custom, user, add_generation_prompt=False)
    add(custom, user, reasoning_effort="none")
    add({"chatTemplate": "kwargs.jinja"}, user, chat_template_kwargs={"greeting": "only the request's"})
    for content_format in ("openai", "string", "auto"):
        add({"chatTemplateContentFormat": content_format}, parts)
        add({"chatTemplateContentFormat": content_format}, user)
        add({"chatTemplate": "parts.jinja", "chatTemplateContentFormat": content_format}, parts)
        add({"chatTemplate": "features.jinja", "chatTemplateContentFormat": content_format,
             "defaultChatTemplateKwargs": {"enable_thinking": False}}, parts, tools=[TOOLS[0]])


# Around a chunk end of the piece cache: every kind of character a cut can land next to.
ADVERSARIAL = ("The quick brown fox's   den, \t\t  12345 apples;\r\nnaïve café e\u0301 日本語の文章 😀👍🏽 "
               "ﬁne ＡＢＣ it'll     be (ok)...\n\n\n  --> x=3.14159; Привет мир  مرحبا \u00a0\u2028end.  ")
CONTINUATIONS = ["X", " ", "   \n", "\r\n", "7", "\u0301", "語", "😀", "'s", "ll", "!", "\u00a0y"]


def prefix_reuse(shared, out):
    """A long user message, then messages that agree with it up to every character around a
    chunk end of kvgate's piece cache (4096 bytes of the piece "user\\n" + content) and go on
    differently: kvgate reuses the seen prefix's ids, transformers tokenizes from scratch."""
    with open(Path(shared) / "data" / "traces" / "loogle_longdep_qa.jsonl", encoding="utf-8") as f:
        doc = json.loads(f.readline())["input"]
    chunk_end = 3 * 4096 - len("user\n".encode())
    head = doc.encode()[:chunk_end - 40].decode(errors="ignore")
    base = head + ADVERSARIAL + doc[len(head):len(head) + 12000]
    out.append(chat([{"role": "user", "content": base}]))
    for i in range(len(head), len(head) + len(ADVERSARIAL)):
        continuation = CONTINUATIONS[i % len(CONTINUATIONS)]
        out.append(chat([{"role": "user", "content": base[:i] + continuation + base[i:i + 3000]}]))
        if len(base[i].encode()) > 1:
            # The same lead bytes, another character: the shared prefix ends inside it.
            out.append(chat([{"role": "user", "content": base[:i] + chr(ord(base[i]) ^ 1) + base[i + 1:i + 3000]}]))
    questions = ["Who is the main subject?", "List the places named.", "Summarize the last section."]
    for q in questions:
        out.append(chat([{"role": "user", "content": base + "\n\nQuestion: " + q}]))


def errors(out):
    user = [{"role": "user", "content": "x"}]
    out.append(chat([{"role": "user", "content": [{"type": "text", "text": "look"},
                                                  {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]))
    out.append(chat(user, add_generation_prompt=True, continue_final_message=True))
    out.append(chat(user, chat_template_kwargs={"tokenize": True}))
    out.append(chat(user, tools=[{"type": "function", "function": {"description": "no name"}}]))
    out.append(chat([]))
    out.append(("chat", {"model": "m"}))
    out.append(("completion", {"model": "m"}))
    out.append(chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--long-docs", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(SEED)
    requests = []
    simple_chats(rng, requests)
    growing_conversations(rng, requests)
    tool_conversations(rng, requests)
    content_parts(rng, requests)
    generation_controls(rng, requests)
    template_kwargs(rng, requests)
    long_documents(args.shared, args.long_docs, requests)
    completions(rng, requests)
    random_fuzz(rng, requests)
    errors(requests)
    custom_templates(rng, requests)
    template_options(requests)
    prefix_reuse(args.shared, requests)
    corpus = []
    for i, (endpoint, body, *options) in enumerate(requests):
        entry = {"id": i, "endpoint": endpoint, "body": body}
        if options:
            entry["options"] = options[0]
        corpus.append(entry)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(corpus, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
