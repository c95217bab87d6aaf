//! The relay's fan-out, owned by the ingest task: every batch a pod sent this replica goes
//! to every peer that joined, and a joining peer first gets a snapshot of every pod this
//! replica is home to. Both happen between two batches of the ingest task, so a snapshot
//! and the batches after it are in order on the peer's queue.

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::ZmqMessage;

use super::frame::PodSnapshot;
use crate::metrics::relay::SnapshotResult;

/// Items queued for one peer. A peer whose queue is full is dropped (it reconnects and
/// catches up by snapshot), so a slow peer costs bounded memory.
pub const PEER_QUEUE: usize = 16_384;

/// What goes to a peer.
#[derive(Debug)]
pub enum Outgoing {
    /// A pod's batch as received here, `[topic, seq, payload]`.
    Batch {
        received_at_ns: u64,
        frames: [Bytes; 3],
    },
    Snapshot(PodSnapshot),
}

/// A peer that authenticated and wants this replica's relay.
pub struct Join {
    pub peer: String,
    pub queue: mpsc::Sender<Outgoing>,
}

struct Subscriber {
    peer: String,
    queue: mpsc::Sender<Outgoing>,
}

#[derive(Default)]
pub struct RelayHub {
    subscribers: Vec<Subscriber>,
}

impl RelayHub {
    /// Queues the snapshots, then subscribes the peer to every batch from now on.
    pub fn join(&mut self, join: Join, snapshots: Vec<PodSnapshot>) {
        let metrics = &crate::metrics::global().relay;
        let count = snapshots.len();
        for snapshot in snapshots {
            if join.queue.try_send(Outgoing::Snapshot(snapshot)).is_err() {
                tracing::warn!(peer = %join.peer, pods = count, "relay peer cannot take this replica's snapshots; dropped");
                metrics.rejected("slow");
                return;
            }
            metrics.snapshot(SnapshotResult::Sent);
        }
        tracing::info!(peer = %join.peer, pods = count, "relay peer joined; snapshots of this replica's pods sent");
        self.subscribers.push(Subscriber {
            peer: join.peer,
            queue: join.queue,
        });
        metrics.subscribers(self.subscribers.len());
    }

    /// Relays one batch a pod sent this replica.
    pub fn forward(&mut self, message: &ZmqMessage, received_at_ns: u64) {
        if self.subscribers.is_empty() {
            return;
        }
        let (Some(topic), Some(seq), Some(payload)) =
            (message.get(0), message.get(1), message.get(2))
        else {
            return;
        };
        let before = self.subscribers.len();
        self.subscribers.retain(|s| {
            let item = Outgoing::Batch {
                received_at_ns,
                frames: [topic.clone(), seq.clone(), payload.clone()],
            };
            match s.queue.try_send(item) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(peer = %s.peer, "relay peer fell behind; dropped (it catches up by snapshot when it reconnects)");
                    crate::metrics::global().relay.rejected("slow");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if self.subscribers.len() != before {
            crate::metrics::global()
                .relay
                .subscribers(self.subscribers.len());
        }
    }
}
