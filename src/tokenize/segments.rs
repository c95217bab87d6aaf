//! Splitting text at added tokens, exactly as the tokenizer does first.
//!
//! Hugging Face tokenizers cut the input at added tokens (`<|im_start|>`,
//! `<think>`, ...) before normalizing or pre-tokenizing anything: the pieces
//! between them are encoded independently and the added tokens map straight
//! to their ids. Splitting the same way here lets each piece be cached, and
//! the concatenation is the whole-string encoding by construction.
//!
//! This reproduces `AddedVocabulary::find_matches` for the tokens matched on
//! the raw text (`normalized: false`): leftmost-longest matching, `lstrip` /
//! `rstrip` widening the match over whitespace, and special tokens left in
//! the text when the tokenizer encodes them as text. Tokens with
//! `single_word` depend on Unicode word boundaries as the `regex` crate
//! defines them; tokenizers that have one are not split here.

use tokenizers::Tokenizer;

/// A piece of text between added tokens, or an added token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Segment<'t> {
    Text(&'t str),
    Token(u32),
}

#[derive(Debug)]
struct Pattern {
    content: Box<str>,
    id: u32,
    lstrip: bool,
    rstrip: bool,
    /// Matched (so it still consumes its span) but left in the text.
    skip: bool,
}

/// The raw-text added-token matcher of one tokenizer.
#[derive(Debug)]
pub(crate) struct AddedTokenSplitter {
    patterns: Vec<Pattern>,
    /// Pattern indices by first byte, longest first.
    by_first_byte: Vec<Vec<usize>>,
}

/// Why a tokenizer's added tokens cannot be split outside the tokenizer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SplitUnsupported {
    SingleWord(String),
    EmptyToken(u32),
}

impl AddedTokenSplitter {
    pub(crate) fn new(tokenizer: &Tokenizer) -> Result<Self, SplitUnsupported> {
        let encode_special = tokenizer.get_encode_special_tokens();
        let mut added: Vec<(u32, tokenizers::AddedToken)> =
            tokenizer.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        let mut patterns = Vec::new();
        for (id, token) in added {
            if token.normalized {
                // Matched after normalization, inside each piece, by the tokenizer itself.
                continue;
            }
            if token.content.is_empty() {
                return Err(SplitUnsupported::EmptyToken(id));
            }
            if token.single_word {
                return Err(SplitUnsupported::SingleWord(token.content));
            }
            patterns.push(Pattern {
                content: token.content.as_str().into(),
                id,
                lstrip: token.lstrip,
                rstrip: token.rstrip,
                skip: encode_special && token.special,
            });
        }
        let mut by_first_byte = vec![Vec::new(); 256];
        for (i, pattern) in patterns.iter().enumerate() {
            by_first_byte[usize::from(pattern.content.as_bytes()[0])].push(i);
        }
        for candidates in &mut by_first_byte {
            candidates.sort_by_key(|&i| std::cmp::Reverse(patterns[i].content.len()));
        }
        Ok(AddedTokenSplitter {
            patterns,
            by_first_byte,
        })
    }

    /// The longest pattern starting at byte `at`.
    fn longest_at(&self, text: &str, at: usize) -> Option<&Pattern> {
        let rest = &text.as_bytes()[at..];
        self.by_first_byte[usize::from(rest[0])]
            .iter()
            .map(|&i| &self.patterns[i])
            .find(|p| rest.starts_with(p.content.as_bytes()))
    }

    /// Calls `emit` with the segments of `text` in order.
    pub(crate) fn split<'t>(&self, text: &'t str, mut emit: impl FnMut(Segment<'t>)) {
        let bytes = text.as_bytes();
        let mut search_from = 0;
        let mut text_from = 0;
        while search_from < bytes.len() {
            let Some(found) = bytes[search_from..]
                .iter()
                .position(|b| !self.by_first_byte[usize::from(*b)].is_empty())
            else {
                break;
            };
            let at = search_from + found;
            let Some(pattern) = self.longest_at(text, at) else {
                search_from = at + 1;
                continue;
            };
            let mut start = at;
            let mut stop = at + pattern.content.len();
            search_from = stop;
            if pattern.skip {
                continue;
            }
            if pattern.lstrip {
                start = text[..start].trim_end().len().max(text_from);
            }
            if pattern.rstrip {
                let after = &text[stop..];
                stop += after.len() - after.trim_start().len();
            }
            if text_from < start {
                emit(Segment::Text(&text[text_from..start]));
            }
            emit(Segment::Token(pattern.id));
            text_from = stop;
        }
        if text_from < bytes.len() {
            emit(Segment::Text(&text[text_from..]));
        }
    }
}
