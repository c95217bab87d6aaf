//! `pickle.dumps(x, protocol=5)` as CPython's C pickler writes it, for the shapes vLLM hashes (docs:
//! vllm-kv-events.md §6.7). Besides the opcodes, two CPython behaviours shape the bytes: framing
//! (a frame is closed before an object once it holds 64 KiB; frames under 4 bytes lose their header;
//! payloads of 64 KiB or more are written outside any frame) and the memo (a repeated object is written
//! as a reference; CPython shares one object for the empty string and for every one-character Latin-1
//! string, so those repeat even when vLLM built them separately).

use super::{KeyItem, Parent};

const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const STOP: u8 = 0x2e;
const MEMOIZE: u8 = 0x94;
const BINGET: u8 = 0x68;
const LONG_BINGET: u8 = 0x6a;
const NONE: u8 = 0x4e;
const BININT: u8 = 0x4a;
const BININT1: u8 = 0x4b;
const BININT2: u8 = 0x4d;
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const SHORT_BINBYTES: u8 = 0x43;
const BINBYTES: u8 = 0x42;
const BINBYTES8: u8 = 0x8e;
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = 0x58;
const BINUNICODE8: u8 = 0x8d;
const EMPTY_TUPLE: u8 = 0x29;
const MARK: u8 = 0x28;
const TUPLE: u8 = 0x74;
const TUPLE1: u8 = 0x85;

const PROTOCOL: u8 = 5;
const FRAME_HEADER_LEN: usize = 9;
/// CPython's `FRAME_SIZE_TARGET`: a frame is closed before the next object once it reaches this size,
/// and a payload this large bypasses framing.
const FRAME_SIZE_TARGET: usize = 64 * 1024;
/// CPython's `FRAME_SIZE_MIN`: shorter frames are written without a header.
const FRAME_SIZE_MIN: usize = 4;
/// The largest opcode sequence one u32 token takes (LONG1, length, 5 bytes).
const MAX_TOKEN_LEN: usize = 7;
/// Distinct shared one-character strings one pre-image can hold: the shapes carry at most three
/// user strings (LoRA name, LoRA path, cache salt) plus the seed.
const SHARED_STR_CAPACITY: usize = 4;

/// The pre-image of NONE_HASH: the pickled seed string.
pub(super) fn seed_preimage(seed: &str, buf: &mut Vec<u8>) {
    let mut pickler = Pickler::begin(buf);
    pickler.save_str(seed);
    pickler.finish();
}

/// The pre-image of one block: the pickled tuple `(parent, tokens, extra)`.
pub(super) fn block_preimage(
    parent: Parent<'_>,
    tokens: &[u32],
    extra: &[KeyItem<'_>],
    buf: &mut Vec<u8>,
) {
    let mut pickler = Pickler::begin(buf);
    pickler
        .buf
        .reserve(tokens.len() * MAX_TOKEN_LEN + 2 * FRAME_HEADER_LEN + 128);
    // The outer 3-tuple: items, then TUPLE3 and its memo entry.
    pickler.boundary();
    match parent {
        Parent::Bytes(bytes) => pickler.save_bytes(bytes),
        Parent::Int(be) => pickler.save_uint_be(be),
    }
    pickler.save_tokens(tokens);
    if extra.is_empty() {
        pickler.save_none();
    } else {
        pickler.save_tuple_of(extra.len(), |pickler| {
            for item in extra {
                match *item {
                    KeyItem::Int(value) => pickler.save_int(value),
                    KeyItem::Str(text) => pickler.save_str(text),
                    KeyItem::Tagged2(tag, a) => pickler.save_tuple_of(2, |p| {
                        p.save_str(tag);
                        p.save_str(a);
                    }),
                    KeyItem::Tagged3(tag, a, b) => pickler.save_tuple_of(3, |p| {
                        p.save_str(tag);
                        p.save_str(a);
                        p.save_str(b);
                    }),
                }
            }
        });
    }
    pickler.end_tuple(3);
    pickler.finish();
}

struct Pickler<'b> {
    buf: &'b mut Vec<u8>,
    /// Offset of the open frame's header, if a frame is open.
    frame_start: Option<usize>,
    /// Entries in the memo so far; the next MEMOIZE gets this index.
    memo_len: u32,
    /// Memo indices of the shared empty / one-character strings written so far: (char code + 1, or 0
    /// for the empty string; memo index).
    shared_strs: [(u32, u32); SHARED_STR_CAPACITY],
    shared_str_count: usize,
}

impl<'b> Pickler<'b> {
    fn begin(buf: &'b mut Vec<u8>) -> Self {
        buf.clear();
        // The protocol header precedes the first frame.
        buf.extend_from_slice(&[PROTO, PROTOCOL]);
        Self {
            buf,
            frame_start: None,
            memo_len: 0,
            shared_strs: [(0, 0); SHARED_STR_CAPACITY],
            shared_str_count: 0,
        }
    }

    fn finish(mut self) {
        self.write(&[STOP]);
        self.commit_frame();
    }

    /// Opens a frame lazily, as CPython does on the first write after a commit.
    fn write(&mut self, bytes: &[u8]) {
        self.open_frame();
        self.buf.extend_from_slice(bytes);
    }

    fn open_frame(&mut self) {
        if self.frame_start.is_none() {
            self.frame_start = Some(self.buf.len());
            self.buf.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        }
    }

    fn frame_len(&self) -> usize {
        self.frame_start
            .map_or(0, |start| self.buf.len() - start - FRAME_HEADER_LEN)
    }

    /// CPython checks the frame size at the start of saving every object.
    fn boundary(&mut self) {
        if self.frame_len() >= FRAME_SIZE_TARGET {
            self.commit_frame();
        }
    }

    fn commit_frame(&mut self) {
        let Some(start) = self.frame_start.take() else {
            return;
        };
        let len = self.buf.len() - start - FRAME_HEADER_LEN;
        if len >= FRAME_SIZE_MIN {
            if let Some(header) = self.buf.get_mut(start..start + FRAME_HEADER_LEN) {
                header[0] = FRAME;
                header[1..].copy_from_slice(&(len as u64).to_le_bytes());
            }
        } else {
            self.buf.drain(start..start + FRAME_HEADER_LEN);
        }
    }

    fn memoize(&mut self) -> u32 {
        self.write(&[MEMOIZE]);
        self.memo_len += 1;
        self.memo_len - 1
    }

    /// Writes an opcode header and a payload; a payload of FRAME_SIZE_TARGET or more goes outside frames.
    fn write_payload(&mut self, header: &[u8], payload: &[u8]) {
        if payload.len() >= FRAME_SIZE_TARGET {
            self.commit_frame();
            self.buf.extend_from_slice(header);
            self.buf.extend_from_slice(payload);
        } else {
            self.write(header);
            self.buf.extend_from_slice(payload);
        }
    }

    fn save_none(&mut self) {
        self.boundary();
        self.write(&[NONE]);
    }

    fn save_int(&mut self, value: i64) {
        self.boundary();
        if (0..=0xff).contains(&value) {
            self.write(&[BININT1, value as u8]);
        } else if (0..=0xffff).contains(&value) {
            let le = (value as u16).to_le_bytes();
            self.write(&[BININT2, le[0], le[1]]);
        } else if let Ok(small) = i32::try_from(value) {
            let le = small.to_le_bytes();
            self.write(&[BININT, le[0], le[1], le[2], le[3]]);
        } else {
            // LONG1 with Python's minimal two's complement: bit_length // 8 + 1 bytes, then a redundant
            // 0xff sign byte of a negative value dropped.
            let magnitude_bits = 64 - value.unsigned_abs().leading_zeros() as usize;
            let mut len = magnitude_bits / 8 + 1;
            let le = i128::from(value).to_le_bytes();
            if value < 0 && len > 1 && le[len - 1] == 0xff && le[len - 2] & 0x80 != 0 {
                len -= 1;
            }
            self.write(&[LONG1, len as u8]);
            self.buf.extend_from_slice(&le[..len]);
        }
    }

    /// A non-negative integer given as big-endian bytes (the 256-bit chain values of sha256 on 0.10.x).
    fn save_uint_be(&mut self, be: &[u8]) {
        let first = be.iter().position(|&b| b != 0).unwrap_or(be.len());
        let significant = &be[first..];
        if significant.len() <= 4 {
            let mut word = [0u8; 8];
            word[8 - significant.len()..].copy_from_slice(significant);
            // Fits in i64; save_int picks BININT* for it exactly as CPython does for small ints.
            self.save_int(i64::from_be_bytes(word));
            return;
        }
        self.boundary();
        // Positive: bit_length // 8 + 1 bytes, i.e. one extra zero byte when the top bit is set.
        let sign_byte = significant.first().is_some_and(|&top| top & 0x80 != 0);
        let len = significant.len() + usize::from(sign_byte);
        if let Ok(short_len) = u8::try_from(len) {
            self.write(&[LONG1, short_len]);
        } else {
            let le = (len as u32).to_le_bytes();
            self.write(&[LONG4, le[0], le[1], le[2], le[3]]);
        }
        self.buf.extend(significant.iter().rev());
        if sign_byte {
            self.buf.push(0);
        }
    }

    fn save_bytes(&mut self, bytes: &[u8]) {
        self.boundary();
        let len = bytes.len();
        if let Ok(short) = u8::try_from(len) {
            self.write_payload(&[SHORT_BINBYTES, short], bytes);
        } else if let Ok(medium) = u32::try_from(len) {
            let le = medium.to_le_bytes();
            self.write_payload(&[BINBYTES, le[0], le[1], le[2], le[3]], bytes);
        } else {
            let mut header = [BINBYTES8; 9];
            header[1..].copy_from_slice(&(len as u64).to_le_bytes());
            self.write_payload(&header, bytes);
        }
        self.memoize();
    }

    fn save_str(&mut self, text: &str) {
        self.boundary();
        let shared_key = shared_string_key(text);
        if let Some(key) = shared_key {
            let known = self.shared_strs[..self.shared_str_count]
                .iter()
                .find(|(k, _)| *k == key);
            if let Some(&(_, index)) = known {
                self.write_memo_get(index);
                return;
            }
        }
        let len = text.len();
        if let Ok(short) = u8::try_from(len) {
            self.write_payload(&[SHORT_BINUNICODE, short], text.as_bytes());
        } else if let Ok(medium) = u32::try_from(len) {
            let le = medium.to_le_bytes();
            self.write_payload(&[BINUNICODE, le[0], le[1], le[2], le[3]], text.as_bytes());
        } else {
            let mut header = [BINUNICODE8; 9];
            header[1..].copy_from_slice(&(len as u64).to_le_bytes());
            self.write_payload(&header, text.as_bytes());
        }
        let index = self.memoize();
        if let Some(key) = shared_key {
            if let Some(slot) = self.shared_strs.get_mut(self.shared_str_count) {
                *slot = (key, index);
                self.shared_str_count += 1;
            }
        }
    }

    fn write_memo_get(&mut self, index: u32) {
        if let Ok(short) = u8::try_from(index) {
            self.write(&[BINGET, short]);
        } else {
            let le = index.to_le_bytes();
            self.write(&[LONG_BINGET, le[0], le[1], le[2], le[3]]);
        }
    }

    /// A tuple of `len` items written by `items`.
    fn save_tuple_of(&mut self, len: usize, items: impl FnOnce(&mut Self)) {
        self.boundary();
        if len == 0 {
            self.write(&[EMPTY_TUPLE]);
            return;
        }
        if len > 3 {
            self.write(&[MARK]);
        }
        items(self);
        self.end_tuple(len);
    }

    fn end_tuple(&mut self, len: usize) {
        match len {
            1..=3 => self.write(&[TUPLE1 + (len as u8 - 1)]),
            _ => self.write(&[TUPLE]),
        }
        self.memoize();
    }

    /// The block's token tuple. Tokens are ints; the per-token frame check is only needed when the
    /// tuple could cross a frame boundary, which takes blocks of thousands of tokens.
    fn save_tokens(&mut self, tokens: &[u32]) {
        self.boundary();
        if tokens.is_empty() {
            self.write(&[EMPTY_TUPLE]);
            return;
        }
        if tokens.len() > 3 {
            self.write(&[MARK]);
        }
        self.open_frame();
        if self.frame_len() + tokens.len() * MAX_TOKEN_LEN < FRAME_SIZE_TARGET {
            write_tokens(self.buf, tokens);
        } else {
            for &token in tokens {
                self.boundary();
                self.open_frame();
                write_tokens(self.buf, &[token]);
            }
        }
        self.end_tuple(tokens.len());
    }
}

/// Key under which CPython shares a string object: the empty string and one-character Latin-1 strings.
fn shared_string_key(text: &str) -> Option<u32> {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (None, _) => Some(0),
        (Some(c), None) if u32::from(c) < 256 => Some(u32::from(c) + 1),
        _ => None,
    }
}

/// Tokens as pickle ints, with no frame checks. The hot loop of every pickle hash, so it avoids
/// branches on the token's width (token ids of a real vocabulary mix widths unpredictably): each token
/// is one fixed-size store into pre-sized space, and the cursor advances by the token's real length.
fn write_tokens(buf: &mut Vec<u8>, tokens: &[u32]) {
    // By width class (≤ 0xff, ≤ 0xffff, ≤ i32::MAX): opcode and encoded length.
    const OPCODE: [u8; 3] = [BININT1, BININT2, BININT];
    const LEN: [usize; 3] = [2, 3, 5];
    let start = buf.len();
    buf.resize(start + tokens.len() * MAX_TOKEN_LEN, 0);
    let out = &mut buf[start..];
    let mut at = 0;
    for &token in tokens {
        let le = token.to_le_bytes();
        // Before token i, `at` is at most i * MAX_TOKEN_LEN, so the store stays inside the resized space.
        let slot = &mut out[at..at + MAX_TOKEN_LEN];
        if token <= 0x7fff_ffff {
            let class = usize::from(token > 0xff) + usize::from(token > 0xffff);
            slot.copy_from_slice(&[OPCODE[class], le[0], le[1], le[2], le[3], 0, 0]);
            at += LEN[class];
        } else {
            // Above i32::MAX: 32 significant bits need a fifth, zero sign byte.
            slot.copy_from_slice(&[LONG1, 5, le[0], le[1], le[2], le[3], 0]);
            at += MAX_TOKEN_LEN;
        }
    }
    buf.truncate(start + at);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pickled_int(value: i64) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut pickler = Pickler::begin(&mut buf);
        pickler.save_int(value);
        pickler.finish();
        // Strip the protocol header, the frame header (absent for frames under 4 bytes) and STOP.
        let body = if buf[2] == FRAME {
            &buf[11..]
        } else {
            &buf[2..]
        };
        body[..body.len() - 1].to_vec()
    }

    #[test]
    fn ints_match_cpython_opcodes() {
        // Expected bytes from pickle.dumps(v, protocol=5) on CPython 3.11.
        assert_eq!(pickled_int(0), [0x4b, 0]);
        assert_eq!(pickled_int(255), [0x4b, 0xff]);
        assert_eq!(pickled_int(256), [0x4d, 0, 1]);
        assert_eq!(pickled_int(65536), [0x4a, 0, 0, 1, 0]);
        assert_eq!(pickled_int(-1), [0x4a, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(pickled_int(1 << 31), [0x8a, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(
            pickled_int(-(1 << 31) - 1),
            [0x8a, 5, 0xff, 0xff, 0xff, 0x7f, 0xff]
        );
        assert_eq!(pickled_int(-(1 << 39)), [0x8a, 5, 0, 0, 0, 0, 0x80]);
        assert_eq!(pickled_int(i64::MIN), [0x8a, 8, 0, 0, 0, 0, 0, 0, 0, 0x80]);
    }

    #[test]
    fn tokens_match_single_token_encoding() {
        for token in [
            0u32,
            23,
            255,
            256,
            65535,
            65536,
            0x7fff_ffff,
            0x8000_0000,
            u32::MAX,
        ] {
            let mut buf = Vec::new();
            write_tokens(&mut buf, &[token]);
            assert_eq!(buf, pickled_int(i64::from(token)), "token {token}");
        }
    }

    #[test]
    fn tiny_frames_lose_their_header() {
        let mut buf = Vec::new();
        seed_preimage("", &mut buf);
        // "" pickles to 8c 00 94 2e: exactly FRAME_SIZE_MIN, so still framed.
        assert_eq!(hex::encode(&buf), "80059504000000000000008c00942e");
    }
}
