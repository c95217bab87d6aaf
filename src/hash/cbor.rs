//! Canonical CBOR (RFC 8949 §4.2, what cbor2 writes with `canonical=True`) for the few shapes vLLM
//! hashes (docs: vllm-kv-events.md §6.6). Written by hand into a reused buffer: the shapes are tiny and
//! fixed, and a generic serializer would have to be trusted to pick the same shortest forms.

use super::{KeyItem, Parent};

const MAJOR_UINT: u8 = 0;
const MAJOR_NEGINT: u8 = 1;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_TAG: u8 = 6;
const NULL: u8 = 0xf6;
/// Tag 2: unsigned bignum, used by cbor2 for ints of 2^64 and above.
const TAG_POSITIVE_BIGNUM: u64 = 2;

/// The pre-image of NONE_HASH: the seed string alone.
pub(super) fn seed_preimage(seed: &str, buf: &mut Vec<u8>) {
    buf.clear();
    write_text(buf, seed);
}

/// The pre-image of one block: `(parent, tokens, extra)` as a 3-element array.
pub(super) fn block_preimage(
    parent: Parent<'_>,
    tokens: &[u32],
    extra: &[KeyItem<'_>],
    buf: &mut Vec<u8>,
) {
    buf.clear();
    // A token takes at most 5 bytes; the rest is the parent and a few short keys.
    buf.reserve(tokens.len() * 5 + 64);
    write_head(buf, MAJOR_ARRAY, 3);
    match parent {
        Parent::Bytes(bytes) => write_bytes(buf, bytes),
        Parent::Int(be) => write_uint_be(buf, be),
    }
    write_head(buf, MAJOR_ARRAY, tokens.len() as u64);
    write_tokens(buf, tokens);
    if extra.is_empty() {
        buf.push(NULL);
        return;
    }
    write_head(buf, MAJOR_ARRAY, extra.len() as u64);
    for item in extra {
        match *item {
            KeyItem::Int(value) => write_int(buf, value),
            KeyItem::Str(text) => write_text(buf, text),
            KeyItem::Tagged2(tag, a) => {
                write_head(buf, MAJOR_ARRAY, 2);
                write_text(buf, tag);
                write_text(buf, a);
            }
            KeyItem::Tagged3(tag, a, b) => {
                write_head(buf, MAJOR_ARRAY, 3);
                write_text(buf, tag);
                write_text(buf, a);
                write_text(buf, b);
            }
        }
    }
}

/// Tokens as unsigned ints in shortest form. The hot loop of every CBOR hash, so it avoids branches on
/// the token's width (token ids of a real vocabulary mix widths unpredictably): each token is one fixed
/// 5-byte store into pre-sized space, and the cursor advances by the token's real length.
fn write_tokens(buf: &mut Vec<u8>, tokens: &[u32]) {
    const MAX_LEN: usize = 5;
    // By width class (< 24, ≤ 0xff, ≤ 0xffff, larger): head byte, left shift that brings the value's
    // significant bytes to the front, and encoded length. Class 0 is the value itself in the head.
    const HEAD: [u8; 4] = [0, 24, 25, 26];
    const SHIFT: [u32; 4] = [0, 24, 16, 0];
    const LEN: [usize; 4] = [1, 2, 3, 5];
    let start = buf.len();
    buf.resize(start + tokens.len() * MAX_LEN, 0);
    let out = &mut buf[start..];
    let mut at = 0;
    for &token in tokens {
        let class =
            usize::from(token >= 24) + usize::from(token > 0xff) + usize::from(token > 0xffff);
        let head = if class == 0 { token as u8 } else { HEAD[class] };
        let be = (token << SHIFT[class]).to_be_bytes();
        // Before token i, `at` is at most i * MAX_LEN, so the store stays inside the resized space.
        out[at..at + MAX_LEN].copy_from_slice(&[head, be[0], be[1], be[2], be[3]]);
        at += LEN[class];
    }
    buf.truncate(start + at);
}

/// A data item head in its shortest form.
fn write_head(buf: &mut Vec<u8>, major: u8, value: u64) {
    let major = major << 5;
    if value < 24 {
        buf.push(major | value as u8);
    } else if value <= 0xff {
        buf.extend_from_slice(&[major | 24, value as u8]);
    } else if value <= 0xffff {
        buf.push(major | 25);
        buf.extend_from_slice(&(value as u16).to_be_bytes());
    } else if value <= 0xffff_ffff {
        buf.push(major | 26);
        buf.extend_from_slice(&(value as u32).to_be_bytes());
    } else {
        buf.push(major | 27);
        buf.extend_from_slice(&value.to_be_bytes());
    }
}

fn write_int(buf: &mut Vec<u8>, value: i64) {
    if value >= 0 {
        write_head(buf, MAJOR_UINT, value as u64);
    } else {
        // Major type 1 carries -1 - n, which is the bitwise complement in two's complement.
        write_head(buf, MAJOR_NEGINT, !value as u64);
    }
}

/// A non-negative integer given as big-endian bytes of any width (the 0.10.x int chain values).
fn write_uint_be(buf: &mut Vec<u8>, be: &[u8]) {
    let significant = strip_leading_zeros(be);
    if significant.len() <= 8 {
        let mut word = [0u8; 8];
        word[8 - significant.len()..].copy_from_slice(significant);
        write_head(buf, MAJOR_UINT, u64::from_be_bytes(word));
    } else {
        write_head(buf, MAJOR_TAG, TAG_POSITIVE_BIGNUM);
        write_bytes(buf, significant);
    }
}

fn strip_leading_zeros(be: &[u8]) -> &[u8] {
    let first = be.iter().position(|&b| b != 0).unwrap_or(be.len());
    &be[first..]
}

fn write_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    write_head(buf, MAJOR_BYTES, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn write_text(buf: &mut Vec<u8>, text: &str) {
    write_head(buf, MAJOR_TEXT, text.len() as u64);
    buf.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(major: u8, value: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        write_head(&mut buf, major, value);
        buf
    }

    #[test]
    fn heads_use_the_shortest_form() {
        assert_eq!(head(MAJOR_UINT, 23), [0x17]);
        assert_eq!(head(MAJOR_UINT, 24), [0x18, 24]);
        assert_eq!(head(MAJOR_UINT, 256), [0x19, 1, 0]);
        assert_eq!(head(MAJOR_UINT, 65536), [0x1a, 0, 1, 0, 0]);
        assert_eq!(head(MAJOR_UINT, 1 << 32), [0x1b, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(head(MAJOR_ARRAY, 16), [0x90]);
        assert_eq!(head(MAJOR_ARRAY, 64), [0x98, 64]);
        assert_eq!(head(MAJOR_TEXT, 300), [0x79, 1, 44]);
    }

    #[test]
    fn tokens_match_single_heads() {
        let tokens = [0u32, 23, 24, 255, 256, 65535, 65536, u32::MAX, 7];
        let mut buf = Vec::new();
        write_tokens(&mut buf, &tokens);
        let expected: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| head(MAJOR_UINT, u64::from(t)))
            .collect();
        assert_eq!(buf, expected);
    }

    #[test]
    fn negative_and_big_ints() {
        let mut buf = Vec::new();
        write_int(&mut buf, -1);
        write_int(&mut buf, -25);
        assert_eq!(buf, [0x20, 0x38, 24]);
        buf.clear();
        write_uint_be(&mut buf, &[0, 0, 0xa7, 0x4f]);
        assert_eq!(buf, [0x19, 0xa7, 0x4f]);
        buf.clear();
        let mut big = [0u8; 32];
        big[22] = 1;
        write_uint_be(&mut buf, &big);
        assert_eq!(buf, [0xc2, 0x4a, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
