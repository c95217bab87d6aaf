//! Metrics of the replica relay (`crate::relay`): volume, lag, peers.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `kvgate_relay_batches_sent_total`, `kvgate_relay_bytes_sent_total` | counter | |
//! | `kvgate_relay_batches_received_total` | counter | |
//! | `kvgate_relay_lag_seconds` | histogram | |
//! | `kvgate_relay_snapshots_total` | counter | result |
//! | `kvgate_relay_peer_up` | gauge | peer |
//! | `kvgate_relay_subscribers` | gauge | |
//! | `kvgate_relay_rejected_total` | counter | reason |
//! | `kvgate_relay_secret_reloads_total` | counter | result |

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::{register, MetricsError};

/// Loopback relays take tens of microseconds; a loaded node, milliseconds.
const LAG_BUCKETS: &[f64] = &[
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
];

pub struct RelayMetrics {
    batches_sent: IntCounter,
    bytes_sent: IntCounter,
    batches_received: IntCounter,
    lag: Histogram,
    snapshots: IntCounterVec,
    peer_up: IntGaugeVec,
    subscribers: IntGauge,
    rejected: IntCounterVec,
    secret_reloads: IntCounterVec,
}

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

impl RelayMetrics {
    pub(super) fn new(r: &Registry) -> Result<Self, MetricsError> {
        let counter =
            |name: &'static str, help: &str| register(r, name, IntCounter::new(name, help));
        let vec = |name: &'static str, help: &str, labels: &[&str]| {
            register(r, name, IntCounterVec::new(Opts::new(name, help), labels))
        };
        Ok(Self {
            batches_sent: counter(
                "kvgate_relay_batches_sent_total",
                "Pod event batches relayed to peer replicas (one per peer).",
            )?,
            bytes_sent: counter(
                "kvgate_relay_bytes_sent_total",
                "Bytes of relay frames written to peer replicas.",
            )?,
            batches_received: counter(
                "kvgate_relay_batches_received_total",
                "Pod event batches received from peer replicas.",
            )?,
            lag: register(
                r,
                "kvgate_relay_lag_seconds",
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kvgate_relay_lag_seconds",
                        "Time from a peer receiving a pod's batch to this replica taking it in \
                         (wall clocks of two processes).",
                    )
                    .buckets(LAG_BUCKETS.to_vec()),
                ),
            )?,
            snapshots: vec(
                "kvgate_relay_snapshots_total",
                "Pod state snapshots a joining peer was sent, or this replica applied or skipped.",
                &["result"],
            )?,
            peer_up: register(
                r,
                "kvgate_relay_peer_up",
                IntGaugeVec::new(
                    Opts::new(
                        "kvgate_relay_peer_up",
                        "1 while this replica receives a peer replica's relay, 0 while it is \
                         trying to reach it.",
                    ),
                    &["peer"],
                ),
            )?,
            subscribers: register(
                r,
                "kvgate_relay_subscribers",
                IntGauge::new(
                    "kvgate_relay_subscribers",
                    "Peer replicas receiving this replica's relay.",
                ),
            )?,
            rejected: vec(
                "kvgate_relay_rejected_total",
                "Relay connections refused or dropped: unauthenticated (no valid proof of the \
                 shared secret), handshake (malformed), slow (a peer that fell behind).",
                &["reason"],
            )?,
            secret_reloads: vec(
                "kvgate_relay_secret_reloads_total",
                "Changes of the relay secret's file: applied (a rotated secret now in use), \
                 failed (unreadable or too short; the secret in use stays).",
                &["result"],
            )?,
        })
    }

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
