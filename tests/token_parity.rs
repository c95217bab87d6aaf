//! Token parity with a vLLM pod: every request of a generated corpus must
//! tokenize to exactly the ids Python `transformers` computes the way vLLM
//! calls it (tests/parity/reference.py), and be rejected where vLLM rejects it.
//!
//! Requests carry the template flags their pod runs with (`chatTemplate`,
//! `defaultChatTemplateKwargs`, `chatTemplateContentFormat`), set on kvgate's side as
//! the same `models[]` fields, and long messages that agree with an earlier one up to
//! every character around a chunk end of the piece cache, so prefix reuse is checked
//! against transformers tokenizing from scratch.
//!
//! Needs `python3` with `transformers` (tests/requirements.txt) and the Qwen3
//! tokenizer in `.tokenizers/qwen3` (`.ci/setup`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use kvgate::config::ModelConfig;
use kvgate::tokenize::{parse_request, Endpoint, ModelTokenizer, PromptInput};
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
struct CorpusEntry<'a> {
    id: usize,
    endpoint: String,
    #[serde(borrow)]
    body: &'a RawValue,
    /// The pod's template flags as `models[]` fields; `chatTemplate` names a file in
    /// tests/parity/templates. Kept as text: `defaultChatTemplateKwargs` keeps its key
    /// order, which a template's `tojson` prints.
    #[serde(borrow)]
    options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Reference {
    id: usize,
    text: Option<String>,
    tokens: Option<Vec<u32>>,
    error: Option<String>,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_python(script: &str, args: &[&str]) {
    let output = Command::new("python3")
        .arg(manifest_dir().join("tests/parity").join(script))
        .args(args)
        .output()
        .expect("python3 must be installed");
    assert!(
        output.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn first_difference(a: &str, b: &str) -> String {
    let at = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or(a.len().min(b.len()));
    let context = |s: &str| {
        let mut start = at.saturating_sub(60).min(s.len());
        while !s.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (at + 60).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        format!("{:?}", &s[start..end])
    };
    format!(
        "at byte {at}:\n  kvgate:    {}\n  reference: {}",
        context(a),
        context(b)
    )
}

#[test]
fn token_parity_with_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_path = dir.path().join("corpus.json");
    let reference_path = dir.path().join("reference.json");
    let shared = manifest_dir().join("../shared");
    let tokenizer_dir = manifest_dir().join(".tokenizers/qwen3");
    run_python(
        "gen_corpus.py",
        &[
            "--shared",
            shared.to_str().unwrap(),
            "--out",
            corpus_path.to_str().unwrap(),
        ],
    );
    run_python(
        "reference.py",
        &[
            "--tokenizer-dir",
            tokenizer_dir.to_str().unwrap(),
            "--corpus",
            corpus_path.to_str().unwrap(),
            "--out",
            reference_path.to_str().unwrap(),
        ],
    );

    let corpus_text = std::fs::read_to_string(&corpus_path).unwrap();
    let corpus: Vec<CorpusEntry> = serde_json::from_str(&corpus_text).unwrap();
    let references: Vec<Reference> =
        serde_json::from_str(&std::fs::read_to_string(&reference_path).unwrap()).unwrap();
    assert_eq!(corpus.len(), references.len());
    assert!(corpus.len() >= 200, "corpus too small: {}", corpus.len());

    let load = |options: &str| {
        let fixed = serde_json::json!({
            "name": "Qwen/Qwen3-8B",
            "tokenizer": tokenizer_dir.join("tokenizer.json"),
            "tokenizerConfig": tokenizer_dir.join("tokenizer_config.json"),
            "blockSize": 16,
            "hashAlgo": "sha256_cbor",
            "hashSeed": "42",
            "vllmRelease": "0.11.0",
            "discovery": {"static": {"pods": []}},
        })
        .to_string();
        // The fields as text, so that the config reads them in their written order.
        let mut model = fixed.strip_suffix('}').unwrap().to_owned();
        let options: HashMap<String, &RawValue> =
            serde_json::from_str(options).expect("options are a JSON object");
        for (key, value) in options {
            let value = match key.as_str() {
                "chatTemplate" => {
                    let name: String = serde_json::from_str(value.get()).unwrap();
                    let path = manifest_dir().join("tests/parity/templates").join(name);
                    serde_json::to_string(&path).unwrap()
                }
                _ => value.get().to_owned(),
            };
            model.push_str(&format!(
                ",{}:{value}",
                serde_json::to_string(&key).unwrap()
            ));
        }
        model.push('}');
        let model: ModelConfig = serde_json::from_str(&model).expect("a valid models[] entry");
        ModelTokenizer::for_model(&model).unwrap()
    };
    let model = load("{}");
    let mut with_options: HashMap<String, ModelTokenizer> = HashMap::new();

    let mut identical = 0;
    let mut failures = Vec::new();
    for (entry, reference) in corpus.iter().zip(&references) {
        assert_eq!(entry.id, reference.id);
        let endpoint = match entry.endpoint.as_str() {
            "chat" => Endpoint::ChatCompletions,
            _ => Endpoint::Completions,
        };
        let model = match &entry.options {
            None => &model,
            Some(options) => with_options
                .entry(options.get().to_owned())
                .or_insert_with(|| load(options.get())),
        };
        let outcome = parse_request(endpoint, entry.body.get().as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|req| {
                let tokens = model.tokens(&req).map_err(|e| e.to_string())?;
                let rendered = model.render(&req).map_err(|e| e.to_string())?;
                Ok((req, rendered, tokens))
            });
        match (&outcome, &reference.tokens, &reference.error) {
            (Ok((req, rendered, tokens)), Some(want), None) => {
                if tokens == want {
                    identical += 1;
                } else {
                    let detail = match (rendered, &reference.text) {
                        (Some(ours), Some(theirs)) if ours != theirs => {
                            first_difference(ours, theirs)
                        }
                        _ => format!(
                            "same text, tokens differ: {} vs {} ids",
                            tokens.len(),
                            want.len()
                        ),
                    };
                    failures.push(format!("request {}: {detail}", entry.id));
                }
                // The segment cache must not change a single id.
                if let (PromptInput::Chat(_), Some(text)) = (&req.prompt, rendered) {
                    let whole = model
                        .encode_text_uncached(text, req.add_special_tokens)
                        .unwrap();
                    assert_eq!(
                        tokens, &whole,
                        "request {}: segmented != whole encoding",
                        entry.id
                    );
                }
            }
            (Err(_), None, Some(_)) => identical += 1,
            (Ok(_), None, Some(error)) => failures.push(format!(
                "request {}: accepted, but vLLM rejects it: {error}",
                entry.id
            )),
            (Err(error), Some(_), None) => failures.push(format!(
                "request {}: rejected, but vLLM accepts it: {error}",
                entry.id
            )),
            _ => failures.push(format!("request {}: malformed reference", entry.id)),
        }
    }
    let stats = model.cache_stats();
    println!(
        "token parity: {identical}/{} requests identical",
        corpus.len()
    );
    println!(
        "piece cache: {} hits, {} prefix hits, {} misses",
        stats.hits, stats.prefix_hits, stats.misses
    );
    for failure in &failures {
        println!("{failure}");
    }
    assert!(failures.is_empty(), "{} requests differ", failures.len());
    assert!(
        stats.hits > 0,
        "multi-turn requests should reuse cached pieces"
    );
    assert!(
        stats.prefix_hits >= 100,
        "messages that start with a seen message should reuse its prefix: {stats:?}"
    );
    assert!(
        with_options.len() >= 10,
        "template flag cases: {}",
        with_options.len()
    );
}
