//! The model's real tokenizer, with a segment cache in front of it.

use std::path::Path;
use std::sync::Arc;

use tokenizers::{Encoding, Token, Tokenizer};

use super::cache::SegmentCache;
use super::error::{TokenizeError, TokenizerLoadError};
use super::segments::{AddedTokenSplitter, Segment};
use super::words::WordEncoder;

/// Default segment-cache budget in token ids (4 bytes each).
pub const DEFAULT_SEGMENT_CACHE_TOKENS: usize = 16 * 1024 * 1024;

/// Default number of cached pre-tokenized words.
const DEFAULT_WORD_CACHE_ENTRIES: usize = 256 * 1024;

/// A tokenizer plus the machinery that makes repeated prompts cheap.
pub(crate) struct TextTokenizer {
    tokenizer: Tokenizer,
    max_token_id: u32,
    /// What the post-processor puts around a single sequence when asked to add special tokens.
    special_prefix: Vec<u32>,
    special_suffix: Vec<u32>,
    /// `None` when added tokens cannot be split outside the tokenizer.
    splitter: Option<AddedTokenSplitter>,
    words: Option<WordEncoder>,
    segments: SegmentCache,
}

fn tokenizer_error(e: impl std::fmt::Display) -> TokenizeError {
    TokenizeError::Tokenizer {
        message: e.to_string(),
    }
}

impl TextTokenizer {
    pub(crate) fn load(
        path: &Path,
        split_special_tokens: bool,
    ) -> Result<Self, TokenizerLoadError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerLoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut tokenizer =
            Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerLoadError::TokenizerJson {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        // transformers encodes without truncation or padding unless asked to.
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerLoadError::TokenizerJson {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        tokenizer.set_encode_special_tokens(split_special_tokens);
        Self::new(tokenizer, DEFAULT_SEGMENT_CACHE_TOKENS)
    }

    pub(crate) fn new(
        tokenizer: Tokenizer,
        segment_cache_tokens: usize,
    ) -> Result<Self, TokenizerLoadError> {
        let max_token_id = tokenizer
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        let (special_prefix, special_suffix) = post_processor_wrap(&tokenizer)?;
        let deterministic = match tokenizer.get_model() {
            tokenizers::ModelWrapper::BPE(bpe) => !bpe.dropout.is_some_and(|p| p > 0.0),
            _ => true,
        };
        let splitter = if deterministic {
            match AddedTokenSplitter::new(&tokenizer) {
                Ok(splitter) => Some(splitter),
                Err(reason) => {
                    tracing::info!(
                        ?reason,
                        "added tokens are not split outside the tokenizer; segment cache disabled"
                    );
                    None
                }
            }
        } else {
            tracing::info!("BPE dropout makes encodings random; segment cache disabled");
            None
        };
        let words = WordEncoder::new(&tokenizer, DEFAULT_WORD_CACHE_ENTRIES);
        if words.is_none() {
            tracing::info!(
                "tokenizer pipeline has no word-level fast path; pieces use Tokenizer::encode"
            );
        }
        Ok(TextTokenizer {
            tokenizer,
            max_token_id,
            special_prefix,
            special_suffix,
            splitter,
            words,
            segments: SegmentCache::new(segment_cache_tokens),
        })
    }

    pub(crate) fn max_token_id(&self) -> u32 {
        self.max_token_id
    }

    pub(crate) fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub(crate) fn set_segment_cache_capacity(&mut self, tokens: usize) {
        self.segments = SegmentCache::new(tokens);
    }

    pub(crate) fn cache_stats(&self) -> (u64, u64) {
        self.segments.stats()
    }

    pub(crate) fn cache_held_tokens(&self) -> usize {
        self.segments.held_tokens()
    }

    pub(crate) fn clear_segment_cache(&self) {
        self.segments.clear();
    }

    pub(crate) fn clear_caches(&self) {
        self.segments.clear();
        if let Some(words) = &self.words {
            words.clear_cache();
        }
    }

    /// Token ids of `text`, identical to `Tokenizer::encode(text, add_special_tokens)`.
    pub(crate) fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        let Some(splitter) = &self.splitter else {
            return self.encode_whole(text, add_special_tokens);
        };
        let mut ids = Vec::with_capacity(text.len() / 3 + 8);
        if add_special_tokens {
            ids.extend_from_slice(&self.special_prefix);
        }
        let mut failure = None;
        splitter.split(text, |segment| {
            if failure.is_some() {
                return;
            }
            match segment {
                Segment::Token(id) => ids.push(id),
                Segment::Text(piece) => {
                    if let Err(e) = self.encode_piece(piece, &mut ids) {
                        failure = Some(e);
                    }
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        if add_special_tokens {
            ids.extend_from_slice(&self.special_suffix);
        }
        Ok(ids)
    }

    /// One piece between added tokens, through the segment cache.
    fn encode_piece(&self, piece: &str, ids: &mut Vec<u32>) -> Result<(), TokenizeError> {
        let key = SegmentCache::key(piece);
        if let Some(cached) = self.segments.get(key) {
            ids.extend_from_slice(&cached);
            return Ok(());
        }
        let start = ids.len();
        match &self.words {
            Some(words) => words
                .encode(&self.tokenizer, piece, ids)
                .map_err(tokenizer_error)?,
            None => {
                let encoding = self
                    .tokenizer
                    .encode_fast(piece, false)
                    .map_err(tokenizer_error)?;
                ids.extend_from_slice(encoding.get_ids());
            }
        }
        let fresh = &ids[start..];
        if self.segments.admits(fresh.len()) {
            self.segments.insert(key, Arc::from(fresh));
        }
        Ok(())
    }

    /// `Tokenizer::encode` on the whole text, without any cache.
    pub(crate) fn encode_whole(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// The ids the post-processor adds before and after a single sequence, read
/// off the real post-processor by processing a one-token sequence.
fn post_processor_wrap(tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>), TokenizerLoadError> {
    let unsupported = |message: String| TokenizerLoadError::PostProcessor { message };
    let added = tokenizer.get_added_tokens_decoder();
    let (probe_id, probe_text) = tokenizer
        .get_vocab(false)
        .into_iter()
        .filter(|(_, id)| !added.contains_key(id))
        .min_by_key(|(_, id)| *id)
        .map(|(text, id)| (id, text))
        .ok_or_else(|| unsupported("the vocabulary has no ordinary token to probe with".into()))?;
    let probe_len = probe_text.len();
    let probe = Encoding::from_tokens(vec![Token::new(probe_id, probe_text, (0, probe_len))], 0);
    let processed = tokenizer
        .post_process(probe, None, true)
        .map_err(|e| unsupported(e.to_string()))?;
    let ids = processed.get_ids();
    let positions: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, id)| **id == probe_id)
        .map(|(i, _)| i)
        .collect();
    match positions.as_slice() {
        [at] => Ok((ids[..*at].to_vec(), ids[at + 1..].to_vec())),
        _ => Err(unsupported(format!(
            "post-processing one token gave {ids:?}, which does not wrap it"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use tokenizers::AddedToken;

    fn qwen() -> Tokenizer {
        static QWEN: OnceLock<Tokenizer> = OnceLock::new();
        QWEN.get_or_init(|| {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/.tokenizers/qwen3/tokenizer.json"
            );
            Tokenizer::from_file(path).expect("run .ci/setup to fetch the Qwen3 tokenizer")
        })
        .clone()
    }

    const SAMPLES: [&str; 8] = [
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
        "<think>\n\n</think>\n\nThe answer is 42.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>",
        "  leading spaces <|endoftext|>  trailing spaces   \n\n\n",
        "Ünïcödé e\u{301} Å 한국어 日本語のテキスト 😀👍🏽 \u{fb01} ＡＢＣ\r\n\ttabs",
        "<|im_start|><|im_start|><|im_end|><|im_start",
        "code: fn main() { println!(\"<{}>\", 1 < 2); } // <tool_call",
        "",
        "1234567890 3.14159 -2e10 $5.00 100%",
    ];

    fn check_parity(tokenizer: Tokenizer, texts: &[&str]) -> TextTokenizer {
        let reference = tokenizer.clone();
        let fast = TextTokenizer::new(tokenizer, 1 << 20).unwrap();
        for text in texts {
            for add_special in [false, true] {
                let want = reference
                    .encode_fast(*text, add_special)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                // Twice: once filling the caches, once served from them.
                assert_eq!(fast.encode(text, add_special).unwrap(), want, "{text:?}");
                assert_eq!(
                    fast.encode(text, add_special).unwrap(),
                    want,
                    "{text:?} (cached)"
                );
            }
        }
        fast
    }

    #[test]
    fn segment_encoding_equals_whole_encoding() {
        let fast = check_parity(qwen(), &SAMPLES);
        assert!(fast.splitter.is_some() && fast.words.is_some());
        assert_eq!(
            (fast.special_prefix.len(), fast.special_suffix.len()),
            (0, 0)
        );
        let (hits, misses) = fast.cache_stats();
        assert!(hits > misses && misses > 0, "hits {hits} misses {misses}");
    }

    #[test]
    fn strip_flags_and_split_special_tokens_match_the_tokenizer() {
        let mut tokenizer = qwen();
        tokenizer
            .add_tokens([
                AddedToken::from("<L>", false)
                    .normalized(false)
                    .lstrip(true),
                AddedToken::from("<R>", false)
                    .normalized(false)
                    .rstrip(true),
                AddedToken::from("<LR>", true).lstrip(true).rstrip(true),
                AddedToken::from("<|im_start|>x", true),
            ])
            .unwrap();
        let texts = [
            "a  <L>  b <R>   c\n<LR>\n d",
            "<R>  <L>  <LR><LR>  ",
            "  <L>",
            "<|im_start|>xy <|im_start|>",
        ];
        let fast = check_parity(tokenizer.clone(), &texts);
        assert!(fast.splitter.is_some() && fast.words.is_some());
        tokenizer.set_encode_special_tokens(true);
        check_parity(tokenizer, &texts);
    }

    #[test]
    fn single_word_tokens_fall_back_to_whole_encoding() {
        let mut tokenizer = qwen();
        tokenizer
            .add_tokens([AddedToken::from("cat", false)
                .normalized(false)
                .single_word(true)])
            .unwrap();
        let fast = TextTokenizer::new(tokenizer.clone(), 1 << 20).unwrap();
        assert!(fast.splitter.is_none());
        check_parity(tokenizer, &["a cat, concatenate"]);
    }

    #[test]
    fn normalized_added_tokens_are_left_to_the_tokenizer() {
        let mut tokenizer = qwen();
        tokenizer
            .add_tokens([AddedToken::from("ﬁsh", false).normalized(true)])
            .unwrap();
        let fast = TextTokenizer::new(tokenizer.clone(), 1 << 20).unwrap();
        assert!(fast.splitter.is_some() && fast.words.is_none());
        check_parity(tokenizer, &["a \u{fb01}sh and a fish <|im_end|>"]);
    }

    #[test]
    fn post_processor_special_tokens_are_read_off_the_processor() {
        use tokenizers::processors::template::TemplateProcessing;
        let mut tokenizer = qwen();
        let bos = tokenizer.token_to_id("<|im_start|>").unwrap();
        let eos = tokenizer.token_to_id("<|im_end|>").unwrap();
        let processor = TemplateProcessing::builder()
            .try_single("<|im_start|> $A <|im_end|>")
            .unwrap()
            .special_tokens(vec![("<|im_start|>", bos), ("<|im_end|>", eos)])
            .build()
            .unwrap();
        tokenizer.with_post_processor(Some(processor));
        let fast = TextTokenizer::new(tokenizer.clone(), 1 << 20).unwrap();
        assert_eq!(
            (fast.special_prefix.clone(), fast.special_suffix.clone()),
            (vec![bos], vec![eos])
        );
        check_parity(tokenizer, &SAMPLES);
    }
}
