//! A model's Jinja chat template, rendered the way Hugging Face
//! `apply_chat_template` renders it for vLLM.
//!
//! Jinja2 is emulated with minijinja plus its Python-compat methods and an
//! environment shaped like Hugging Face's: `trim_blocks` and `lstrip_blocks`,
//! the `raise_exception` and `strftime_now` globals, a `tojson` that is
//! `json.dumps(..., ensure_ascii=False)` with key order kept, Python's `str()`
//! for printed values, and the `{% generation %}` tag as a no-op.

use std::fmt::Write;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};

use super::error::{TokenizeError, TokenizerLoadError};
use super::json::{JsonObject, JsonValue};
use super::pyfmt::{self, JsonDumpOptions};
use super::request::{self, ChatMessage, ChatPrompt, ContentPart, MessageContent};
use super::strftime::{strftime, CivilTime};

/// How a template expects message `content` (vLLM's `--chat-template-content-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentFormat {
    /// `content` is one string; text parts are joined with newlines.
    String,
    /// `content` is a list of `{"type": "text", "text": ...}` parts.
    OpenAi,
}

/// Hugging Face appends this to the final message to find where it ends.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

struct NamedTemplate {
    name: String,
    content_format: ContentFormat,
    /// Hugging Face only continues a final message if the template reads `content`.
    mentions_content: bool,
}

/// A model's chat template(s), compiled once.
pub struct ChatTemplate {
    env: Environment<'static>,
    templates: Vec<NamedTemplate>,
    /// `bos_token`, `eos_token`, ... as `apply_chat_template` passes them.
    special_tokens: Vec<(String, String)>,
    /// Server-side `--default-chat-template-kwargs`, under the request's own.
    default_kwargs: JsonObject,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field(
                "templates",
                &self
                    .templates
                    .iter()
                    .map(|t| (&t.name, t.content_format))
                    .collect::<Vec<_>>(),
            )
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

/// The error `raise_exception` raises, found again in the render error's source chain.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compiles named templates (`"default"`, `"tool_use"`, ... or a single `"default"`).
    pub fn new(
        templates: Vec<(String, String)>,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Self, TokenizerLoadError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerLoadError::ChatTemplate {
                name: String::new(),
                message: e.to_string(),
            })?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_filter("tojson", tojson);
        env.add_filter("string", python_string);
        env.add_filter("truncate", truncate);
        env.add_filter("wordcount", wordcount);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_formatter(|out, _state, value| {
            let mut text = String::new();
            pyfmt::write_python_str(&mut text, value);
            out.write_str(&text).map_err(Error::from)
        });

        let mut compiled = Vec::with_capacity(templates.len());
        for (name, source) in templates {
            let source = neutralize_generation_tags(&source);
            let content_format = detect_content_format(&source);
            let mentions_content = source.contains("content");
            env.add_template_owned(name.clone(), source).map_err(|e| {
                TokenizerLoadError::ChatTemplate {
                    name: name.clone(),
                    message: e.to_string(),
                }
            })?;
            compiled.push(NamedTemplate {
                name,
                content_format,
                mentions_content,
            });
        }
        Ok(ChatTemplate {
            env,
            templates: compiled,
            special_tokens,
            default_kwargs: JsonObject::new(),
        })
    }

    /// Sets the server's default template kwargs (vLLM `--default-chat-template-kwargs`),
    /// as [`super::default_template_kwargs`] validated them.
    pub(crate) fn set_default_kwargs(&mut self, kwargs: JsonObject) {
        self.default_kwargs = kwargs;
    }

    /// Overrides the detected content format of every template (vLLM `--chat-template-content-format`).
    pub(crate) fn set_content_format(&mut self, format: ContentFormat) {
        for template in &mut self.templates {
            template.content_format = format;
        }
    }

    /// The content format of the template used when a request has (or lacks) tools.
    pub fn content_format(&self, with_tools: bool) -> Option<ContentFormat> {
        self.select(with_tools).map(|t| t.content_format)
    }

    /// `tokenizer.get_chat_template(None, tools)`: `tool_use` when tools are given, else `default`.
    fn select(&self, with_tools: bool) -> Option<&NamedTemplate> {
        if let [only] = self.templates.as_slice() {
            return Some(only);
        }
        let find = |name: &str| self.templates.iter().find(|t| t.name == name);
        with_tools
            .then(|| find("tool_use"))
            .flatten()
            .or_else(|| find("default"))
    }

    /// Renders the prompt text for a chat request.
    pub fn render(&self, chat: &ChatPrompt) -> Result<String, TokenizeError> {
        let template = self
            .select(chat.tools.is_some())
            .ok_or(TokenizeError::NoChatTemplate)?;
        let mut messages: Vec<Vec<(&'static str, Value)>> = chat
            .messages
            .iter()
            .map(|m| message_entries(m, template.content_format))
            .collect();

        let final_message = if chat.continue_final_message {
            Some(tag_final_message(&mut messages, template)?)
        } else {
            None
        };

        let kwargs = self.merged_kwargs(chat);
        let documents = kwargs
            .get("documents")
            .map(JsonValue::to_template_value)
            .unwrap_or(Value::from(()));
        let mut context: Vec<(String, Value)> =
            Vec::with_capacity(self.special_tokens.len() + kwargs.len() + 4);
        for (name, token) in &self.special_tokens {
            context.push((name.clone(), Value::from(token.as_str())));
        }
        for (key, value) in kwargs.iter() {
            if key != "documents" && request::is_template_variable(key) {
                context.push((key.to_owned(), value.to_template_value()));
            }
        }
        let messages = Value::from(
            messages
                .into_iter()
                .map(Value::from_pairs)
                .collect::<Vec<_>>(),
        );
        let tools = match &chat.tools {
            Some(tools) => Value::from(
                tools
                    .iter()
                    .map(JsonValue::to_template_value)
                    .collect::<Vec<_>>(),
            ),
            None => Value::from(()),
        };
        context.push(("messages".into(), messages));
        context.push(("tools".into(), tools));
        context.push(("documents".into(), documents));
        context.push((
            "add_generation_prompt".into(),
            Value::from(chat.add_generation_prompt),
        ));

        let compiled =
            self.env
                .get_template(&template.name)
                .map_err(|e| TokenizeError::Template {
                    message: e.to_string(),
                })?;
        let rendered = compiled
            .render(Value::from_pairs(context))
            .map_err(render_error)?;

        match final_message {
            Some(final_message) => cut_at_continue_tag(rendered, &final_message),
            None => Ok(rendered),
        }
    }

    /// vLLM's `default_chat_template_kwargs | request_chat_template_kwargs`: the
    /// request's own kwargs (unset request-level values already left out) win.
    fn merged_kwargs(&self, chat: &ChatPrompt) -> JsonObject {
        if self.default_kwargs.is_empty() {
            return chat.template_kwargs.clone();
        }
        let mut merged = self.default_kwargs.clone();
        merged.remove("add_generation_prompt");
        merged.remove("continue_final_message");
        for (key, value) in chat.template_kwargs.iter() {
            merged.insert(key.to_owned(), value.clone());
        }
        merged
    }
}

fn render_error(error: Error) -> TokenizeError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return TokenizeError::TemplateRaised {
                message: raised.0.clone(),
            };
        }
        source = e.source();
    }
    TokenizeError::Template {
        message: error.to_string(),
    }
}

/// The message dict vLLM builds and Hugging Face then cleans: `None` values
/// dropped, and reasoning mirrored as `thinking` (first) and `reasoning_content`.
fn message_entries(message: &ChatMessage, format: ContentFormat) -> Vec<(&'static str, Value)> {
    let mut entries = Vec::with_capacity(8);
    if let Some(reasoning) = &message.reasoning {
        entries.push(("thinking", Value::from(reasoning.as_str())));
    }
    entries.push(("role", Value::from(message.role.as_str())));
    entries.push(("content", content_value(message, format)));
    if let Some(calls) = &message.tool_calls {
        entries.push((
            "tool_calls",
            Value::from(
                calls
                    .iter()
                    .map(JsonValue::to_template_value)
                    .collect::<Vec<_>>(),
            ),
        ));
    }
    if let Some(reasoning) = &message.reasoning {
        entries.push(("reasoning", Value::from(reasoning.as_str())));
        entries.push(("reasoning_content", Value::from(reasoning.as_str())));
    }
    if let Some(Some(id)) = &message.tool_call_id {
        entries.push(("tool_call_id", Value::from(id.as_str())));
    }
    if let Some(name) = &message.name {
        entries.push(("name", Value::from(name.as_str())));
    }
    if let Some(task) = &message.task {
        entries.push(("task", Value::from(task.as_str())));
    }
    if let Some(tools) = &message.developer_tools {
        entries.push(("tools", tools.to_template_value()));
    }
    entries
}

fn content_value(message: &ChatMessage, format: ContentFormat) -> Value {
    match format {
        ContentFormat::String => match &message.content {
            MessageContent::Text(text) => Value::from(text.as_str()),
            other => Value::from(joined_text(other)),
        },
        ContentFormat::OpenAi => {
            let parts: Vec<Value> = match &message.content {
                MessageContent::Absent => Vec::new(),
                MessageContent::Text(text) => vec![text_part(text)],
                MessageContent::Parts(parts) => parts
                    .iter()
                    .map(|part| match part {
                        ContentPart::Text(text) => text_part(text),
                        ContentPart::ToolReference(name) => Value::from_pairs([
                            ("type", Value::from("tool_reference")),
                            ("name", Value::from(name.as_str())),
                        ]),
                    })
                    .collect(),
            };
            // vLLM flattens tool results to a string unless they hold a non-text part.
            let all_text = match &message.content {
                MessageContent::Parts(parts) => {
                    parts.iter().all(|p| matches!(p, ContentPart::Text(_)))
                }
                _ => true,
            };
            if message.role == "tool" && all_text {
                let texts: Vec<&str> = match &message.content {
                    MessageContent::Absent => Vec::new(),
                    MessageContent::Text(text) => vec![text.as_str()],
                    MessageContent::Parts(parts) => parts
                        .iter()
                        .filter_map(|p| match p {
                            ContentPart::Text(t) => Some(t.as_str()),
                            ContentPart::ToolReference(_) => None,
                        })
                        .collect(),
                };
                Value::from(texts.join("\n"))
            } else {
                Value::from(parts)
            }
        }
    }
}

fn text_part(text: &str) -> Value {
    Value::from_pairs([("type", Value::from("text")), ("text", Value::from(text))])
}

/// vLLM's string content: non-empty text parts joined by newlines.
fn joined_text(content: &MessageContent) -> String {
    match content {
        MessageContent::Absent => String::new(),
        MessageContent::Text(text) => text.clone(),
        MessageContent::Parts(parts) => {
            let mut joined = String::new();
            for text in parts.iter().map(|p| match p {
                ContentPart::Text(t) | ContentPart::ToolReference(t) => t.as_str(),
            }) {
                if text.is_empty() {
                    continue;
                }
                if !joined.is_empty() {
                    joined.push('\n');
                }
                joined.push_str(text);
            }
            joined
        }
    }
}

/// Appends Hugging Face's tag to the final message's text; returns the text before tagging.
fn tag_final_message(
    messages: &mut [Vec<(&'static str, Value)>],
    template: &NamedTemplate,
) -> Result<String, TokenizeError> {
    let continue_error = |message: &str| TokenizeError::ContinueFinalMessage {
        message: message.into(),
    };
    let last = messages.last_mut().ok_or_else(|| {
        continue_error("continue_final_message is set but the conversation is empty!")
    })?;
    if !template.mentions_content {
        return Err(continue_error(
            "continue_final_message is set to \"content\" but this is not an accepted field in the chat_template",
        ));
    }
    let Some((_, content)) = last.iter_mut().find(|(k, _)| *k == "content") else {
        return Err(continue_error(
            "continue_final_message is set but the final message has no \"content\" to continue!",
        ));
    };
    if let Some(text) = content.as_str() {
        let original = text.to_owned();
        *content = Value::from(format!("{original}{CONTINUE_TAG}"));
        return Ok(original);
    }
    let mut blocks: Vec<Value> = content
        .try_iter()
        .map(|items| items.collect())
        .unwrap_or_default();
    for block in blocks.iter_mut().rev() {
        let Ok(text) = block.get_attr("text") else {
            continue;
        };
        if text.is_undefined() {
            continue;
        }
        let mut original = String::new();
        pyfmt::write_python_str(&mut original, &text);
        let entries: Vec<(Value, Value)> = block
            .try_iter()
            .map(|keys| {
                keys.map(|key| {
                    let value = if key.as_str() == Some("text") {
                        Value::from(format!("{original}{CONTINUE_TAG}"))
                    } else {
                        block.get_item(&key).unwrap_or_default()
                    };
                    (key, value)
                })
                .collect()
            })
            .unwrap_or_default();
        *block = Value::from_pairs(entries);
        *content = Value::from(blocks);
        return Ok(original);
    }
    Err(continue_error(
        "continue_final_message is set but we could not find any text to continue in the final message!",
    ))
}

/// Python's `str.isspace()` for one character.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn cut_at_continue_tag(rendered: String, final_message: &str) -> Result<String, TokenizeError> {
    let tag = CONTINUE_TAG.trim_end();
    let final_stripped = final_message.trim_matches(is_python_space);
    let Some(tag_at) = rendered.rfind(tag) else {
        return Err(missing_final_message());
    };
    if !rendered.contains(final_stripped) {
        return Err(missing_final_message());
    }
    let mut rendered = rendered;
    if rendered[tag_at..].starts_with(CONTINUE_TAG) {
        rendered.truncate(tag_at);
    } else {
        let kept = rendered[..tag_at].trim_end_matches(is_python_space).len();
        rendered.truncate(kept);
    }
    Ok(rendered)
}

fn missing_final_message() -> TokenizeError {
    TokenizeError::ContinueFinalMessage {
        message: "continue_final_message is set but the final message does not appear in the chat \
                  after applying the chat template! This can happen if the chat template deletes \
                  portions of the final message."
            .into(),
    }
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` as Hugging Face defines it.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut given: [Option<Value>; 4] = Default::default();
    for (slot, arg) in given.iter_mut().zip(args.iter()) {
        *slot = Some(arg.clone());
    }
    for (slot, name) in given.iter_mut().zip(names) {
        if kwargs.has(name) {
            if slot.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson() got multiple values for argument '{name}'"),
                ));
            }
            *slot = Some(kwargs.get::<Value>(name)?);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = given;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_owned()),
        Some(v) if v.is_integer() => {
            let width = i64::try_from(v).unwrap_or(0).max(0) as usize;
            Some(" ".repeat(width))
        }
        Some(v) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson indent must be an int or a string, not {}", v.kind()),
            ))
        }
    };
    let mut options = JsonDumpOptions::hf_default(indent);
    options.ensure_ascii = ensure_ascii.is_some_and(|v| v.is_true());
    options.sort_keys = sort_keys.is_some_and(|v| v.is_true());
    if let Some(separators) = separators.filter(|v| !v.is_none()) {
        let parts: Vec<Value> = separators.try_iter()?.collect();
        match parts.as_slice() {
            [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                options.item_separator = item.as_str().unwrap_or_default().to_owned();
                options.key_separator = key.as_str().unwrap_or_default().to_owned();
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson separators must be a pair of strings",
                ))
            }
        }
    }
    pyfmt::json_dumps(value, &options).map(Value::from)
}

/// Jinja2's `string` filter: Python's `str()`.
fn python_string(value: &Value) -> String {
    let mut out = String::new();
    pyfmt::write_python_str(&mut out, value);
    out
}

/// Jinja2's `truncate(s, length=255, killwords=False, end='...', leeway=5)`, in characters.
fn truncate(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    let names = ["length", "killwords", "end", "leeway"];
    if args.len() > names.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "truncate takes at most 4 arguments",
        ));
    }
    let mut given: [Option<Value>; 4] = Default::default();
    for (slot, arg) in given.iter_mut().zip(args.iter()) {
        *slot = Some(arg.clone());
    }
    for (slot, name) in given.iter_mut().zip(names) {
        if kwargs.has(name) {
            *slot = Some(kwargs.get::<Value>(name)?);
        }
    }
    kwargs.assert_all_used()?;
    let [length, killwords, end, leeway] = given;
    let int = |v: Option<Value>, default: i64| -> Result<i64, Error> {
        match v {
            None => Ok(default),
            Some(v) => i64::try_from(v),
        }
    };
    let length = int(length, 255)?;
    let leeway = int(leeway, 5)?;
    let end = match end {
        None => "...".to_owned(),
        Some(v) => python_string(&v),
    };
    let end_len = end.chars().count() as i64;
    if length < end_len || leeway < 0 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("expected length >= {end_len} and leeway >= 0, got {length} and {leeway}"),
        ));
    }
    let text = python_string(value);
    let chars = text.chars().count() as i64;
    if chars <= length + leeway {
        return Ok(text);
    }
    let keep: String = text.chars().take((length - end_len) as usize).collect();
    if killwords.is_some_and(|v| v.is_true()) {
        return Ok(keep + &end);
    }
    let kept = match keep.rsplit_once(' ') {
        Some((before, _)) => before.to_owned(),
        None => keep,
    };
    Ok(kept + &end)
}

/// Jinja2's `wordcount`: runs of word characters (`\w`: alphanumerics and `_`).
fn wordcount(value: &Value) -> usize {
    let text = python_string(value);
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|word| !word.is_empty())
        .count()
}

fn raise_exception(message: &Value) -> Result<Value, Error> {
    let text = python_string(message);
    Err(Error::new(ErrorKind::InvalidOperation, text.clone()).with_source(RaisedByTemplate(text)))
}

fn strftime_now(format: &str) -> String {
    strftime(format, &CivilTime::now_utc())
}

/// Rewrites Hugging Face's `{% generation %}` / `{% endgeneration %}` tags (an
/// extension that only marks assistant spans) into an always-true `if`, keeping
/// their whitespace-control markers so the output is unchanged.
fn neutralize_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(stripped) => (&inner[..1], stripped),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(stripped) => (stripped, &body[body.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => {
                let _ = write!(out, "{{%{left} if true {right}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{left} endif {right}%}}");
            }
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// vLLM's content-format detection: a template that loops over a message's
/// `content` (`{% for part in message['content'] %}`) wants OpenAI-style parts.
///
/// vLLM walks the Jinja AST: variables assigned from `messages` (directly,
/// sliced, filtered or tested), loops over those give message variables, and
/// a loop over a message variable's `content` means OpenAI format. This scans
/// the block tags for the same `set` and `for` statements.
pub fn detect_content_format(source: &str) -> ContentFormat {
    let statements = block_statements(source);
    let mut message_lists = vec!["messages".to_owned()];
    let mut i = 0;
    while let Some(list) = message_lists.get(i).cloned() {
        for statement in &statements {
            if let Statement::Set { target, value } = statement {
                if accesses(value, &list, None) && !message_lists.contains(target) {
                    message_lists.push(target.clone());
                }
            }
        }
        i += 1;
    }
    let mut message_vars: Vec<String> = Vec::new();
    for statement in &statements {
        if let Statement::For { targets, iter } = statement {
            if message_lists.iter().any(|list| accesses(iter, list, None)) {
                match targets.as_slice() {
                    [single] => message_vars.push(single.clone()),
                    // vLLM's detection gives up on unpacking loops and keeps its default.
                    _ => return ContentFormat::String,
                }
            }
        }
    }
    let loops_over_content = statements.iter().any(|statement| match statement {
        Statement::For { iter, .. } => message_vars
            .iter()
            .any(|var| accesses(iter, var, Some("content"))),
        Statement::Set { .. } => false,
    });
    if loops_over_content {
        ContentFormat::OpenAi
    } else {
        ContentFormat::String
    }
}

#[derive(Debug)]
enum Statement {
    Set { target: String, value: String },
    For { targets: Vec<String>, iter: String },
}

fn block_statements(source: &str) -> Vec<Statement> {
    let mut statements = Vec::new();
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let tag = &rest[open + 2..];
        let Some(close) = tag.find("%}") else { break };
        let body = tag[..close].trim_matches(['-', '+']).trim();
        rest = &tag[close + 2..];
        if let Some(set) = body.strip_prefix("set ") {
            if let Some((target, value)) = set.split_once('=') {
                let target = target.trim();
                if is_identifier(target) && !value.starts_with('=') {
                    statements.push(Statement::Set {
                        target: target.to_owned(),
                        value: value.trim().to_owned(),
                    });
                }
            }
        } else if let Some(for_clause) = body.strip_prefix("for ") {
            if let Some((targets, iter)) = split_keyword(for_clause, "in") {
                let targets = targets
                    .trim()
                    .trim_matches(['(', ')'])
                    .split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect();
                let iter = split_keyword(iter, "if").map_or(iter, |(iter, _)| iter);
                let iter = iter.trim().strip_suffix("recursive").unwrap_or(iter.trim());
                statements.push(Statement::For {
                    targets,
                    iter: iter.trim().to_owned(),
                });
            }
        }
    }
    statements
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

/// Splits at the first top-level ` keyword ` outside brackets and quotes.
fn split_keyword<'a>(text: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let bytes = text.as_bytes();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (quote, b) {
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some(b),
            (None, b'(' | b'[' | b'{') => depth += 1,
            (None, b')' | b']' | b'}') => depth -= 1,
            (None, _) if depth == 0 && bytes[i..].starts_with(keyword.as_bytes()) => {
                let before = i == 0 || bytes[i - 1].is_ascii_whitespace();
                let after = bytes
                    .get(i + keyword.len())
                    .is_none_or(|c| c.is_ascii_whitespace());
                if before && after {
                    return Some((&text[..i], &text[i + keyword.len()..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether `expr` reads variable `var` (or its attribute/item `key`), possibly
/// sliced, filtered or tested: vLLM's `_is_var_or_elems_access`.
fn accesses(expr: &str, var: &str, key: Option<&str>) -> bool {
    let expr = expr.trim();
    let expr = split_keyword(expr, "is")
        .map_or(expr, |(before, _)| before)
        .trim();
    let mut core = match split_top_level_pipe(expr) {
        Some(before) => before.trim(),
        None => expr,
    };
    // Strip trailing slices; an index that is not a slice stops the match.
    while core.ends_with(']') {
        let Some(open) = matching_open_bracket(core) else {
            return false;
        };
        let inside = &core[open + 1..core.len() - 1];
        if split_keyword_char(inside, ':').is_none() {
            break;
        }
        core = core[..open].trim_end();
    }
    if core.starts_with('(') && core.ends_with(')') {
        return accesses(&core[1..core.len() - 1], var, key);
    }
    match key {
        None => core == var,
        Some(key) => {
            let Some(rest) = core.strip_prefix(var) else {
                return false;
            };
            let rest = rest.trim();
            rest.strip_prefix('.')
                .is_some_and(|attr| attr.trim() == key)
                || [format!("['{key}']"), format!("[\"{key}\"]")]
                    .iter()
                    .any(|item| rest.replace(' ', "") == *item)
        }
    }
}

/// The text before the first top-level `|` (a filter), if any.
fn split_top_level_pipe(expr: &str) -> Option<&str> {
    split_keyword_char(expr, '|').map(|(before, _)| before)
}

fn split_keyword_char(text: &str, wanted: char) -> Option<(&str, &str)> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            (None, c) if c == wanted && depth == 0 => {
                return Some((&text[..i], &text[i + c.len_utf8()..]))
            }
            _ => {}
        }
    }
    None
}

fn matching_open_bracket(text: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (i, c) in text.char_indices().rev() {
        match c {
            ']' => depth += 1,
            '[' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::request::{parse_request, Endpoint, PromptInput};

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(
            vec![("default".into(), source.into())],
            vec![("eos_token".into(), "</s>".into())],
        )
        .unwrap()
    }

    fn chat(body: &str) -> ChatPrompt {
        match parse_request(Endpoint::ChatCompletions, body.as_bytes())
            .unwrap()
            .prompt
        {
            PromptInput::Chat(c) => c,
            _ => panic!(),
        }
    }

    #[test]
    fn jinja2_compatible_rendering() {
        let t = template(
            "{%- for m in messages %}[{{ m.role }}:{{ m.content | trim }}]{% endfor %}\n\
             {{ tools | tojson }}|{{ tools[0].function | tojson(indent=2) }}|{{ none }}|{{ true }}|{{ 1.0 }}|{{ {'a': 1} }}|{{ eos_token }}\n\
             {%- if add_generation_prompt %}<gen>{% endif %}",
        );
        let c = chat(
            r#"{"model":"m","messages":[{"role":"user","content":" héllo "}],
                "tools":[{"type":"function","function":{"name":"f","parameters":{"z":1,"a":"é<&>"}}}]}"#,
        );
        assert_eq!(
            t.render(&c).unwrap(),
            "[user:héllo][{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": null, \"parameters\": {\"z\": 1, \"a\": \"é<&>\"}}}]|{\n  \"name\": \"f\",\n  \"description\": null,\n  \"parameters\": {\n    \"z\": 1,\n    \"a\": \"é<&>\"\n  }\n}|None|True|1.0|{'a': 1}|</s><gen>"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = template("{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}");
        let err = t
            .render(&chat(
                r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            ))
            .unwrap_err();
        assert_eq!(
            err,
            TokenizeError::TemplateRaised {
                message: "System first!".into()
            }
        );
    }

    #[test]
    fn continue_final_message_cuts_after_the_text() {
        let t = template(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}",
        );
        let c = chat(
            r#"{"model":"m","add_generation_prompt":false,"continue_final_message":true,
                "messages":[{"role":"user","content":"q"},{"role":"assistant","content":"The answer is "}]}"#,
        );
        assert_eq!(
            t.render(&c).unwrap(),
            "<user>q</user>\n<assistant>The answer is "
        );
    }

    #[test]
    fn generation_tags_are_no_ops() {
        let source = "{%- for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}|{% endfor %}";
        assert_eq!(
            neutralize_generation_tags(source),
            "{%- for m in messages %}{%- if true -%} {{ m.content }} {%- endif %}|{% endfor %}"
        );
        let t = template(source);
        let c = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}"#,
        );
        assert_eq!(t.render(&c).unwrap(), "a|b|");
    }

    #[test]
    fn detects_content_format_like_vllm() {
        assert_eq!(
            detect_content_format("{% for message in messages %}{{ message.content }}{% endfor %}"),
            ContentFormat::String
        );
        assert_eq!(
            detect_content_format(
                "{%- set msgs = messages[1:] %}{% for m in msgs %}{% for c in m['content'] | selectattr('type') %}{{ c.text }}{% endfor %}{% endfor %}"
            ),
            ContentFormat::OpenAi
        );
        assert_eq!(
            detect_content_format("{% for m in messages[::-1] %}{%- for part in m.content -%}{{ part }}{% endfor %}{% endfor %}"),
            ContentFormat::OpenAi
        );
        assert_eq!(
            detect_content_format("{% for m in messages %}{% for x in m.content.split('\\n') %}{% endfor %}{% endfor %}"),
            ContentFormat::String
        );
        assert_eq!(
            detect_content_format(
                "{% for m in other %}{% for c in m.content %}{% endfor %}{% endfor %}"
            ),
            ContentFormat::String
        );
        assert_eq!(
            detect_content_format(
                "{% set é = 'ü' %}{% set ü = messages %}{% for m in ü %}{% for c in m.content %}{% endfor %}{% endfor %}"
            ),
            ContentFormat::OpenAi
        );
    }

    #[test]
    fn openai_content_format_shapes_parts() {
        let t = template(
            "{% for m in messages %}{% for p in m['content'] %}({{ p.type }}:{{ p.text }}){% endfor %}|{% endfor %}",
        );
        let c = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":""}]},
                {"role":"user","content":"b"}]}"#,
        );
        assert_eq!(t.render(&c).unwrap(), "(text:a)(text:)|(text:b)|");
    }

    #[test]
    fn named_templates_follow_tools() {
        let t = ChatTemplate::new(
            vec![
                ("default".into(), "plain".into()),
                ("tool_use".into(), "tools".into()),
            ],
            Vec::new(),
        )
        .unwrap();
        let without = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#);
        let with = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[]}"#);
        assert_eq!(t.render(&without).unwrap(), "plain");
        assert_eq!(t.render(&with).unwrap(), "tools");
    }
}
