//! A simulated pod's KV-event publisher, shaped like vLLM's `ZmqEventPublisher`
//! (docs: vllm-kv-events.md §2, §4).
//!
//! One task owns a PUB socket and, when replay is configured, a ROUTER socket.
//! Every batch takes the next sequence number (from 0 for each new publisher,
//! like a new vLLM process), goes out as `[topic, seq, payload]` and is kept in
//! a ring of the last `buffer_steps` batches; a DEALER that sends
//! `["", start_seq]` to the ROUTER gets every kept batch from `start_seq` on
//! in the release's replay frame form, then the end marker.
//!
//! In connect mode the PUB dials the subscriber and, like libzmq, dials again
//! about every 100 ms while the peer is away; batches published meanwhile are
//! lost on the wire but kept for replay, exactly as vLLM's are. Faults that
//! tests ask for act at the same place: a dropped batch uses its sequence
//! number and stays replayable, a delayed one leaves later.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc as zmq_mpsc;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use zeromq::{
    PubSocket, RouterSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, ZmqError,
    ZmqMessage,
};

use crate::events::EventEncoder;

/// How long one dial of a connecting PUB may take before it is tried again;
/// libzmq's default `ZMQ_RECONNECT_IVL` is 100 ms.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

/// Where the PUB socket goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PubEndpoint {
    /// Bind and let subscribers connect (vLLM's default `tcp://*:5557`).
    Bind(String),
    /// Connect to a subscriber that binds (e.g. kvgate's `events.bind`).
    Connect(String),
}

impl std::fmt::Display for PubEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bind(endpoint) => write!(f, "bind {endpoint}"),
            Self::Connect(endpoint) => write!(f, "connect {endpoint}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PublisherConfig {
    pub endpoint: PubEndpoint,
    /// The ROUTER's bind address; no replay when absent.
    pub replay_bind: Option<String>,
    pub topic: String,
    /// Batches kept for replay (vLLM's `buffer_steps`).
    pub buffer_steps: usize,
    pub encoder: EventEncoder,
}

/// Event faults a test injects. They belong to the pod, not to one publisher,
/// so they survive a restart.
#[derive(Debug, Default)]
pub struct EventFaults {
    drop_probability_bits: AtomicU64,
    delay_us: AtomicU64,
}

impl EventFaults {
    /// Probability in `[0, 1]` that a batch is not sent (it stays replayable).
    pub fn drop_probability(&self) -> f64 {
        f64::from_bits(self.drop_probability_bits.load(Ordering::Relaxed))
    }

    /// Clamps to `[0, 1]`; NaN counts as 0.
    pub fn set_drop_probability(&self, probability: f64) {
        let probability = if probability.is_nan() {
            0.0
        } else {
            probability.clamp(0.0, 1.0)
        };
        self.drop_probability_bits
            .store(probability.to_bits(), Ordering::Relaxed);
    }

    /// Extra time between a step's end and its batch leaving.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }

    pub fn set_delay(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.delay_us.store(micros, Ordering::Relaxed);
    }
}

/// Counters of one publisher (one pod incarnation).
#[derive(Debug, Default)]
pub struct PublisherStats {
    next_seq: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    replays: AtomicU64,
}

/// A snapshot of [`PublisherStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublisherCounts {
    /// The sequence number the next batch gets (= batches published so far).
    pub next_seq: u64,
    /// Batches handed to the PUB socket.
    pub sent: u64,
    /// Batches held back by the drop fault or lost while the PUB was not connected.
    pub dropped: u64,
    /// Replay requests answered.
    pub replays: u64,
}

impl PublisherStats {
    pub fn counts(&self) -> PublisherCounts {
        PublisherCounts {
            next_seq: self.next_seq.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            replays: self.replays.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error("binding the KV-event PUB socket to {endpoint}: {source}")]
    BindPub { endpoint: String, source: ZmqError },
    #[error("binding the KV-event replay ROUTER socket to {endpoint}: {source}")]
    BindReplay { endpoint: String, source: ZmqError },
}

/// The sending side of a running publisher. Dropping it stops the publisher.
#[derive(Debug)]
pub struct Publisher {
    batches: mpsc::UnboundedSender<Bytes>,
    stats: Arc<PublisherStats>,
    pub_endpoint: String,
    replay_endpoint: Option<String>,
}

impl Publisher {
    /// Binds what must be bound (so a taken port fails here), then runs the
    /// publisher as a task on the current runtime.
    pub async fn start(
        config: PublisherConfig,
        faults: Arc<EventFaults>,
    ) -> Result<Self, PublisherError> {
        let (pub_state, pub_endpoint) = match &config.endpoint {
            PubEndpoint::Bind(endpoint) => {
                let mut socket = PubSocket::new();
                let bound =
                    socket
                        .bind(endpoint)
                        .await
                        .map_err(|source| PublisherError::BindPub {
                            endpoint: endpoint.clone(),
                            source,
                        })?;
                (PubState::Bound(socket), bound.to_string())
            }
            PubEndpoint::Connect(endpoint) => (PubState::dial(endpoint.clone()), endpoint.clone()),
        };
        let (router, replay_endpoint) =
            match &config.replay_bind {
                Some(endpoint) => {
                    let mut socket = RouterSocket::new();
                    let bound = socket.bind(endpoint).await.map_err(|source| {
                        PublisherError::BindReplay {
                            endpoint: endpoint.clone(),
                            source,
                        }
                    })?;
                    (Some(socket), Some(bound.to_string()))
                }
                None => (None, None),
            };
        let (batches, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(PublisherStats::default());
        let task = PublisherTask {
            topic: Bytes::from(config.topic.clone().into_bytes()),
            buffer: VecDeque::with_capacity(config.buffer_steps.min(1 << 16)),
            config,
            faults,
            stats: Arc::clone(&stats),
            pub_state,
            router,
            delayed: VecDeque::new(),
            next_seq: 0,
        };
        tokio::spawn(task.run(rx));
        Ok(Self {
            batches,
            stats,
            pub_endpoint,
            replay_endpoint,
        })
    }

    /// Publishes one batch (an encoded `KVEventBatch`).
    pub fn publish(&self, payload: Bytes) {
        if self.batches.send(payload).is_err() {
            tracing::warn!("KV-event publisher has stopped; batch discarded");
        }
    }

    /// The publisher's live counters (they outlive the publisher).
    pub fn stats(&self) -> Arc<PublisherStats> {
        Arc::clone(&self.stats)
    }

    /// The PUB endpoint: the bound address (with the real port) or the one dialled.
    pub fn pub_endpoint(&self) -> &str {
        &self.pub_endpoint
    }

    /// The bound replay endpoint, if replay is on.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }
}

/// A connected PUB and the monitor that reports its peer going away.
type Dialled = (PubSocket, zmq_mpsc::Receiver<SocketEvent>);

enum PubState {
    Bound(PubSocket),
    Connected {
        socket: PubSocket,
        monitor: zmq_mpsc::Receiver<SocketEvent>,
        endpoint: String,
    },
    /// A dialler task is trying; it hands over the socket once connected.
    Dialling {
        dialled: oneshot::Receiver<Dialled>,
        endpoint: String,
    },
}

impl PubState {
    fn dial(endpoint: String) -> Self {
        let (tx, dialled) = oneshot::channel();
        tokio::spawn(dial(endpoint.clone(), tx));
        Self::Dialling { dialled, endpoint }
    }
}

/// Dials until connected or until the publisher is gone. Each try gets a fresh
/// socket so that a half-finished handshake never lingers.
async fn dial(endpoint: String, tx: oneshot::Sender<Dialled>) {
    loop {
        if tx.is_closed() {
            return;
        }
        let mut options = SocketOptions::default();
        options.connect_timeout(RECONNECT_INTERVAL);
        let mut socket = PubSocket::with_options(options);
        let monitor = socket.monitor();
        match socket.connect(&endpoint).await {
            Ok(()) => {
                tracing::debug!(%endpoint, "KV-event PUB connected");
                // The publisher may have stopped meanwhile; then the socket just closes.
                let _ = tx.send((socket, monitor));
                return;
            }
            Err(error) => {
                tracing::trace!(%endpoint, %error, "KV-event PUB dial failed; retrying");
                tokio::time::sleep(RECONNECT_INTERVAL).await;
            }
        }
    }
}

struct PublisherTask {
    config: PublisherConfig,
    faults: Arc<EventFaults>,
    stats: Arc<PublisherStats>,
    topic: Bytes,
    pub_state: PubState,
    router: Option<RouterSocket>,
    /// `(seq, payload)` of the last `buffer_steps` batches, oldest first.
    buffer: VecDeque<(u64, Bytes)>,
    /// Batches held by the delay fault, with the time each may leave.
    delayed: VecDeque<(Instant, Bytes)>,
    next_seq: u64,
}

enum Wake {
    Batch(Option<Bytes>),
    PeerEvent(Option<SocketEvent>),
    Dialled(Option<Dialled>),
    Replay(Result<ZmqMessage, ZmqError>),
    DelayElapsed,
}

impl PublisherTask {
    async fn run(mut self, mut batches: mpsc::UnboundedReceiver<Bytes>) {
        loop {
            let due = self.delayed.front().map(|(at, _)| *at);
            // Unbiased so that a stream of batches cannot starve replay requests;
            // batches stay in order through their FIFO channel.
            let wake = tokio::select! {
                batch = batches.recv() => Wake::Batch(batch),
                wake = connection_change(&mut self.pub_state) => wake,
                request = replay_request(&mut self.router) => Wake::Replay(request),
                () = sleep_until(due) => Wake::DelayElapsed,
            };
            match wake {
                Wake::Batch(None) => return,
                Wake::Batch(Some(payload)) => {
                    let delay = self.faults.delay();
                    if delay.is_zero() && self.delayed.is_empty() {
                        self.send(payload).await;
                    } else {
                        // FIFO even if the delay shrinks: batches never overtake.
                        let at = Instant::now() + delay;
                        let at = self.delayed.back().map_or(at, |(last, _)| at.max(*last));
                        self.delayed.push_back((at, payload));
                    }
                }
                Wake::DelayElapsed => {
                    let now = Instant::now();
                    while self.delayed.front().is_some_and(|(at, _)| *at <= now) {
                        if let Some((_, payload)) = self.delayed.pop_front() {
                            self.send(payload).await;
                        }
                    }
                }
                Wake::PeerEvent(event) => self.on_peer_event(event),
                Wake::Dialled(Some((socket, monitor))) => {
                    if let PubState::Dialling { endpoint, .. } = &self.pub_state {
                        let endpoint = endpoint.clone();
                        self.pub_state = PubState::Connected {
                            socket,
                            monitor,
                            endpoint,
                        };
                    }
                }
                Wake::Dialled(None) => {
                    // The dialler ended without a socket; start another.
                    if let PubState::Dialling { endpoint, .. } = &self.pub_state {
                        self.pub_state = PubState::dial(endpoint.clone());
                    }
                }
                Wake::Replay(Ok(request)) => self.answer_replay(request).await,
                Wake::Replay(Err(error)) => {
                    tracing::warn!(%error, "KV-event replay socket failed; replay is off");
                    self.router = None;
                }
            }
        }
    }

    fn on_peer_event(&mut self, event: Option<SocketEvent>) {
        let PubState::Connected { endpoint, .. } = &self.pub_state else {
            return;
        };
        match event {
            Some(SocketEvent::Disconnected(_)) | None => {
                tracing::info!(%endpoint, "KV-event subscriber went away; reconnecting");
                self.pub_state = PubState::dial(endpoint.clone());
            }
            Some(_) => {}
        }
    }

    /// Takes the next sequence number, sends (unless dropped) and keeps the batch.
    async fn send(&mut self, payload: Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.next_seq.store(self.next_seq, Ordering::Relaxed);
        let drop_probability = self.faults.drop_probability();
        let dropped = drop_probability > 0.0 && rand::random::<f64>() < drop_probability;
        let socket = match &mut self.pub_state {
            PubState::Bound(socket) | PubState::Connected { socket, .. } => Some(socket),
            PubState::Dialling { .. } => None,
        };
        match socket {
            Some(socket) if !dropped => {
                let frames =
                    self.config
                        .encoder
                        .pub_frames(self.topic.clone(), seq, payload.clone());
                match ZmqMessage::try_from(frames) {
                    Ok(message) => match socket.send(message).await {
                        Ok(()) => {
                            self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            tracing::warn!(seq, %error, "KV-event batch not sent");
                            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Err(error) => tracing::warn!(seq, ?error, "KV-event batch has no frames"),
                }
            }
            _ => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.config.buffer_steps > 0 {
            if self.buffer.len() == self.config.buffer_steps {
                self.buffer.pop_front();
            }
            self.buffer.push_back((seq, payload));
        }
    }

    /// Answers `[identity, "", start_seq]` like vLLM's `_service_replay`: every
    /// kept batch with seq ≥ start_seq, then the end marker. Other frame counts
    /// are ignored, as vLLM does.
    async fn answer_replay(&mut self, request: ZmqMessage) {
        let frames = request.into_vec();
        let [identity, _, start] = frames.as_slice() else {
            tracing::warn!(
                frames = frames.len(),
                "replay request without 3 frames ignored"
            );
            return;
        };
        let start_seq = start
            .iter()
            .try_fold(0u64, |acc, &byte| {
                acc.checked_mul(256).map(|v| v | u64::from(byte))
            })
            .unwrap_or(u64::MAX);
        let Some(router) = self.router.as_mut() else {
            return;
        };
        self.stats.replays.fetch_add(1, Ordering::Relaxed);
        let encoder = self.config.encoder;
        for (seq, payload) in self.buffer.iter().filter(|(seq, _)| *seq >= start_seq) {
            let mut frames = vec![identity.clone()];
            frames.extend(encoder.replay_batch_frames(self.topic.clone(), *seq, payload.clone()));
            if !send_replay_frames(router, frames).await {
                return;
            }
        }
        let mut frames = vec![identity.clone()];
        frames.extend(encoder.replay_end_frames());
        send_replay_frames(router, frames).await;
    }
}

async fn send_replay_frames(router: &mut RouterSocket, frames: Vec<Bytes>) -> bool {
    let message = match ZmqMessage::try_from(frames) {
        Ok(message) => message,
        Err(error) => {
            tracing::warn!(?error, "replay message has no frames");
            return false;
        }
    };
    match router.send(message).await {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(%error, "replay peer went away");
            false
        }
    }
}

/// The next change of the PUB's connection: its peer went away (connected),
/// or the dialler finished (dialling). Never ready for a bound PUB.
async fn connection_change(state: &mut PubState) -> Wake {
    match state {
        PubState::Connected { monitor, .. } => Wake::PeerEvent(monitor.next().await),
        PubState::Dialling { dialled, .. } => Wake::Dialled(dialled.await.ok()),
        PubState::Bound(_) => std::future::pending().await,
    }
}

async fn replay_request(router: &mut Option<RouterSocket>) -> Result<ZmqMessage, ZmqError> {
    match router {
        Some(router) => router.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
