//! A faithful stand-in for a vLLM pod, for tests and benchmarks without GPUs.
//!
//! [`engine`] is the pod's core: a pure, deterministic state machine (no I/O, no
//! clocks) that models vLLM v1's paged KV cache with automatic prefix caching,
//! its continuous-batching scheduler and a calibrated step time. Drivers feed it
//! time: a real-time server, or a discrete-event benchmark in virtual time.

pub mod engine;
mod kv_cache;

pub use engine::{
    BatchStats, EngineEvent, KvChange, ParamsError, PodEngine, PodMetrics, PodParams, RequestId,
    RequestSummary, SimRequest, StepOutput, SubmitError,
};
