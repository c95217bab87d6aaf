//! `kvgate inspect`: the operator's answer to "why did my request miss the cache".
//! It shows what kvgate computes for a request body — the rendered prompt, the
//! token ids and every block hash, both as the index keys it and as vLLM's
//! events carry it — with exactly the code the gateway runs.

use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use crate::config::{Config, ConfigError};
use crate::hash::{BlockHash, BlockHasher, ExtraKeys, HashConfigError};
use crate::tokenize::{
    self, Endpoint, ModelTokenizer, RequestError, TokenizeError, TokenizerLoadError,
};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// kvgate's config file (models, tokenizers, hash settings).
    #[arg(long, short, default_value = "conf/kvgate.yaml")]
    pub config: PathBuf,
    /// The request body (JSON); `-` or absent reads standard input.
    pub body: Option<PathBuf>,
    /// Which endpoint the body is for; by default `messages` means chat, `prompt` completions.
    #[arg(long, value_enum)]
    pub endpoint: Option<EndpointArg>,
    /// Leave the token ids and per-block list out (for very long prompts).
    #[arg(long)]
    pub summary: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EndpointArg {
    Chat,
    Completions,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the request body from {from}: {source}")]
    Body {
        from: String,
        source: std::io::Error,
    },
    #[error("the body is not a JSON object with `messages` or `prompt`; pass --endpoint")]
    UnknownEndpoint,
    #[error("invalid request: {0}")]
    Request(#[from] RequestError),
    #[error("model {0:?} is not configured (neither a model nor a LoRA adapter)")]
    UnknownModel(String),
    #[error("model {model:?}: {source}")]
    Tokenizer {
        model: String,
        source: TokenizerLoadError,
    },
    #[error("model {model:?}: {source}")]
    Hash {
        model: String,
        source: HashConfigError,
    },
    #[error("cannot render or tokenize the request: {0}")]
    Tokenize(#[from] TokenizeError),
    #[error("cannot write the report: {0}")]
    Output(std::io::Error),
}

fn read_body(path: Option<&PathBuf>) -> Result<Vec<u8>, InspectError> {
    match path.filter(|p| p.as_os_str() != "-") {
        Some(path) => std::fs::read(path).map_err(|source| InspectError::Body {
            from: path.display().to_string(),
            source,
        }),
        None => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .map_err(|source| InspectError::Body {
                    from: "standard input".into(),
                    source,
                })?;
            Ok(body)
        }
    }
}

fn detect_endpoint(body: &[u8]) -> Result<Endpoint, InspectError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| InspectError::UnknownEndpoint)?;
    if value.get("messages").is_some() {
        Ok(Endpoint::ChatCompletions)
    } else if value.get("prompt").is_some() {
        Ok(Endpoint::Completions)
    } else {
        Err(InspectError::UnknownEndpoint)
    }
}

fn block_json(hasher: &BlockHasher, i: usize, block: &BlockHash) -> Value {
    let size = hasher.settings().block_size;
    json!({
        "index": i,
        "tokens": [i * size, (i + 1) * size],
        "digest": block.digest.to_string(),
        "indexKey": block.key,
        "eventIntValue": block.key,
        "eventBytesValue": hex::encode(block.digest.as_bytes()),
    })
}

/// Renders, tokenizes and hashes one request body; returns the JSON report.
pub fn inspect(args: &InspectArgs) -> Result<Value, InspectError> {
    let config = Config::load(&args.config)?;
    let body = read_body(args.body.as_ref())?;
    let endpoint = match args.endpoint {
        Some(EndpointArg::Chat) => Endpoint::ChatCompletions,
        Some(EndpointArg::Completions) => Endpoint::Completions,
        None => detect_endpoint(&body)?,
    };

    let started = Instant::now();
    let request = tokenize::parse_request(endpoint, &body)?;
    let (model, adapter) = config
        .served_model(&request.model)
        .ok_or_else(|| InspectError::UnknownModel(request.model.clone()))?;
    let tokenizer = ModelTokenizer::for_model(model).map_err(|source| InspectError::Tokenizer {
        model: model.name.clone(),
        source,
    })?;
    let hasher = BlockHasher::new(&model.hash_settings()).map_err(|source| InspectError::Hash {
        model: model.name.clone(),
        source,
    })?;
    let loaded = Instant::now();

    let rendered = tokenizer.render(&request)?;
    let tokens = tokenizer.tokens(&request)?;
    let tokenized = Instant::now();
    let extra = ExtraKeys {
        lora: adapter.map(|a| a.hash_key()),
        cache_salt: request.cache_salt.clone(),
    };
    let mut blocks = Vec::with_capacity(tokens.len() / model.block_size + 1);
    hasher.hash_prompt(&tokens, &extra, &mut blocks);
    let hashed = Instant::now();

    let micros = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
    let mut report = json!({
        "model": request.model,
        "targetModel": model.name,
        "loraAdapter": adapter.map(|a| a.name.as_str()),
        "endpoint": match endpoint { Endpoint::ChatCompletions => "/v1/chat/completions", Endpoint::Completions => "/v1/completions" },
        "vllmRelease": model.vllm_release.to_string(),
        "hashAlgo": model.hash_algo,
        "hashSeed": model.hash_seed,
        "blockSize": model.block_size,
        "noneHash": hasher.none_hash().to_string(),
        "cacheSalt": request.cache_salt,
        "renderedPrompt": rendered,
        "tokenCount": tokens.len(),
        "fullBlocks": blocks.len(),
        "tokensInPartialBlock": tokens.len() - blocks.len() * model.block_size,
        "timingsUs": {
            "loadTokenizer": micros(started, loaded),
            "renderAndTokenize": micros(loaded, tokenized),
            "hash": micros(tokenized, hashed),
        },
    });
    if !args.summary {
        report["tokenIds"] = json!(tokens);
        report["blocks"] = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| block_json(&hasher, i, b))
            .collect();
    }
    Ok(report)
}

/// `kvgate inspect`: prints the report as pretty JSON. A reader that stops early
/// (`kvgate inspect … | head`) ends the output, as it does for other command-line tools.
pub fn run(args: &InspectArgs) -> Result<(), InspectError> {
    let report = inspect(args)?;
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer_pretty(&mut out, &report)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(InspectError::Output(e)),
        _ => Ok(()),
    }
}
