//! TEMPORARY interface shim until the `tokenize` branch merges (replaced whole).
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("request has no `model`")]
    MissingModel,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

#[derive(Debug)]
pub struct OpenAiRequest {
    pub model: String,
    pub stream: bool,
    pub cache_salt: Option<String>,
    text: String,
}

pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<OpenAiRequest, RequestError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(RequestError::Json)?;
    let model = v
        .get("model")
        .and_then(|m| m.as_str())
        .ok_or(RequestError::MissingModel)?
        .to_string();
    let text = match endpoint {
        Endpoint::ChatCompletions => v
            .get("messages")
            .and_then(|m| m.as_array())
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| m.get("content").and_then(|c| c.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
        Endpoint::Completions => v
            .get("prompt")
            .and_then(|p| p.as_str())
            .unwrap_or_default()
            .to_string(),
    };
    Ok(OpenAiRequest {
        model,
        stream: v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false),
        cache_salt: v
            .get("cache_salt")
            .and_then(|s| s.as_str())
            .map(str::to_string),
        text,
    })
}

pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
}

impl ModelTokenizer {
    pub fn load(
        tokenizer_json: &Path,
        _tokenizer_config: Option<&Path>,
        _chat_template: Option<&Path>,
    ) -> Result<Self, TokenizeError> {
        Ok(Self {
            tokenizer: tokenizers::Tokenizer::from_file(tokenizer_json)
                .map_err(|e| TokenizeError::Tokenizer(e.to_string()))?,
        })
    }

    pub fn tokens(&self, req: &OpenAiRequest) -> Result<Vec<u32>, TokenizeError> {
        self.tokenizer
            .encode(req.text.as_str(), false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Tokenizer(e.to_string()))
    }
}
