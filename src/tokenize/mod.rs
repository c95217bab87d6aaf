//! OpenAI request → token ids, exactly as a vLLM pod computes them.
//!
//! A chat request is normalized the way vLLM's OpenAI server normalizes it
//! ([`request`]), rendered with the model's own Jinja chat template the way
//! Hugging Face `apply_chat_template` renders it ([`template`]), and encoded
//! with the model's real tokenizer: chat prompts without the post-processor's
//! special tokens (the template already holds them), completion prompts with
//! them. Token-id prompts pass through.
//!
//! Encoding splits the prompt at added tokens first, as the tokenizer itself
//! does, and caches each piece's ids: a conversation whose earlier turns were
//! seen before only tokenizes its new text, and a message that starts with a
//! text seen before (a document followed by a new question) only tokenizes
//! what follows the seen text.

mod cache;
mod cuts;
mod error;
pub mod json;
mod pyfmt;
mod request;
mod segments;
mod strftime;
mod template;
mod tokenizer;
mod words;

use std::path::Path;

pub use cache::CacheStats;
pub use error::{ApiError, RequestError, TokenizeError, TokenizerLoadError};
pub use json::{JsonObject, JsonValue};
pub use request::{
    parse_request, ChatMessage, ChatPrompt, ContentPart, Endpoint, MessageContent, OpenAiRequest,
    PromptInput,
};
pub use template::{ChatTemplate, ContentFormat};
pub use tokenizer::DEFAULT_PIECE_CACHE_BYTES;

use crate::config::{ChatTemplateContentFormat, ModelConfig};

use tokenizer::TextTokenizer;

/// Special-token attributes `apply_chat_template` passes to templates.
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One model's tokenizer, chat template and piece cache. Shared by all requests for the model.
pub struct ModelTokenizer {
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("max_token_id", &self.tokenizer.max_token_id())
            .field("template", &self.template)
            .finish()
    }
}

impl ModelTokenizer {
    /// Loads `tokenizer.json`, and the chat template and special tokens from
    /// `tokenizer_config.json` and/or a separate template file (a Jinja file,
    /// or a `chat_template.json`); the separate file wins, as vLLM's `--chat-template` does.
    pub fn load(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        chat_template_file: Option<&Path>,
    ) -> Result<Self, TokenizerLoadError> {
        let config = match tokenizer_config {
            Some(path) => Some((path, read_json_object(path)?)),
            None => None,
        };
        let config_error = |path: &Path, message: String| TokenizerLoadError::TokenizerConfig {
            path: path.to_owned(),
            message,
        };

        let mut special_tokens = Vec::new();
        let mut split_special_tokens = false;
        let mut templates: Vec<(String, String)> = Vec::new();
        if let Some((path, config)) = &config {
            for name in SPECIAL_TOKEN_NAMES {
                match config.get(name) {
                    None | Some(JsonValue::Null) => {}
                    Some(JsonValue::String(token)) => {
                        special_tokens.push((name.to_owned(), token.clone()))
                    }
                    Some(JsonValue::Object(token)) => match token.get("content") {
                        Some(JsonValue::String(content)) => {
                            special_tokens.push((name.to_owned(), content.clone()))
                        }
                        _ => {
                            return Err(config_error(
                                path,
                                format!("`{name}` has no string `content`"),
                            ))
                        }
                    },
                    Some(other) => {
                        return Err(config_error(
                            path,
                            format!("`{name}` is {}", other.type_name()),
                        ))
                    }
                }
            }
            split_special_tokens = match config.get("split_special_tokens") {
                None | Some(JsonValue::Null) => false,
                Some(JsonValue::Bool(b)) => *b,
                Some(other) => {
                    return Err(config_error(
                        path,
                        format!("`split_special_tokens` is {}", other.type_name()),
                    ))
                }
            };
            templates =
                config_templates(config.get("chat_template")).map_err(|m| config_error(path, m))?;
        }
        if let Some(path) = chat_template_file {
            templates = vec![("default".to_owned(), read_template_file(path)?)];
        }

        let tokenizer = TextTokenizer::load(tokenizer_json, split_special_tokens)?;
        let template = if templates.is_empty() {
            None
        } else {
            Some(ChatTemplate::new(templates, special_tokens)?)
        };
        Ok(ModelTokenizer {
            tokenizer,
            template,
        })
    }

    /// A configured model's tokenizer, with vLLM's template flags its pods run with:
    /// `--chat-template` (`chatTemplate`), `--default-chat-template-kwargs`
    /// (`defaultChatTemplateKwargs`) and `--chat-template-content-format`
    /// (`chatTemplateContentFormat`).
    pub fn for_model(model: &ModelConfig) -> Result<Self, TokenizerLoadError> {
        let mut loaded = Self::load(
            &model.tokenizer,
            model.tokenizer_config.as_deref(),
            model.chat_template.as_deref(),
        )?
        .with_piece_cache_bytes(model.token_cache_bytes);
        if let Some(template) = &mut loaded.template {
            if let Some(kwargs) = &model.default_chat_template_kwargs {
                template.set_default_kwargs(default_template_kwargs(kwargs)?);
            }
            match model.chat_template_content_format {
                ChatTemplateContentFormat::Auto => {}
                ChatTemplateContentFormat::String => {
                    template.set_content_format(ContentFormat::String)
                }
                ChatTemplateContentFormat::Openai => {
                    template.set_content_format(ContentFormat::OpenAi)
                }
            }
        }
        Ok(loaded)
    }

    /// Bounds the piece cache to about this many bytes (default [`DEFAULT_PIECE_CACHE_BYTES`]).
    pub fn with_piece_cache_bytes(mut self, bytes: usize) -> Self {
        self.tokenizer.set_piece_cache_bytes(bytes);
        self
    }

    /// Tokenizes a long new piece on at most this many threads (default: the cores this
    /// process may run on, at most 8).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.tokenizer.set_threads(threads);
        self
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The underlying Hugging Face tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.tokenizer.inner()
    }

    /// The rendered prompt text; `None` for token-id prompts.
    pub fn render(&self, req: &OpenAiRequest) -> Result<Option<String>, TokenizeError> {
        match &req.prompt {
            PromptInput::TokenIds(_) => Ok(None),
            PromptInput::Text(text) => Ok(Some(text.clone())),
            PromptInput::Chat(chat) => {
                let template = self
                    .template
                    .as_ref()
                    .ok_or(TokenizeError::NoChatTemplate)?;
                template.render(chat).map(Some)
            }
        }
    }

    /// The prompt's token ids, as the pod will compute them.
    pub fn tokens(&self, req: &OpenAiRequest) -> Result<Vec<u32>, TokenizeError> {
        match &req.prompt {
            PromptInput::TokenIds(ids) => {
                let max_token_id = self.tokenizer.max_token_id();
                if let Some((i, &id)) = ids.iter().enumerate().find(|(_, id)| **id > max_token_id) {
                    return Err(TokenizeError::TokenIdOutOfRange {
                        param: format!("prompt[{i}]"),
                        id,
                        max_token_id,
                    });
                }
                Ok(ids.clone())
            }
            PromptInput::Text(text) => self.tokenizer.encode(text, req.add_special_tokens),
            PromptInput::Chat(chat) => {
                let template = self
                    .template
                    .as_ref()
                    .ok_or(TokenizeError::NoChatTemplate)?;
                let prompt = template.render(chat)?;
                self.tokenizer.encode(&prompt, req.add_special_tokens)
            }
        }
    }

    /// Encodes text through the piece cache.
    pub fn encode_text(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        self.tokenizer.encode(text, add_special_tokens)
    }

    /// Encodes text with `Tokenizer::encode` on the whole string, bypassing every cache.
    pub fn encode_text_uncached(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        self.tokenizer.encode_whole(text, add_special_tokens)
    }

    /// Piece-cache hits since load.
    pub fn cache_stats(&self) -> CacheStats {
        self.tokenizer.cache_stats()
    }

    /// Bytes the piece cache holds now.
    pub fn cache_held_bytes(&self) -> usize {
        self.tokenizer.cache_held_bytes()
    }

    /// Empties the piece cache; words seen before stay cached.
    pub fn clear_piece_cache(&self) {
        self.tokenizer.clear_piece_cache();
    }

    /// Empties the piece and word caches.
    pub fn clear_caches(&self) {
        self.tokenizer.clear_caches();
    }
}

/// `defaultChatTemplateKwargs` from the config, as the template sees them; refused
/// where vLLM refuses them in a request's `chat_template_kwargs`.
pub fn default_template_kwargs(kwargs: &JsonObject) -> Result<JsonObject, TokenizerLoadError> {
    request::validate_template_kwargs(kwargs, "defaultChatTemplateKwargs")
        .map_err(|e| TokenizerLoadError::DefaultKwargs(e.to_string()))?;
    Ok(kwargs.clone())
}

fn read_json_object(path: &Path) -> Result<JsonObject, TokenizerLoadError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerLoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    match json::parse(&bytes) {
        Ok(JsonValue::Object(object)) => Ok(object),
        Ok(other) => Err(TokenizerLoadError::TokenizerConfig {
            path: path.to_owned(),
            message: format!("expected an object, found {}", other.type_name()),
        }),
        Err(e) => Err(TokenizerLoadError::TokenizerConfig {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// `chat_template` as a string, or Hugging Face's list of `{"name", "template"}`.
fn config_templates(value: Option<&JsonValue>) -> Result<Vec<(String, String)>, String> {
    match value {
        None | Some(JsonValue::Null) => Ok(Vec::new()),
        Some(JsonValue::String(source)) => Ok(vec![("default".to_owned(), source.clone())]),
        Some(JsonValue::Array(items)) => items
            .iter()
            .map(|item| match item {
                JsonValue::Object(entry) => match (entry.get("name"), entry.get("template")) {
                    (Some(JsonValue::String(name)), Some(JsonValue::String(source))) => {
                        Ok((name.clone(), source.clone()))
                    }
                    _ => {
                        Err("a `chat_template` entry needs string `name` and `template`".to_owned())
                    }
                },
                other => Err(format!("a `chat_template` entry is {}", other.type_name())),
            })
            .collect(),
        Some(other) => Err(format!("`chat_template` is {}", other.type_name())),
    }
}

fn read_template_file(path: &Path) -> Result<String, TokenizerLoadError> {
    let source = std::fs::read_to_string(path).map_err(|source| TokenizerLoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "json") {
        let file_error = |message: String| TokenizerLoadError::ChatTemplateFile {
            path: path.to_owned(),
            message,
        };
        let object = match json::parse(source.as_bytes()) {
            Ok(JsonValue::Object(object)) => object,
            Ok(other) => {
                return Err(file_error(format!(
                    "expected an object, found {}",
                    other.type_name()
                )))
            }
            Err(e) => return Err(file_error(e.to_string())),
        };
        return match object.get("chat_template") {
            Some(JsonValue::String(template)) => Ok(template.clone()),
            _ => Err(file_error("no string `chat_template`".into())),
        };
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".tokenizers/qwen3")
    }

    fn qwen() -> ModelTokenizer {
        let dir = qwen_dir();
        ModelTokenizer::load(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
            None,
        )
        .expect("run .ci/setup to fetch the Qwen3 tokenizer")
    }

    #[test]
    fn model_tokenizer_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ModelTokenizer>();
    }

    #[test]
    fn chat_and_completion_tokens() {
        let model = qwen();
        let chat = parse_request(
            Endpoint::ChatCompletions,
            br#"{"model":"Qwen3","messages":[{"role":"user","content":"Hello"}],"chat_template_kwargs":{"enable_thinking":false}}"#,
        )
        .unwrap();
        let rendered = model.render(&chat).unwrap().unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        let tokens = model.tokens(&chat).unwrap();
        assert_eq!(
            tokens,
            model.encode_text_uncached(&rendered, false).unwrap()
        );
        assert_eq!(
            tokens[0],
            model.tokenizer().token_to_id("<|im_start|>").unwrap()
        );

        let ids =
            parse_request(Endpoint::Completions, br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(model.render(&ids).unwrap(), None);
        assert_eq!(model.tokens(&ids).unwrap(), vec![1, 2, 3]);
        let out_of_range = parse_request(
            Endpoint::Completions,
            br#"{"model":"m","prompt":[1,4000000]}"#,
        )
        .unwrap();
        assert!(matches!(
            model.tokens(&out_of_range),
            Err(TokenizeError::TokenIdOutOfRange { param, id: 4_000_000, .. }) if param == "prompt[1]"
        ));
    }

    #[test]
    fn concurrent_requests_share_the_caches() {
        let model = qwen();
        let turns: Vec<String> = (0..6)
            .map(|i| {
                format!("Turn {i}: the quick brown fox {i} jumps over the lazy dog. ünïcödé 日本語")
            })
            .collect();
        let bodies: Vec<Vec<u8>> = (1..=turns.len())
            .map(|n| {
                let messages: Vec<serde_json::Value> = turns[..n]
                    .iter()
                    .map(|t| serde_json::json!({"role": "user", "content": t}))
                    .collect();
                serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages}))
                    .unwrap()
            })
            .collect();
        let expected: Vec<Vec<u32>> = bodies
            .iter()
            .map(|body| {
                let request = parse_request(Endpoint::ChatCompletions, body).unwrap();
                let prompt = model.render(&request).unwrap().unwrap();
                model.encode_text_uncached(&prompt, false).unwrap()
            })
            .collect();
        std::thread::scope(|scope| {
            for worker in 0..4 {
                let (model, bodies, expected) = (&model, &bodies, &expected);
                scope.spawn(move || {
                    for round in 0..3 {
                        for (i, body) in bodies.iter().enumerate().rev().skip((worker + round) % 2)
                        {
                            let request = parse_request(Endpoint::ChatCompletions, body).unwrap();
                            assert_eq!(model.tokens(&request).unwrap(), expected[i]);
                        }
                    }
                });
            }
        });
        assert!(model.cache_stats().hits > 0);
        assert!(model.cache_held_bytes() > 0);
    }

    #[test]
    fn load_errors() {
        let missing = ModelTokenizer::load(Path::new("/nonexistent/tokenizer.json"), None, None);
        assert!(matches!(missing, Err(TokenizerLoadError::Io { .. })));
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("tokenizer.json");
        std::fs::write(&broken, b"{\"model\": 1}").unwrap();
        assert!(matches!(
            ModelTokenizer::load(&broken, None, None),
            Err(TokenizerLoadError::TokenizerJson { .. })
        ));
        let bad_template = dir.path().join("template.jinja");
        std::fs::write(&bad_template, b"{% for x in %}").unwrap();
        assert!(matches!(
            ModelTokenizer::load(
                &qwen_dir().join("tokenizer.json"),
                None,
                Some(&bad_template)
            ),
            Err(TokenizerLoadError::ChatTemplate { .. })
        ));
        let no_template =
            ModelTokenizer::load(&qwen_dir().join("tokenizer.json"), None, None).unwrap();
        let chat = parse_request(
            Endpoint::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(
            no_template.tokens(&chat),
            Err(TokenizeError::NoChatTemplate)
        );
    }
}
