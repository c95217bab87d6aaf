//! Errors of request parsing, prompt rendering and tokenizer loading.
//!
//! Request and rendering errors are the client's fault in the same cases where
//! vLLM answers 400, and each one carries what an OpenAI-style error body needs.

use std::path::PathBuf;

use serde::Serialize;

/// The body of an OpenAI-style error response: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApiError {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: &'static str,
    /// The HTTP status to answer with.
    #[serde(skip)]
    pub status: u16,
}

impl ApiError {
    fn invalid_request(message: String, param: Option<String>, code: &'static str) -> Self {
        ApiError {
            message,
            kind: "invalid_request_error",
            param,
            code,
            status: 400,
        }
    }

    /// The JSON document `{"error": {...}}`.
    pub fn to_body(&self) -> String {
        serde_json::json!({ "error": self }).to_string()
    }
}

/// A request body kvgate cannot turn into a prompt.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {message}")]
    InvalidJson { message: String },

    #[error("`{param}` is required")]
    MissingField { param: String },

    #[error("`{param}` must be {expected}, not {found}")]
    WrongType {
        param: String,
        expected: &'static str,
        found: &'static str,
    },

    #[error("`{param}`: {message}")]
    InvalidValue { param: String, message: String },

    #[error(
        "content part type `{part_type}` at `{param}` is not supported for routing: \
         multimodal input is not supported"
    )]
    Multimodal { param: String, part_type: String },

    #[error("`{param}` is not supported for routing: {message}")]
    Unsupported { param: String, message: String },
}

impl RequestError {
    pub fn param(&self) -> Option<&str> {
        match self {
            RequestError::InvalidJson { .. } => None,
            RequestError::MissingField { param }
            | RequestError::WrongType { param, .. }
            | RequestError::InvalidValue { param, .. }
            | RequestError::Multimodal { param, .. }
            | RequestError::Unsupported { param, .. } => Some(param),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            RequestError::InvalidJson { .. } => "invalid_json",
            RequestError::MissingField { .. } => "missing_required_parameter",
            RequestError::WrongType { .. } => "invalid_type",
            RequestError::InvalidValue { .. } => "invalid_value",
            RequestError::Multimodal { .. } => "multimodal_not_supported",
            RequestError::Unsupported { .. } => "unsupported_parameter",
        }
    }

    pub fn api_error(&self) -> ApiError {
        ApiError::invalid_request(
            self.to_string(),
            self.param().map(str::to_owned),
            self.code(),
        )
    }
}

/// A parsed request whose prompt cannot be rendered or tokenized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenizeError {
    #[error(transparent)]
    Request(#[from] RequestError),

    #[error("the model has no chat template, so chat completions cannot be rendered")]
    NoChatTemplate,

    /// The template called `raise_exception(message)`.
    #[error("{message}")]
    TemplateRaised { message: String },

    #[error("chat template failed: {message}")]
    Template { message: String },

    #[error("{message}")]
    ContinueFinalMessage { message: String },

    #[error("token id {id} at `{param}` is out of vocabulary (the largest id is {max_token_id})")]
    TokenIdOutOfRange {
        param: String,
        id: u32,
        max_token_id: u32,
    },

    #[error("tokenizer failed: {message}")]
    Tokenizer { message: String },
}

impl TokenizeError {
    pub fn api_error(&self) -> ApiError {
        match self {
            TokenizeError::Request(e) => e.api_error(),
            TokenizeError::NoChatTemplate => ApiError::invalid_request(
                self.to_string(),
                Some("messages".into()),
                "no_chat_template",
            ),
            TokenizeError::TemplateRaised { .. } => ApiError::invalid_request(
                self.to_string(),
                Some("messages".into()),
                "template_error",
            ),
            TokenizeError::Template { .. } => ApiError::invalid_request(
                self.to_string(),
                Some("messages".into()),
                "template_error",
            ),
            TokenizeError::ContinueFinalMessage { .. } => ApiError::invalid_request(
                self.to_string(),
                Some("continue_final_message".into()),
                "invalid_value",
            ),
            TokenizeError::TokenIdOutOfRange { param, .. } => {
                ApiError::invalid_request(self.to_string(), Some(param.clone()), "invalid_value")
            }
            TokenizeError::Tokenizer { .. } => ApiError {
                message: self.to_string(),
                kind: "internal_error",
                param: None,
                code: "tokenizer_error",
                status: 500,
            },
        }
    }
}

/// A model's tokenizer files cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerLoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a usable tokenizer.json: {message}")]
    TokenizerJson { path: PathBuf, message: String },

    #[error("{path} is not a usable tokenizer_config.json: {message}")]
    TokenizerConfig { path: PathBuf, message: String },

    #[error("chat template `{name}` does not compile: {message}")]
    ChatTemplate { name: String, message: String },

    #[error("chat template file {path} is not usable: {message}")]
    ChatTemplateFile { path: PathBuf, message: String },

    #[error("the tokenizer's post-processor is not supported: {message}")]
    PostProcessor { message: String },

    #[error("defaultChatTemplateKwargs: {0}")]
    DefaultKwargs(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_carry_param_and_code() {
        let e = RequestError::Multimodal {
            param: "messages[0].content[1]".into(),
            part_type: "image_url".into(),
        };
        let api = e.api_error();
        assert_eq!(api.status, 400);
        assert_eq!(api.code, "multimodal_not_supported");
        assert_eq!(api.param.as_deref(), Some("messages[0].content[1]"));
        assert!(api.message.contains("multimodal input is not supported"));
        let body: serde_json::Value = serde_json::from_str(&api.to_body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "messages[0].content[1]");

        let raised = TokenizeError::TemplateRaised {
            message: "Conversation roles must alternate".into(),
        };
        assert_eq!(
            raised.api_error().message,
            "Conversation roles must alternate"
        );
    }
}
