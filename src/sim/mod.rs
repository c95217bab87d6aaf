//! A faithful stand-in for a vLLM pod, for tests and benchmarks without GPUs.
//!
//! [`engine`] is the pod's core: a pure, deterministic state machine (no I/O, no
//! clocks) that models vLLM v1's paged KV cache with automatic prefix caching,
//! its continuous-batching scheduler and a calibrated step time. Drivers feed it
//! time: a real-time server, or a discrete-event benchmark in virtual time.
//!
//! `kvgate sim` ([`cli`]) is the real-time driver: [`pod`] runs each pod's
//! engine against the wall clock as a restartable process stand-in, [`server`]
//! is its OpenAI-compatible HTTP server and [`publisher`] its ZeroMQ KV-event
//! publisher, each shaped like the chosen vLLM release.

pub mod cli;
pub mod engine;
mod kv_cache;
pub mod pod;
pub mod publisher;
pub mod server;

pub use cli::{run, SimArgs, SimError};
pub use engine::{
    BatchStats, EngineEvent, KvChange, KvTransfer, ParamsError, PodEngine, PodMetrics, PodParams,
    RequestId, RequestSummary, SchedulingPolicy, SimRequest, StepOutput, SubmitError,
};
