//! The relay's sockets: the listener peers connect to (one writer task per peer, fed by the
//! hub), and one task per peer this replica follows (reading its relay into the ingest task).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use zeromq::ZmqMessage;

use super::auth::{self, ReplicaId};
use super::frame::{self, Frame, PodSnapshot, MAX_FRAME};
use super::hub::{Join, Outgoing, PEER_QUEUE};
use super::{FrameReader, PeersConfig, RelayConfig, RelayError, RelaySecret, ROTATION_GRACE};
use crate::discovery::{run_discovery, DiscoveryConfig, Snapshot};

/// A peer must finish the handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A quiet relay sends a heartbeat this often; a peer silent for `SILENCE` is reconnected.
const HEARTBEAT: Duration = Duration::from_secs(1);
const SILENCE: Duration = Duration::from_secs(5);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Relayed items taken in one write.
const WRITE_BURST: usize = 256;
/// Relayed items queued towards the ingest task; a full queue stops reading the peers' sockets.
const INBOUND_QUEUE: usize = 16_384;

/// What a peer relayed to this replica, in the order it sent it.
#[derive(Debug)]
pub enum Relayed {
    Batch {
        message: ZmqMessage,
        received_at_ns: u64,
    },
    Snapshot(PodSnapshot),
}

/// Wall-clock nanoseconds, as carried in batches (peers compare them to measure lag).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The relay's running tasks and the ingest task's ends of its channels. Dropping it stops
/// every task.
pub struct RelayTasks {
    pub joins: mpsc::Receiver<Join>,
    pub inbound: mpsc::Receiver<Relayed>,
    /// The listener's address (with the port resolved when 0 was asked for).
    pub bound: std::net::SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RelayTasks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Aborts a task when dropped (the peers' tasks end with their manager).
struct Owned(JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds the relay listener and starts following the peers.
pub async fn start(
    config: &RelayConfig,
    secret: Arc<RelaySecret>,
    shutdown: watch::Receiver<bool>,
) -> Result<RelayTasks, RelayError> {
    let id: ReplicaId = rand::random();
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RelayError::Bind {
            addr: config.listen,
            source,
        })?;
    let bound = listener.local_addr()?;
    let (joins_tx, joins) = mpsc::channel(64);
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
    tracing::info!(listen = %bound, id = %hex::encode(id), "relay listening for peer replicas");
    let accept = tokio::spawn(accept_peers(listener, Arc::clone(&secret), id, joins_tx));
    let rotation = follow_rotations(Arc::clone(&secret));
    let peers = tokio::spawn(follow_peers(
        config.peers.clone(),
        secret,
        id,
        inbound_tx,
        shutdown,
    ));
    Ok(RelayTasks {
        joins,
        inbound,
        bound,
        tasks: vec![accept, rotation, peers],
    })
}

/// Re-reads the secret when its file changes (a rotated Kubernetes Secret) or on SIGHUP. The
/// watch is set up before this returns; the file is read once more when the task starts, for
/// a change made between the first read and the watch.
fn follow_rotations(secret: Arc<RelaySecret>) -> JoinHandle<()> {
    let (tx, mut changes) = mpsc::channel(1);
    let watcher = crate::reload::watch_dir(secret.path(), tx)
        .inspect_err(|error| {
            tracing::warn!(path = %secret.path().display(), %error, "cannot watch the relay secret; it is re-read on SIGHUP only");
        })
        .ok();
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut hangups = signal(SignalKind::hangup()).ok();
        loop {
            reread(&secret);
            tokio::select! {
                Some(()) = changes.recv() => crate::reload::settle(&mut changes).await,
                Some(()) = async { hangups.as_mut()?.recv().await } => {}
                else => return,
            }
        }
    })
}

fn reread(secret: &RelaySecret) {
    let metrics = &crate::metrics::global().relay;
    match secret.reload() {
        Ok(false) => {}
        Ok(true) => {
            metrics.secret_reload(true);
            tracing::info!(path = %secret.path().display(), grace = ?ROTATION_GRACE, "relay secret rotated: new connections prove the new one; peers proving the previous one are accepted for the grace period");
        }
        Err(error) => {
            metrics.secret_reload(false);
            tracing::error!(%error, "relay secret reload refused; the secret in use stays");
        }
    }
}

async fn accept_peers(
    listener: TcpListener,
    secret: Arc<RelaySecret>,
    id: ReplicaId,
    joins: mpsc::Sender<Join>,
) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "relay accept failed");
                tokio::time::sleep(RECONNECT_MIN).await;
                continue;
            }
        };
        tokio::spawn(serve_peer(
            stream,
            addr.to_string(),
            Arc::clone(&secret),
            id,
            joins.clone(),
        ));
    }
}

/// One peer following this replica: authenticate it, have the ingest task queue its
/// snapshots, then write whatever the hub queues.
async fn serve_peer(
    stream: TcpStream,
    peer: String,
    secret: Arc<RelaySecret>,
    id: ReplicaId,
    joins: mpsc::Sender<Join>,
) {
    let metrics = &crate::metrics::global().relay;
    let _ = stream.set_nodelay(true);
    let mut reader = FrameReader::new(stream);
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        auth::accept(&mut reader, &secret.keys(), &id),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(RelayError::Unauthenticated)) => {
            tracing::warn!(%peer, "relay connection without a valid proof of the shared secret refused");
            metrics.rejected("unauthenticated");
            return;
        }
        Ok(Err(error)) => {
            tracing::warn!(%peer, %error, "relay handshake failed");
            metrics.rejected("handshake");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "relay handshake timed out");
            metrics.rejected("handshake");
            return;
        }
    }
    let (queue, mut items) = mpsc::channel(PEER_QUEUE);
    if joins
        .send(Join {
            peer: peer.clone(),
            queue,
        })
        .await
        .is_err()
    {
        return;
    }
    let (mut read, mut write) = reader.inner.into_split();
    let mut out = BytesMut::with_capacity(64 << 10);
    let mut sink = [0u8; 64];
    loop {
        out.clear();
        let mut batches = 0;
        tokio::select! {
            item = tokio::time::timeout(HEARTBEAT, items.recv()) => match item {
                Ok(None) => return,
                Ok(Some(first)) => {
                    let mut next = Some(first);
                    let mut taken = 0;
                    while let Some(item) = next {
                        batches += u64::from(matches!(item, Outgoing::Batch { .. }));
                        encode(&mut out, &item);
                        taken += 1;
                        next = if taken < WRITE_BURST { items.try_recv().ok() } else { None };
                    }
                }
                Err(_) => frame::encode(&mut out, frame::HEARTBEAT, |_| {}),
            },
            // The follower sends nothing after the handshake: a read returns only when it left.
            _ = read.read(&mut sink) => {
                tracing::info!(%peer, "relay peer left");
                return;
            }
        }
        if let Err(error) = write.write_all(&out).await {
            tracing::info!(%peer, %error, "relay peer gone");
            return;
        }
        metrics.sent(batches, out.len() as u64);
    }
}

fn encode(out: &mut BytesMut, item: &Outgoing) {
    match item {
        Outgoing::Batch {
            received_at_ns,
            frames,
        } => frame::encode_batch(out, *received_at_ns, frames),
        Outgoing::Snapshot(snapshot) => frame::encode_snapshot(out, snapshot),
    }
}

/// Keeps one follower task per peer the configuration or discovery lists.
async fn follow_peers(
    peers: PeersConfig,
    secret: Arc<RelaySecret>,
    id: ReplicaId,
    inbound: mpsc::Sender<Relayed>,
    shutdown: watch::Receiver<bool>,
) {
    let mut following: HashMap<String, Owned> = HashMap::new();
    let follow = |addresses: Vec<String>, following: &mut HashMap<String, Owned>| {
        following.retain(|addr, _| {
            let keep = addresses.contains(addr);
            if !keep {
                crate::metrics::global().relay.forget_peer(addr);
                tracing::info!(peer = %addr, "relay peer no longer listed");
            }
            keep
        });
        for addr in addresses {
            following.entry(addr.clone()).or_insert_with(|| {
                Owned(tokio::spawn(follow_peer(
                    addr,
                    Arc::clone(&secret),
                    id,
                    inbound.clone(),
                )))
            });
        }
    };
    match peers {
        PeersConfig::Static(list) => {
            follow(list, &mut following);
            std::future::pending::<()>().await;
        }
        PeersConfig::Kubernetes(kube) => {
            let (tx, mut rx) = watch::channel(Snapshot::default());
            let discovery = Owned(tokio::spawn(async move {
                if let Err(error) = run_discovery(
                    DiscoveryConfig::Kubernetes(kube),
                    "relay peers".into(),
                    tx,
                    shutdown,
                )
                .await
                {
                    tracing::error!(%error, "relay peer discovery stopped");
                }
            }));
            while rx.changed().await.is_ok() {
                let addresses = rx
                    .borrow_and_update()
                    .iter()
                    .map(|e| e.http.to_string())
                    .collect();
                follow(addresses, &mut following);
            }
            drop(discovery);
        }
    }
}

/// Follows one peer's relay, reconnecting after any failure, until this replica stops (or
/// the peer turns out to be this replica).
async fn follow_peer(
    addr: String,
    secret: Arc<RelaySecret>,
    id: ReplicaId,
    inbound: mpsc::Sender<Relayed>,
) {
    let metrics = &crate::metrics::global().relay;
    let mut backoff = RECONNECT_MIN;
    loop {
        let keys = secret.keys();
        let mut streamed = stream_peer(&addr, &keys.current, &id, &inbound, &mut backoff).await;
        if let (Err(RelayError::Unauthenticated), Some(previous)) = (&streamed, keys.previous()) {
            // During a rotation the peer's volume may still hold the previous secret.
            streamed = stream_peer(&addr, previous, &id, &inbound, &mut backoff).await;
        }
        match streamed {
            Ok(()) => return,
            Err(RelayError::Myself) => {
                tracing::debug!(peer = %addr, "relay peer is this replica");
                metrics.forget_peer(&addr);
                return;
            }
            Err(RelayError::Unauthenticated) => {
                tracing::error!(peer = %addr, "relay peer does not prove it holds the shared secret; not followed until it does");
                metrics.peer(&addr, false);
            }
            Err(error) => {
                tracing::info!(peer = %addr, %error, retry_in = ?backoff, "relay peer unreachable");
                metrics.peer(&addr, false);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// One connection to a peer; `Ok` only when this replica's ingest task is gone.
async fn stream_peer(
    addr: &str,
    secret: &[u8],
    id: &ReplicaId,
    inbound: &mpsc::Sender<Relayed>,
    backoff: &mut Duration,
) -> Result<(), RelayError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| RelayError::Silent)??;
    let _ = stream.set_nodelay(true);
    let mut reader = FrameReader::new(stream);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, auth::connect(&mut reader, secret, id))
        .await
        .map_err(|_| RelayError::Silent)??;
    *backoff = RECONNECT_MIN;
    crate::metrics::global().relay.peer(addr, true);
    tracing::info!(peer = %addr, "following a peer replica's relay");
    loop {
        let (kind, body) = tokio::time::timeout(SILENCE, reader.next(MAX_FRAME))
            .await
            .map_err(|_| RelayError::Silent)??;
        let item = match frame::decode(kind, body)? {
            Frame::Heartbeat => continue,
            Frame::Snapshot(snapshot) => Relayed::Snapshot(snapshot),
            Frame::Batch {
                received_at_ns,
                frames,
            } => match ZmqMessage::try_from(frames.to_vec()) {
                Ok(message) => Relayed::Batch {
                    message,
                    received_at_ns,
                },
                Err(_) => continue,
            },
        };
        if inbound.send(item).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use super::*;

    fn endpoint(secret_file: &Path, peers: Vec<String>) -> RelayConfig {
        RelayConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            secret_file: secret_file.to_path_buf(),
            peers: PeersConfig::Static(peers),
        }
    }

    async fn follower(
        secret_file: &Path,
        home: &RelayTasks,
        shutdown: &watch::Receiver<bool>,
    ) -> RelayTasks {
        let secret = Arc::new(RelaySecret::read(secret_file).expect("secret"));
        start(
            &endpoint(secret_file, vec![home.bound.to_string()]),
            secret,
            shutdown.clone(),
        )
        .await
        .expect("follower's relay")
    }

    #[tokio::test]
    async fn a_rotated_secret_file_is_followed_and_peers_not_rotated_yet_still_join() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (home_file, stale_file, fresh_file) = (
            dir.path().join("home"),
            dir.path().join("stale"),
            dir.path().join("fresh"),
        );
        let (before, after) = (
            "the secret before rotation\n",
            "the secret after rotation!\n",
        );
        for (file, secret) in [
            (&home_file, before),
            (&stale_file, before),
            (&fresh_file, after),
        ] {
            std::fs::write(file, secret).expect("secret file");
        }
        let (_stop, shutdown) = watch::channel(false);
        let secret = Arc::new(RelaySecret::read(&home_file).expect("secret"));
        let mut home = start(
            &endpoint(&home_file, Vec::new()),
            Arc::clone(&secret),
            shutdown.clone(),
        )
        .await
        .expect("home relay");

        // The Secret's volume is updated: the running relay takes the new secret.
        std::fs::write(&home_file, after).expect("rotated secret");
        let deadline = Instant::now() + Duration::from_secs(20);
        while &*secret.keys().current != after.trim_end().as_bytes() {
            assert!(
                Instant::now() < deadline,
                "the rotated secret file was not re-read"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A peer already rotated, and one whose volume still holds the previous secret.
        for file in [&fresh_file, &stale_file] {
            let _peer = follower(file, &home, &shutdown).await;
            let joined = tokio::time::timeout(Duration::from_secs(20), home.joins.recv()).await;
            assert!(
                matches!(joined, Ok(Some(_))),
                "a peer with {} did not join",
                file.display()
            );
        }
    }
}
