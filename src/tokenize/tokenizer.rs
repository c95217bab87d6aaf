//! The model's real tokenizer, with a piece cache in front of it.
//!
//! Text is split at added tokens into pieces, as the tokenizer itself does. A piece seen
//! before costs a lookup; a piece that starts with text seen before reuses that text's
//! ids up to a proven cut (`cuts`) and tokenizes the rest; a long new piece is cut into
//! parts tokenized on several cores.

use std::path::Path;

use tokenizers::{Encoding, Token, Tokenizer};

use super::cache::{CacheStats, Checkpoint, Lookup, PieceCache, PieceKeys, CHUNK_BYTES};
use super::cuts;
use super::error::{TokenizeError, TokenizerLoadError};
use super::segments::{AddedTokenSplitter, Segment};
use super::words::WordEncoder;

/// Default piece-cache budget in bytes.
pub const DEFAULT_PIECE_CACHE_BYTES: usize = 256 << 20;

/// A piece that reused a seen prefix is kept as a record of its own only when at least
/// this much of it was new, so a document asked about with many short questions is held
/// once, while a text that keeps growing is re-recorded every so often.
const FRESH_RECORD_BYTES: usize = 4 * CHUNK_BYTES;

/// New text below this is tokenized on the calling thread alone.
const PARALLEL_MIN_BYTES: usize = 64 << 10;

/// Most threads one piece is tokenized on.
const MAX_TOKENIZE_THREADS: usize = 8;

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
    /// Whether pieces may be cut (`cuts`): word-level encoding of an analysed pipeline.
    cuttable: bool,
    /// Threads a long new piece is tokenized on (this process's usable cores, capped).
    threads: usize,
    pieces: PieceCache,
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
        Self::new(tokenizer, DEFAULT_PIECE_CACHE_BYTES)
    }

    pub(crate) fn new(
        tokenizer: Tokenizer,
        piece_cache_bytes: usize,
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
        let cuttable = splitter.is_some() && words.as_ref().is_some_and(WordEncoder::cuttable);
        if !cuttable {
            tracing::info!("the tokenizer's pipeline has no proven cut; long pieces are tokenized whole and reused only whole");
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_TOKENIZE_THREADS);
        Ok(TextTokenizer {
            tokenizer,
            max_token_id,
            special_prefix,
            special_suffix,
            splitter,
            words,
            cuttable,
            threads,
            pieces: PieceCache::new(piece_cache_bytes),
        })
    }

    pub(crate) fn max_token_id(&self) -> u32 {
        self.max_token_id
    }

    pub(crate) fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub(crate) fn set_piece_cache_bytes(&mut self, bytes: usize) {
        self.pieces = PieceCache::new(bytes);
    }

    pub(crate) fn set_threads(&mut self, threads: usize) {
        self.threads = threads.clamp(1, MAX_TOKENIZE_THREADS);
    }

    pub(crate) fn cache_stats(&self) -> CacheStats {
        self.pieces.stats()
    }

    pub(crate) fn cache_held_bytes(&self) -> usize {
        self.pieces.held_bytes()
    }

    pub(crate) fn clear_piece_cache(&self) {
        self.pieces.clear();
    }

    pub(crate) fn clear_caches(&self) {
        self.pieces.clear();
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

    /// One piece between added tokens, through the piece cache.
    fn encode_piece(&self, piece: &str, ids: &mut Vec<u32>) -> Result<(), TokenizeError> {
        let keys = PieceKeys::new(piece, self.cuttable);
        let start = ids.len();
        let (resume, mut checkpoints) = match self.pieces.lookup(piece, &keys) {
            Lookup::Whole(record) => {
                ids.extend_from_slice(record.ids());
                return Ok(());
            }
            Lookup::Prefix { record, chunks } => {
                let reused = &record.checkpoints()[..chunks];
                let resume = reused[chunks - 1];
                ids.extend_from_slice(&record.ids()[..resume.ids]);
                (resume, reused.to_vec())
            }
            Lookup::Miss => (Checkpoint::default(), Vec::new()),
        };
        if self.cuttable {
            self.encode_cut(piece, resume, start, ids, &mut checkpoints)?;
        } else {
            self.encode_part(piece, ids)?;
        }
        if resume.cut == 0 || piece.len() - resume.cut >= FRESH_RECORD_BYTES {
            self.pieces.insert(&keys, piece, &ids[start..], checkpoints);
        }
        Ok(())
    }

    /// Tokenizes `piece[resume.cut..]` in parts between cuts, and appends a checkpoint for
    /// every whole chunk after those in `checkpoints`: the last cut before the chunk's end.
    fn encode_cut(
        &self,
        piece: &str,
        resume: Checkpoint,
        start: usize,
        ids: &mut Vec<u32>,
        checkpoints: &mut Vec<Checkpoint>,
    ) -> Result<(), TokenizeError> {
        let bytes = piece.as_bytes();
        // Part boundaries: the resume point, each new chunk's cut, the end.
        let mut bounds = vec![resume.cut];
        let first_new = checkpoints.len();
        let mut chunk_cuts =
            Vec::with_capacity((bytes.len() / CHUNK_BYTES).saturating_sub(first_new));
        let mut last = resume.cut;
        for chunk in first_new..bytes.len() / CHUNK_BYTES {
            if let Some(cut) = cuts::last_cut_before(bytes, last, (chunk + 1) * CHUNK_BYTES) {
                bounds.push(cut);
                last = cut;
            }
            chunk_cuts.push(last);
        }
        bounds.push(bytes.len());
        let parts: Vec<&str> = bounds.windows(2).map(|w| &piece[w[0]..w[1]]).collect();
        let lens = self.encode_parts(&parts, bytes.len() - resume.cut, ids)?;
        // Ids before each part boundary, from the piece's start.
        let mut ids_at = Vec::with_capacity(bounds.len());
        let mut total = resume.ids;
        ids_at.push(total);
        for len in lens {
            total += len;
            ids_at.push(total);
        }
        debug_assert_eq!(total, ids.len() - start);
        let mut bound = 0;
        for cut in chunk_cuts {
            while bounds[bound] < cut {
                bound += 1;
            }
            let ids_before = if cut == 0 { 0 } else { ids_at[bound] };
            checkpoints.push(Checkpoint {
                cut,
                ids: ids_before,
            });
        }
        Ok(())
    }

    /// Appends the ids of consecutive parts of a piece, split between threads when they
    /// are long enough to pay for it; returns each part's number of ids.
    fn encode_parts(
        &self,
        parts: &[&str],
        bytes: usize,
        ids: &mut Vec<u32>,
    ) -> Result<Vec<usize>, TokenizeError> {
        let threads = self.threads.min(bytes / (PARALLEL_MIN_BYTES / 2)).max(1);
        if threads == 1 || parts.len() == 1 {
            return parts
                .iter()
                .map(|part| {
                    let before = ids.len();
                    self.encode_part(part, ids)?;
                    Ok(ids.len() - before)
                })
                .collect();
        }
        // Contiguous groups of about equal size, one per thread; this thread takes the first.
        let per_thread = bytes.div_ceil(threads);
        let mut groups: Vec<&[&str]> = Vec::with_capacity(threads);
        let (mut from, mut size) = (0, 0);
        for (i, part) in parts.iter().enumerate() {
            size += part.len();
            if size >= per_thread && groups.len() + 1 < threads {
                groups.push(&parts[from..=i]);
                (from, size) = (i + 1, 0);
            }
        }
        groups.push(&parts[from..]);
        let encode_group = &|group: &[&str]| -> Result<(Vec<u32>, Vec<usize>), TokenizeError> {
            let mut out = Vec::with_capacity(group.iter().map(|p| p.len()).sum::<usize>() / 3);
            let mut lens = Vec::with_capacity(group.len());
            for part in group {
                let before = out.len();
                self.encode_part(part, &mut out)?;
                lens.push(out.len() - before);
            }
            Ok((out, lens))
        };
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = groups[1..]
                .iter()
                .map(|&group| scope.spawn(move || encode_group(group)))
                .collect();
            let mut results = vec![encode_group(groups[0])];
            results.extend(handles.into_iter().map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(TokenizeError::Tokenizer {
                        message: "a tokenizer thread panicked".into(),
                    })
                })
            }));
            results
        });
        let mut lens = Vec::with_capacity(parts.len());
        for result in results {
            let (group_ids, group_lens) = result?;
            ids.extend_from_slice(&group_ids);
            lens.extend(group_lens);
        }
        Ok(lens)
    }

    /// Ids of text free of added tokens, without the piece cache.
    fn encode_part(&self, text: &str, ids: &mut Vec<u32>) -> Result<(), TokenizeError> {
        match &self.words {
            Some(words) => words
                .encode(&self.tokenizer, text, ids)
                .map_err(tokenizer_error),
            None => {
                let encoding = self
                    .tokenizer
                    .encode_fast(text, false)
                    .map_err(tokenizer_error)?;
                ids.extend_from_slice(encoding.get_ids());
                Ok(())
            }
        }
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
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
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
        let stats = fast.cache_stats();
        assert!(stats.hits > stats.misses && stats.misses > 0, "{stats:?}");
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

    /// Text with every kind of character a cut could land next to, repeated well past
    /// several chunks.
    fn long_document() -> String {
        let paragraph = "The quick brown fox's   den, \t\t  12345 apples;\r\nnaïve café e\u{301} 日本語の文章 😀👍🏽 \
            ﬁne ＡＢＣ it'll     be (ok)...\n\n\n  --> x=3.14159; Привет мир  مرحبا \u{a0}\u{2028}end.  ";
        paragraph.repeat(180)
    }

    /// Continuations that differ from the document right after a cut: letters, digits,
    /// whitespace runs, `\r\n`, a combining mark, CJK, emoji, contractions.
    const CONTINUATIONS: [&str; 12] = [
        "X", " ", "   \n", "\r\n", "7", "\u{301}", "語", "😀", "'s", "ll", "!", "\u{a0}y",
    ];

    fn check_prefix_reuse(tokenizer: Tokenizer) {
        let reference = tokenizer.clone();
        let mut fast = TextTokenizer::new(tokenizer, 64 << 20).unwrap();
        fast.set_threads(1);
        assert!(fast.cuttable);
        let document = long_document();
        let whole = |text: &str| {
            reference
                .encode_fast(text, false)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        assert_eq!(fast.encode(&document, false).unwrap(), whole(&document));
        let mut reused = 0;
        // Texts agreeing with the document up to every byte around two chunk ends,
        // continued differently; a cut inside a character keeps its lead bytes.
        for end in [2 * CHUNK_BYTES, 5 * CHUNK_BYTES] {
            for agreed in end - 24..end + 24 {
                let continuation = CONTINUATIONS[agreed % CONTINUATIONS.len()];
                // Inside a character: a character that shares its lead bytes.
                let start = (0..=agreed)
                    .rev()
                    .find(|&i| document.is_char_boundary(i))
                    .unwrap();
                let mut text = document[..start].to_owned();
                let rest = if start < agreed {
                    let c = document[start..].chars().next().unwrap();
                    text.push(char::from_u32(u32::from(c) ^ 1).unwrap());
                    start + c.len_utf8()
                } else {
                    start
                };
                text.push_str(continuation);
                let tail_end = (rest + 3000..)
                    .find(|&i| document.is_char_boundary(i))
                    .unwrap();
                text.push_str(&document[rest..tail_end]);
                let before = fast.cache_stats().prefix_hits;
                assert_eq!(
                    fast.encode(&text, false).unwrap(),
                    whole(&text),
                    "agreeing on {agreed} bytes, then {continuation:?}"
                );
                reused += fast.cache_stats().prefix_hits - before;
            }
        }
        assert!(reused >= 90, "only {reused} of 96 texts reused a prefix");
    }

    #[test]
    fn prefix_reuse_equals_whole_encoding_at_adversarial_cuts() {
        check_prefix_reuse(qwen());
    }

    /// Qwen3 with another split regex in front of its byte-level stage.
    fn with_split_pattern(pattern: &str) -> Tokenizer {
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .unwrap();
        let mut tokenizer = qwen();
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])));
        tokenizer
    }

    #[test]
    fn prefix_reuse_holds_for_the_llama3_split_pattern() {
        check_prefix_reuse(with_split_pattern(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ));
    }

    #[test]
    fn unanalysed_split_patterns_are_never_cut() {
        // A look-behind would make a cut depend on the text before it.
        let tokenizer = with_split_pattern(r"(?<=a) b|\w+|\s+|.");
        let document = long_document();
        let at = (3 * CHUNK_BYTES..)
            .find(|&i| document.is_char_boundary(i))
            .unwrap();
        let edited = format!("{} b{}", &document[..at], &document[at..]);
        let fast = check_parity(tokenizer, &[&document, &edited]);
        assert!(!fast.cuttable);
        assert_eq!(fast.cache_stats().prefix_hits, 0);
    }

    #[test]
    fn long_pieces_tokenized_on_several_threads_equal_whole_encoding() {
        let mut fast = TextTokenizer::new(qwen(), 64 << 20).unwrap();
        fast.set_threads(4);
        // Then spaces only after non-letters: no cut anywhere, one part.
        for text in [long_document(), "日本語 12 ".repeat(20_000)] {
            let want = qwen().encode_fast(text.as_str(), false).unwrap();
            assert_eq!(fast.encode(&text, false).unwrap(), want.get_ids());
            fast.clear_caches();
        }
    }
}
