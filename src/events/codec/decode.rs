//! Decoding a msgpack `KVEventBatch`.
//!
//! Decoding is one pass over the payload bytes with no intermediate value
//! tree: events arrive at pod-fleet rates and each carries hundreds of token
//! ids. Both event forms are read: arrays (≤0.23, whose length identifies the
//! release generation) and maps (0.24+, keyed by field name, unknown keys
//! ignored). A malformed or unknown event is skipped and reported in
//! [`EventBatch::dropped`]; only a payload whose msgpack structure itself is
//! broken (so the next event cannot be found) fails as a whole.

use super::{
    wire_hash_key, BlockRemoved, BlockStored, DecodeError, EventBatch, EventDecodeError,
    EventError, ExtraKey, ExtraKeys, KvEvent, Medium, WireError, TAG_ALL_CLEARED, TAG_KEY,
    TAG_REMOVED, TAG_STORED,
};

/// Deepest nesting of tuples accepted inside one block's extra keys. vLLM's
/// keys nest at most two levels (0.31+ tagged keys); the cap bounds recursion
/// on hostile input.
const MAX_EXTRA_KEY_DEPTH: usize = 8;

/// The longest unknown tag kept in an error, so a hostile payload cannot make
/// error records large.
const MAX_REPORTED_TAG_LEN: usize = 64;

// ---------------------------------------------------------------------------
// msgpack reader
// ---------------------------------------------------------------------------

fn marker_name(marker: u8) -> &'static str {
    match marker {
        0x00..=0x7f | 0xcc..=0xd3 | 0xe0..=0xff => "int",
        0x80..=0x8f | 0xde | 0xdf => "map",
        0x90..=0x9f | 0xdc | 0xdd => "array",
        0xa0..=0xbf | 0xd9..=0xdb => "str",
        0xc0 => "nil",
        0xc1 => "reserved byte 0xc1",
        0xc2 | 0xc3 => "bool",
        0xc4..=0xc6 => "bin",
        0xc7..=0xc9 | 0xd4..=0xd8 => "ext",
        0xca | 0xcb => "float",
    }
}

fn is_int_marker(marker: u8) -> bool {
    matches!(marker, 0x00..=0x7f | 0xcc..=0xd3 | 0xe0..=0xff)
}

fn is_array_marker(marker: u8) -> bool {
    matches!(marker, 0x90..=0x9f | 0xdc | 0xdd)
}

fn is_map_marker(marker: u8) -> bool {
    matches!(marker, 0x80..=0x8f | 0xde | 0xdf)
}

/// Cursor over a msgpack payload. Every read is bounds-checked and reports the
/// byte offset it failed at.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Capacity to reserve for `declared` elements: each takes at least one
    /// byte, so a length from the wire never allocates beyond the payload.
    fn capacity_for(&self, declared: u32) -> usize {
        (declared as usize).min(self.remaining())
    }

    fn type_error(&self, at: usize, expected: &'static str) -> WireError {
        WireError::Type {
            at,
            expected,
            found: self
                .buf
                .get(at)
                .map_or("end of payload", |&m| marker_name(m)),
        }
    }

    #[inline]
    fn peek(&self) -> Result<u8, WireError> {
        self.buf.get(self.pos).copied().ok_or(WireError::Truncated {
            at: self.pos,
            needed: 1,
        })
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, WireError> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let bytes = self
            .buf
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| WireError::Truncated {
                at: self.pos,
                needed: n.saturating_sub(self.remaining()),
            })?;
        self.pos += n;
        Ok(bytes)
    }

    #[inline]
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn be_u16(&mut self) -> Result<u16, WireError> {
        self.fixed().map(u16::from_be_bytes)
    }

    fn be_u32(&mut self) -> Result<u32, WireError> {
        self.fixed().map(u32::from_be_bytes)
    }

    #[inline]
    fn be_u64(&mut self) -> Result<u64, WireError> {
        self.fixed().map(u64::from_be_bytes)
    }

    /// Consumes a nil if one is next.
    #[inline]
    fn nil(&mut self) -> Result<bool, WireError> {
        let is_nil = self.peek()? == 0xc0;
        if is_nil {
            self.pos += 1;
        }
        Ok(is_nil)
    }

    fn array_len(&mut self) -> Result<u32, WireError> {
        let at = self.pos;
        match self.byte()? {
            m @ 0x90..=0x9f => Ok(u32::from(m & 0x0f)),
            0xdc => self.be_u16().map(u32::from),
            0xdd => self.be_u32(),
            _ => Err(self.type_error(at, "array")),
        }
    }

    fn map_len(&mut self) -> Result<u32, WireError> {
        let at = self.pos;
        match self.byte()? {
            m @ 0x80..=0x8f => Ok(u32::from(m & 0x0f)),
            0xde => self.be_u16().map(u32::from),
            0xdf => self.be_u32(),
            _ => Err(self.type_error(at, "map")),
        }
    }

    /// Any msgpack integer, widened so that every form fits.
    fn integer(&mut self, expected: &'static str) -> Result<i128, WireError> {
        let at = self.pos;
        let value = match self.byte()? {
            m @ 0x00..=0x7f => i128::from(m),
            m @ 0xe0..=0xff => i128::from(m as i8),
            0xcc => i128::from(self.byte()?),
            0xcd => i128::from(self.be_u16()?),
            0xce => i128::from(self.be_u32()?),
            0xcf => i128::from(self.be_u64()?),
            0xd0 => i128::from(self.byte()? as i8),
            0xd1 => i128::from(self.be_u16()? as i16),
            0xd2 => i128::from(self.be_u32()? as i32),
            0xd3 => i128::from(self.be_u64()? as i64),
            _ => return Err(self.type_error(at, expected)),
        };
        Ok(value)
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, WireError> {
        let at = self.pos;
        // Token ids dominate payloads; take the forms msgspec emits for them
        // without widening.
        match self.peek()? {
            m @ 0x00..=0x7f => {
                self.pos += 1;
                Ok(u32::from(m))
            }
            0xcc => {
                self.pos += 1;
                self.byte().map(u32::from)
            }
            0xcd => {
                self.pos += 1;
                self.be_u16().map(u32::from)
            }
            0xce => {
                self.pos += 1;
                self.be_u32()
            }
            _ => {
                u32::try_from(self.integer("unsigned 32-bit int")?).map_err(|_| WireError::Range {
                    at,
                    expected: "unsigned 32-bit int",
                })
            }
        }
    }

    fn i64(&mut self) -> Result<i64, WireError> {
        let at = self.pos;
        i64::try_from(self.integer("int")?).map_err(|_| WireError::Range {
            at,
            expected: "signed 64-bit int",
        })
    }

    fn f64(&mut self) -> Result<f64, WireError> {
        let at = self.pos;
        match self.peek()? {
            0xcb => {
                self.pos += 1;
                self.be_u64().map(f64::from_bits)
            }
            0xca => {
                self.pos += 1;
                self.be_u32().map(|bits| f64::from(f32::from_bits(bits)))
            }
            // An integral timestamp is still a timestamp.
            m if is_int_marker(m) => self.integer("float").map(|v| v as f64),
            _ => Err(self.type_error(at, "float")),
        }
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let at = self.pos;
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => usize::from(self.byte()?),
            0xda => usize::from(self.be_u16()?),
            0xdb => self.be_u32()? as usize,
            _ => return Err(self.type_error(at, "str")),
        };
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| WireError::Utf8 { at })
    }

    fn bin_len(&mut self, marker: u8) -> Result<usize, WireError> {
        match marker {
            0xc4 => self.byte().map(usize::from),
            0xc5 => self.be_u16().map(usize::from),
            _ => self.be_u32().map(|n| n as usize),
        }
    }

    /// A block hash: an int (usually uint64) or the raw digest bytes.
    #[inline]
    fn hash(&mut self) -> Result<u64, WireError> {
        let at = self.pos;
        match self.peek()? {
            0xcf => {
                self.pos += 1;
                self.be_u64()
            }
            m @ 0xc4..=0xc6 => {
                self.pos += 1;
                let len = self.bin_len(m)?;
                self.take(len).map(wire_hash_key)
            }
            // Smaller ints, and the signed 64-bit values of Python's builtin
            // hash, whose two's complement is what `hash & (2**64 - 1)` gives.
            m if is_int_marker(m) => self.integer("block hash").map(|v| v as u64),
            _ => Err(self.type_error(at, "block hash (int or bin)")),
        }
    }

    fn skip_value(&mut self) -> Result<(), WireError> {
        // Iterative, so deeply nested hostile input cannot exhaust the stack;
        // every value consumes at least one byte, so the loop ends with the
        // payload.
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let at = self.pos;
            let skip = match self.byte()? {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                m @ 0x80..=0x8f => {
                    pending += 2 * u64::from(m & 0x0f);
                    0
                }
                m @ 0x90..=0x9f => {
                    pending += u64::from(m & 0x0f);
                    0
                }
                m @ 0xa0..=0xbf => usize::from(m & 0x1f),
                0xc1 => return Err(self.type_error(at, "a msgpack value")),
                m @ 0xc4..=0xc6 => self.bin_len(m)?,
                0xd9 => usize::from(self.byte()?),
                0xc7 => usize::from(self.byte()?) + 1,
                0xc8 => usize::from(self.be_u16()?) + 1,
                0xc9 => (self.be_u32()? as usize).saturating_add(1),
                0xca | 0xce | 0xd2 => 4,
                0xcb | 0xcf | 0xd3 => 8,
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 => 2,
                0xd4 => 2,
                0xd5 => 3,
                0xd6 => 5,
                0xd7 => 9,
                0xd8 => 17,
                0xda => usize::from(self.be_u16()?),
                0xdb => self.be_u32()? as usize,
                0xdc => {
                    pending = pending.saturating_add(u64::from(self.be_u16()?));
                    0
                }
                0xdd => {
                    pending = pending.saturating_add(u64::from(self.be_u32()?));
                    0
                }
                0xde => {
                    pending = pending.saturating_add(2 * u64::from(self.be_u16()?));
                    0
                }
                0xdf => {
                    pending = pending.saturating_add(2 * u64::from(self.be_u32()?));
                    0
                }
            };
            self.take(skip)?;
        }
        Ok(())
    }

    fn opt_hash(&mut self) -> Result<Option<u64>, WireError> {
        if self.nil()? {
            return Ok(None);
        }
        self.hash().map(Some)
    }

    fn opt_u32(&mut self) -> Result<Option<u32>, WireError> {
        if self.nil()? {
            return Ok(None);
        }
        self.u32().map(Some)
    }

    fn opt_i64(&mut self) -> Result<Option<i64>, WireError> {
        if self.nil()? {
            return Ok(None);
        }
        self.i64().map(Some)
    }

    fn opt_string(&mut self) -> Result<Option<String>, WireError> {
        if self.nil()? {
            return Ok(None);
        }
        self.str().map(|s| Some(s.to_owned()))
    }

    fn medium(&mut self) -> Result<Medium, WireError> {
        if self.nil()? {
            return Ok(Medium::Gpu);
        }
        self.str().map(Medium::from_wire)
    }

    fn hashes_into(&mut self, out: &mut Vec<u64>) -> Result<(), WireError> {
        let len = self.array_len()?;
        out.clear();
        out.reserve(self.capacity_for(len));
        for _ in 0..len {
            out.push(self.hash()?);
        }
        Ok(())
    }

    fn tokens_into(&mut self, out: &mut Vec<u32>) -> Result<(), WireError> {
        let len = self.array_len()?;
        out.clear();
        out.reserve(self.capacity_for(len));
        for _ in 0..len {
            out.push(self.u32()?);
        }
        Ok(())
    }

    fn extra_keys(&mut self) -> Result<ExtraKeys, WireError> {
        if self.nil()? {
            return Ok(ExtraKeys::Absent);
        }
        let len = self.array_len()?;
        // Plain requests publish only nils: allocate once a real key shows up.
        let mut per_block: Option<Vec<Option<Box<[ExtraKey]>>>> = None;
        for block in 0..len {
            if self.nil()? {
                if let Some(keys) = per_block.as_mut() {
                    keys.push(None);
                }
                continue;
            }
            let tuple = self.extra_key_tuple(1)?;
            let keys = per_block.get_or_insert_with(Vec::new);
            if keys.is_empty() {
                keys.reserve(
                    self.capacity_for(len - block)
                        .saturating_add(block as usize),
                );
                keys.resize(block as usize, None);
            }
            keys.push(Some(tuple));
        }
        Ok(per_block.map_or(ExtraKeys::Plain, ExtraKeys::PerBlock))
    }

    fn extra_key_tuple(&mut self, depth: usize) -> Result<Box<[ExtraKey]>, WireError> {
        let at = self.pos;
        if depth > MAX_EXTRA_KEY_DEPTH {
            return Err(WireError::TooDeep {
                at,
                limit: MAX_EXTRA_KEY_DEPTH,
            });
        }
        let len = self.array_len()?;
        let mut items = Vec::with_capacity(self.capacity_for(len));
        for _ in 0..len {
            items.push(self.extra_key(depth)?);
        }
        Ok(items.into_boxed_slice())
    }

    fn extra_key(&mut self, depth: usize) -> Result<ExtraKey, WireError> {
        let at = self.pos;
        let marker = self.peek()?;
        Ok(match marker {
            0xc0 => {
                self.pos += 1;
                ExtraKey::Nil
            }
            m if is_int_marker(m) => {
                let value = self.integer("extra key")?;
                match u64::try_from(value) {
                    Ok(unsigned) => ExtraKey::UInt(unsigned),
                    Err(_) => {
                        ExtraKey::Int(i64::try_from(value).map_err(|_| WireError::Range {
                            at,
                            expected: "signed 64-bit int",
                        })?)
                    }
                }
            }
            0xa0..=0xbf | 0xd9..=0xdb => ExtraKey::Str(self.str()?.into()),
            0xc4..=0xc6 => {
                self.pos += 1;
                let len = self.bin_len(marker)?;
                ExtraKey::Bytes(self.take(len)?.into())
            }
            m if is_array_marker(m) => ExtraKey::Tuple(self.extra_key_tuple(depth + 1)?),
            _ => return Err(self.type_error(at, "extra key (nil, int, str, bin or tuple)")),
        })
    }
}

// ---------------------------------------------------------------------------
// Event decoding
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum EventKind {
    Stored,
    Removed,
    AllCleared,
}

impl EventKind {
    fn from_tag(tag: &str) -> Option<Self> {
        match tag {
            TAG_STORED => Some(Self::Stored),
            TAG_REMOVED => Some(Self::Removed),
            TAG_ALL_CLEARED => Some(Self::AllCleared),
            _ => None,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Stored => TAG_STORED,
            Self::Removed => TAG_REMOVED,
            Self::AllCleared => TAG_ALL_CLEARED,
        }
    }
}

/// The event fields kvgate reads; everything else is skipped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    BlockHashes,
    ParentBlockHash,
    TokenIds,
    BlockSize,
    LoraId,
    Medium,
    LoraName,
    ExtraKeys,
    GroupIdx,
    Skipped(&'static str),
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Self::BlockHashes => "block_hashes",
            Self::ParentBlockHash => "parent_block_hash",
            Self::TokenIds => "token_ids",
            Self::BlockSize => "block_size",
            Self::LoraId => "lora_id",
            Self::Medium => "medium",
            Self::LoraName => "lora_name",
            Self::ExtraKeys => "extra_keys",
            Self::GroupIdx => "group_idx",
            Self::Skipped(name) => name,
        }
    }

    fn from_key(key: &str) -> Self {
        match key {
            "block_hashes" => Self::BlockHashes,
            "parent_block_hash" => Self::ParentBlockHash,
            "token_ids" => Self::TokenIds,
            "block_size" => Self::BlockSize,
            "lora_id" => Self::LoraId,
            "medium" => Self::Medium,
            "lora_name" => Self::LoraName,
            "extra_keys" => Self::ExtraKeys,
            "group_idx" => Self::GroupIdx,
            _ => Self::Skipped("unknown field"),
        }
    }
}

/// BlockStored fields in declaration order, for the array form (docs §3.1).
const STORED_ARRAY_FIELDS: [Field; 11] = [
    Field::BlockHashes,
    Field::ParentBlockHash,
    Field::TokenIds,
    Field::BlockSize,
    Field::LoraId,
    Field::Medium,
    Field::LoraName,
    Field::ExtraKeys,
    Field::GroupIdx,
    Field::Skipped("kv_cache_spec_kind"),
    Field::Skipped("kv_cache_spec_sliding_window"),
];

const REMOVED_ARRAY_FIELDS: [Field; 3] = [Field::BlockHashes, Field::Medium, Field::GroupIdx];

/// A decoded event under construction; holds recycled vectors.
struct Draft {
    kind: EventKind,
    stored: BlockStored,
    /// Required fields seen (map form may lack them).
    has_hashes: bool,
    has_tokens: bool,
    has_block_size: bool,
}

impl Draft {
    fn new(kind: EventKind, recycled: BlockStored) -> Self {
        Self {
            kind,
            stored: recycled,
            has_hashes: false,
            has_tokens: false,
            has_block_size: false,
        }
    }

    fn read(&mut self, r: &mut Reader<'_>, field: Field) -> Result<(), EventError> {
        let tag = self.kind.tag();
        let wire = |source| EventError::Field {
            tag,
            field: field.name(),
            source,
        };
        let ev = &mut self.stored;
        match (self.kind, field) {
            (EventKind::AllCleared, _) | (_, Field::Skipped(_)) => r.skip_value().map_err(wire)?,
            (_, Field::BlockHashes) => {
                r.hashes_into(&mut ev.block_hashes).map_err(wire)?;
                self.has_hashes = true;
            }
            (_, Field::Medium) => ev.medium = r.medium().map_err(wire)?,
            (_, Field::GroupIdx) => ev.group_idx = r.opt_u32().map_err(wire)?,
            (EventKind::Removed, _) => r.skip_value().map_err(wire)?,
            (EventKind::Stored, Field::ParentBlockHash) => {
                ev.parent_block_hash = r.opt_hash().map_err(wire)?
            }
            (EventKind::Stored, Field::TokenIds) => {
                r.tokens_into(&mut ev.token_ids).map_err(wire)?;
                self.has_tokens = true;
            }
            (EventKind::Stored, Field::BlockSize) => {
                ev.block_size = r.u32().map_err(wire)?;
                self.has_block_size = true;
            }
            (EventKind::Stored, Field::LoraId) => ev.lora_id = r.opt_i64().map_err(wire)?,
            (EventKind::Stored, Field::LoraName) => ev.lora_name = r.opt_string().map_err(wire)?,
            (EventKind::Stored, Field::ExtraKeys) => {
                ev.extra_keys = r.extra_keys().map_err(wire)?
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<KvEvent, EventError> {
        let missing = |field: Field| EventError::MissingField {
            tag: self.kind.tag(),
            field: field.name(),
        };
        match self.kind {
            EventKind::AllCleared => Ok(KvEvent::AllCleared),
            EventKind::Removed => {
                if !self.has_hashes {
                    return Err(missing(Field::BlockHashes));
                }
                Ok(KvEvent::Removed(BlockRemoved {
                    block_hashes: self.stored.block_hashes,
                    medium: self.stored.medium,
                    group_idx: self.stored.group_idx,
                }))
            }
            EventKind::Stored => {
                let absent = [
                    (self.has_hashes, Field::BlockHashes),
                    (self.has_tokens, Field::TokenIds),
                    (self.has_block_size, Field::BlockSize),
                ]
                .into_iter()
                .find(|(seen, _)| !seen);
                if let Some((_, field)) = absent {
                    return Err(missing(field));
                }
                Ok(KvEvent::Stored(self.stored))
            }
        }
    }
}

/// Takes the vectors of a previous decode's event so that refilling a batch
/// reuses their allocations.
fn recycle(slot: Option<&mut KvEvent>) -> BlockStored {
    let mut fresh = BlockStored::default();
    match slot {
        Some(KvEvent::Stored(old)) => {
            fresh.block_hashes = std::mem::take(&mut old.block_hashes);
            fresh.token_ids = std::mem::take(&mut old.token_ids);
        }
        Some(KvEvent::Removed(old)) => fresh.block_hashes = std::mem::take(&mut old.block_hashes),
        Some(KvEvent::AllCleared) | None => {}
    }
    fresh
}

fn event_tag(r: &mut Reader<'_>) -> Result<EventKind, EventError> {
    let tag = r.str().map_err(EventError::Tag)?;
    EventKind::from_tag(tag).ok_or_else(|| {
        let shown = tag
            .char_indices()
            .take_while(|&(i, _)| i < MAX_REPORTED_TAG_LEN)
            .map(|(_, c)| c)
            .collect::<String>();
        EventError::UnknownTag(shown.into_boxed_str())
    })
}

fn decode_array_event(r: &mut Reader<'_>, recycled: BlockStored) -> Result<KvEvent, EventError> {
    let len = r.array_len().map_err(EventError::NotAnEvent)?;
    if len == 0 {
        return Err(EventError::Tag(WireError::Type {
            at: r.pos,
            expected: "event tag",
            found: "empty array",
        }));
    }
    let kind = event_tag(r)?;
    // The length names the release generation (docs §3.1); any other length
    // is a layout this decoder has not been checked against.
    let fields: &[Field] = match (kind, len) {
        (EventKind::Stored, 6 | 7 | 8 | 9 | 10 | 12) => &STORED_ARRAY_FIELDS,
        (EventKind::Removed, 2..=4) => &REMOVED_ARRAY_FIELDS,
        (EventKind::AllCleared, 1) => &[],
        (_, len) => {
            return Err(EventError::ArrayLength {
                tag: kind.tag(),
                len,
                known: match kind {
                    EventKind::Stored => "6, 7, 8, 9, 10 or 12",
                    EventKind::Removed => "2, 3 or 4",
                    EventKind::AllCleared => "1",
                },
            })
        }
    };
    let mut draft = Draft::new(kind, recycled);
    for &field in fields.iter().take(len as usize - 1) {
        draft.read(r, field)?;
    }
    draft.finish()
}

fn is_tag_key(r: &mut Reader<'_>) -> Result<bool, WireError> {
    Ok(r.str()? == TAG_KEY)
}

fn decode_map_event(r: &mut Reader<'_>, recycled: BlockStored) -> Result<KvEvent, EventError> {
    let len = r.map_len().map_err(EventError::NotAnEvent)?;
    let entries_start = r.pos;
    let tag_error = EventError::Tag;
    // msgspec writes the tag first; find it elsewhere only if it is not.
    let mut tag_first = false;
    if len > 0 {
        tag_first = is_tag_key(r).map_err(tag_error)?;
        if !tag_first {
            r.pos = entries_start;
        }
    }
    let kind = if tag_first {
        event_tag(r)?
    } else {
        let mut found = None;
        for _ in 0..len {
            if is_tag_key(r).map_err(tag_error)? {
                found = Some(event_tag(r)?);
                break;
            }
            r.skip_value().map_err(tag_error)?;
        }
        r.pos = entries_start;
        found.ok_or(EventError::MissingTag)?
    };
    let mut draft = Draft::new(kind, recycled);
    for _ in u32::from(tag_first)..len {
        let key = r.str().map_err(|source| EventError::Field {
            tag: kind.tag(),
            field: "key",
            source,
        })?;
        let field = match key {
            TAG_KEY => Field::Skipped(TAG_KEY),
            _ => Field::from_key(key),
        };
        draft.read(r, field)?;
    }
    draft.finish()
}

fn decode_event(r: &mut Reader<'_>, recycled: BlockStored) -> Result<KvEvent, EventError> {
    let marker = r.peek().map_err(EventError::NotAnEvent)?;
    if is_array_marker(marker) {
        decode_array_event(r, recycled)
    } else if is_map_marker(marker) {
        decode_map_event(r, recycled)
    } else {
        Err(EventError::NotAnEvent(
            r.type_error(r.pos, "event (array or map)"),
        ))
    }
}

/// Decodes one msgpack `KVEventBatch`.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut batch = EventBatch::default();
    decode_batch_into(payload, &mut batch)?;
    Ok(batch)
}

/// Decodes into `batch`, reusing its allocations (the event vector and the
/// hash and token vectors of its previous events). On error `batch` holds a
/// partial result that must not be applied.
pub fn decode_batch_into(payload: &[u8], batch: &mut EventBatch) -> Result<(), DecodeError> {
    let mut r = Reader::new(payload);
    let part = |part| move |source| DecodeError::Batch { part, source };
    batch.dropped.clear();
    batch.dp_rank = None;

    let len = r.array_len().map_err(part("header"))?;
    if len < 2 {
        return Err(DecodeError::BatchShape { len });
    }
    batch.ts = r.f64().map_err(part("ts"))?;
    let count = r.array_len().map_err(part("events"))?;
    let mut filled = 0usize;
    for index in 0..count as usize {
        let start = r.pos;
        let recycled = recycle(batch.events.get_mut(filled));
        match decode_event(&mut r, recycled) {
            Ok(event) => {
                match batch.events.get_mut(filled) {
                    Some(slot) => *slot = event,
                    None => {
                        if batch.events.is_empty() {
                            batch
                                .events
                                .reserve(r.capacity_for(count - index as u32) + 1);
                        }
                        batch.events.push(event);
                    }
                }
                filled += 1;
            }
            Err(error) => {
                // Resume after the whole event, wherever decoding stopped in it.
                r.pos = start;
                r.skip_value()
                    .map_err(|source| DecodeError::EventExtent { index, source })?;
                batch.dropped.push(EventDecodeError {
                    index,
                    offset: start,
                    error,
                });
            }
        }
    }
    batch.events.truncate(filled);
    if len >= 3 {
        batch.dp_rank = r.opt_u32().map_err(part("data_parallel_rank"))?;
    }
    for _ in 3..len {
        r.skip_value().map_err(part("trailing fields"))?;
    }
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingBytes {
            trailing: r.remaining(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::codec::encode::{put_int, put_str};
    use crate::events::codec::{EventEncoder, OutEvent, WireHash};
    use crate::vllm::VllmRelease;
    fn release(text: &str) -> VllmRelease {
        text.parse().expect("test release")
    }

    #[test]
    fn integers_use_the_smallest_form() {
        let cases: [(i64, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0xcc, 0x80]),
            (256, &[0xcd, 0x01, 0x00]),
            (65536, &[0xce, 0, 1, 0, 0]),
            (-1, &[0xff]),
            (-33, &[0xd0, 0xdf]),
            (-129, &[0xd1, 0xff, 0x7f]),
        ];
        for (value, bytes) in cases {
            let mut out = Vec::new();
            put_int(&mut out, value);
            assert_eq!(out, bytes, "{value}");
            assert_eq!(Reader::new(&out).integer("int"), Ok(i128::from(value)));
        }
    }

    #[test]
    fn reused_batch_matches_fresh_decode() {
        let hashes = [WireHash::Int(1), WireHash::Int(u64::MAX)];
        let tokens: Vec<u32> = (0..32).map(|t| t * 1000).collect();
        let plain = ExtraKeys::Plain;
        let stored = OutEvent::Stored {
            block_hashes: &hashes,
            parent: Some(WireHash::Int(9)),
            token_ids: &tokens,
            block_size: 16,
            lora_id: None,
            lora_name: None,
            medium: "GPU",
            extra_keys: &plain,
        };
        let removed = OutEvent::Removed {
            block_hashes: &hashes[..1],
            medium: "CPU",
        };
        let encoder = EventEncoder::new(release("0.33.0"));
        let mut big = Vec::new();
        let mut small = Vec::new();
        encoder.encode_batch(1.5, &[stored, removed, stored], 2, &mut big);
        encoder.encode_batch(2.5, &[removed], 3, &mut small);

        let mut reused = EventBatch::default();
        for payload in [&big, &small, &big] {
            decode_batch_into(payload, &mut reused).expect("valid batch");
            assert_eq!(reused, decode_batch(payload).expect("valid batch"));
        }
        assert_eq!(reused.events.len(), 3);
        assert_eq!(reused.dp_rank, Some(2));
    }

    #[test]
    fn map_events_accept_the_tag_anywhere_and_ignore_unknown_keys() {
        // {"medium": "CPU", "future": [1, {"x": 2}], "type": "BlockRemoved", "block_hashes": [5]}
        let mut event = vec![0x84];
        put_str(&mut event, "medium");
        put_str(&mut event, "CPU");
        put_str(&mut event, "future");
        event.extend_from_slice(&[0x92, 0x01, 0x81, 0xa1, b'x', 0x02]);
        put_str(&mut event, "type");
        put_str(&mut event, "BlockRemoved");
        put_str(&mut event, "block_hashes");
        event.extend_from_slice(&[0x91, 0x05]);
        let mut payload = vec![0x93, 0xcb];
        payload.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
        payload.push(0x91);
        payload.extend_from_slice(&event);
        payload.push(0x00);
        let batch = decode_batch(&payload).expect("valid batch");
        assert_eq!(
            batch.events,
            vec![KvEvent::Removed(BlockRemoved {
                block_hashes: vec![5],
                medium: Medium::Cpu,
                group_idx: None,
            })]
        );
    }

    #[test]
    fn skip_handles_every_msgpack_type() {
        let mut value = vec![0xdc, 0, 17];
        value.extend_from_slice(&[0xc0, 0xc2, 0xc3, 0xe0]);
        value.extend_from_slice(&[0xca, 0, 0, 0, 0]);
        value.extend_from_slice(&[0xd4, 1, 2]);
        value.extend_from_slice(&[0xd8, 1]);
        value.extend_from_slice(&[0; 16]);
        value.extend_from_slice(&[0xc7, 2, 1, 9, 9]);
        value.extend_from_slice(&[0xc5, 0, 1, 7]);
        value.extend_from_slice(&[0xda, 0, 1, b'a']);
        value.extend_from_slice(&[0xde, 0, 1, 0x01, 0x02]);
        value.extend_from_slice(&[0xdd, 0, 0, 0, 1, 0x03]);
        value.extend_from_slice(&[0xd3, 0, 0, 0, 0, 0, 0, 0, 0]);
        value.extend_from_slice(&[0xd1, 0, 0]);
        value.extend_from_slice(&[0x80, 0x90, 0xa0]);
        let mut r = Reader::new(&value);
        assert_eq!(r.skip_value(), Ok(()));
        assert_eq!(r.remaining(), 0);
        let mut r = Reader::new(&[0xc1]);
        assert!(matches!(r.skip_value(), Err(WireError::Type { .. })));
        let mut r = Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.skip_value(), Err(WireError::Truncated { .. })));
    }

    #[test]
    fn extra_keys_nesting_is_bounded() {
        let mut keys = vec![0x91];
        keys.extend(std::iter::repeat_n(0x91, MAX_EXTRA_KEY_DEPTH + 2));
        keys.push(0x01);
        assert!(matches!(
            Reader::new(&keys).extra_keys(),
            Err(WireError::TooDeep { .. })
        ));
        let keys = [0x93, 0xc0, 0x92, 0xa1, b'a', 0xff, 0xc0];
        assert_eq!(
            Reader::new(&keys).extra_keys(),
            Ok(ExtraKeys::PerBlock(vec![
                None,
                Some(vec![ExtraKey::Str("a".into()), ExtraKey::Int(-1)].into_boxed_slice()),
                None,
            ]))
        );
    }
}
