//! Encoding KV events: the encoder reproduces the bytes vLLM's msgspec encoder
//! writes for each release, so kvgate's simulated pods are indistinguishable
//! from real ones.

use bytes::Bytes;

use super::{
    wire_hash_key, ExtraKey, ExtraKeys, REPLAY_END_SEQ, TAG_ALL_CLEARED, TAG_KEY, TAG_REMOVED,
    TAG_STORED,
};
use crate::vllm::VllmRelease;

/// A block hash to publish: the 64-bit int (default) or the raw digest
/// (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireHash<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

impl WireHash<'_> {
    /// The key a decoder indexes this hash by.
    pub fn index_key(&self) -> u64 {
        match *self {
            Self::Int(value) => value,
            Self::Bytes(digest) => wire_hash_key(digest),
        }
    }
}

/// An event to encode. Fields a release does not have are left out for it.
#[derive(Clone, Copy, Debug)]
pub enum OutEvent<'a> {
    Stored {
        block_hashes: &'a [WireHash<'a>],
        parent: Option<WireHash<'a>>,
        token_ids: &'a [u32],
        block_size: u32,
        lora_id: Option<i64>,
        lora_name: Option<&'a str>,
        medium: &'a str,
        /// What the block pool publishes (0.17+): [`ExtraKeys::Plain`] for
        /// requests without LoRA, multimodal input, salt or embeds.
        extra_keys: &'a ExtraKeys,
    },
    Removed {
        block_hashes: &'a [WireHash<'a>],
        medium: &'a str,
    },
    AllCleared,
}

/// The event layout of one release (docs §3.1, §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    map_form: bool,
    medium: bool,
    lora_name: bool,
    extra_keys: bool,
    group_idx: bool,
    spec_kind: bool,
    /// Fields the BlockStored and BlockRemoved classes declare, which size
    /// msgspec's map headers.
    stored_class_fields: usize,
    removed_class_fields: usize,
    replay_topic: bool,
}

impl Layout {
    fn of(release: VllmRelease) -> Self {
        let since = |minor: u16, patch: u16| release >= VllmRelease::new(0, minor, patch);
        let (medium, lora_name, extra_keys) = (since(10, 2), since(14, 0), since(17, 0));
        let (group_idx, spec_kind, map_form) = (since(20, 0), since(22, 0), since(24, 0));
        let (locality, ownership) = (since(26, 0), since(29, 0));
        let (session_id, lookahead) = (since(30, 0), since(33, 0));
        let count = |fields: &[bool]| fields.iter().filter(|&&has| has).count();
        let stored_class_fields = 5
            + count(&[medium, lora_name, extra_keys, group_idx, locality])
            + count(&[ownership, session_id, lookahead])
            + 2 * usize::from(spec_kind);
        let removed_class_fields = 1 + count(&[medium, group_idx, locality, ownership]);
        Self {
            map_form,
            medium,
            lora_name,
            extra_keys,
            group_idx,
            spec_kind,
            stored_class_fields,
            removed_class_fields,
            replay_topic: since(26, 0),
        }
    }
}

/// kvgate's simulated pods serve dense single-group models, whose block pool
/// publishes every event in KV-cache group 0 with full attention.
const DENSE_GROUP_IDX: u64 = 0;
const DENSE_SPEC_KIND: &str = "full_attention";

/// Writes events exactly as a given vLLM release's publisher does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventEncoder {
    release: VllmRelease,
    layout: Layout,
}

impl EventEncoder {
    /// Releases before 0.10.0 are written as 0.10.0, later ones than 0.33.0
    /// as 0.33.0.
    pub fn new(release: VllmRelease) -> Self {
        Self {
            release,
            layout: Layout::of(release),
        }
    }

    pub fn release(&self) -> VllmRelease {
        self.release
    }

    /// Replaces `out` with the msgpack `KVEventBatch`.
    pub fn encode_batch(&self, ts: f64, events: &[OutEvent<'_>], dp_rank: u32, out: &mut Vec<u8>) {
        out.clear();
        put_array_len(out, 3);
        out.push(0xcb);
        out.extend_from_slice(&ts.to_bits().to_be_bytes());
        put_array_len(out, events.len());
        for event in events {
            self.encode_event(event, out);
        }
        put_uint(out, u64::from(dp_rank));
    }

    fn encode_event(&self, event: &OutEvent<'_>, out: &mut Vec<u8>) {
        let l = &self.layout;
        match *event {
            OutEvent::Stored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_id,
                lora_name,
                medium,
                extra_keys,
            } => {
                let publish_extra_keys = l.extra_keys && *extra_keys != ExtraKeys::Absent;
                let mut w = EventWriter::start(
                    out,
                    l,
                    TAG_STORED,
                    1 + 5
                        + usize::from(l.medium)
                        + usize::from(l.lora_name)
                        + usize::from(l.extra_keys)
                        + usize::from(l.group_idx)
                        + 2 * usize::from(l.spec_kind),
                    6 + usize::from(l.medium)
                        + usize::from(l.lora_name)
                        + usize::from(publish_extra_keys)
                        + usize::from(l.group_idx)
                        + usize::from(l.spec_kind),
                    l.stored_class_fields,
                );
                w.field("block_hashes", |out| put_hashes(out, block_hashes));
                w.field("parent_block_hash", |out| match parent {
                    Some(hash) => put_hash(out, hash),
                    None => out.push(0xc0),
                });
                w.field("token_ids", |out| {
                    put_array_len(out, token_ids.len());
                    for &token in token_ids {
                        put_uint(out, u64::from(token));
                    }
                });
                w.field("block_size", |out| put_uint(out, u64::from(block_size)));
                w.field("lora_id", |out| match lora_id {
                    Some(id) => put_int(out, id),
                    None => out.push(0xc0),
                });
                if l.medium {
                    w.field("medium", |out| put_str(out, medium));
                }
                if l.lora_name {
                    w.field("lora_name", |out| match lora_name {
                        Some(name) => put_str(out, name),
                        None => out.push(0xc0),
                    });
                }
                if l.extra_keys {
                    w.defaulted_field("extra_keys", publish_extra_keys, |out| {
                        put_extra_keys(out, extra_keys, block_hashes.len())
                    });
                }
                if l.group_idx {
                    w.field("group_idx", |out| put_uint(out, DENSE_GROUP_IDX));
                }
                if l.spec_kind {
                    w.field("kv_cache_spec_kind", |out| put_str(out, DENSE_SPEC_KIND));
                    w.defaulted_field("kv_cache_spec_sliding_window", false, |out| out.push(0xc0));
                }
            }
            OutEvent::Removed {
                block_hashes,
                medium,
            } => {
                let fields = 1 + usize::from(l.medium) + usize::from(l.group_idx);
                let mut w = EventWriter::start(
                    out,
                    l,
                    TAG_REMOVED,
                    1 + fields,
                    1 + fields,
                    l.removed_class_fields,
                );
                w.field("block_hashes", |out| put_hashes(out, block_hashes));
                if l.medium {
                    w.field("medium", |out| put_str(out, medium));
                }
                if l.group_idx {
                    w.field("group_idx", |out| put_uint(out, DENSE_GROUP_IDX));
                }
            }
            OutEvent::AllCleared => {
                EventWriter::start(out, l, TAG_ALL_CLEARED, 1, 1, 0);
            }
        }
    }

    /// The PUB message `[topic, seq, payload]`.
    pub fn pub_frames(&self, topic: Bytes, seq: u64, payload: Bytes) -> Vec<Bytes> {
        vec![topic, seq_frame(seq), payload]
    }

    /// A replayed batch as the ROUTER sends it after the peer's identity frame
    /// (and so as the DEALER receives it).
    pub fn replay_batch_frames(&self, topic: Bytes, seq: u64, payload: Bytes) -> Vec<Bytes> {
        if self.layout.replay_topic {
            vec![Bytes::new(), topic, seq_frame(seq), payload]
        } else {
            vec![Bytes::new(), seq_frame(seq), payload]
        }
    }

    /// The replay end marker, after the peer's identity frame.
    pub fn replay_end_frames(&self) -> Vec<Bytes> {
        let end = seq_frame(REPLAY_END_SEQ);
        if self.layout.replay_topic {
            vec![Bytes::new(), Bytes::new(), end, Bytes::new()]
        } else {
            vec![Bytes::new(), end, Bytes::new()]
        }
    }
}

fn seq_frame(seq: u64) -> Bytes {
    Bytes::copy_from_slice(&seq.to_be_bytes())
}

/// Writes one event in array or map form. msgspec writes every field in the
/// array form, but leaves fields holding their default out of the map form.
struct EventWriter<'o> {
    out: &'o mut Vec<u8>,
    map_form: bool,
}

impl<'o> EventWriter<'o> {
    /// `array_len` counts the array elements (tag included), `map_entries` the
    /// entries written in map form (tag included), `class_fields` the fields
    /// the release's class declares: msgspec sizes the map header for all of
    /// them plus the tag, which is why 0.33's 11-entry BlockStored has a map16
    /// header.
    fn start(
        out: &'o mut Vec<u8>,
        layout: &Layout,
        tag: &str,
        array_len: usize,
        map_entries: usize,
        class_fields: usize,
    ) -> Self {
        if layout.map_form {
            if class_fields + 1 > 15 {
                out.push(0xde);
                out.extend_from_slice(&len_u16(map_entries).to_be_bytes());
            } else {
                put_map_len(out, map_entries);
            }
            put_str(out, TAG_KEY);
        } else {
            put_array_len(out, array_len);
        }
        put_str(out, tag);
        Self {
            out,
            map_form: layout.map_form,
        }
    }

    fn field(&mut self, name: &str, value: impl FnOnce(&mut Vec<u8>)) {
        if self.map_form {
            put_str(self.out, name);
        }
        value(self.out);
    }

    /// A field that has a default; `set` says it holds something else.
    fn defaulted_field(&mut self, name: &str, set: bool, value: impl FnOnce(&mut Vec<u8>)) {
        if set || !self.map_form {
            self.field(name, value);
        }
    }
}

/// Lengths beyond msgpack's 32-bit limit cannot come from in-memory slices of
/// events, tokens or hashes; they are clamped rather than wrapped.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn len_u16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

fn put_uint(out: &mut Vec<u8>, value: u64) {
    if value < 0x80 {
        out.push(value as u8);
    } else if let Ok(v) = u8::try_from(value) {
        out.extend_from_slice(&[0xcc, v]);
    } else if let Ok(v) = u16::try_from(value) {
        out.push(0xcd);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(value) {
        out.push(0xce);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub(super) fn put_int(out: &mut Vec<u8>, value: i64) {
    if let Ok(unsigned) = u64::try_from(value) {
        put_uint(out, unsigned);
    } else if value >= -32 {
        out.push(value as u8);
    } else if let Ok(v) = i8::try_from(value) {
        out.extend_from_slice(&[0xd0, v as u8]);
    } else if let Ok(v) = i16::try_from(value) {
        out.push(0xd1);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = i32::try_from(value) {
        out.push(0xd2);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = s.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if let Ok(n) = u8::try_from(len) {
        out.extend_from_slice(&[0xd9, n]);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(0xda);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&len_u32(len).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    if let Ok(n) = u8::try_from(len) {
        out.extend_from_slice(&[0xc4, n]);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(0xc5);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&len_u32(len).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

fn put_array_len(out: &mut Vec<u8>, len: usize) {
    if len < 16 {
        out.push(0x90 | len as u8);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(0xdc);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&len_u32(len).to_be_bytes());
    }
}

fn put_map_len(out: &mut Vec<u8>, len: usize) {
    if len < 16 {
        out.push(0x80 | len as u8);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(0xde);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0xdf);
        out.extend_from_slice(&len_u32(len).to_be_bytes());
    }
}

fn put_hash(out: &mut Vec<u8>, hash: WireHash<'_>) {
    match hash {
        WireHash::Int(value) => put_uint(out, value),
        WireHash::Bytes(digest) => put_bin(out, digest),
    }
}

fn put_hashes(out: &mut Vec<u8>, hashes: &[WireHash<'_>]) {
    put_array_len(out, hashes.len());
    for &hash in hashes {
        put_hash(out, hash);
    }
}

fn put_extra_keys(out: &mut Vec<u8>, keys: &ExtraKeys, blocks: usize) {
    match keys {
        ExtraKeys::Absent => out.push(0xc0),
        ExtraKeys::Plain => {
            put_array_len(out, blocks);
            out.resize(out.len() + blocks, 0xc0);
        }
        ExtraKeys::PerBlock(per_block) => {
            put_array_len(out, per_block.len());
            for block in per_block {
                match block {
                    Some(tuple) => put_extra_key_tuple(out, tuple),
                    None => out.push(0xc0),
                }
            }
        }
    }
}

fn put_extra_key_tuple(out: &mut Vec<u8>, tuple: &[ExtraKey]) {
    put_array_len(out, tuple.len());
    for key in tuple {
        match key {
            ExtraKey::Nil => out.push(0xc0),
            ExtraKey::Int(value) => put_int(out, *value),
            ExtraKey::UInt(value) => put_uint(out, *value),
            ExtraKey::Str(s) => put_str(out, s),
            ExtraKey::Bytes(bytes) => put_bin(out, bytes),
            ExtraKey::Tuple(inner) => put_extra_key_tuple(out, inner),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn release(text: &str) -> VllmRelease {
        text.parse().expect("test release")
    }

    #[test]
    fn hash_key_is_last_eight_bytes_big_endian() {
        let digest: Vec<u8> = (1..=32).collect();
        assert_eq!(wire_hash_key(&digest), 0x191a_1b1c_1d1e_1f20);
        assert_eq!(wire_hash_key(&[0x01, 0x02]), 0x0102);
        assert_eq!(wire_hash_key(&[]), 0);
        assert_eq!(WireHash::Bytes(&digest).index_key(), 0x191a_1b1c_1d1e_1f20);
    }

    #[test]
    fn header_width_follows_the_class_size() {
        assert!(!Layout::of(release("0.23.0")).map_form);
        assert_eq!(Layout::of(release("0.10.1.1")).stored_class_fields, 5);
        assert_eq!(Layout::of(release("0.10.2")).stored_class_fields, 6);
        assert_eq!(Layout::of(release("0.23.0")).stored_class_fields, 11);
        assert_eq!(Layout::of(release("0.32.0")).stored_class_fields, 14);
        assert_eq!(Layout::of(release("0.33.0")).stored_class_fields, 15);
        assert_eq!(Layout::of(release("0.33.0")).removed_class_fields, 5);
        assert_eq!(Layout::of(release("0.10.0")).removed_class_fields, 1);
        assert!(Layout::of(release("0.26.0")).replay_topic);
        assert!(!Layout::of(release("0.25.1")).replay_topic);
    }
}
