//! KV-cache events published by vLLM pods (docs: vllm-kv-events.md §2–§5).
//!
//! * `codec`: ZeroMQ frames and msgpack payloads ↔ events.
//! * `subscriber`: the SUB sockets (kvgate binds, or connects to each pod).
//! * `tracker`: per-publisher sequence state: gaps, replay, restarts, duplicates.
//! * `replay`: the DEALER client of a pod's replay ROUTER.
//! * `parity`: recomputes announced block hashes to catch mismatched settings.
//! * `ingest`: applies batches to the block index and sets each pod's trust.
//! * `service`: the Pingora background service that runs it all.

pub mod codec;
pub mod ingest;
pub mod parity;
pub mod replay;
pub mod service;
pub mod stats;
pub mod subscriber;
pub mod tracker;

pub use codec::{
    decode_batch, decode_batch_into, parse_pub_frames, parse_replay_frames, parse_topic,
    replay_request, wire_hash_key, BlockRemoved, BlockStored, DecodeError, EventBatch,
    EventDecodeError, EventEncoder, EventError, EventMessage, ExtraKey, ExtraKeys, KvEvent, Medium,
    OutEvent, ReplayFrame, WireError, WireHash, REPLAY_END_SEQ, TOPIC_PREFIX,
};
pub use ingest::{
    IngestConfig, Ingestor, ModelEvents, PodHandover, PublisherHandover, ReplayDone, ReplayRequest,
};
pub use parity::{ParityChecker, ParityMismatch, ParityOutcome};
pub use replay::{ReplayClient, ReplayError, ReplayReply};
pub use service::{EventServiceError, KvEventService};
pub use stats::{EventStats, GlobalEventStats, ParityVerdict, PodEventCounts, PodEventStats};
pub use subscriber::{
    endpoint_for_rank, BindSource, ConnectSource, EventSource, Inbound, Origin, PodDelta,
    PublisherEndpoint, SubscriberError,
};
pub use tracker::{
    Action, ClearReason, ReplayEnd, ReplayToken, ReplayVerdict, Replayed, SeqTracker, StreamMark,
    SyncState, TrackerConfig, Verdict,
};
