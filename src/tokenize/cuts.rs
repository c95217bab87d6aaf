//! Where a piece of text can be cut so that its token ids are the ids of the two halves.
//!
//! A cut lets a long piece be tokenized in independent parts (on several cores), and lets
//! a piece that starts with text seen before reuse the seen text's ids and tokenize only
//! the rest. Tokenization is local only between pre-tokenizer boundaries, so a cut must
//! be proven safe for the tokenizer's pipeline; it is offered only for the pipelines
//! analysed here, and every other tokenizer keeps whole pieces.
//!
//! # The rule
//!
//! Byte `c` of text `T` is a cut when `T[c]` is an ASCII space and `T[c - 1]` an ASCII
//! letter. For the analysed pipelines — a Unicode normalization form (or none), then one
//! isolating `Split` with one of [`ANALYSED_PATTERNS`], then per-word stages and a
//! deterministic model — the ids of `T` are the ids of `T[..c]` followed by those of
//! `T[c..]`, and that holds for every text that agrees with `T` on `T[..=c]`:
//!
//! 1. *Normalization.* `T[c]` is ASCII: it has canonical combining class 0 (nothing is
//!    reordered across it), decomposes to itself, and is the second element of no
//!    canonical composition, so it blocks every composition across it. Hence
//!    `N(T) = N(T[..c]) + N(T[c..])` for NFC, NFD, NFKC and NFKD.
//! 2. *`c` is a split boundary.* The match that holds the letter `T[c - 1]` cannot hold
//!    the space `T[c]`: the patterns' alternatives are contractions (ending in a letter),
//!    an optional non-letter followed by letters, digits, punctuation runs with trailing
//!    newlines, and whitespace runs; none has a letter followed by a space.
//! 3. *The matches before `c` do not depend on anything after `c`.* The regex engine
//!    decides a match at `p < c` from the characters it examines: the contraction
//!    alternative reads at most three characters from `p`; the letter, digit and
//!    punctuation alternatives read their run and one character past it; the whitespace
//!    alternatives read their whitespace run and one character past it. Every run that
//!    starts before `c` ends by `c - 1` (the letter ends whitespace and punctuation runs,
//!    the space ends letter runs), so each match before `c` reads nothing past `T[c]`;
//!    where one reads `T[c]` itself (the letter run ending at `c`, a contraction tried at
//!    `c - 2`), the space decides exactly as the end of the text does: it ends the run and
//!    fails the contraction.
//! 4. *The matches from `c` on do not depend on anything before `c`:* the patterns have
//!    no look-behind, no anchors and no word boundaries, and they match every character,
//!    so matching restarts at `c` as it starts at the beginning of `T[c..]`.
//!
//! The per-word stages and the model see the same words either way, so the ids agree.
//! Each of these steps is checked against the tokenizer itself by the parity tests.

use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

/// The split patterns the rule is proven for: Qwen2/Qwen3's (one digit per word) and the
/// cl100k / Llama 3 pattern (up to three digits per word), both GPT-4 style.
const ANALYSED_PATTERNS: [&str; 2] = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];

/// Whether a tokenizer whose first (and only) regex split is `split` may be cut by the rule.
pub(crate) fn split_is_analysed(split: &Split) -> bool {
    match &split.pattern {
        SplitPattern::Regex(pattern) => ANALYSED_PATTERNS.contains(&pattern.as_str()),
        SplitPattern::String(_) => false,
    }
}

/// Whether byte `at` of `bytes` is a cut.
pub(crate) fn is_cut(bytes: &[u8], at: usize) -> bool {
    at > 0 && at < bytes.len() && bytes[at] == b' ' && bytes[at - 1].is_ascii_alphabetic()
}

/// The last cut in `floor < c < before`, if any.
pub(crate) fn last_cut_before(bytes: &[u8], floor: usize, before: usize) -> Option<usize> {
    let before = before.min(bytes.len());
    (floor + 1..before).rev().find(|&c| is_cut(bytes, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_spaces_after_ascii_letters() {
        let text = b"ab cd,  e\xc3\xa9 f 1 g";
        let cuts: Vec<usize> = (0..text.len()).filter(|&c| is_cut(text, c)).collect();
        assert_eq!(cuts, [2, 13]);
        assert_eq!(last_cut_before(text, 0, text.len()), Some(13));
        assert_eq!(last_cut_before(text, 0, 13), Some(2));
        assert_eq!(last_cut_before(text, 2, 13), None);
        assert_eq!(last_cut_before(b" a", 0, 2), None);
    }
}
