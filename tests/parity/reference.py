#!/usr/bin/env python3
"""Reference token ids for the parity corpus: what a vLLM pod computes per request.

vLLM itself needs torch and an accelerator build, so this reproduces the steps its
OpenAI server takes before the engine sees a prompt -- request validation
(`ChatCompletionRequest`), conversation parsing (`entrypoints/chat_utils.py`),
kwargs resolution and rendering (`renderers/hf.py`) -- and leaves rendering and
encoding to the real `transformers` tokenizer and chat template:
`apply_chat_template(..., tokenize=False)` then `encode(text, add_special_tokens=...)`.

Usage: reference.py --tokenizer-dir DIR --corpus corpus.json --out reference.json
"""

import argparse
import inspect
import json
import logging
import os
from typing import Any, Literal

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.disable(logging.WARNING)

import jinja2  # noqa: E402
import jinja2.meta  # noqa: E402
import jinja2.nodes  # noqa: E402
from pydantic import BaseModel, ConfigDict, model_serializer, model_validator  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

MEDIA_TYPES = {"image_url", "input_image", "image_embeds", "image_pil", "audio_url", "input_audio",
               "audio_embeds", "video_url", "prompt_embeds", "file", "input_file"}
MEDIA_KEYS = ("image_url", "input_audio", "image_pil", "image_embeds", "audio_embeds",
              "prompt_embeds", "audio_url", "video_url")
TEXT_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
             "thinking": "thinking"}


class RequestRejected(Exception):
    pass


# The pydantic models vLLM validates tools with; `model_dump()` of these is what templates see.
class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    defer_loading: bool | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        data = handler(self)
        if self.defer_loading is None:
            data.pop("defer_loading", None)
        return data


class ChatCompletionToolsParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition
    defer_loading: bool | None = None

    @model_validator(mode="after")
    def _propagate_defer_loading(self):
        if self.defer_loading is not None and self.function.defer_loading is None:
            self.function.defer_loading = self.defer_loading
        return self

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        data = handler(self)
        data = {k: v for k, v in data.items() if k in type(self).model_fields}
        if self.defer_loading is None:
            data.pop("defer_loading", None)
        return data


def is_access(node, names, key=None):
    """A read of one of `names` (or its item/attribute `key`), possibly filtered, tested or sliced."""
    if isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)):
        return node.node is not None and is_access(node.node, names, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return is_access(node.node, names, key)
    if key is None:
        return isinstance(node, jinja2.nodes.Name) and node.name in names
    if isinstance(node, jinja2.nodes.Getitem):
        return (isinstance(node.node, jinja2.nodes.Name) and node.node.name in names
                and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key)
    if isinstance(node, jinja2.nodes.Getattr):
        return isinstance(node.node, jinja2.nodes.Name) and node.node.name in names and node.attr == key
    return False


def content_format(template_source):
    """'openai' when the template loops over a message's content, as vLLM detects it."""
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    ast = env.parse(template_source)
    lists = {"messages"}
    changed = True
    while changed:
        changed = False
        for assign in ast.find_all(jinja2.nodes.Assign):
            if isinstance(assign.target, jinja2.nodes.Name) and is_access(assign.node, lists) \
                    and assign.target.name not in lists:
                lists.add(assign.target.name)
                changed = True
    message_vars = set()
    for loop in ast.find_all(jinja2.nodes.For):
        if is_access(loop.iter, lists):
            if not isinstance(loop.target, jinja2.nodes.Name):
                return "string"
            message_vars.add(loop.target.name)
    for loop in ast.find_all(jinja2.nodes.For):
        if is_access(loop.iter, message_vars, "content"):
            return "openai"
    return "string"


def parse_part(part, fmt):
    if isinstance(part, str):
        return {"type": "text", "text": part} if fmt == "openai" else part
    kind = part.get("type")
    if kind is None:
        if any(k in part for k in MEDIA_KEYS):
            raise RequestRejected("multimodal")
        raise RequestRejected("Missing 'type' field in multimodal part.")
    if kind in TEXT_KEYS:
        text = part.get(TEXT_KEYS[kind])
        if text is None:
            return None
        return {"type": "text", "text": text} if fmt == "openai" else text
    if kind == "tool_reference":
        name = part.get("name")
        if name is None:
            return None
        return {"type": "tool_reference", "name": name} if fmt == "openai" else name
    if kind in MEDIA_TYPES:
        raise RequestRejected("multimodal")
    raise RequestRejected(f"Unsupported chat content part type: {kind!r}")


def parse_message(message, fmt):
    if "reasoning_content" in message:
        deprecated = message.pop("reasoning_content")
        if deprecated is not None and message.get("reasoning") is None:
            message["reasoning"] = deprecated
    role = message["role"]
    content = message.get("content")
    if content is None:
        parts = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    else:
        parts = content
    parsed = [p for p in (parse_part(p, fmt) for p in parts) if p]
    result = {"role": role, "content": parsed if fmt == "openai" else "\n".join(parsed)}
    if role == "assistant":
        if message.get("tool_calls") is not None:
            result["tool_calls"] = list(message["tool_calls"])
        if message.get("reasoning") is not None:
            result["reasoning"] = message["reasoning"]
            result["reasoning_content"] = message["reasoning"]
    elif role == "tool":
        if "tool_call_id" in message:
            result["tool_call_id"] = message["tool_call_id"]
        if isinstance(result["content"], list) and all(p.get("type") == "text" for p in result["content"]):
            texts = [p.get("text", "") for p in result["content"]]
            result["content"] = "\n".join(texts) if texts else ""
    if isinstance(message.get("name"), str):
        result["name"] = message["name"]
    if isinstance(message.get("task"), str):
        result["task"] = message["task"]
    if role == "developer":
        result["tools"] = message.get("tools")
    return result


def postprocess(conversation):
    for message in conversation:
        if message["role"] != "assistant" or not isinstance(message.get("tool_calls"), list):
            continue
        if not message["tool_calls"]:
            message.pop("tool_calls")
            continue
        for call in message["tool_calls"]:
            arguments = call["function"].get("arguments")
            if isinstance(arguments, str):
                try:
                    call["function"]["arguments"] = json.loads(arguments)
                except json.JSONDecodeError:
                    call["function"]["arguments"] = {}
            elif not isinstance(arguments, (dict, list)):
                call["function"]["arguments"] = {}


def chat_tokens(tok, body, template_source=None, default_kwargs=None, content_format_flag="auto"):
    if not isinstance(body.get("model"), str):
        raise RequestRejected("model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestRejected("messages")
    add_generation_prompt = body.get("add_generation_prompt", True)
    continue_final_message = body.get("continue_final_message", False)
    if add_generation_prompt and continue_final_message:
        raise RequestRejected("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    tools = body.get("tools")
    if tools is not None:
        tools = [ChatCompletionToolsParam.model_validate(t).model_dump() for t in tools]
    template = template_source or tok.get_chat_template(None, tools=tools)
    fmt = content_format(template) if content_format_flag == "auto" else content_format_flag
    conversation = [parse_message(m, fmt) for m in messages]
    postprocess(conversation)

    user_kwargs = body.get("chat_template_kwargs") or {}
    reasoning_effort = body.get("reasoning_effort")
    extra = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                 documents=body.get("documents"), reasoning_effort=reasoning_effort)
    if reasoning_effort is not None and "enable_thinking" not in user_kwargs:
        extra["enable_thinking"] = reasoning_effort != "none"
    kwargs = user_kwargs | {k: v for k, v in extra.items() if v not in (None, "auto")}
    # vLLM: `default_chat_template_kwargs | request_chat_template_kwargs`.
    kwargs = (default_kwargs or {}) | kwargs
    kwargs["return_dict"] = False
    if {"chat_template", "tokenize"} & kwargs.keys():
        raise RequestRejected("Found unexpected chat template kwargs from request")
    template_vars = jinja2.meta.find_undeclared_variables(
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))
    params = {p.name for p in inspect.signature(tok.apply_chat_template).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    accepted = (template_vars | params) - {"chat_template", "tokenize"}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}

    text = tok.apply_chat_template(conversation, tools=tools, chat_template=template, tokenize=False, **kwargs)
    ids = tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))
    return text, ids


def completion_tokens(tok, body):
    if not isinstance(body.get("model"), str):
        raise RequestRejected("model")
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestRejected("prompt")
    if isinstance(prompt, list):
        if not prompt:
            raise RequestRejected("empty prompt")
        first = prompt[0]
        if isinstance(first, int):
            return None, prompt
        if isinstance(first, list):
            return None, first
        prompt = first
    return prompt, tok.encode(prompt, add_special_tokens=body.get("add_special_tokens", True))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    with open(args.corpus, encoding="utf-8") as f:
        corpus = json.load(f)
    results = []
    for request in corpus:
        body = json.loads(json.dumps(request["body"]))
        try:
            if request["endpoint"] == "chat":
                # The pod's flags: --chat-template, --default-chat-template-kwargs,
                # --chat-template-content-format.
                options = request.get("options", {})
                template = None
                if "chatTemplate" in options:
                    with open(os.path.join(os.path.dirname(__file__), "templates", options["chatTemplate"]),
                              encoding="utf-8") as f:
                        template = f.read()
                text, ids = chat_tokens(tok, body, template, options.get("defaultChatTemplateKwargs"),
                                        options.get("chatTemplateContentFormat", "auto"))
            else:
                text, ids = completion_tokens(tok, body)
            results.append({"id": request["id"], "text": text, "tokens": list(ids)})
        except Exception as e:  # noqa: BLE001 -- every failure is a 400 at the pod
            results.append({"id": request["id"], "error": f"{type(e).__name__}: {e}"})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
