//! KV-cache events published by vLLM pods (docs: vllm-kv-events.md §2–§5).
//!
//! `codec` turns ZeroMQ frames and msgpack payloads into events and back.

pub mod codec;

pub use codec::{
    decode_batch, decode_batch_into, parse_pub_frames, parse_replay_frames, parse_topic,
    replay_request, wire_hash_key, BlockRemoved, BlockStored, DecodeError, EventBatch,
    EventDecodeError, EventEncoder, EventError, EventMessage, ExtraKey, ExtraKeys, KvEvent, Medium,
    OutEvent, ReplayFrame, WireError, WireHash, REPLAY_END_SEQ, TOPIC_PREFIX,
};
