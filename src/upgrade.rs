//! Graceful upgrade (`kvgate serve -u`): a new process takes over the listening
//! sockets of the running one, and with them its block index and KV event streams.
//!
//! Pingora moves the sockets: the new process, started with `-u`, waits on
//! `upgrade_sock` for them; the old one sends them when it gets SIGQUIT, keeps
//! accepting for 5 s more, then stops accepting and drains. kvgate adds a second
//! Unix socket beside it (`<upgrade_sock>.state`) for its own state:
//!
//! 1. The new process binds the state socket before it waits for the sockets.
//! 2. The old process, on SIGQUIT, connects to it first (so the new one knows a
//!    handover is coming), then lets Pingora send the sockets, and meanwhile, on a
//!    thread of its own: stops its KV event ingestion (which frees a bound event
//!    endpoint and fixes each publisher's last sequence number), snapshots the
//!    block index, and writes both.
//! 3. The new process reads the state before any service starts, restores the
//!    index under its own pod ids once discovery has listed the pods, and resumes
//!    every event stream at the handed-over sequence number: batches published
//!    while no process listened show up as a gap and are fetched from the pods'
//!    replay buffers, like any other gap. Only then does it take traffic.
//!
//! A snapshot rather than a replay of every pod from sequence 0: a pod's replay
//! buffer holds its last `buffer_steps` batches (10,000 by default, minutes of a
//! busy pod), not the history that built its cache, so a replay alone would
//! leave long-lived pods cold. The replay covers just the seconds of the switch.
//!
//! Both processes log as they go; when anything fails the new process starts
//! with an empty index (and learns it again from live events), never without
//! its sockets.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::server::{ListenFds, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use xxhash_rust::xxh3::xxh3_64;

use crate::events::{KvEventService, PodHandover};
use crate::gateway::Gateway;
use crate::index::{BlockIndex, SnapshotStats};

/// First bytes of a handover: the format and its version.
const MAGIC: &[u8; 8] = b"KVGHOV01";
/// How long the old process tries to reach the new one's state socket.
const CONNECT_FOR: Duration = Duration::from_secs(3);
/// Longest the old process waits for its event ingestion to stop.
const EVENTS_STOP_WAIT: Duration = Duration::from_secs(5);
/// Once the sockets arrived, how long the new process waits for the old one's
/// connection (it connects before sending the sockets, so this only covers
/// scheduling delays).
const CONNECTION_GRACE: Duration = Duration::from_secs(2);
/// Longest the whole state may take to arrive.
const STATE_WAIT: Duration = Duration::from_secs(120);
/// How often a draining process checks whether its last request finished.
const DRAIN_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade state socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("receiving the handed-over state: {0}")]
    Io(#[from] std::io::Error),
    #[error("the handed-over state is not a kvgate handover (or another version)")]
    Header,
    #[error("the handed-over state is truncated or corrupt (checksum mismatch)")]
    Checksum,
    #[error("the handed-over KV event state does not parse: {0}")]
    Events(serde_json::Error),
    #[error("the previous process did not finish handing over within {0:?}")]
    Timeout(Duration),
    #[error("the thread receiving the handed-over state panicked")]
    Receiver,
}

/// What the old process hands to the new one.
#[derive(Debug, Default)]
pub struct Handover {
    /// Every pod's event stream positions.
    pub pods: Vec<PodHandover>,
    /// The block index, as [`BlockIndex::snapshot`] writes it (under the old pod ids).
    pub index: Bytes,
}

/// The state socket that goes with Pingora's `upgrade_sock`.
pub fn state_socket(upgrade_sock: &Path) -> PathBuf {
    let mut path = upgrade_sock.as_os_str().to_owned();
    path.push(".state");
    PathBuf::from(path)
}

impl Handover {
    /// `MAGIC | events JSON length | events JSON | index length | index | xxh3 of all before`.
    pub fn encode(pods: &[PodHandover], index: &[u8]) -> Vec<u8> {
        // Serializing plain structs of strings and numbers cannot fail.
        let events = serde_json::to_vec(pods).unwrap_or_default();
        let mut out = Vec::with_capacity(MAGIC.len() + 24 + events.len() + index.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(events.len() as u64).to_le_bytes());
        out.extend_from_slice(&events);
        out.extend_from_slice(&(index.len() as u64).to_le_bytes());
        out.extend_from_slice(index);
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, UpgradeError> {
        let (body, sum) = bytes
            .split_last_chunk::<8>()
            .ok_or(UpgradeError::Checksum)?;
        if body.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(UpgradeError::Header);
        }
        if xxh3_64(body) != u64::from_le_bytes(*sum) {
            return Err(UpgradeError::Checksum);
        }
        let mut rest = &body[MAGIC.len()..];
        let events = take_chunk(&mut rest).ok_or(UpgradeError::Checksum)?;
        let index = take_chunk(&mut rest).ok_or(UpgradeError::Checksum)?;
        let pods = serde_json::from_slice(events).map_err(UpgradeError::Events)?;
        Ok(Self {
            pods,
            index: Bytes::copy_from_slice(index),
        })
    }
}

/// A length-prefixed chunk off the front of `rest`.
fn take_chunk<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, tail) = rest.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
    let chunk = tail.get(..len)?;
    *rest = &tail[len..];
    Some(chunk)
}

/// The new process's end of the state socket.
pub struct HandoverReceiver {
    path: PathBuf,
    connected: Arc<AtomicBool>,
    abandon: Arc<AtomicBool>,
    thread: JoinHandle<Result<Option<Vec<u8>>, UpgradeError>>,
}

impl HandoverReceiver {
    /// Binds the state socket (replacing a stale one) and waits for the old process
    /// on a thread. Call before Pingora's bootstrap.
    pub fn listen(path: &Path) -> Result<Self, UpgradeError> {
        let socket_err = |source| UpgradeError::Socket {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(socket_err)?;
        // Whoever can write here can plant an index in this process: only its user.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err)?;
        listener.set_nonblocking(true).map_err(socket_err)?;
        let connected = Arc::new(AtomicBool::new(false));
        let abandon = Arc::new(AtomicBool::new(false));
        let thread = {
            let connected = Arc::clone(&connected);
            let abandon = Arc::clone(&abandon);
            std::thread::Builder::new()
                .name("kvgate-handover".into())
                .spawn(move || receive(&listener, &connected, &abandon))
                .map_err(socket_err)?
        };
        tracing::info!(path = %path.display(), "waiting for the running kvgate to hand over its state");
        Ok(Self {
            path: path.to_path_buf(),
            connected,
            abandon,
            thread,
        })
    }

    /// After Pingora received the sockets: the handed-over state, or `None` when the
    /// old process sent none (it connects before it sends the sockets, so a missing
    /// connection by now means none is coming).
    pub fn finish(self) -> Result<Option<Handover>, UpgradeError> {
        let deadline = Instant::now() + CONNECTION_GRACE;
        while !self.connected.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(DRAIN_POLL);
        }
        if !self.connected.load(Ordering::Acquire) {
            self.abandon.store(true, Ordering::Release);
        }
        let received = self.thread.join().map_err(|_| UpgradeError::Receiver);
        let _ = std::fs::remove_file(&self.path);
        match received?? {
            Some(bytes) => Handover::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }
}

fn receive(
    listener: &UnixListener,
    connected: &AtomicBool,
    abandon: &AtomicBool,
) -> Result<Option<Vec<u8>>, UpgradeError> {
    let started = Instant::now();
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if abandon.load(Ordering::Acquire) {
                    return Ok(None);
                }
                if started.elapsed() > STATE_WAIT {
                    return Err(UpgradeError::Timeout(STATE_WAIT));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    };
    connected.store(true, Ordering::Release);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STATE_WAIT))?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// Runs the KV event service under a stop signal of its own, so a graceful upgrade
/// can stop it (and read its final stream positions) before the server shuts down.
pub struct EventsRunner {
    service: Arc<KvEventService>,
    stop: watch::Sender<bool>,
    done: watch::Sender<bool>,
}

impl EventsRunner {
    pub fn new(service: Arc<KvEventService>) -> Self {
        Self {
            service,
            stop: watch::Sender::new(false),
            done: watch::Sender::new(false),
        }
    }

    pub fn service(&self) -> &Arc<KvEventService> {
        &self.service
    }

    /// Stops ingestion and waits (bounded) until it has; true once stopped.
    async fn stop(&self, limit: Duration) -> bool {
        self.stop.send_replace(true);
        let mut done = self.done.subscribe();
        tokio::time::timeout(limit, done.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[async_trait]
impl BackgroundService for EventsRunner {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let run = async {
            if let Err(error) = self.service.run(self.stop.subscribe()).await {
                tracing::error!(%error, "KV event service failed; pods stay unknown and are routed on load only");
            }
            self.done.send_replace(true);
        };
        // Ready once the source is open and a handover applied, or once the service
        // gave up (the proxy then routes on load alone).
        let readiness = async {
            let mut done = self.done.subscribe();
            tokio::select! {
                _ = self.service.ready() => {}
                _ = done.wait_for(|d| *d) => {}
            }
            ready.notify_ready();
            let _ = shutdown.wait_for(|stop| *stop).await;
            self.stop.send_replace(true);
        };
        futures::future::join(run, readiness).await;
    }
}

/// Pingora's shutdown signals (SIGQUIT: upgrade, SIGTERM: graceful stop, SIGINT:
/// fast stop), with kvgate's handover added to SIGQUIT and draining to both
/// graceful ones.
pub struct Signals {
    state_sock: PathBuf,
    gateway: Arc<Gateway>,
    events: Arc<EventsRunner>,
    /// Set while the state is being written; the drain exit waits for it.
    handing_over: Arc<AtomicBool>,
}

impl Signals {
    pub fn new(
        state_sock: PathBuf,
        gateway: Arc<Gateway>,
        events: Arc<EventsRunner>,
        handing_over: Arc<AtomicBool>,
    ) -> Self {
        Self {
            state_sock,
            gateway,
            events,
            handing_over,
        }
    }

    /// Connects to the new process and hands over on a thread of its own, so that
    /// Pingora sends the sockets meanwhile.
    async fn hand_over(&self) {
        let Some(stream) = connect(&self.state_sock).await else {
            tracing::warn!(path = %self.state_sock.display(), "no new kvgate listens for the state: it starts with an empty index");
            return;
        };
        self.handing_over.store(true, Ordering::Release);
        let events = Arc::clone(&self.events);
        let index = Arc::clone(&self.gateway.index);
        let handing_over = Arc::clone(&self.handing_over);
        let spawned = std::thread::Builder::new()
            .name("kvgate-handover".into())
            .spawn(move || {
                match write_state(stream, &events, &index) {
                    Ok(sent) => tracing::info!(
                        pods = sent.pods,
                        blocks = sent.index.blocks,
                        entries = sent.index.entries,
                        bytes = sent.bytes,
                        "state handed over to the new process"
                    ),
                    Err(error) => tracing::error!(%error, "handing over the state failed; the new process starts with an empty index"),
                }
                handing_over.store(false, Ordering::Release);
            });
        if let Err(error) = spawned {
            self.handing_over.store(false, Ordering::Release);
            tracing::error!(%error, "cannot start the handover thread");
        }
    }
}

async fn connect(path: &Path) -> Option<UnixStream> {
    let deadline = Instant::now() + CONNECT_FOR;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Some(stream),
            Err(error) if Instant::now() >= deadline => {
                tracing::debug!(%error, "connecting to the state socket");
                return None;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// What one handover carried.
struct Sent {
    pods: usize,
    index: SnapshotStats,
    bytes: usize,
}

/// Stops ingestion, snapshots the index and writes both.
fn write_state(
    mut stream: UnixStream,
    events: &EventsRunner,
    index: &BlockIndex,
) -> std::io::Result<Sent> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    if !runtime.block_on(events.stop(EVENTS_STOP_WAIT)) {
        tracing::warn!(waited = ?EVENTS_STOP_WAIT, "KV event ingestion did not stop in time; handing over without stream positions");
    }
    let pods = events.service().handover().unwrap_or_default();
    let mut snapshot = Vec::new();
    let stats = index.snapshot(&mut snapshot)?;
    let bytes = Handover::encode(&pods, &snapshot);
    stream.write_all(&bytes)?;
    stream.flush()?;
    Ok(Sent {
        pods: pods.len(),
        index: stats,
        bytes: bytes.len(),
    })
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (mut quit, mut term, mut int) = match (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(quit), Ok(term), Ok(int)) => (quit, term, int),
            _ => {
                tracing::error!("cannot listen for shutdown signals; stopping");
                return ShutdownSignal::FastShutdown;
            }
        };
        tokio::select! {
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the sockets, index and event streams to the new process");
                self.gateway.set_draining();
                self.hand_over().await;
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: finishing in-flight requests, then stopping");
                self.gateway.set_draining();
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// Ends the process once it is shutting down and nothing is left to finish (no
/// request in flight, no handover being written), instead of sleeping out the whole
/// grace period: the grace period bounds a drain, it is not a fixed wait.
pub struct DrainExit {
    gateway: Arc<Gateway>,
    handing_over: Arc<AtomicBool>,
}

impl DrainExit {
    pub fn new(gateway: Arc<Gateway>, handing_over: Arc<AtomicBool>) -> Self {
        Self {
            gateway,
            handing_over,
        }
    }
}

#[async_trait]
impl BackgroundService for DrainExit {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(DRAIN_POLL).await;
            if self.gateway.active_requests() == 0 && !self.handing_over.load(Ordering::Acquire) {
                tracing::info!("drained: no request in flight; exiting");
                std::process::exit(0);
            }
        }
    }
}

/// A TCP listener on `addr`: the one a previous process handed over under `key` when
/// there is one (graceful upgrade), else a new one, entered in Pingora's table under
/// `key` so that it is handed to the next process in turn.
pub fn inherit_or_bind(
    fds: &ListenFds,
    key: &str,
    addr: SocketAddr,
) -> std::io::Result<std::net::TcpListener> {
    let mut table = fds.lock();
    if let Some(&fd) = table.get(key) {
        tracing::info!(%addr, "listening socket taken over from the previous process");
        // SAFETY: the descriptor came over the upgrade socket as a listening TCP socket
        // bound to `addr`, and nothing else in this process uses it.
        return Ok(unsafe { std::net::TcpListener::from_raw_fd(fd) });
    }
    let listener = std::net::TcpListener::bind(addr)?;
    table.add(key.to_string(), listener.as_raw_fd());
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{PublisherHandover, StreamMark};

    fn pods() -> Vec<PodHandover> {
        vec![PodHandover {
            model: "m".into(),
            key: "10.0.0.1:8000".into(),
            publishers: vec![PublisherHandover {
                rank: 0,
                target: 7,
                scopes: vec![3],
                mark: StreamMark {
                    seq: 41,
                    // A publisher's wall clock; its shortest decimal does not parse back
                    // exactly with every JSON reader.
                    ts: 1795679153.8389897,
                    synced: true,
                },
            }],
        }]
    }

    #[test]
    fn handover_round_trips_and_rejects_damage() {
        let bytes = Handover::encode(&pods(), b"index bytes");
        let back = Handover::decode(&bytes).expect("decodes");
        assert_eq!(back.pods, pods());
        assert_eq!(
            back.pods[0].publishers[0].mark.ts.to_bits(),
            pods()[0].publishers[0].mark.ts.to_bits(),
            "timestamps cross bit for bit"
        );
        assert_eq!(&back.index[..], b"index bytes");

        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            Handover::decode(&flipped),
            Err(UpgradeError::Checksum)
        ));
        assert!(matches!(
            Handover::decode(&bytes[..bytes.len() - 3]),
            Err(UpgradeError::Checksum) | Err(UpgradeError::Header)
        ));
        let mut other = bytes;
        other[0] = b'X';
        assert!(matches!(
            Handover::decode(&other),
            Err(UpgradeError::Header)
        ));
    }

    #[test]
    fn state_crosses_the_socket_and_absence_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_socket(&dir.path().join("upgrade.sock"));
        let receiver = HandoverReceiver::listen(&path).expect("listen");
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream
            .write_all(&Handover::encode(&pods(), b"ix"))
            .expect("write");
        drop(stream);
        let got = receiver.finish().expect("received").expect("some state");
        assert_eq!(got.pods, pods());
        assert!(!path.exists(), "the socket file is removed");

        // Nobody connects: the new process goes on without state.
        let receiver = HandoverReceiver::listen(&path).expect("listen again");
        assert!(receiver.finish().expect("no error").is_none());
    }
}
