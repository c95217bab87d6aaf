//! Wire codec for vLLM's KV events, for every release 0.10.0–0.33.0
//! (docs: vllm-kv-events.md §2–§4, §8).
//!
//! * `frames`: the ZeroMQ frames of the PUB and replay (ROUTER) sockets, and topics.
//! * `decode`: a msgpack `KVEventBatch` payload → [`EventBatch`], in one pass.
//! * `encode`: events → the bytes a given release's publisher writes.
//!
//! This module holds what the three share: the event types, the errors, and the
//! index key of a wire hash.

mod decode;
mod encode;
mod frames;

pub use decode::{decode_batch, decode_batch_into};
pub use encode::{EventEncoder, OutEvent, WireHash};
pub use frames::{
    parse_pub_frames, parse_replay_frames, parse_topic, replay_request, EventMessage, ReplayFrame,
    REPLAY_END_SEQ, TOPIC_PREFIX,
};

const TAG_STORED: &str = "BlockStored";
const TAG_REMOVED: &str = "BlockRemoved";
const TAG_ALL_CLEARED: &str = "AllBlocksCleared";
const TAG_KEY: &str = "type";

/// Where the KV cache blocks of an event live.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Medium {
    /// `"GPU"`, or no medium at all (releases before 0.10.2, or nil).
    #[default]
    Gpu,
    /// `"CPU"` (offload tier, 0.26+).
    Cpu,
    /// Any other tier, e.g. `"FS"`, `"OBJ"`, `"STORAGE"`.
    Other(Box<str>),
}

impl Medium {
    fn from_wire(name: &str) -> Self {
        match name {
            "GPU" => Self::Gpu,
            "CPU" => Self::Cpu,
            other => Self::Other(other.into()),
        }
    }

    /// The name vLLM puts on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Gpu => "GPU",
            Self::Cpu => "CPU",
            Self::Other(name) => name,
        }
    }
}

/// One element of a block's extra-key tuple, as published in `extra_keys`
/// (0.17+): LoRA name, multimodal identifier and offset, cache salt, prompt
/// embeds digest (docs §6.4).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExtraKey {
    Nil,
    /// A negative integer (non-negative values decode as [`ExtraKey::UInt`]).
    Int(i64),
    UInt(u64),
    Str(Box<str>),
    Bytes(Box<[u8]>),
    Tuple(Box<[ExtraKey]>),
}

/// The `extra_keys` field of a BlockStored event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExtraKeys {
    /// Not published: releases before 0.17, or nil.
    #[default]
    Absent,
    /// A list with no key for any block (`[nil, …]`), what vLLM's block pool
    /// publishes for plain requests. Decoding it allocates nothing.
    Plain,
    /// One entry per block: the key tuple used in its hash, or `None`.
    PerBlock(Vec<Option<Box<[ExtraKey]>>>),
}

/// A run of consecutive full blocks of one request, just cached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStored {
    /// Index keys of the blocks, in order (see [`wire_hash_key`]).
    pub block_hashes: Vec<u64>,
    /// Index key of the block right before the run; `None` when the run starts
    /// at block 0 of its request.
    pub parent_block_hash: Option<u64>,
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    pub lora_name: Option<String>,
    pub medium: Medium,
    pub extra_keys: ExtraKeys,
    /// KV-cache group (0.20+); `None` before.
    pub group_idx: Option<u32>,
}

/// Blocks evicted (vLLM sends one hash per event).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<u64>,
    pub medium: Medium,
    pub group_idx: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    Stored(BlockStored),
    Removed(BlockRemoved),
    /// The pod reset its prefix cache: drop every block of this publisher.
    AllCleared,
}

/// A decoded `KVEventBatch`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventBatch {
    /// Wall-clock seconds when vLLM built the batch.
    pub ts: f64,
    /// The events that decoded, in wire order.
    pub events: Vec<KvEvent>,
    /// The publisher's data-parallel rank (always sent by vLLM's publisher).
    pub dp_rank: Option<u32>,
    /// Events that were skipped, malformed or unknown; the rest of the batch
    /// is unaffected.
    pub dropped: Vec<EventDecodeError>,
}

/// A msgpack-level fault at a byte offset of the payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("payload ends at byte {at}: {needed} more bytes needed")]
    Truncated { at: usize, needed: usize },
    #[error("byte {at}: expected {expected}, found {found}")]
    Type {
        at: usize,
        expected: &'static str,
        found: &'static str,
    },
    #[error("byte {at}: integer out of range for {expected}")]
    Range { at: usize, expected: &'static str },
    #[error("byte {at}: string is not valid UTF-8")]
    Utf8 { at: usize },
    #[error("byte {at}: extra keys nest deeper than {limit} levels")]
    TooDeep { at: usize, limit: usize },
}

/// Why one event of a batch was skipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not an event: {0}")]
    NotAnEvent(#[source] WireError),
    #[error("event tag: {0}")]
    Tag(#[source] WireError),
    #[error("map event has no \"type\" key")]
    MissingTag,
    #[error("unknown event tag {0:?}")]
    UnknownTag(Box<str>),
    #[error("{tag} array has {len} elements; known releases use {known}")]
    ArrayLength {
        tag: &'static str,
        len: u32,
        known: &'static str,
    },
    #[error("{tag} has no {field}")]
    MissingField {
        tag: &'static str,
        field: &'static str,
    },
    #[error("{tag}.{field}: {source}")]
    Field {
        tag: &'static str,
        field: &'static str,
        #[source]
        source: WireError,
    },
}

/// One skipped event: its position in the batch and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event {index} (payload byte {offset}): {error}")]
pub struct EventDecodeError {
    pub index: usize,
    pub offset: usize,
    pub error: EventError,
}

/// A message or payload that cannot be used at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("batch {part}: {source}")]
    Batch {
        part: &'static str,
        #[source]
        source: WireError,
    },
    #[error("batch array has {len} elements, expected [ts, events, data_parallel_rank]")]
    BatchShape { len: u32 },
    #[error(
        "event {index} is not valid msgpack, the rest of the batch cannot be located: {source}"
    )]
    EventExtent {
        index: usize,
        #[source]
        source: WireError,
    },
    #[error("{trailing} bytes follow the batch")]
    TrailingBytes { trailing: usize },
    #[error("{socket} message has {got} frames, expected {expected}")]
    FrameCount {
        socket: &'static str,
        got: usize,
        expected: &'static str,
    },
    #[error("{socket} sequence frame has {len} bytes, expected 8")]
    SeqFrame { socket: &'static str, len: usize },
    #[error("replay message starts with a {len}-byte frame, expected the empty DEALER delimiter")]
    ReplayDelimiter { len: usize },
}

/// The index key of a hash as it appears on the wire: the last 8 bytes of the
/// big-endian value (docs §6.5). Raw digests (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`)
/// and int hashes of the same block give the same key.
pub fn wire_hash_key(digest: &[u8]) -> u64 {
    digest
        .iter()
        .skip(digest.len().saturating_sub(8))
        .fold(0u64, |key, &b| (key << 8) | u64::from(b))
}
