//! Metrics of the replica relay (`crate::relay`): volume, lag, peers.
//!
//! The families are declared in [`RelayMetrics`].

use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::family::metric_families;

/// Loopback relays take tens of microseconds; a loaded node, milliseconds.
const LAG_BUCKETS: &[f64] = &[
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
];

/// What became of a snapshot.
#[derive(Clone, Copy, Debug)]
pub enum SnapshotResult {
    /// Sent to a peer that joined.
    Sent,
    /// Received and applied.
    Applied,
    /// Received, but this replica was already as far (or the pod is unknown here).
    Skipped,
}

metric_families! {
    /// The replica relay's families, and what records them.
    pub struct RelayMetrics {
        batches_sent: IntCounter {
            name: kvgate_relay_batches_sent_total,
            help: "Pod event batches relayed to peer replicas (one per peer).",
        },
        bytes_sent: IntCounter {
            name: kvgate_relay_bytes_sent_total,
            help: "Bytes of relay frames written to peer replicas.",
        },
        batches_received: IntCounter {
            name: kvgate_relay_batches_received_total,
            help: "Pod event batches received from peer replicas.",
        },
        lag: Histogram {
            name: kvgate_relay_lag_seconds,
            help: "Time from a peer receiving a pod's batch to this replica taking it in \
                   (wall clocks of two processes).",
            buckets: LAG_BUCKETS,
        },
        snapshots: IntCounterVec {
            name: kvgate_relay_snapshots_total,
            help: "Pod state snapshots a joining peer was sent, or this replica applied or \
                   skipped.",
            labels: [result],
        },
        peer_up: IntGaugeVec {
            name: kvgate_relay_peer_up,
            help: "1 while this replica receives a peer replica's relay, 0 while it is \
                   trying to reach it.",
            labels: [peer],
        },
        subscribers: IntGauge {
            name: kvgate_relay_subscribers,
            help: "Peer replicas receiving this replica's relay.",
        },
        rejected: IntCounterVec {
            name: kvgate_relay_rejected_total,
            help: "Relay connections refused or dropped: unauthenticated (no valid proof of the \
                   shared secret), handshake (malformed), slow (a peer that fell behind).",
            labels: [reason],
        },
        secret_reloads: IntCounterVec {
            name: kvgate_relay_secret_reloads_total,
            help: "Changes of the relay secret's file: applied (a rotated secret now in use), \
                   failed (unreadable or too short; the secret in use stays).",
            labels: [result],
        },
    }
}

impl RelayMetrics {
    pub fn sent(&self, batches: u64, bytes: u64) {
        self.batches_sent.inc_by(batches);
        self.bytes_sent.inc_by(bytes);
    }

    pub fn received(&self, lag: Option<Duration>) {
        self.batches_received.inc();
        if let Some(lag) = lag {
            self.lag.observe(lag.as_secs_f64());
        }
    }

    pub fn snapshot(&self, result: SnapshotResult) {
        let label = match result {
            SnapshotResult::Sent => "sent",
            SnapshotResult::Applied => "applied",
            SnapshotResult::Skipped => "skipped",
        };
        self.snapshots.with_label_values(&[label]).inc();
    }

    pub fn peer(&self, peer: &str, up: bool) {
        self.peer_up.with_label_values(&[peer]).set(i64::from(up));
    }

    pub fn forget_peer(&self, peer: &str) {
        let _ = self.peer_up.remove_label_values(&[peer]);
    }

    pub fn subscribers(&self, count: usize) {
        self.subscribers.set(count as i64);
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    pub fn secret_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "failed" };
        self.secret_reloads.with_label_values(&[result]).inc();
    }
}
