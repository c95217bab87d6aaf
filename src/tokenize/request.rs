//! OpenAI request bodies → the prompt a vLLM pod would build from them.
//!
//! Parsing follows vLLM's OpenAI server (`ChatCompletionRequest`,
//! `CompletionRequest` and `entrypoints/chat_utils.py`, as of the 0.3x
//! releases): the same defaults, the same rejections, and the same
//! conversation normalization before the chat template runs:
//!
//! * text content parts are kept, media parts are refused (kvgate routes
//!   text; a pod would fetch and encode the media);
//! * `reasoning_content` is the deprecated name of `reasoning` and becomes it;
//!   an assistant's `reasoning` reaches the template as both `reasoning` and
//!   `reasoning_content`;
//! * tool-call `arguments` given as a JSON string are parsed into a value
//!   (`{}` when not valid JSON), so templates print them with `tojson`;
//! * tools are re-emitted like pydantic's `model_dump()` of vLLM's
//!   `ChatCompletionToolsParam`: fixed key order, `null` for absent optional fields;
//! * `chat_template_kwargs` are merged under the request-level
//!   `add_generation_prompt`, `continue_final_message`, `documents` and
//!   `reasoning_effort` (which wins unless it is `null` or `"auto"`).

use super::error::RequestError;
use super::json::{self, JsonObject, JsonValue};

/// Which OpenAI endpoint a body was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
}

/// The routing-relevant content of an OpenAI request.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenAiRequest {
    pub endpoint: Endpoint,
    /// The requested model name; it may name a LoRA adapter, which the caller maps to its base model.
    pub model: String,
    pub stream: bool,
    pub cache_salt: Option<String>,
    /// `max_completion_tokens`, else `max_tokens`, as vLLM reads them.
    pub max_tokens: Option<u32>,
    pub user: Option<String>,
    /// Whether the tokenizer's post-processor adds its special tokens
    /// (vLLM: `false` for chat, whose template holds them; `true` for completions).
    pub add_special_tokens: bool,
    /// How many prompts a batch completions request holds; routing uses the first.
    pub prompt_count: usize,
    pub prompt: PromptInput,
}

/// The prompt of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// A completions prompt given as text.
    Text(String),
    /// A completions prompt given as token ids.
    TokenIds(Vec<u32>),
    /// A chat conversation, rendered with the model's chat template.
    Chat(ChatPrompt),
}

/// A chat request after vLLM's conversation normalization.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatPrompt {
    pub messages: Vec<ChatMessage>,
    /// Tool definitions as vLLM hands them to the template, or `None` when the request had none.
    pub tools: Option<Vec<JsonValue>>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// Template variables: `chat_template_kwargs` merged with the request-level
    /// `documents`, `reasoning_effort` and the `enable_thinking` it implies.
    /// Server-side defaults are merged under these when rendering.
    pub template_kwargs: JsonObject,
}

/// One conversation message, holding the fields vLLM passes to the template.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: MessageContent,
    /// Assistant tool calls, with `function.arguments` parsed into a value.
    pub tool_calls: Option<Vec<JsonValue>>,
    /// Assistant reasoning (`reasoning`, or the deprecated `reasoning_content`).
    pub reasoning: Option<String>,
    /// Tool messages: `Some(None)` when the key was present with `null`.
    pub tool_call_id: Option<Option<String>>,
    pub name: Option<String>,
    pub task: Option<String>,
    /// Developer messages carry their own tool list.
    pub developer_tools: Option<JsonValue>,
}

/// Message content before it is shaped for a template's content format.
#[derive(Clone, Debug, PartialEq)]
pub enum MessageContent {
    /// `content` was `null` or absent.
    Absent,
    /// `content` was a string.
    Text(String),
    /// `content` was an array of parts; only text-like parts remain.
    Parts(Vec<ContentPart>),
}

/// A content part that renders as text.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentPart {
    /// `text`, `input_text`, `output_text`, `refusal` or `thinking` parts, and bare strings.
    Text(String),
    /// A reference to a deferred tool, which templates expand themselves.
    ToolReference(String),
}

/// `reasoning_effort` values vLLM accepts.
const REASONING_EFFORTS: [&str; 7] = ["none", "minimal", "low", "medium", "high", "xhigh", "max"];

/// Content part types whose payload is media; a pod would fetch and encode it.
const MEDIA_PART_TYPES: [&str; 11] = [
    "image_url",
    "input_image",
    "image_embeds",
    "image_pil",
    "audio_url",
    "input_audio",
    "audio_embeds",
    "video_url",
    "prompt_embeds",
    "file",
    "input_file",
];

/// Keys that make a part media when it has no `type`.
const MEDIA_PART_KEYS: [&str; 8] = [
    "image_url",
    "input_audio",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "prompt_embeds",
    "audio_url",
    "video_url",
];

/// `chat_template_kwargs` keys that collide with `apply_chat_template`'s own
/// arguments: vLLM fails such requests (duplicate keyword argument).
const KWARGS_COLLIDING: [&str; 3] = ["tools", "conversation", "messages"];

/// `chat_template_kwargs` keys vLLM rejects outright.
const KWARGS_REJECTED: [&str; 2] = ["chat_template", "tokenize"];

/// `apply_chat_template` arguments that only matter when it tokenizes, which vLLM does not ask it to.
const KWARGS_TOKENIZE_ONLY: [&str; 6] = [
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "tokenizer_kwargs",
];

/// Parses an OpenAI request body sent to `endpoint`.
pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<OpenAiRequest, RequestError> {
    let value = json::parse(body).map_err(|e| RequestError::InvalidJson {
        message: e.to_string(),
    })?;
    let JsonValue::Object(mut body) = value else {
        return Err(RequestError::WrongType {
            param: "body".into(),
            expected: "an object",
            found: value.type_name(),
        });
    };

    let model = match body.get("model") {
        None | Some(JsonValue::Null) => {
            return Err(RequestError::MissingField {
                param: "model".into(),
            })
        }
        Some(v) => expect_string(v, "model")?.to_owned(),
    };
    let stream = optional_bool(&body, "stream")?.unwrap_or(false);
    let cache_salt = optional_string(&body, "cache_salt")?;
    if cache_salt.as_deref() == Some("") {
        return Err(RequestError::InvalidValue {
            param: "cache_salt".into(),
            message: "must be a non-empty string if provided".into(),
        });
    }
    let max_tokens = match optional_u32(&body, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => optional_u32(&body, "max_tokens")?,
    };
    let user = optional_string(&body, "user")?;

    let (prompt, prompt_count, add_special_tokens) = match endpoint {
        Endpoint::ChatCompletions => {
            let chat = parse_chat(&mut body)?;
            let add_special_tokens = optional_bool(&body, "add_special_tokens")?.unwrap_or(false);
            (PromptInput::Chat(chat), 1, add_special_tokens)
        }
        Endpoint::Completions => {
            let (prompt, count) = parse_completion_prompt(&body)?;
            let add_special_tokens = optional_bool(&body, "add_special_tokens")?.unwrap_or(true);
            (prompt, count, add_special_tokens)
        }
    };

    Ok(OpenAiRequest {
        endpoint,
        model,
        stream,
        cache_salt,
        max_tokens,
        user,
        add_special_tokens,
        prompt_count,
        prompt,
    })
}

fn wrong_type(param: impl Into<String>, expected: &'static str, found: &JsonValue) -> RequestError {
    RequestError::WrongType {
        param: param.into(),
        expected,
        found: found.type_name(),
    }
}

fn expect_string<'a>(value: &'a JsonValue, param: &str) -> Result<&'a str, RequestError> {
    value
        .as_str()
        .ok_or_else(|| wrong_type(param, "a string", value))
}

fn optional_string(object: &JsonObject, key: &str) -> Result<Option<String>, RequestError> {
    match object.get(key) {
        None | Some(JsonValue::Null) => Ok(None),
        Some(v) => Ok(Some(expect_string(v, key)?.to_owned())),
    }
}

fn optional_bool(object: &JsonObject, key: &str) -> Result<Option<bool>, RequestError> {
    match object.get(key) {
        None | Some(JsonValue::Null) => Ok(None),
        Some(JsonValue::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(key, "a boolean", v)),
    }
}

fn optional_u32(object: &JsonObject, key: &str) -> Result<Option<u32>, RequestError> {
    match object.get(key) {
        None | Some(JsonValue::Null) => Ok(None),
        Some(JsonValue::Int(i)) => {
            u32::try_from(*i)
                .map(Some)
                .map_err(|_| RequestError::InvalidValue {
                    param: key.into(),
                    message: format!("must be between 0 and {}, got {i}", u32::MAX),
                })
        }
        Some(JsonValue::UInt(u)) => Err(RequestError::InvalidValue {
            param: key.into(),
            message: format!("must be between 0 and {}, got {u}", u32::MAX),
        }),
        Some(v) => Err(wrong_type(key, "an integer", v)),
    }
}

fn parse_completion_prompt(body: &JsonObject) -> Result<(PromptInput, usize), RequestError> {
    let prompt = match body.get("prompt") {
        Some(JsonValue::Null) | None => {
            return Err(match body.get("prompt_embeds") {
                Some(v) if !v.is_null() => RequestError::Unsupported {
                    param: "prompt_embeds".into(),
                    message: "prompt embeddings carry no tokens to route on".into(),
                },
                _ => RequestError::MissingField {
                    param: "prompt".into(),
                },
            })
        }
        Some(prompt) => prompt,
    };
    match prompt {
        JsonValue::String(text) => Ok((PromptInput::Text(text.clone()), 1)),
        JsonValue::Array(items) => {
            let Some(first) = items.first() else {
                return Err(RequestError::InvalidValue {
                    param: "prompt".into(),
                    message: "must not be empty".into(),
                });
            };
            match first {
                JsonValue::String(text) => {
                    for (i, item) in items.iter().enumerate() {
                        expect_string(item, &format!("prompt[{i}]"))?;
                    }
                    Ok((PromptInput::Text(text.clone()), items.len()))
                }
                JsonValue::Int(_) | JsonValue::UInt(_) => {
                    Ok((PromptInput::TokenIds(token_ids(items, "prompt")?), 1))
                }
                JsonValue::Array(first_ids) => {
                    for (i, item) in items.iter().enumerate().skip(1) {
                        let param = format!("prompt[{i}]");
                        match item {
                            JsonValue::Array(ids) => {
                                token_ids(ids, &param)?;
                            }
                            other => return Err(wrong_type(param, "an array of token ids", other)),
                        }
                    }
                    Ok((
                        PromptInput::TokenIds(token_ids(first_ids, "prompt[0]")?),
                        items.len(),
                    ))
                }
                other => Err(wrong_type(
                    "prompt[0]",
                    "a string, a token id or an array of token ids",
                    other,
                )),
            }
        }
        other => Err(wrong_type(
            "prompt",
            "a string, an array of strings or an array of token ids",
            other,
        )),
    }
}

fn token_ids(items: &[JsonValue], param: &str) -> Result<Vec<u32>, RequestError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            JsonValue::Int(id) => u32::try_from(*id).map_err(|_| RequestError::InvalidValue {
                param: format!("{param}[{i}]"),
                message: format!("token id {id} is out of range"),
            }),
            JsonValue::UInt(id) => Err(RequestError::InvalidValue {
                param: format!("{param}[{i}]"),
                message: format!("token id {id} is out of range"),
            }),
            other => Err(wrong_type(
                format!("{param}[{i}]"),
                "an integer token id",
                other,
            )),
        })
        .collect()
}

fn parse_chat(body: &mut JsonObject) -> Result<ChatPrompt, RequestError> {
    if body.get("chat_template").is_some_and(|v| !v.is_null()) {
        return Err(RequestError::Unsupported {
            param: "chat_template".into(),
            message: "vLLM only accepts a request's own chat template when started with \
                      --trust-request-chat-template, and kvgate renders the model's template"
                .into(),
        });
    }
    let messages = match body.remove("messages") {
        None | Some(JsonValue::Null) => {
            return Err(RequestError::MissingField {
                param: "messages".into(),
            })
        }
        Some(JsonValue::Array(items)) => items,
        Some(other) => return Err(wrong_type("messages", "an array", &other)),
    };
    if messages.is_empty() {
        return Err(RequestError::InvalidValue {
            param: "messages".into(),
            message: "must hold at least one message".into(),
        });
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| parse_message(m, i))
        .collect::<Result<Vec<_>, _>>()?;

    let tools = match body.remove("tools") {
        None | Some(JsonValue::Null) => None,
        Some(JsonValue::Array(items)) => Some(
            items
                .into_iter()
                .enumerate()
                .map(|(i, t)| normalize_tool(t, i))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => return Err(wrong_type("tools", "an array", &other)),
    };

    let add_generation_prompt = optional_bool(body, "add_generation_prompt")?.unwrap_or(true);
    let continue_final_message = optional_bool(body, "continue_final_message")?.unwrap_or(false);
    if add_generation_prompt && continue_final_message {
        return Err(RequestError::InvalidValue {
            param: "continue_final_message".into(),
            message: "cannot set both `continue_final_message` and `add_generation_prompt` to true"
                .into(),
        });
    }

    let documents = match body.remove("documents") {
        None | Some(JsonValue::Null) => None,
        Some(documents) => Some(validate_documents(documents)?),
    };
    let reasoning_effort = match body.get("reasoning_effort") {
        None | Some(JsonValue::Null) => None,
        Some(v) => {
            let effort = expect_string(v, "reasoning_effort")?;
            if !REASONING_EFFORTS.contains(&effort) {
                return Err(RequestError::InvalidValue {
                    param: "reasoning_effort".into(),
                    message: format!("must be one of {}", REASONING_EFFORTS.join(", ")),
                });
            }
            Some(effort.to_owned())
        }
    };
    let user_kwargs = match body.remove("chat_template_kwargs") {
        None | Some(JsonValue::Null) => JsonObject::new(),
        Some(JsonValue::Object(kwargs)) => kwargs,
        Some(other) => return Err(wrong_type("chat_template_kwargs", "an object", &other)),
    };
    validate_template_kwargs(&user_kwargs, "chat_template_kwargs")?;

    // vLLM's `merge_kwargs(chat_template_kwargs, request_level)`: request-level
    // values win unless they are unset (`None` or "auto").
    let mut template_kwargs = user_kwargs;
    let derived_thinking = reasoning_effort
        .as_deref()
        .filter(|_| !template_kwargs.contains_key("enable_thinking"))
        .map(|effort| effort != "none");
    template_kwargs.remove("add_generation_prompt");
    template_kwargs.remove("continue_final_message");
    if let Some(documents) = documents {
        template_kwargs.insert("documents".into(), documents);
    }
    if let Some(effort) = reasoning_effort {
        template_kwargs.insert("reasoning_effort".into(), JsonValue::String(effort));
    }
    if let Some(thinking) = derived_thinking {
        template_kwargs.insert("enable_thinking".into(), JsonValue::Bool(thinking));
    }
    if let Some(documents) = template_kwargs.get("documents") {
        check_documents_are_objects(documents, "chat_template_kwargs.documents")?;
    }

    Ok(ChatPrompt {
        messages,
        tools,
        add_generation_prompt,
        continue_final_message,
        template_kwargs,
    })
}

/// Refuses template kwargs that make vLLM or `apply_chat_template` fail, or
/// that change rendering in ways kvgate does not model.
pub(crate) fn validate_template_kwargs(
    kwargs: &JsonObject,
    param: &str,
) -> Result<(), RequestError> {
    for (key, value) in kwargs.iter() {
        let key_param = format!("{param}.{key}");
        if KWARGS_REJECTED.contains(&key) {
            return Err(RequestError::InvalidValue {
                param: key_param,
                message: "unexpected chat template kwarg".into(),
            });
        }
        if KWARGS_COLLIDING.contains(&key) {
            return Err(RequestError::InvalidValue {
                param: key_param,
                message: "collides with an argument of the chat template renderer".into(),
            });
        }
        let truthy = !matches!(value, JsonValue::Null | JsonValue::Bool(false));
        if key == "return_assistant_tokens_mask" && truthy {
            return Err(RequestError::InvalidValue {
                param: key_param,
                message: "requires tokenize=True, which the server does not use".into(),
            });
        }
        if key == "sanitize_control_tokens" && truthy {
            return Err(RequestError::Unsupported {
                param: key_param,
                message: "control-token sanitizing is not modeled".into(),
            });
        }
    }
    Ok(())
}

/// Whether a template kwarg reaches the template as a variable.
pub(crate) fn is_template_variable(key: &str) -> bool {
    !KWARGS_TOKENIZE_ONLY.contains(&key)
        && key != "return_assistant_tokens_mask"
        && key != "sanitize_control_tokens"
}

fn validate_documents(documents: JsonValue) -> Result<JsonValue, RequestError> {
    let JsonValue::Array(items) = &documents else {
        return Err(wrong_type("documents", "an array of objects", &documents));
    };
    for (i, item) in items.iter().enumerate() {
        let JsonValue::Object(document) = item else {
            return Err(wrong_type(format!("documents[{i}]"), "an object", item));
        };
        for (key, value) in document.iter() {
            expect_string(value, &format!("documents[{i}].{key}"))?;
        }
    }
    Ok(documents)
}

/// `apply_chat_template` refuses documents that are not dicts.
fn check_documents_are_objects(documents: &JsonValue, param: &str) -> Result<(), RequestError> {
    match documents {
        JsonValue::Null => Ok(()),
        JsonValue::Array(items) => match items
            .iter()
            .position(|d| !matches!(d, JsonValue::Object(_)))
        {
            None => Ok(()),
            Some(i) => Err(wrong_type(format!("{param}[{i}]"), "an object", &items[i])),
        },
        other => Err(wrong_type(param, "an array of objects", other)),
    }
}

fn parse_message(value: JsonValue, index: usize) -> Result<ChatMessage, RequestError> {
    let param = format!("messages[{index}]");
    let JsonValue::Object(mut message) = value else {
        return Err(wrong_type(param, "an object", &value));
    };
    let role = match message.get("role") {
        None | Some(JsonValue::Null) => {
            return Err(RequestError::MissingField {
                param: format!("{param}.role"),
            })
        }
        Some(v) => expect_string(v, &format!("{param}.role"))?.to_owned(),
    };
    let content = parse_content(message.remove("content"), &param)?;

    let deprecated_reasoning = message.remove("reasoning_content");
    let reasoning = match message.remove("reasoning") {
        None | Some(JsonValue::Null) => deprecated_reasoning.filter(|v| !v.is_null()),
        Some(v) => Some(v),
    };
    let reasoning = match reasoning {
        None => None,
        Some(JsonValue::String(s)) => Some(s),
        Some(other) => return Err(wrong_type(format!("{param}.reasoning"), "a string", &other)),
    };

    let mut parsed = ChatMessage {
        role,
        content,
        tool_calls: None,
        reasoning: None,
        tool_call_id: None,
        name: None,
        task: None,
        developer_tools: None,
    };
    match parsed.role.as_str() {
        "assistant" => {
            parsed.tool_calls = match message.remove("tool_calls") {
                None | Some(JsonValue::Null) => None,
                Some(JsonValue::Array(calls)) if calls.is_empty() => None,
                Some(JsonValue::Array(calls)) => Some(
                    calls
                        .into_iter()
                        .enumerate()
                        .map(|(i, call)| {
                            normalize_tool_call(call, &format!("{param}.tool_calls[{i}]"))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(other) => {
                    return Err(wrong_type(
                        format!("{param}.tool_calls"),
                        "an array",
                        &other,
                    ))
                }
            };
            parsed.reasoning = reasoning;
        }
        "tool" => {
            parsed.tool_call_id = match message.get("tool_call_id") {
                None => None,
                Some(JsonValue::Null) => Some(None),
                Some(v) => Some(Some(
                    expect_string(v, &format!("{param}.tool_call_id"))?.to_owned(),
                )),
            };
        }
        "developer" => {
            parsed.developer_tools = message.remove("tools").filter(|v| !v.is_null());
        }
        _ => {}
    }
    if let Some(JsonValue::String(name)) = message.get("name") {
        parsed.name = Some(name.clone());
    }
    if let Some(JsonValue::String(task)) = message.get("task") {
        parsed.task = Some(task.clone());
    }
    Ok(parsed)
}

fn parse_content(content: Option<JsonValue>, param: &str) -> Result<MessageContent, RequestError> {
    let parts = match content {
        None | Some(JsonValue::Null) => return Ok(MessageContent::Absent),
        Some(JsonValue::String(text)) => return Ok(MessageContent::Text(text)),
        Some(JsonValue::Array(parts)) => parts,
        Some(other) => {
            return Err(wrong_type(
                format!("{param}.content"),
                "a string or an array of content parts",
                &other,
            ))
        }
    };
    let mut kept = Vec::with_capacity(parts.len());
    for (i, part) in parts.into_iter().enumerate() {
        let part_param = format!("{param}.content[{i}]");
        if let Some(part) = parse_content_part(part, &part_param)? {
            kept.push(part);
        }
    }
    Ok(MessageContent::Parts(kept))
}

fn parse_content_part(part: JsonValue, param: &str) -> Result<Option<ContentPart>, RequestError> {
    let object = match part {
        JsonValue::String(text) => return Ok(Some(ContentPart::Text(text))),
        JsonValue::Object(object) => object,
        other => return Err(wrong_type(param, "a string or an object", &other)),
    };
    let part_type = match object.get("type") {
        None | Some(JsonValue::Null) => {
            return Err(
                match MEDIA_PART_KEYS.iter().find(|k| object.contains_key(k)) {
                    Some(key) => RequestError::Multimodal {
                        param: param.into(),
                        part_type: (*key).into(),
                    },
                    None if object.contains_key("tool_reference") => RequestError::InvalidValue {
                        param: format!("{param}.type"),
                        message: "a tool_reference part needs `type`".into(),
                    },
                    None => RequestError::MissingField {
                        param: format!("{param}.type"),
                    },
                },
            )
        }
        Some(v) => expect_string(v, &format!("{param}.type"))?,
    };
    let text_key = match part_type {
        "text" | "input_text" | "output_text" => "text",
        "refusal" => "refusal",
        "thinking" => "thinking",
        "tool_reference" => {
            return Ok(match object.get("name") {
                Some(JsonValue::String(name)) => Some(ContentPart::ToolReference(name.clone())),
                None | Some(JsonValue::Null) => None,
                Some(other) => return Err(wrong_type(format!("{param}.name"), "a string", other)),
            })
        }
        media if MEDIA_PART_TYPES.contains(&media) => {
            return Err(RequestError::Multimodal {
                param: param.into(),
                part_type: media.into(),
            })
        }
        other => {
            return Err(RequestError::InvalidValue {
                param: format!("{param}.type"),
                message: format!("unsupported chat content part type `{other}`"),
            })
        }
    };
    match object.get(text_key) {
        // vLLM skips text parts whose text is missing.
        None | Some(JsonValue::Null) => Ok(None),
        Some(JsonValue::String(text)) => Ok(Some(ContentPart::Text(text.clone()))),
        Some(other) => Err(wrong_type(format!("{param}.{text_key}"), "a string", other)),
    }
}

/// vLLM's `_postprocess_messages`: string arguments become parsed JSON (or `{}`).
fn normalize_tool_call(call: JsonValue, param: &str) -> Result<JsonValue, RequestError> {
    let JsonValue::Object(mut call) = call else {
        return Err(wrong_type(param, "an object", &call));
    };
    let Some(JsonValue::Object(function)) = call.get("function") else {
        return Err(match call.get("function") {
            None => RequestError::MissingField {
                param: format!("{param}.function"),
            },
            Some(other) => wrong_type(format!("{param}.function"), "an object", other),
        });
    };
    let mut function = function.clone();
    let arguments = match function.get("arguments") {
        Some(JsonValue::String(text)) => {
            json::parse(text.as_bytes()).unwrap_or_else(|_| JsonValue::Object(JsonObject::new()))
        }
        Some(v @ (JsonValue::Object(_) | JsonValue::Array(_))) => v.clone(),
        _ => JsonValue::Object(JsonObject::new()),
    };
    function.insert("arguments".into(), arguments);
    call.insert("function".into(), JsonValue::Object(function));
    Ok(JsonValue::Object(call))
}

/// A tool as pydantic's `model_dump()` of vLLM's `ChatCompletionToolsParam` emits it.
fn normalize_tool(tool: JsonValue, index: usize) -> Result<JsonValue, RequestError> {
    let param = format!("tools[{index}]");
    let JsonValue::Object(tool) = tool else {
        return Err(wrong_type(param, "an object", &tool));
    };
    match tool.get("type") {
        None => {}
        Some(JsonValue::String(t)) if t == "function" => {}
        Some(other) => {
            return Err(RequestError::InvalidValue {
                param: format!("{param}.type"),
                message: format!("must be \"function\", got {}", other.type_name()),
            })
        }
    }
    let function = match tool.get("function") {
        Some(JsonValue::Object(f)) => f,
        None | Some(JsonValue::Null) => {
            return Err(RequestError::MissingField {
                param: format!("{param}.function"),
            })
        }
        Some(other) => return Err(wrong_type(format!("{param}.function"), "an object", other)),
    };
    let fparam = format!("{param}.function");
    let name = match function.get("name") {
        None | Some(JsonValue::Null) => {
            return Err(RequestError::MissingField {
                param: format!("{fparam}.name"),
            })
        }
        Some(v) => expect_string(v, &format!("{fparam}.name"))?.to_owned(),
    };
    let description = match function.get("description") {
        None | Some(JsonValue::Null) => JsonValue::Null,
        Some(v) => {
            JsonValue::String(expect_string(v, &format!("{fparam}.description"))?.to_owned())
        }
    };
    let parameters = match function.get("parameters") {
        None | Some(JsonValue::Null) => JsonValue::Null,
        Some(v @ JsonValue::Object(_)) => v.clone(),
        Some(other) => {
            return Err(wrong_type(
                format!("{fparam}.parameters"),
                "an object",
                other,
            ))
        }
    };
    let defer_flag = |object: &JsonObject, param: String| -> Result<Option<bool>, RequestError> {
        match object.get("defer_loading") {
            None | Some(JsonValue::Null) => Ok(None),
            Some(JsonValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(param, "a boolean", other)),
        }
    };
    let tool_defer = defer_flag(&tool, format!("{param}.defer_loading"))?;
    let function_defer = defer_flag(function, format!("{fparam}.defer_loading"))?.or(tool_defer);

    let mut dumped_function = JsonObject::new();
    dumped_function.insert("name".into(), JsonValue::String(name));
    dumped_function.insert("description".into(), description);
    dumped_function.insert("parameters".into(), parameters);
    if let Some(defer) = function_defer {
        dumped_function.insert("defer_loading".into(), JsonValue::Bool(defer));
    }
    for (key, value) in function.iter() {
        if !matches!(key, "name" | "description" | "parameters" | "defer_loading") {
            dumped_function.insert(key.to_owned(), value.clone());
        }
    }
    let mut dumped = JsonObject::new();
    dumped.insert("type".into(), JsonValue::String("function".into()));
    dumped.insert("function".into(), JsonValue::Object(dumped_function));
    if let Some(defer) = tool_defer {
        dumped.insert("defer_loading".into(), JsonValue::Bool(defer));
    }
    Ok(JsonValue::Object(dumped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<OpenAiRequest, RequestError> {
        parse_request(Endpoint::ChatCompletions, body.as_bytes())
    }

    fn chat_prompt(body: &str) -> ChatPrompt {
        match chat(body).unwrap().prompt {
            PromptInput::Chat(c) => c,
            other => panic!("not chat: {other:?}"),
        }
    }

    #[test]
    fn routing_fields() {
        let r = chat(
            r#"{"model":"qwen-lora-a","stream":true,"cache_salt":"s1","max_tokens":7,
                "max_completion_tokens":9,"user":"u","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_eq!(r.model, "qwen-lora-a");
        assert!(r.stream);
        assert_eq!(r.cache_salt.as_deref(), Some("s1"));
        assert_eq!(r.max_tokens, Some(9));
        assert_eq!(r.user.as_deref(), Some("u"));
        assert!(!r.add_special_tokens);
        let c = parse_request(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"x","max_tokens":3}"#,
        )
        .unwrap();
        assert!(c.add_special_tokens);
        assert_eq!(c.max_tokens, Some(3));
    }

    #[test]
    fn completion_prompt_forms() {
        let parse = |p: &str| {
            parse_request(
                Endpoint::Completions,
                format!(r#"{{"model":"m","prompt":{p}}}"#).as_bytes(),
            )
        };
        assert_eq!(
            parse(r#""a""#).unwrap().prompt,
            PromptInput::Text("a".into())
        );
        let list = parse(r#"["a","b"]"#).unwrap();
        assert_eq!(
            (list.prompt, list.prompt_count),
            (PromptInput::Text("a".into()), 2)
        );
        assert_eq!(
            parse("[1,2,3]").unwrap().prompt,
            PromptInput::TokenIds(vec![1, 2, 3])
        );
        let lists = parse("[[4,5],[6]]").unwrap();
        assert_eq!(
            (lists.prompt, lists.prompt_count),
            (PromptInput::TokenIds(vec![4, 5]), 2)
        );
        assert!(matches!(
            parse("[]"),
            Err(RequestError::InvalidValue { .. })
        ));
        assert!(
            matches!(parse("[1,-2]"), Err(RequestError::InvalidValue { param, .. }) if param == "prompt[1]")
        );
        assert!(
            matches!(parse(r#"["a",1]"#), Err(RequestError::WrongType { param, .. }) if param == "prompt[1]")
        );
        assert!(matches!(
            parse("[[1],2]"),
            Err(RequestError::WrongType { .. })
        ));
        assert!(matches!(parse("5"), Err(RequestError::WrongType { .. })));
        assert!(matches!(
            parse_request(Endpoint::Completions, br#"{"model":"m"}"#),
            Err(RequestError::MissingField { param }) if param == "prompt"
        ));
    }

    #[test]
    fn rejections() {
        assert!(matches!(chat("{"), Err(RequestError::InvalidJson { .. })));
        assert!(matches!(chat("[]"), Err(RequestError::WrongType { .. })));
        assert!(
            matches!(chat(r#"{"messages":[]}"#), Err(RequestError::MissingField { param }) if param == "model")
        );
        assert!(
            matches!(chat(r#"{"model":"m"}"#), Err(RequestError::MissingField { param }) if param == "messages")
        );
        assert!(matches!(
            chat(r#"{"model":1,"messages":[]}"#),
            Err(RequestError::WrongType { .. })
        ));
        assert!(matches!(
            chat(r#"{"model":"m","messages":{}}"#),
            Err(RequestError::WrongType { .. })
        ));
        assert!(
            matches!(chat(r#"{"model":"m","messages":[{"content":"x"}]}"#), Err(RequestError::MissingField { param }) if param == "messages[0].role")
        );
        assert!(matches!(
            chat(r#"{"model":"m","stream":"yes","messages":[{"role":"user"}]}"#),
            Err(RequestError::WrongType { .. })
        ));
        assert!(matches!(
            chat(r#"{"model":"m","cache_salt":"","messages":[{"role":"user"}]}"#),
            Err(RequestError::InvalidValue { .. })
        ));
        assert!(matches!(
            chat(
                r#"{"model":"m","add_generation_prompt":true,"continue_final_message":true,"messages":[{"role":"user"}]}"#
            ),
            Err(RequestError::InvalidValue { .. })
        ));
        let image = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        );
        match image {
            Err(e @ RequestError::Multimodal { .. }) => {
                assert_eq!(e.param(), Some("messages[0].content[1]"));
                assert!(e.to_string().contains("multimodal input is not supported"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            chat(r#"{"model":"m","messages":[{"role":"user","content":[{"image_url":"x"}]}]}"#),
            Err(RequestError::Multimodal { .. })
        ));
        assert!(matches!(
            chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"video"}]}]}"#),
            Err(RequestError::InvalidValue { .. })
        ));
        for bad in ["tokenize", "chat_template", "tools", "messages"] {
            let body = format!(
                r#"{{"model":"m","chat_template_kwargs":{{"{bad}":1}},"messages":[{{"role":"user"}}]}}"#
            );
            assert!(
                matches!(chat(&body), Err(RequestError::InvalidValue { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            chat(r#"{"model":"m","chat_template":"{{x}}","messages":[{"role":"user"}]}"#),
            Err(RequestError::Unsupported { .. })
        ));
    }

    #[test]
    fn normalizes_messages_like_vllm() {
        let c = chat_prompt(
            r#"{"model":"m","messages":[
                {"role":"user","content":[{"type":"text","text":"a"},"b",{"type":"text","text":null}],"name":"n"},
                {"role":"assistant","content":null,"reasoning_content":"why","tool_calls":[
                    {"id":"1","type":"function","function":{"name":"f","arguments":"{\"x\": 1, \"a\": [2]}"}},
                    {"id":"2","type":"function","function":{"name":"g","arguments":"not json"}},
                    {"id":"3","type":"function","function":{"arguments":{"k":"v"},"name":"h"}}]},
                {"role":"tool","content":"r","tool_call_id":"1","reasoning":"dropped"},
                {"role":"assistant","content":"done","tool_calls":[]}
            ]}"#,
        );
        assert_eq!(
            c.messages[0].content,
            MessageContent::Parts(vec![
                ContentPart::Text("a".into()),
                ContentPart::Text("b".into())
            ])
        );
        assert_eq!(c.messages[0].name.as_deref(), Some("n"));
        let assistant = &c.messages[1];
        assert_eq!(assistant.content, MessageContent::Absent);
        assert_eq!(assistant.reasoning.as_deref(), Some("why"));
        let calls = assistant.tool_calls.as_ref().unwrap();
        let args = |i: usize| match &calls[i] {
            JsonValue::Object(call) => match call.get("function") {
                Some(JsonValue::Object(f)) => f.get("arguments").cloned().unwrap(),
                _ => panic!(),
            },
            _ => panic!(),
        };
        assert_eq!(args(0), json::parse(br#"{"x": 1, "a": [2]}"#).unwrap());
        assert_eq!(args(1), JsonValue::Object(JsonObject::new()));
        assert_eq!(args(2), json::parse(br#"{"k":"v"}"#).unwrap());
        assert_eq!(c.messages[2].tool_call_id, Some(Some("1".into())));
        assert_eq!(c.messages[2].reasoning, None);
        assert_eq!(c.messages[3].tool_calls, None);
        assert!(c.add_generation_prompt);
    }

    #[test]
    fn tools_are_dumped_like_pydantic() {
        let c = chat_prompt(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[
                {"function":{"parameters":{"type":"object"},"strict":true,"name":"f"},"extra":1},
                {"type":"function","defer_loading":true,"function":{"name":"g","description":"d"}}]}"#,
        );
        let tools = c.tools.unwrap();
        assert_eq!(
            tools[0],
            json::parse(br#"{"type":"function","function":{"name":"f","description":null,"parameters":{"type":"object"},"strict":true}}"#).unwrap()
        );
        assert_eq!(
            tools[1],
            json::parse(br#"{"type":"function","function":{"name":"g","description":"d","parameters":null,"defer_loading":true},"defer_loading":true}"#).unwrap()
        );
    }

    #[test]
    fn template_kwargs_merge() {
        let c = chat_prompt(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"reasoning_effort":"none",
                "documents":[{"title":"t","text":"x"}],
                "chat_template_kwargs":{"add_generation_prompt":false,"foo":1,"documents":[]}}"#,
        );
        assert!(c.add_generation_prompt);
        assert_eq!(c.template_kwargs.get("foo"), Some(&JsonValue::Int(1)));
        assert_eq!(
            c.template_kwargs.get("enable_thinking"),
            Some(&JsonValue::Bool(false))
        );
        assert_eq!(
            c.template_kwargs.get("reasoning_effort"),
            Some(&JsonValue::String("none".into()))
        );
        assert!(
            matches!(c.template_kwargs.get("documents"), Some(JsonValue::Array(d)) if d.len() == 1)
        );
        assert!(!c.template_kwargs.contains_key("add_generation_prompt"));

        let explicit = chat_prompt(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"reasoning_effort":"high",
                "chat_template_kwargs":{"enable_thinking":false}}"#,
        );
        assert_eq!(
            explicit.template_kwargs.get("enable_thinking"),
            Some(&JsonValue::Bool(false))
        );
    }
}
