//! Metrics of flow control (`crate::flow`): how many requests wait, how long, and what
//! was refused.
//!
//! The families are declared in [`FlowMetrics`].

use std::time::Duration;

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};

use super::family::metric_families;

/// From a wake-up on the next finished request (milliseconds) to a queue deadline (tens of s).
const WAIT_BUCKETS: &[f64] = &[
    1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Why a request was refused by flow control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedReason {
    /// Below the model's `shedBelow` priority while its pods were saturated (429).
    Sheddable,
    /// The queue held `maxQueuedRequests` (429).
    QueueFull,
    /// The body would have taken the queue past `maxQueuedBytes` (429).
    QueueBytes,
    /// Waited `queueTimeoutMs` without being dispatched (503).
    Deadline,
    /// Waited in a full queue and gave its place to a more important request (429).
    Displaced,
}

impl ShedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sheddable => "sheddable",
            Self::QueueFull => "queue_full",
            Self::QueueBytes => "queue_bytes",
            Self::Deadline => "deadline",
            Self::Displaced => "displaced",
        }
    }
}

/// How a request's wait in the queue ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueOutcome {
    Dispatched,
    Deadline,
    /// Its client disconnected while it waited.
    ClientGone,
    /// A more important request took its place in the full queue.
    Displaced,
}

impl QueueOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Dispatched => "dispatched",
            Self::Deadline => "deadline",
            Self::ClientGone => "client_gone",
            Self::Displaced => "displaced",
        }
    }
}

metric_families! {
    /// Flow control's families, and what records them.
    pub struct FlowMetrics {
        depth: IntGaugeVec {
            name: kvgate_flow_queue_depth,
            help: "Requests waiting in kvgate for a model's pods to drop below saturation, \
                   by priority band.",
            labels: [model, priority],
        },
        wait: HistogramVec {
            name: kvgate_flow_queue_wait_seconds,
            help: "Time requests waited in kvgate's queue, by how the wait ended.",
            labels: [model, outcome],
            buckets: WAIT_BUCKETS,
        },
        shed: IntCounterVec {
            name: kvgate_flow_shed_total,
            help: "Requests refused by flow control: sheddable, queue_full, queue_bytes \
                   (429), deadline (503).",
            labels: [model, reason],
        },
    }
}

impl FlowMetrics {
    pub fn queue_depth(&self, model: &str, priority: i32, depth: usize) {
        self.depth
            .with_label_values(&[model, &priority.to_string()])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    pub fn waited(&self, model: &str, outcome: QueueOutcome, waited: Duration) {
        self.wait
            .with_label_values(&[model, outcome.as_str()])
            .observe(waited.as_secs_f64());
    }

    pub fn shed(&self, model: &str, reason: ShedReason) {
        self.shed.with_label_values(&[model, reason.as_str()]).inc();
    }
}
