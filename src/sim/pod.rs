//! One simulated vLLM pod in real time: its process lifecycle and the task
//! that drives its [`PodEngine`].
//!
//! A pod *incarnation* is a process stand-in: a thread with its own
//! single-threaded tokio runtime that serves the pod's HTTP port, runs the
//! engine driver and the KV-event publisher. Killing the pod drops that
//! runtime, which drops every task on it at once: the listener closes,
//! in-flight connections are cut and the ZeroMQ sockets go away, as when a
//! vLLM process dies. A restart starts a fresh incarnation on the same ports
//! with an empty cache and sequence numbers from 0. A supervisor task on the
//! caller's runtime owns the incarnations and carries out lifecycle commands.
//!
//! The driver owns the engine. Requests and aborts reach it over a channel; it
//! plans each step when the step starts, sleeps until the step's end (engine
//! milliseconds scaled to wall time by `time_scale`), then hands out the
//! step's tokens to the requests' streams and publishes its KV events as one
//! batch. Simulated time advances by the engine's own step ends, so timer
//! jitter delays delivery but never distorts the model.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashbrown::HashMap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::engine::{
    EngineEvent, KvChange, KvTransfer, PodEngine, PodMetrics, PodParams, RequestId, RequestSummary,
    SimRequest, StepOutput, SubmitError,
};
use super::publisher::{
    EventFaults, PubEndpoint, Publisher, PublisherConfig, PublisherError, PublisherStats,
};
use super::server::{self, PodContext, SimModel};
use crate::events::{EventEncoder, ExtraKey, ExtraKeys, OutEvent, WireHash};
use crate::hash::{BlockHash, Digest};

/// How long a pod that was told to die over its own HTTP port keeps running,
/// so that its answer to that request still gets out.
const SELF_KILL_GRACE: Duration = Duration::from_millis(50);

/// How long a restart keeps trying to re-bind ports still held by the old
/// incarnation's sockets.
const REBIND_PATIENCE: Duration = Duration::from_secs(5);
const REBIND_INTERVAL: Duration = Duration::from_millis(50);

/// vLLM's bucket bounds for `vllm:time_to_first_token_seconds`.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Maps the engine's milliseconds to wall time: `time_scale` wall seconds per
/// simulated second, from the incarnation's start.
#[derive(Clone, Copy, Debug)]
pub struct SimClock {
    origin: Instant,
    origin_unix_s: f64,
    time_scale: f64,
}

impl SimClock {
    /// `time_scale` must be finite and > 0 (the CLI checks).
    pub fn start(time_scale: f64) -> Self {
        let origin_unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        Self {
            origin: Instant::now(),
            origin_unix_s,
            time_scale,
        }
    }

    /// The simulated time now, in engine milliseconds.
    pub fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1e3 / self.time_scale
    }

    /// The wall instant of simulated time `ms`.
    pub fn instant_at(&self, ms: f64) -> Instant {
        let wall = Duration::try_from_secs_f64((ms * self.time_scale / 1e3).max(0.0))
            .unwrap_or(Duration::from_secs(86_400 * 365));
        self.origin + wall
    }

    /// Unix seconds at simulated time `ms` (the `ts` of a batch built then).
    pub fn unix_at(&self, ms: f64) -> f64 {
        self.origin_unix_s + ms * self.time_scale / 1e3
    }

    /// Simulated milliseconds as simulated seconds (what a real pod reports).
    pub fn seconds(ms: f64) -> f64 {
        ms / 1e3
    }
}

/// A LoRA adapter as events name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventLora {
    pub int_id: i64,
    pub name: Arc<str>,
}

/// A tokenized, hashed request for the pod.
#[derive(Clone, Debug)]
pub struct PodRequest {
    pub tokens: Arc<[u32]>,
    /// The prompt's full-block hashes, in order.
    pub hashes: Arc<[BlockHash]>,
    pub max_tokens: u32,
    pub lora: Option<EventLora>,
    pub cache_salt: Option<Arc<str>>,
    pub kv_transfer: KvTransfer,
    /// The body's `priority` (vLLM: lower is served first; 0 when absent).
    pub priority: i32,
}

/// What a request's stream carries, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamItem {
    /// Output token `index` (0 = first) was sampled.
    Token { index: u32 },
    /// The last token was sampled; the request has left the pod.
    Finished(RequestSummary),
}

/// A request the engine accepted.
#[derive(Debug)]
pub struct Submission {
    pub id: RequestId,
    pub stream: mpsc::UnboundedReceiver<StreamItem>,
    pub guard: AbortOnDrop,
}

/// Aborts the request in the engine when dropped before [`AbortOnDrop::disarm`]:
/// a client that goes away frees its slot and blocks, as in vLLM.
#[derive(Debug)]
pub struct AbortOnDrop {
    id: RequestId,
    commands: mpsc::UnboundedSender<PodCommand>,
    armed: bool,
}

impl AbortOnDrop {
    /// The request finished; nothing to abort.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            // A closed channel means the engine is gone with the request.
            let _ = self.commands.send(PodCommand::Abort(self.id));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Rejected(#[from] SubmitError),
    #[error("the pod's engine is not running")]
    EngineGone,
}

/// Counters a scrape reads from the driver.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSnapshot {
    pub metrics: PodMetrics,
    /// `vllm:lora_requests_info`: adapter slots and every adapter state seen so far, when
    /// adapter slots are modelled.
    pub lora: Option<(u32, Vec<LoraSeries>)>,
    pub paused: bool,
    /// Per-bucket (not cumulative) counts of [`TTFT_BUCKETS`], plus +Inf last.
    pub ttft_bucket_counts: Vec<u64>,
    /// Sum of the TTFTs, simulated seconds.
    pub ttft_sum_s: f64,
}

/// Series of `vllm:lora_requests_info` a pod keeps. vLLM keeps every one it ever set; the
/// simulator drops the stalest past this, so a long run does not grow without bound.
const LORA_SERIES_KEPT: usize = 64;

/// One series of `vllm:lora_requests_info`: an adapter state and when it was last seen
/// (vLLM sets the series of the current state to the current time).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoraSeries {
    /// Adapters of running requests, comma-separated.
    pub running: String,
    /// Adapters of waiting requests, comma-separated.
    pub waiting: String,
    pub set_at_unix_s: f64,
}

#[derive(Debug)]
pub enum PodCommand {
    Submit {
        id: RequestId,
        request: PodRequest,
        stream: mpsc::UnboundedSender<StreamItem>,
        accepted: oneshot::Sender<Result<(), SubmitError>>,
    },
    Abort(RequestId),
    Snapshot(oneshot::Sender<PodSnapshot>),
    /// Replies whether the cache was cleared (only when no request holds blocks).
    ResetPrefixCache(oneshot::Sender<bool>),
    Pause(bool),
}

/// The way into a running pod engine. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PodHandle {
    commands: mpsc::UnboundedSender<PodCommand>,
    next_id: Arc<AtomicU64>,
}

impl PodHandle {
    pub async fn submit(&self, request: PodRequest) -> Result<Submission, PodError> {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (stream_tx, stream) = mpsc::unbounded_channel();
        let (accepted, reply) = oneshot::channel();
        self.commands
            .send(PodCommand::Submit {
                id,
                request,
                stream: stream_tx,
                accepted,
            })
            .map_err(|_| PodError::EngineGone)?;
        // Arm the guard before waiting: a client gone during the wait aborts.
        let guard = AbortOnDrop {
            id,
            commands: self.commands.clone(),
            armed: true,
        };
        match reply.await {
            Ok(Ok(())) => Ok(Submission { id, stream, guard }),
            Ok(Err(rejected)) => {
                let mut guard = guard;
                guard.disarm();
                Err(PodError::Rejected(rejected))
            }
            Err(_) => Err(PodError::EngineGone),
        }
    }

    pub async fn snapshot(&self) -> Result<PodSnapshot, PodError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(PodCommand::Snapshot(tx))
            .map_err(|_| PodError::EngineGone)?;
        rx.await.map_err(|_| PodError::EngineGone)
    }

    pub async fn reset_prefix_cache(&self) -> Result<bool, PodError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(PodCommand::ResetPrefixCache(tx))
            .map_err(|_| PodError::EngineGone)?;
        rx.await.map_err(|_| PodError::EngineGone)
    }

    pub fn pause(&self, paused: bool) -> Result<(), PodError> {
        self.commands
            .send(PodCommand::Pause(paused))
            .map_err(|_| PodError::EngineGone)
    }
}

/// How a pod's events go on the wire.
#[derive(Clone, Copy, Debug)]
pub struct WireForm {
    pub encoder: EventEncoder,
    /// 64-bit ints (default) or raw digest bytes (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`).
    pub int_hashes: bool,
}

struct LiveRequest {
    request: PodRequest,
    stream: mpsc::UnboundedSender<StreamItem>,
}

/// The engine's task. See the module docs.
struct Driver {
    engine: PodEngine,
    clock: SimClock,
    commands: mpsc::UnboundedReceiver<PodCommand>,
    live: HashMap<RequestId, LiveRequest>,
    events: Option<EventSink>,
    out: StepOutput,
    /// The planned step's end; its outcomes wait in `out` until then.
    pending_end_ms: Option<f64>,
    /// The planned step's KV batch, published at its end.
    pending_batch: Option<Bytes>,
    /// Batches made while a step was pending (a cache reset), published after it.
    after_pending: Vec<Bytes>,
    /// Set when the engine had work but could schedule none; cleared by any
    /// command. Stops a busy loop until something changes or time passes.
    stalled_until_ms: Option<f64>,
    paused: bool,
    /// When the engine was last resumed: no step starts before it, so a
    /// paused engine does not catch up on the time it was held.
    resumed_at_ms: f64,
    ttft_bucket_counts: Vec<u64>,
    ttft_sum_s: f64,
    lora_series: Vec<LoraSeries>,
}

impl Driver {
    fn new(engine: PodEngine, clock: SimClock, events: Option<EventSink>) -> (Self, PodHandle) {
        let (tx, commands) = mpsc::unbounded_channel();
        let handle = PodHandle {
            commands: tx,
            next_id: Arc::new(AtomicU64::new(0)),
        };
        let driver = Self {
            engine,
            clock,
            commands,
            live: HashMap::new(),
            events,
            out: StepOutput::default(),
            pending_end_ms: None,
            pending_batch: None,
            after_pending: Vec::new(),
            stalled_until_ms: None,
            paused: false,
            resumed_at_ms: 0.0,
            ttft_bucket_counts: vec![0; TTFT_BUCKETS.len() + 1],
            ttft_sum_s: 0.0,
            lora_series: Vec::new(),
        };
        (driver, handle)
    }

    async fn run(mut self) {
        loop {
            let wake_ms = match self.pending_end_ms {
                Some(end) => Some(end),
                None if self.paused => None,
                None => match self.next_step_time() {
                    Some(at) if self.clock.instant_at(at) <= Instant::now() => {
                        self.plan_step(at);
                        continue;
                    }
                    other => other,
                },
            };
            let wake = wake_ms.map(|ms| self.clock.instant_at(ms));
            // Unbiased: neither a flood of requests nor an engine running
            // behind the wall clock can starve the other branch.
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => return,
                },
                () = sleep_until(wake) => {
                    if self.pending_end_ms.take().is_some() {
                        self.deliver_step();
                    }
                }
            }
        }
    }

    /// When the next step can start: when the engine has work, but not
    /// before the last resume nor while it is stalled. Steps start at engine
    /// time, not at the (later, jittery) wall time the driver woke up.
    fn next_step_time(&self) -> Option<f64> {
        let at = self.engine.next_wakeup()?.max(self.resumed_at_ms);
        Some(match self.stalled_until_ms {
            Some(until) => at.max(until),
            None => at,
        })
    }

    fn plan_step(&mut self, at_ms: f64) {
        match self.engine.step(at_ms, &mut self.out) {
            Some(end_ms) => {
                self.stalled_until_ms = None;
                self.pending_end_ms = Some(end_ms);
                let ts = self.clock.unix_at(end_ms);
                self.pending_batch = match &mut self.events {
                    Some(sink) if !self.out.kv_events.is_empty() => {
                        sink.encode(&self.out.kv_events, &self.live, ts)
                    }
                    _ => None,
                };
            }
            None => {
                // Nothing fit (e.g. a step right after a preemption): try
                // again one base step later unless a command changes things.
                self.stalled_until_ms = Some(at_ms + self.engine.params().step_base_ms);
            }
        }
    }

    fn deliver_step(&mut self) {
        let events = std::mem::take(&mut self.out.events);
        for event in &events {
            match event {
                EngineEvent::Token { id, index } => {
                    let delivered = self.live.get(id).is_some_and(|live| {
                        live.stream
                            .send(StreamItem::Token { index: *index })
                            .is_ok()
                    });
                    if !delivered && self.live.remove(id).is_some() {
                        // The client went away: free its slot like vLLM's abort.
                        self.engine.abort(*id);
                    }
                }
                EngineEvent::Finished(summary) => {
                    self.record_ttft(summary);
                    if let Some(live) = self.live.remove(&summary.id) {
                        let _ = live.stream.send(StreamItem::Finished(summary.clone()));
                    }
                }
                EngineEvent::Preempted { .. } => {}
            }
        }
        self.out.events = events;
        if let Some(sink) = &self.events {
            if let Some(batch) = self.pending_batch.take() {
                sink.publisher.publish(batch);
            }
            for batch in self.after_pending.drain(..) {
                sink.publisher.publish(batch);
            }
        }
    }

    fn record_ttft(&mut self, summary: &RequestSummary) {
        let ttft_s = SimClock::seconds(summary.ttft_ms());
        let bucket = TTFT_BUCKETS
            .iter()
            .position(|&bound| ttft_s <= bound)
            .unwrap_or(TTFT_BUCKETS.len());
        if let Some(count) = self.ttft_bucket_counts.get_mut(bucket) {
            *count += 1;
        }
        self.ttft_sum_s += ttft_s;
    }

    /// Sets the series of the current adapter state to now, as vLLM does on every step,
    /// and returns them all.
    fn lora_snapshot(&mut self) -> Option<(u32, Vec<LoraSeries>)> {
        let info = self.engine.lora_info()?;
        let now = self.clock.unix_at(self.clock.now_ms());
        let running = info.running.join(",");
        let waiting = info.waiting.join(",");
        match self
            .lora_series
            .iter_mut()
            .find(|s| s.running == running && s.waiting == waiting)
        {
            Some(series) => series.set_at_unix_s = now,
            None => {
                if self.lora_series.len() >= LORA_SERIES_KEPT {
                    if let Some(stalest) = self
                        .lora_series
                        .iter()
                        .enumerate()
                        .min_by(|a, b| a.1.set_at_unix_s.total_cmp(&b.1.set_at_unix_s))
                        .map(|(i, _)| i)
                    {
                        self.lora_series.swap_remove(stalest);
                    }
                }
                self.lora_series.push(LoraSeries {
                    running,
                    waiting,
                    set_at_unix_s: now,
                });
            }
        }
        Some((info.max_loras, self.lora_series.clone()))
    }

    fn on_command(&mut self, command: PodCommand) {
        self.stalled_until_ms = None;
        match command {
            PodCommand::Submit {
                id,
                request,
                stream,
                accepted,
            } => {
                let sim_request = SimRequest {
                    id,
                    block_keys: request.hashes.iter().map(|hash| hash.key).collect(),
                    prompt_tokens: u32::try_from(request.tokens.len()).unwrap_or(u32::MAX),
                    max_tokens: request.max_tokens,
                    lora: request.lora.as_ref().map(|lora| Arc::clone(&lora.name)),
                    kv_transfer: request.kv_transfer,
                    priority: request.priority,
                };
                let result = self.engine.submit(self.clock.now_ms(), sim_request);
                if result.is_ok() {
                    self.live.insert(id, LiveRequest { request, stream });
                }
                // A client gone already is aborted by its guard's command.
                let _ = accepted.send(result);
            }
            PodCommand::Abort(id) => {
                if self.live.remove(&id).is_some() {
                    self.engine.abort(id);
                }
            }
            PodCommand::Snapshot(reply) => {
                let lora = self.lora_snapshot();
                let _ = reply.send(PodSnapshot {
                    metrics: self.engine.metrics(),
                    lora,
                    paused: self.paused,
                    ttft_bucket_counts: self.ttft_bucket_counts.clone(),
                    ttft_sum_s: self.ttft_sum_s,
                });
            }
            PodCommand::ResetPrefixCache(reply) => {
                let mut changes = Vec::new();
                let cleared = self.engine.reset_prefix_cache(&mut changes);
                if let Some(sink) = &mut self.events {
                    let ts = self.clock.unix_at(self.clock.now_ms());
                    if let Some(batch) = sink.encode(&changes, &self.live, ts) {
                        if self.pending_end_ms.is_some() {
                            self.after_pending.push(batch);
                        } else {
                            sink.publisher.publish(batch);
                        }
                    }
                }
                let _ = reply.send(cleared);
            }
            PodCommand::Pause(paused) => {
                if self.paused && !paused {
                    self.resumed_at_ms = self.clock.now_ms();
                }
                self.paused = paused;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Turns the engine's cache changes into vLLM event batches for one publisher.
struct EventSink {
    publisher: Publisher,
    wire: WireForm,
    block_size: u32,
    /// The full digest of every cached key, for BlockRemoved in raw-bytes
    /// mode (the engine reports evictions by key only).
    cached: HashMap<u64, Digest>,
    hashes: Vec<HashValue>,
    planned: Vec<Planned>,
    payload: Vec<u8>,
}

#[derive(Clone, Copy)]
enum HashValue {
    Digest(Digest),
    /// An evicted key whose digest is unknown (never happens while the engine
    /// and this sink agree); publishable only as an int.
    KeyOnly(u64),
}

enum Planned {
    Stored {
        hashes: Range<usize>,
        parent: Option<usize>,
        tokens: Arc<[u32]>,
        token_range: Range<usize>,
        lora: Option<EventLora>,
        extra_keys: ExtraKeys,
    },
    Removed {
        hash: usize,
    },
    Cleared,
}

impl EventSink {
    fn new(publisher: Publisher, wire: WireForm, block_size: u32) -> Self {
        Self {
            publisher,
            wire,
            block_size,
            cached: HashMap::new(),
            hashes: Vec::new(),
            planned: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Encodes one batch, or none when no change can be published.
    fn encode(
        &mut self,
        changes: &[KvChange],
        live: &HashMap<RequestId, LiveRequest>,
        ts: f64,
    ) -> Option<Bytes> {
        self.hashes.clear();
        self.planned.clear();
        for change in changes {
            match change {
                KvChange::BlockStored {
                    request,
                    first_block,
                    blocks,
                    ..
                } => self.plan_stored(live.get(request), *request, *first_block, *blocks),
                KvChange::BlockRemoved { key } => {
                    let value = match self.cached.remove(key) {
                        Some(digest) => HashValue::Digest(digest),
                        None => HashValue::KeyOnly(*key),
                    };
                    if matches!(value, HashValue::KeyOnly(_)) && !self.wire.int_hashes {
                        tracing::warn!(key, "evicted block has no known digest; event left out");
                        continue;
                    }
                    self.hashes.push(value);
                    self.planned.push(Planned::Removed {
                        hash: self.hashes.len() - 1,
                    });
                }
                KvChange::AllCleared => {
                    self.cached.clear();
                    self.planned.push(Planned::Cleared);
                }
            }
        }
        if self.planned.is_empty() {
            return None;
        }
        let int_hashes = self.wire.int_hashes;
        let wire: Vec<WireHash<'_>> = self
            .hashes
            .iter()
            .map(|value| match value {
                HashValue::Digest(digest) if int_hashes => WireHash::Int(digest.key()),
                HashValue::Digest(digest) => WireHash::Bytes(digest.as_bytes()),
                HashValue::KeyOnly(key) => WireHash::Int(*key),
            })
            .collect();
        let events: Vec<OutEvent<'_>> = self
            .planned
            .iter()
            .filter_map(|planned| match planned {
                Planned::Stored {
                    hashes,
                    parent,
                    tokens,
                    token_range,
                    lora,
                    extra_keys,
                } => Some(OutEvent::Stored {
                    block_hashes: wire.get(hashes.clone())?,
                    parent: parent.and_then(|index| wire.get(index).copied()),
                    token_ids: tokens.get(token_range.clone())?,
                    block_size: self.block_size,
                    lora_id: lora.as_ref().map(|lora| lora.int_id),
                    lora_name: lora.as_ref().map(|lora| &*lora.name),
                    medium: "GPU",
                    extra_keys,
                }),
                Planned::Removed { hash } => Some(OutEvent::Removed {
                    block_hashes: wire.get(*hash..*hash + 1)?,
                    medium: "GPU",
                }),
                Planned::Cleared => Some(OutEvent::AllCleared),
            })
            .collect();
        self.wire
            .encoder
            .encode_batch(ts, &events, 0, &mut self.payload);
        Some(Bytes::copy_from_slice(&self.payload))
    }

    fn plan_stored(
        &mut self,
        live: Option<&LiveRequest>,
        id: RequestId,
        first_block: usize,
        blocks: usize,
    ) {
        let Some(live) = live else {
            tracing::warn!(%id, "stored blocks of an unknown request; event left out");
            return;
        };
        let request = &live.request;
        let block_size = self.block_size as usize;
        let Some(run) = request.hashes.get(first_block..first_block + blocks) else {
            tracing::warn!(%id, first_block, blocks, "stored blocks beyond the request's hashes");
            return;
        };
        let parent = match first_block.checked_sub(1) {
            Some(index) => {
                let Some(hash) = request.hashes.get(index) else {
                    return;
                };
                self.hashes.push(HashValue::Digest(hash.digest));
                Some(self.hashes.len() - 1)
            }
            None => None,
        };
        let start = self.hashes.len();
        for hash in run {
            self.cached.insert(hash.key, hash.digest);
            self.hashes.push(HashValue::Digest(hash.digest));
        }
        self.planned.push(Planned::Stored {
            hashes: start..self.hashes.len(),
            parent,
            tokens: Arc::clone(&request.tokens),
            token_range: first_block * block_size..(first_block + blocks) * block_size,
            lora: request.lora.clone(),
            extra_keys: published_extra_keys(request, first_block, blocks),
        });
    }
}

/// `extra_keys` as vLLM's block pool publishes it (0.17+): per block, the
/// untagged key tuple (LoRA name, then the cache salt on block 0), or nil.
fn published_extra_keys(request: &PodRequest, first_block: usize, blocks: usize) -> ExtraKeys {
    if request.lora.is_none() && request.cache_salt.is_none() {
        return ExtraKeys::Plain;
    }
    let per_block = (first_block..first_block + blocks)
        .map(|block| {
            let mut keys = Vec::with_capacity(2);
            if let Some(lora) = &request.lora {
                keys.push(ExtraKey::Str(Box::from(&*lora.name)));
            }
            if let Some(salt) = request.cache_salt.as_ref().filter(|_| block == 0) {
                keys.push(ExtraKey::Str(Box::from(&**salt)));
            }
            (!keys.is_empty()).then(|| keys.into_boxed_slice())
        })
        .collect();
    ExtraKeys::PerBlock(per_block)
}

// ---------------------------------------------------------------------------
// Process lifecycle
// ---------------------------------------------------------------------------

/// Everything one pod needs to start an incarnation.
#[derive(Clone, Debug)]
pub struct PodLaunch {
    pub index: usize,
    /// The HTTP address; port 0 picks one on first start, kept for restarts.
    pub http: SocketAddr,
    pub topic: String,
    pub events: Option<PublisherConfig>,
    pub params: PodParams,
    pub time_scale: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PodStartError {
    #[error("pod {index}: binding HTTP on {addr}: {source}")]
    BindHttp {
        index: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pod {index}: {source}")]
    Events {
        index: usize,
        source: PublisherError,
    },
    #[error("pod {index}: starting its runtime: {source}")]
    Runtime {
        index: usize,
        source: std::io::Error,
    },
    #[error("pod {index}: invalid pod parameters: {source}")]
    Params {
        index: usize,
        source: super::engine::ParamsError,
    },
    #[error("pod {index}: its process thread ended during start-up")]
    Vanished { index: usize },
}

/// Where a pod's lifecycle stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessState {
    Running,
    /// Killed, or between the two halves of a restart.
    Down,
}

#[derive(Debug)]
enum Lifecycle {
    /// Go down after `grace`, stay down for `down`, come back fresh.
    Restart {
        grace: Duration,
        down: Duration,
    },
    /// Go down after `grace` until revived.
    Kill {
        grace: Duration,
    },
    Revive,
    Shutdown(oneshot::Sender<()>),
}

/// A pod's public face: where it is and how it is doing.
#[derive(Debug)]
pub struct PodStatus {
    pub index: usize,
    pub http: SocketAddr,
    pub topic: String,
    pub pub_endpoint: Option<String>,
    pub replay_endpoint: Option<String>,
    state: Mutex<ProcessState>,
    incarnation: AtomicU64,
    engine: Mutex<Option<PodHandle>>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusView {
    pub index: usize,
    pub http: SocketAddr,
    pub topic: String,
    pub pub_endpoint: Option<String>,
    pub replay_endpoint: Option<String>,
    pub state: ProcessState,
    /// How many times the pod has started (1 for the first start).
    pub incarnation: u64,
}

impl PodStatus {
    pub fn view(&self) -> PodStatusView {
        PodStatusView {
            index: self.index,
            http: self.http,
            topic: self.topic.clone(),
            pub_endpoint: self.pub_endpoint.clone(),
            replay_endpoint: self.replay_endpoint.clone(),
            state: *self.state.lock(),
            incarnation: self.incarnation.load(Ordering::Relaxed),
        }
    }

    /// The running engine, if the pod is up.
    pub fn engine(&self) -> Option<PodHandle> {
        self.engine.lock().clone()
    }
}

/// Controls one pod's lifecycle. Cheap to clone; commands are carried out in
/// order by the pod's supervisor.
#[derive(Clone, Debug)]
pub struct PodControl {
    commands: mpsc::UnboundedSender<Lifecycle>,
    status: Arc<PodStatus>,
    faults: Arc<EventFaults>,
}

impl PodControl {
    pub fn status(&self) -> &Arc<PodStatus> {
        &self.status
    }

    pub fn faults(&self) -> &Arc<EventFaults> {
        &self.faults
    }

    /// A new process after `down`: empty cache, sequence numbers from 0.
    pub fn restart(&self, down: Duration) {
        self.send(Lifecycle::Restart {
            grace: Duration::ZERO,
            down,
        });
    }

    /// Down (connection refused, sockets closed) until [`PodControl::revive`].
    pub fn kill(&self) {
        self.send(Lifecycle::Kill {
            grace: Duration::ZERO,
        });
    }

    pub fn revive(&self) {
        self.send(Lifecycle::Revive);
    }

    /// Stops the pod for good; returns once it is down.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Lifecycle::Shutdown(tx));
        let _ = rx.await;
    }

    fn send(&self, command: Lifecycle) {
        if self.commands.send(command).is_err() {
            tracing::warn!(pod = self.status.index, "pod supervisor has stopped");
        }
    }
}

/// Starts a pod's first incarnation, on `listener`, and its supervisor (on the
/// current runtime). Fails if a port cannot be bound or the parameters are
/// invalid. `launch.http` must be the listener's address.
pub async fn launch(
    mut launch: PodLaunch,
    listener: std::net::TcpListener,
    model: Arc<SimModel>,
) -> Result<PodControl, PodStartError> {
    let index = launch.index;
    let faults = Arc::new(EventFaults::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let started = start_incarnation(&launch, &model, &faults, listener, tx.clone()).await?;
    // Later incarnations bind exactly what the first one got.
    if let Some(events) = &mut launch.events {
        if let PubEndpoint::Bind(_) = events.endpoint {
            events.endpoint = PubEndpoint::Bind(started.pub_endpoint.clone());
        }
        if events.replay_bind.is_some() {
            events.replay_bind = started.replay_endpoint.clone();
        }
    }
    let status = Arc::new(PodStatus {
        index,
        http: launch.http,
        topic: launch.topic.clone(),
        pub_endpoint: launch.events.as_ref().map(|_| started.pub_endpoint.clone()),
        replay_endpoint: started.replay_endpoint.clone(),
        state: Mutex::new(ProcessState::Running),
        incarnation: AtomicU64::new(1),
        engine: Mutex::new(Some(started.engine.clone())),
    });
    let control = PodControl {
        commands: tx,
        status: Arc::clone(&status),
        faults: Arc::clone(&faults),
    };
    let supervisor = Supervisor {
        launch,
        model,
        control: control.clone(),
        current: Some(started.incarnation),
    };
    tokio::spawn(supervisor.run(rx));
    Ok(control)
}

/// Binds a pod's HTTP port (port 0: the OS picks one).
pub fn bind_http(index: usize, addr: SocketAddr) -> Result<std::net::TcpListener, PodStartError> {
    let bind_error = |source| PodStartError::BindHttp {
        index,
        addr,
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

struct Supervisor {
    launch: PodLaunch,
    model: Arc<SimModel>,
    control: PodControl,
    current: Option<Incarnation>,
}

impl Supervisor {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Lifecycle>) {
        while let Some(command) = commands.recv().await {
            match command {
                Lifecycle::Restart { grace, down } => {
                    tokio::time::sleep(grace).await;
                    self.stop().await;
                    tokio::time::sleep(down).await;
                    self.start().await;
                }
                Lifecycle::Kill { grace } => {
                    tokio::time::sleep(grace).await;
                    self.stop().await;
                }
                Lifecycle::Revive => {
                    if self.current.is_none() {
                        self.start().await;
                    }
                }
                Lifecycle::Shutdown(done) => {
                    self.stop().await;
                    let _ = done.send(());
                    return;
                }
            }
        }
        self.stop().await;
    }

    async fn stop(&mut self) {
        let status = &self.control.status;
        *status.engine.lock() = None;
        *status.state.lock() = ProcessState::Down;
        if let Some(incarnation) = self.current.take() {
            let _ = incarnation.stop.send(());
            let _ = incarnation.exited.await;
            tracing::info!(pod = self.launch.index, "pod is down");
        }
    }

    /// Starts a fresh incarnation, retrying while the old sockets release
    /// their ports.
    async fn start(&mut self) {
        let index = self.launch.index;
        let deadline = Instant::now() + REBIND_PATIENCE;
        loop {
            let attempt = match bind_http(index, self.launch.http) {
                Ok(listener) => {
                    start_incarnation(
                        &self.launch,
                        &self.model,
                        &self.control.faults,
                        listener,
                        self.control.commands.clone(),
                    )
                    .await
                }
                Err(error) => Err(error),
            };
            match attempt {
                Ok(started) => {
                    let status = &self.control.status;
                    *status.engine.lock() = Some(started.engine);
                    *status.state.lock() = ProcessState::Running;
                    let incarnation = status.incarnation.fetch_add(1, Ordering::Relaxed) + 1;
                    self.current = Some(started.incarnation);
                    tracing::info!(pod = index, incarnation, "pod is up");
                    return;
                }
                Err(error) if Instant::now() < deadline => {
                    tracing::debug!(%error, "pod restart: retrying");
                    tokio::time::sleep(REBIND_INTERVAL).await;
                }
                Err(error) => {
                    tracing::error!(%error, "pod could not restart; it stays down");
                    return;
                }
            }
        }
    }
}

struct Incarnation {
    stop: oneshot::Sender<()>,
    exited: oneshot::Receiver<()>,
}

struct Started {
    incarnation: Incarnation,
    engine: PodHandle,
    pub_endpoint: String,
    replay_endpoint: Option<String>,
}

struct Ready {
    engine: PodHandle,
    pub_endpoint: String,
    replay_endpoint: Option<String>,
}

async fn start_incarnation(
    launch: &PodLaunch,
    model: &Arc<SimModel>,
    faults: &Arc<EventFaults>,
    listener: std::net::TcpListener,
    lifecycle: mpsc::UnboundedSender<Lifecycle>,
) -> Result<Started, PodStartError> {
    let index = launch.index;
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop, stop_rx) = oneshot::channel();
    let (exited_tx, exited) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| PodStartError::Runtime { index, source })?;
    let launch = launch.clone();
    let model = Arc::clone(model);
    let faults = Arc::clone(faults);
    std::thread::Builder::new()
        .name(format!("sim-pod-{index}"))
        .spawn(move || {
            runtime.block_on(incarnation_main(
                launch, model, faults, listener, lifecycle, ready_tx, stop_rx,
            ));
            // Dropping the runtime drops every task of this incarnation.
            drop(runtime);
            let _ = exited_tx.send(());
        })
        .map_err(|source| PodStartError::Runtime { index, source })?;
    let ready = ready_rx
        .await
        .map_err(|_| PodStartError::Vanished { index })??;
    Ok(Started {
        incarnation: Incarnation { stop, exited },
        engine: ready.engine,
        pub_endpoint: ready.pub_endpoint,
        replay_endpoint: ready.replay_endpoint,
    })
}

async fn incarnation_main(
    launch: PodLaunch,
    model: Arc<SimModel>,
    faults: Arc<EventFaults>,
    listener: std::net::TcpListener,
    lifecycle: mpsc::UnboundedSender<Lifecycle>,
    ready: oneshot::Sender<Result<Ready, PodStartError>>,
    stop: oneshot::Receiver<()>,
) {
    let index = launch.index;
    let started = async {
        let engine = PodEngine::new(launch.params.clone())
            .map_err(|source| PodStartError::Params { index, source })?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
            PodStartError::BindHttp {
                index,
                addr: launch.http,
                source,
            }
        })?;
        let publisher = match &launch.events {
            Some(config) => Some(
                Publisher::start(config.clone(), Arc::clone(&faults))
                    .await
                    .map_err(|source| PodStartError::Events { index, source })?,
            ),
            None => None,
        };
        Ok::<_, PodStartError>((engine, listener, publisher))
    }
    .await;
    let (engine, listener, publisher) = match started {
        Ok(parts) => parts,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let pub_endpoint = publisher
        .as_ref()
        .map(|p| p.pub_endpoint().to_owned())
        .unwrap_or_default();
    let replay_endpoint = publisher
        .as_ref()
        .and_then(|p| p.replay_endpoint().map(str::to_owned));
    let publisher_stats: Option<Arc<PublisherStats>> = publisher.as_ref().map(Publisher::stats);
    let sink =
        publisher.map(|publisher| EventSink::new(publisher, model.wire, launch.params.block_size));
    let clock = SimClock::start(launch.time_scale);
    let (driver, handle) = Driver::new(engine, clock, sink);
    tokio::spawn(driver.run());
    let context = Arc::new(PodContext {
        model,
        engine: handle.clone(),
        faults,
        publisher: publisher_stats,
        index,
        topic: launch.topic.clone(),
        params: launch.params.clone(),
        lifecycle: PodLifecycle {
            commands: lifecycle,
        },
        started_unix_s: clock.unix_at(0.0) as u64,
        http: launch.http,
        engine_id: uuid::Uuid::new_v4().to_string(),
    });
    let app = server::pod_router(context);
    if ready
        .send(Ok(Ready {
            engine: handle,
            pub_endpoint,
            replay_endpoint,
        }))
        .is_err()
    {
        return;
    }
    tokio::select! {
        served = axum::serve(listener, app) => {
            if let Err(error) = served {
                tracing::error!(pod = index, %error, "pod HTTP server failed");
            }
        }
        _ = stop => {}
    }
}

/// A pod's way to ask its own supervisor for lifecycle changes (from its
/// `/sim/` endpoints).
#[derive(Clone, Debug)]
pub struct PodLifecycle {
    commands: mpsc::UnboundedSender<Lifecycle>,
}

impl PodLifecycle {
    pub fn restart(&self, down: Duration) -> bool {
        self.commands
            .send(Lifecycle::Restart {
                grace: SELF_KILL_GRACE,
                down,
            })
            .is_ok()
    }

    pub fn kill(&self) -> bool {
        self.commands
            .send(Lifecycle::Kill {
                grace: SELF_KILL_GRACE,
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of 4 tokens, 10 ms steps plus 1 ms per prefill token, 5 ms of
    /// request overhead: step ends are easy to predict.
    fn params() -> PodParams {
        PodParams {
            kv_blocks: 64,
            block_size: 4,
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            max_model_len: 256,
            step_base_ms: 10.0,
            prefill_ms_per_token: 1.0,
            attention_ms_per_pair: 0.0,
            decode_ms_per_million_context_tokens: 0.0,
            decode_ms_per_seq: 0.0,
            request_overhead_ms: 5.0,
            ..PodParams::default()
        }
    }

    fn start(time_scale: f64) -> PodHandle {
        let engine = PodEngine::new(params()).unwrap();
        let (driver, handle) = Driver::new(engine, SimClock::start(time_scale), None);
        tokio::spawn(driver.run());
        handle
    }

    fn request(prompt_tokens: u32, max_tokens: u32) -> PodRequest {
        PodRequest {
            tokens: (0..prompt_tokens).collect(),
            hashes: Arc::from(Vec::new()),
            max_tokens,
            lora: None,
            cache_salt: None,
            kv_transfer: KvTransfer::None,
            priority: 0,
        }
    }

    fn elapsed_ms(since: Instant) -> u128 {
        since.elapsed().as_millis()
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_arrive_at_the_modelled_step_ends_scaled_to_wall_time() {
        let handle = start(2.0);
        let started = Instant::now();
        let mut submission = handle.submit(request(8, 3)).await.unwrap();
        // Ready at 5 ms; the prefill step takes 10 + 8 ms; each decode 10 ms.
        // Simulated 23, 33, 43 ms are wall 46, 66, 86 ms at time scale 2.
        let mut arrivals = Vec::new();
        while let Some(item) = submission.stream.recv().await {
            arrivals.push((elapsed_ms(started), item.clone()));
            if let StreamItem::Finished(summary) = item {
                assert_eq!((summary.prompt_tokens, summary.output_tokens), (8, 3));
                assert!((summary.ttft_ms() - 23.0).abs() < 1e-9);
                submission.guard.disarm();
                break;
            }
        }
        let times: Vec<u128> = arrivals.iter().map(|(at, _)| *at).collect();
        assert_eq!(times, [46, 66, 86, 86]);
        assert_eq!(arrivals[1].1, StreamItem::Token { index: 1 });
        let snapshot = handle.snapshot().await.unwrap();
        assert_eq!(snapshot.metrics.finished_requests, 1);
        assert_eq!(snapshot.ttft_bucket_counts.iter().sum::<u64>(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_submission_aborts_its_request() {
        let handle = start(1.0);
        let submission = handle.submit(request(8, 200)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(handle.snapshot().await.unwrap().metrics.running, 1);
        drop(submission);
        let metrics = handle.snapshot().await.unwrap().metrics;
        assert_eq!((metrics.running, metrics.kv_cache_usage), (0, 0.0));
        assert_eq!(metrics.finished_requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_engine_takes_no_step_until_resumed() {
        let handle = start(1.0);
        handle.pause(true).unwrap();
        let mut submission = handle.submit(request(4, 1)).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(5), submission.stream.recv()).await;
        assert!(waited.is_err(), "a token arrived while paused");
        assert!(handle.snapshot().await.unwrap().paused);
        let resumed = Instant::now();
        handle.pause(false).unwrap();
        assert_eq!(
            submission.stream.recv().await,
            Some(StreamItem::Token { index: 0 })
        );
        // The arrival is long ready; the step (10 + 4 ms) starts on resume.
        assert_eq!(elapsed_ms(resumed), 14);
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_requests_report_the_engine_error() {
        let handle = start(1.0);
        let error = handle.submit(request(250, 10)).await.unwrap_err();
        assert!(matches!(
            error,
            PodError::Rejected(SubmitError::TooLong { .. })
        ));
    }

    #[test]
    fn published_extra_keys_follow_the_block_pool() {
        let plain = request(8, 1);
        assert_eq!(published_extra_keys(&plain, 0, 2), ExtraKeys::Plain);
        let salted = PodRequest {
            lora: Some(EventLora {
                int_id: 1,
                name: "sql-lora".into(),
            }),
            cache_salt: Some("salt".into()),
            ..request(8, 1)
        };
        let str_key = |s: &str| ExtraKey::Str(s.into());
        assert_eq!(
            published_extra_keys(&salted, 0, 2),
            ExtraKeys::PerBlock(vec![
                Some(vec![str_key("sql-lora"), str_key("salt")].into_boxed_slice()),
                Some(vec![str_key("sql-lora")].into_boxed_slice()),
            ])
        );
        let salt_only = PodRequest {
            cache_salt: Some("salt".into()),
            ..request(8, 1)
        };
        assert_eq!(
            published_extra_keys(&salt_only, 1, 1),
            ExtraKeys::PerBlock(vec![None])
        );
    }
}
