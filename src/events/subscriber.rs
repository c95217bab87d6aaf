//! Where events come from: ZeroMQ SUB sockets feeding one bounded channel.
//!
//! Two topologies (docs §2, building-blocks §2):
//!
//! * [`BindSource`]: kvgate binds one SUB and every pod's PUB connects to it
//!   (vLLM `endpoint: tcp://<kvgate>:5557`). Messages carry no peer identity,
//!   so the topic `kv@<pod>@<model>` names the publisher. libzmq on the pods
//!   reconnects every 100 ms, so this is the robust default.
//! * [`ConnectSource`]: kvgate connects a SUB to each discovered pod's PUB (and
//!   rank `r` of a data-parallel pod to port + r), so any number of kvgate
//!   replicas can each see every pod. zmq.rs reconnects with an exponential
//!   backoff up to 30 s that cannot be configured, and its first connect blocks;
//!   so each publisher gets its own task, which connects with a short timeout and
//!   replaces the socket as soon as the monitor reports a disconnect.
//!
//! Both only move messages; decoding and sequence tracking happen in the
//! service's single ingest task. The channel is bounded: when ingestion falls
//! behind, the SUB stops reading, TCP pushes back, and the pod's PUB drops at
//! its high-water mark, which shows up as a gap and is replayed.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketEvent, SocketOptions, SocketRecv, SubSocket, ZmqMessage};

use crate::pods::PodId;

/// Shortest and longest wait before a connect-mode SUB tries its pod again.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// One connect attempt (zmq.rs retries refused connections inside it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Which socket a message arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The bound SUB: the topic names the pod, the batch its rank.
    Bound,
    /// A SUB connected to one pod's publisher for one data-parallel rank.
    Pod { pod: PodId, rank: u32 },
    /// A peer kvgate replica's relay of a batch a pod sent it (bind mode): the topic names
    /// the pod, as on the bound SUB.
    Relayed,
}

/// A message as received.
#[derive(Debug)]
pub struct Inbound {
    pub origin: Origin,
    pub message: ZmqMessage,
}

/// A publisher to connect to (connect mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublisherEndpoint {
    pub pod: PodId,
    pub rank: u32,
    pub endpoint: String,
}

/// How the pod set changed, for sources that follow pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodDelta {
    pub added: Vec<PublisherEndpoint>,
    pub removed: Vec<PodId>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error("cannot bind the event SUB socket on {endpoint}: {source}")]
    Bind {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error(
        "cannot bind the event SUB for data-parallel rank {rank}: {endpoint} has no port to offset \
         (rank r of a pod connects to the bind port + r)"
    )]
    RankEndpoint { endpoint: String, rank: u32 },
    #[error("cannot subscribe to {prefix:?}: {source}")]
    Subscribe {
        prefix: String,
        #[source]
        source: zeromq::ZmqError,
    },
}

/// A producer of event messages. The service opens it once, then tells it
/// about pod changes; it stops (closing its sockets) when dropped.
#[async_trait]
pub trait EventSource: Send {
    /// Starts delivering into `sink`. Returns the bound endpoint, if the
    /// source binds one (with the port resolved when 0 was asked for).
    async fn open(
        &mut self,
        sink: mpsc::Sender<Inbound>,
    ) -> Result<Option<String>, SubscriberError>;

    /// Follows the pod set.
    fn update(&mut self, delta: &PodDelta);
}

/// The port of rank `rank` of a data-parallel pod whose rank 0 uses `endpoint`:
/// tcp ports are offset by the rank, inproc names get `_dp<rank>`; vLLM
/// rejects ipc endpoints for ranks above 0 (docs §1).
pub fn endpoint_for_rank(endpoint: &str, rank: u32) -> Option<String> {
    if rank == 0 {
        return Some(endpoint.to_string());
    }
    if let Some(rest) = endpoint.strip_prefix("tcp://") {
        let (host, port) = rest.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        if port == 0 {
            return None;
        }
        let port = u16::try_from(u32::from(port) + rank).ok()?;
        return Some(format!("tcp://{host}:{port}"));
    }
    if endpoint.starts_with("inproc://") {
        return Some(format!("{endpoint}_dp{rank}"));
    }
    None
}

/// The bound SUB of the bind topology. With data parallelism, rank r of every
/// pod connects to the bind port + r, so one port per rank is bound; the
/// batch's `data_parallel_rank` then tells the ranks apart.
pub struct BindSource {
    endpoint: String,
    prefix: String,
    ranks: u32,
    task: Option<JoinHandle<()>>,
}

impl BindSource {
    pub fn new(endpoint: impl Into<String>, prefix: impl Into<String>, ranks: u32) -> Self {
        Self {
            endpoint: endpoint.into(),
            prefix: prefix.into(),
            ranks: ranks.max(1),
            task: None,
        }
    }
}

impl Drop for BindSource {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[async_trait]
impl EventSource for BindSource {
    async fn open(
        &mut self,
        sink: mpsc::Sender<Inbound>,
    ) -> Result<Option<String>, SubscriberError> {
        let mut socket = SubSocket::new();
        let mut first = None;
        for rank in 0..self.ranks {
            let endpoint = endpoint_for_rank(&self.endpoint, rank).ok_or_else(|| {
                SubscriberError::RankEndpoint {
                    endpoint: self.endpoint.clone(),
                    rank,
                }
            })?;
            let bound = socket
                .bind(&endpoint)
                .await
                .map_err(|source| SubscriberError::Bind { endpoint, source })?;
            first.get_or_insert(bound);
        }
        let bound = first.map(|b| b.to_string()).unwrap_or_default();
        socket
            .subscribe(&self.prefix)
            .await
            .map_err(|source| SubscriberError::Subscribe {
                prefix: self.prefix.clone(),
                source,
            })?;
        tracing::info!(endpoint = %bound, ranks = self.ranks, prefix = %self.prefix, "KV event SUB bound; pods connect to it");
        self.task = Some(tokio::spawn(receive(socket, Origin::Bound, sink)));
        Ok(Some(bound))
    }

    fn update(&mut self, _delta: &PodDelta) {}
}

/// Forwards every message of `socket` until the sink is gone.
async fn receive(mut socket: SubSocket, origin: Origin, sink: mpsc::Sender<Inbound>) {
    loop {
        match socket.recv().await {
            Ok(message) => {
                if sink.send(Inbound { origin, message }).await.is_err() {
                    return;
                }
            }
            // A peer's stream failed; zmq.rs has already dropped that peer and
            // the socket goes on with the others.
            Err(error) => tracing::debug!(%error, "KV event SUB receive error"),
        }
    }
}

/// One SUB per publisher of every discovered pod (connect topology).
pub struct ConnectSource {
    prefix: String,
    sink: Option<mpsc::Sender<Inbound>>,
    tasks: HashMap<PodId, Vec<JoinHandle<()>>>,
}

impl ConnectSource {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            sink: None,
            tasks: HashMap::new(),
        }
    }
}

impl Drop for ConnectSource {
    fn drop(&mut self) {
        for task in self.tasks.drain().flat_map(|(_, tasks)| tasks) {
            task.abort();
        }
    }
}

#[async_trait]
impl EventSource for ConnectSource {
    async fn open(
        &mut self,
        sink: mpsc::Sender<Inbound>,
    ) -> Result<Option<String>, SubscriberError> {
        self.sink = Some(sink);
        Ok(None)
    }

    fn update(&mut self, delta: &PodDelta) {
        for pod in &delta.removed {
            for task in self.tasks.remove(pod).into_iter().flatten() {
                task.abort();
            }
        }
        let Some(sink) = &self.sink else {
            return;
        };
        for publisher in &delta.added {
            let task = tokio::spawn(follow_publisher(
                publisher.clone(),
                self.prefix.clone(),
                sink.clone(),
            ));
            self.tasks.entry(publisher.pod).or_default().push(task);
        }
    }
}

/// Keeps a SUB connected to one publisher, replacing it after every
/// disconnect instead of waiting out zmq.rs's own backoff.
async fn follow_publisher(
    publisher: PublisherEndpoint,
    prefix: String,
    sink: mpsc::Sender<Inbound>,
) {
    let origin = Origin::Pod {
        pod: publisher.pod,
        rank: publisher.rank,
    };
    let mut backoff = RECONNECT_MIN;
    loop {
        let mut options = SocketOptions::default();
        options.connect_timeout(CONNECT_TIMEOUT);
        let mut socket = SubSocket::with_options(options);
        let mut monitor = socket.monitor();
        // With no peer yet this only records the prefix; it is sent on connect.
        if let Err(error) = socket.subscribe(&prefix).await {
            tracing::warn!(endpoint = %publisher.endpoint, %error, "KV event subscribe failed");
        }
        if let Err(error) = socket.connect(&publisher.endpoint).await {
            tracing::debug!(endpoint = %publisher.endpoint, %error, retry_in = ?backoff, "KV event publisher not reachable");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_MAX);
            continue;
        }
        tracing::info!(pod = publisher.pod, rank = publisher.rank, endpoint = %publisher.endpoint, "KV event SUB connected");
        backoff = RECONNECT_MIN;
        loop {
            tokio::select! {
                received = socket.recv() => match received {
                    Ok(message) => {
                        if sink.send(Inbound { origin, message }).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::debug!(endpoint = %publisher.endpoint, %error, "KV event SUB receive error");
                        break;
                    }
                },
                event = monitor.next() => match event {
                    Some(SocketEvent::Disconnected(_)) | None => break,
                    Some(_) => {}
                },
            }
        }
        tracing::info!(pod = publisher.pod, rank = publisher.rank, endpoint = %publisher.endpoint, "KV event publisher disconnected; reconnecting");
        drop(socket);
        tokio::time::sleep(RECONNECT_MIN).await;
    }
}

#[cfg(test)]
mod tests {
    use super::endpoint_for_rank;

    #[test]
    fn data_parallel_ranks_offset_the_endpoint() {
        assert_eq!(
            endpoint_for_rank("tcp://10.0.0.5:5557", 0).as_deref(),
            Some("tcp://10.0.0.5:5557")
        );
        assert_eq!(
            endpoint_for_rank("tcp://10.0.0.5:5557", 2).as_deref(),
            Some("tcp://10.0.0.5:5559")
        );
        assert_eq!(
            endpoint_for_rank("tcp://[fd00::5]:5557", 1).as_deref(),
            Some("tcp://[fd00::5]:5558")
        );
        assert_eq!(
            endpoint_for_rank("inproc://kv", 1).as_deref(),
            Some("inproc://kv_dp1")
        );
        assert_eq!(endpoint_for_rank("ipc:///tmp/kv", 1), None);
        assert_eq!(endpoint_for_rank("tcp://10.0.0.5:65535", 1), None);
    }
}
