//! Encoding a piece of text through the tokenizer's own components, word by word.
//!
//! `Tokenizer::encode` builds offset-tracking strings for every split and an
//! `Encoding` with per-token strings; routing needs only the ids. For the
//! common pipeline shape — a Unicode normalization form (or none), one or
//! more isolating regex `Split` pre-tokenizers, then per-word stages such as
//! `ByteLevel`, then a deterministic model — this runs the same components:
//! the tokenizer's normalizer, its compiled split regexes, its per-word
//! pre-tokenizers and its model, and caches each word's ids. Words are
//! independent once split, so the ids are those of the whole pipeline.

use std::borrow::Cow;

use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    Model, ModelWrapper, NormalizedString, Normalizer, OffsetReferential, OffsetType,
    PreTokenizedString, PreTokenizer, SplitDelimiterBehavior, Tokenizer,
};

use super::cache::WordCache;
use super::cuts;

type TkResult<T> = tokenizers::Result<T>;

/// How the normalizer is applied to a piece.
#[derive(Debug, PartialEq, Eq)]
enum NormalizerUse {
    None,
    /// NFC/NFD/NFKC/NFKD: ASCII text is already normal, and the text can be
    /// normalized in chunks that start at an ASCII character, because no
    /// canonical composition has an ASCII character as its second element
    /// and ASCII characters have combining class 0.
    UnicodeForm,
    /// NFC, which also leaves runs of [`nfc_inert`] characters as they are.
    Nfc,
    Other,
}

/// Characters that NFC leaves alone wherever they stand between ASCII text:
/// canonical combining class 0, NFC quick-check "Yes" (nothing composes onto
/// them from behind, they decompose to nothing else). Latin-1 and Latin
/// Extended-A/B letters, general punctuation after the two quads, CJK
/// symbols, kana, CJK ideographs, Hangul syllables, variation selectors,
/// fullwidth forms and emoji. Checked against the tokenizer's NFC in tests.
fn nfc_inert(c: char) -> bool {
    matches!(c,
        '\u{a0}'..='\u{24f}'
        | '\u{2002}'..='\u{205e}'
        | '\u{3000}'..='\u{3029}'
        | '\u{3030}'..='\u{303f}'
        | '\u{3041}'..='\u{3096}'
        | '\u{30a1}'..='\u{30fa}'
        | '\u{4e00}'..='\u{9fff}'
        | '\u{ac00}'..='\u{d7a3}'
        | '\u{fe00}'..='\u{fe0f}'
        | '\u{ff01}'..='\u{ffef}'
        | '\u{1f300}'..='\u{1faff}')
}

/// What happens to each word after the regex splits.
#[derive(Debug)]
enum WordStage {
    /// Straight to the model.
    Model,
    /// `ByteLevel` without a prefix space or regex: one character per byte,
    /// through a table read off the tokenizer's own `ByteLevel`.
    ByteTable(Box<[char; 256]>),
    /// Any other per-split pre-tokenizers, run on each word.
    PreTokenizers(Vec<PreTokenizerWrapper>),
}

/// The word-level encoder of one tokenizer.
pub(crate) struct WordEncoder {
    normalizer: NormalizerUse,
    splits: Vec<Split>,
    stage: WordStage,
    cache: WordCache,
    /// Whether `cuts` applies: a Unicode form (or none) and one analysed split.
    cuttable: bool,
}

/// Per-split pre-tokenizers that ignore a split's position, so running them
/// on one word gives what they give that word inside the whole text.
fn is_positionless(pre: &PreTokenizerWrapper) -> bool {
    matches!(
        pre,
        PreTokenizerWrapper::ByteLevel(_)
            | PreTokenizerWrapper::Split(_)
            | PreTokenizerWrapper::Digits(_)
            | PreTokenizerWrapper::Punctuation(_)
            | PreTokenizerWrapper::Whitespace(_)
            | PreTokenizerWrapper::WhitespaceSplit(_)
    )
}

impl WordEncoder {
    /// Builds the encoder if the tokenizer has the supported shape; `None` means
    /// pieces go through `Tokenizer::encode_fast` instead.
    pub(crate) fn new(tokenizer: &Tokenizer, cache_words: usize) -> Option<Self> {
        if let ModelWrapper::BPE(bpe) = tokenizer.get_model() {
            if bpe.dropout.is_some_and(|p| p > 0.0) {
                return None;
            }
        }
        if tokenizer
            .get_added_tokens_decoder()
            .values()
            .any(|t| t.normalized)
        {
            // Those are matched inside normalized text; leave it to the tokenizer.
            return None;
        }
        let normalizer = match tokenizer.get_normalizer() {
            None => NormalizerUse::None,
            Some(NormalizerWrapper::NFC(_)) => NormalizerUse::Nfc,
            Some(
                NormalizerWrapper::NFD(_) | NormalizerWrapper::NFKC(_) | NormalizerWrapper::NFKD(_),
            ) => NormalizerUse::UnicodeForm,
            Some(_) => NormalizerUse::Other,
        };
        let pre_tokenizers: Vec<PreTokenizerWrapper> = match tokenizer.get_pre_tokenizer()? {
            PreTokenizerWrapper::Sequence(sequence) => sequence.as_ref().to_vec(),
            single => vec![single.clone()],
        };
        let mut splits = Vec::new();
        let mut rest = pre_tokenizers.as_slice();
        while let [PreTokenizerWrapper::Split(split), tail @ ..] = rest {
            if split.behavior != SplitDelimiterBehavior::Isolated || split.invert {
                break;
            }
            splits.push(split.clone());
            rest = tail;
        }
        if splits.is_empty() || !rest.iter().all(is_positionless) {
            return None;
        }
        let stage = match rest {
            [] => WordStage::Model,
            [PreTokenizerWrapper::ByteLevel(byte_level)]
                if !byte_level.add_prefix_space && !byte_level.use_regex =>
            {
                match byte_table(byte_level) {
                    Some(table) => WordStage::ByteTable(table),
                    None => WordStage::PreTokenizers(rest.to_vec()),
                }
            }
            _ => WordStage::PreTokenizers(rest.to_vec()),
        };
        let cuttable = matches!(
            normalizer,
            NormalizerUse::None | NormalizerUse::Nfc | NormalizerUse::UnicodeForm
        ) && matches!(splits.as_slice(), [split] if cuts::split_is_analysed(split));
        Some(WordEncoder {
            normalizer,
            splits,
            stage,
            cache: WordCache::new(cache_words),
            cuttable,
        })
    }

    /// Whether a piece may be cut where `cuts` says, and its parts encoded apart.
    pub(crate) fn cuttable(&self) -> bool {
        self.cuttable
    }

    pub(crate) fn clear_cache(&self) {
        self.cache.clear();
    }

    /// Appends the ids of `piece`, a text free of raw-matched added tokens.
    pub(crate) fn encode(
        &self,
        tokenizer: &Tokenizer,
        piece: &str,
        out: &mut Vec<u32>,
    ) -> TkResult<()> {
        let normalized = self.normalize(tokenizer, piece)?;
        let text = normalized.as_ref();
        let model = tokenizer.get_model();
        let mut word_scratch = String::new();
        let mut ids_scratch = Vec::new();
        let mut encode_word = |word: &str| -> TkResult<()> {
            if word.is_empty() {
                return Ok(());
            }
            let hash = self.cache.hash(word);
            if self.cache.extend_from(hash, word, out) {
                return Ok(());
            }
            ids_scratch.clear();
            self.encode_word(model, word, &mut word_scratch, &mut ids_scratch)?;
            out.extend_from_slice(&ids_scratch);
            self.cache.insert(hash, word, &ids_scratch);
            Ok(())
        };
        // Split offsets come from the regex engine; a bad one is an error, not a panic.
        let word_at = |start: usize, end: usize| -> TkResult<&str> {
            text.get(start..end)
                .ok_or_else(|| format!("split regex gave {start}..{end}, not a text range").into())
        };
        match self.splits.as_slice() {
            [single] => for_each_split(single, text, 0, &mut |s, e| encode_word(word_at(s, e)?)),
            chain => {
                let mut ranges = vec![(0, text.len())];
                for split in chain {
                    let mut next = Vec::with_capacity(ranges.len() * 2);
                    for (start, end) in ranges {
                        for_each_split(split, word_at(start, end)?, start, &mut |s, e| {
                            next.push((s, e));
                            Ok(())
                        })?;
                    }
                    ranges = next;
                }
                ranges
                    .into_iter()
                    .try_for_each(|(s, e)| encode_word(word_at(s, e)?))
            }
        }
    }

    fn normalize<'t>(&self, tokenizer: &Tokenizer, text: &'t str) -> TkResult<Cow<'t, str>> {
        let Some(normalizer) = tokenizer.get_normalizer() else {
            return Ok(Cow::Borrowed(text));
        };
        let nfc = self.normalizer == NormalizerUse::Nfc;
        match self.normalizer {
            NormalizerUse::None => Ok(Cow::Borrowed(text)),
            NormalizerUse::UnicodeForm | NormalizerUse::Nfc if text.is_ascii() => {
                Ok(Cow::Borrowed(text))
            }
            NormalizerUse::Nfc if text.chars().all(|c| c.is_ascii() || nfc_inert(c)) => {
                Ok(Cow::Borrowed(text))
            }
            NormalizerUse::UnicodeForm | NormalizerUse::Nfc => {
                let bytes = text.as_bytes();
                let mut out = String::with_capacity(text.len());
                let mut copied = 0;
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i].is_ascii() {
                        i += 1;
                        continue;
                    }
                    let mut run_end = i;
                    while run_end < bytes.len() && !bytes[run_end].is_ascii() {
                        run_end += 1;
                    }
                    if nfc && text[i..run_end].chars().all(nfc_inert) {
                        i = run_end;
                        continue;
                    }
                    // The preceding ASCII character may compose with the run.
                    let chunk_start = if i > copied { i - 1 } else { i };
                    out.push_str(&text[copied..chunk_start]);
                    out.push_str(&normalize_all(normalizer, &text[chunk_start..run_end])?);
                    copied = run_end;
                    i = run_end;
                }
                out.push_str(&text[copied..]);
                Ok(Cow::Owned(out))
            }
            NormalizerUse::Other => Ok(Cow::Owned(normalize_all(normalizer, text)?)),
        }
    }

    fn encode_word(
        &self,
        model: &ModelWrapper,
        word: &str,
        scratch: &mut String,
        ids: &mut Vec<u32>,
    ) -> TkResult<()> {
        match &self.stage {
            WordStage::Model => push_model_ids(model, word, ids),
            WordStage::ByteTable(table) => {
                scratch.clear();
                scratch.extend(word.bytes().map(|b| table[usize::from(b)]));
                push_model_ids(model, scratch, ids)
            }
            WordStage::PreTokenizers(stages) => {
                let mut pretokenized = PreTokenizedString::from(word);
                for stage in stages {
                    stage.pre_tokenize(&mut pretokenized)?;
                }
                for (split, _, _) in
                    pretokenized.get_splits(OffsetReferential::Original, OffsetType::None)
                {
                    push_model_ids(model, split, ids)?;
                }
                Ok(())
            }
        }
    }
}

fn push_model_ids(model: &ModelWrapper, word: &str, ids: &mut Vec<u32>) -> TkResult<()> {
    ids.extend(model.tokenize(word)?.into_iter().map(|t| t.id));
    Ok(())
}

fn normalize_all(normalizer: &NormalizerWrapper, text: &str) -> TkResult<String> {
    let mut normalized = NormalizedString::from(text);
    normalizer.normalize(&mut normalized)?;
    Ok(normalized.get().to_owned())
}

/// Calls `emit(start, end)` (offset by `base`) for each piece an isolating
/// `Split` makes of `text`: the matches and the gaps between them, like
/// `NormalizedString::split(regex, Isolated)` minus empty pieces.
fn for_each_split(
    split: &Split,
    text: &str,
    base: usize,
    emit: &mut dyn FnMut(usize, usize) -> TkResult<()>,
) -> TkResult<()> {
    let mut previous = 0;
    for (start, end) in split.regex.find_iter(text) {
        if previous < start {
            emit(base + previous, base + start)?;
        }
        if start < end {
            emit(base + start, base + end)?;
        }
        previous = end;
    }
    if previous < text.len() {
        emit(base + previous, base + text.len())?;
    }
    Ok(())
}

/// Reads the byte → character table off the tokenizer's own `ByteLevel` by
/// running it on characters whose UTF-8 bytes cover every byte valid UTF-8 can hold.
fn byte_table(byte_level: &ByteLevel) -> Option<Box<[char; 256]>> {
    let mut table = Box::new(['\0'; 256]);
    let mut known = [false; 256];
    let mut probes: Vec<char> = (0u32..0x80).filter_map(char::from_u32).collect();
    probes.extend((0x80u32..0xC0).filter_map(char::from_u32)); // C2 80..BF
    probes.extend((0xC3u32..=0xDF).filter_map(|lead| char::from_u32((lead - 0xC0) << 6)));
    probes.push('\u{800}'); // E0 A0 80
    probes.extend((0xE1u32..=0xEF).filter_map(|lead| char::from_u32((lead - 0xE0) << 12)));
    probes.push('\u{10000}'); // F0 90 80 80
    probes.extend((0xF1u32..=0xF4).filter_map(|lead| char::from_u32((lead - 0xF0) << 18)));
    let mut utf8 = [0u8; 4];
    for probe in probes {
        let bytes = probe.encode_utf8(&mut utf8).as_bytes();
        let mut pretokenized = PreTokenizedString::from(&*probe.to_string());
        byte_level.pre_tokenize(&mut pretokenized).ok()?;
        let splits = pretokenized.get_splits(OffsetReferential::Original, OffsetType::None);
        let [(mapped, _, _)] = splits.as_slice() else {
            return None;
        };
        let mapped: Vec<char> = mapped.chars().collect();
        if mapped.len() != bytes.len() {
            return None;
        }
        for (&byte, &c) in bytes.iter().zip(&mapped) {
            let slot = usize::from(byte);
            if known[slot] && table[slot] != c {
                return None;
            }
            table[slot] = c;
            known[slot] = true;
        }
    }
    // Only C0, C1 and F5..FF never occur in UTF-8.
    let missing = (0..256).filter(|&b| !known[b]).count();
    (missing == 13).then_some(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::normalizers::unicode::NFC;

    fn nfc(text: &str) -> String {
        normalize_all(&NormalizerWrapper::NFC(NFC), text).unwrap()
    }

    #[test]
    fn nfc_inert_characters_are_left_alone_by_nfc() {
        let inert: Vec<char> = (0u32..0x110000)
            .filter_map(char::from_u32)
            .filter(|c| nfc_inert(*c))
            .collect();
        // Each one on its own, and behind a combining mark (a character with a
        // nonzero combining class before it would be reordered past it).
        let alone: String = inert.iter().flat_map(|c| [*c, ' ']).collect();
        assert_eq!(nfc(&alone), alone);
        let behind_mark: String = inert.iter().flat_map(|c| ['\u{301}', *c, ' ']).collect();
        assert_eq!(nfc(&behind_mark), behind_mark);
    }

    #[test]
    fn chunked_normalization_equals_whole_normalization() {
        let tokenizer = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/.tokenizers/qwen3/tokenizer.json"
        ))
        .expect("run .ci/setup to fetch the Qwen3 tokenizer");
        let encoder = WordEncoder::new(&tokenizer, 1024).unwrap();
        assert_eq!(encoder.normalizer, NormalizerUse::Nfc);
        for text in [
            "plain ascii",
            "Cádiz e\u{301} a\u{308}\u{323} 한국어 \u{1100}\u{1161}\u{11a8} ﬁ Å \u{212b} \u{2000}x",
            "\u{301}leading mark, é\u{301}, 日本語\u{3099}カ\u{3099}",
        ] {
            assert_eq!(
                encoder.normalize(&tokenizer, text).unwrap(),
                nfc(text),
                "{text:?}"
            );
        }
    }
}
