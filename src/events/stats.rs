//! Counters of the event ingestion, per pod and overall, for export as metrics
//! and for `/debug`. Written with relaxed atomics on the ingest path; read at
//! any time without stopping it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::pods::PodId;

/// What the hash parity check says about a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ParityVerdict {
    /// No announced run could be checked yet.
    Unchecked = 0,
    /// Recomputed hashes agree with the announced ones.
    Agree = 1,
    /// They disagree: kvgate's hash settings differ from the pod's.
    Disagree = 2,
}

impl ParityVerdict {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Agree,
            2 => Self::Disagree,
            _ => Self::Unchecked,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unchecked => "unchecked",
            Self::Agree => "agree",
            Self::Disagree => "disagree",
        }
    }
}

/// One pod's counters (all its data-parallel ranks together).
#[derive(Debug, Default)]
pub struct PodEventStats {
    /// Batches received live (duplicates included).
    pub batches: AtomicU64,
    /// Events applied (BlockStored, BlockRemoved, AllBlocksCleared).
    pub events: AtomicU64,
    /// Block hashes stored / removed (one per block, per event).
    pub blocks_stored: AtomicU64,
    pub blocks_removed: AtomicU64,
    /// AllBlocksCleared applied.
    pub all_cleared: AtomicU64,
    /// Sequence gaps opened.
    pub gaps: AtomicU64,
    /// Gaps closed by replay, and replay rounds that failed or left holes.
    pub replays_ok: AtomicU64,
    pub replays_failed: AtomicU64,
    /// Gaps given up: the pod's entries were cleared.
    pub unrecoverable: AtomicU64,
    /// New publisher processes detected.
    pub restarts: AtomicU64,
    /// Batches already applied, dropped.
    pub duplicates: AtomicU64,
    /// Payloads that could not be decoded, and batches with undecodable events.
    pub malformed: AtomicU64,
    /// BlockStored runs skipped: their LoRA adapter is not configured.
    pub unknown_adapter: AtomicU64,
    /// Runs whose hashes were recomputed, and those that disagreed.
    pub parity_checked: AtomicU64,
    pub parity_mismatched: AtomicU64,
    parity: AtomicU8,
    last_mismatch: Mutex<Option<String>>,
}

impl PodEventStats {
    pub fn parity(&self) -> ParityVerdict {
        ParityVerdict::from_u8(self.parity.load(Ordering::Relaxed))
    }

    pub(crate) fn set_parity(&self, verdict: ParityVerdict) {
        self.parity.store(verdict as u8, Ordering::Relaxed);
    }

    /// The last disagreement, described for operators.
    pub fn last_mismatch(&self) -> Option<String> {
        self.last_mismatch.lock().clone()
    }

    pub(crate) fn record_mismatch(&self, description: String) {
        *self.last_mismatch.lock() = Some(description);
    }

    pub fn snapshot(&self) -> PodEventCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PodEventCounts {
            batches: get(&self.batches),
            events: get(&self.events),
            blocks_stored: get(&self.blocks_stored),
            blocks_removed: get(&self.blocks_removed),
            all_cleared: get(&self.all_cleared),
            gaps: get(&self.gaps),
            replays_ok: get(&self.replays_ok),
            replays_failed: get(&self.replays_failed),
            unrecoverable: get(&self.unrecoverable),
            restarts: get(&self.restarts),
            duplicates: get(&self.duplicates),
            malformed: get(&self.malformed),
            unknown_adapter: get(&self.unknown_adapter),
            parity_checked: get(&self.parity_checked),
            parity_mismatched: get(&self.parity_mismatched),
            parity: self.parity(),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A copy of one pod's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEventCounts {
    pub batches: u64,
    pub events: u64,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub all_cleared: u64,
    pub gaps: u64,
    pub replays_ok: u64,
    pub replays_failed: u64,
    pub unrecoverable: u64,
    pub restarts: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub unknown_adapter: u64,
    pub parity_checked: u64,
    pub parity_mismatched: u64,
    pub parity: ParityVerdict,
}

/// Counters not attributable to a discovered pod.
#[derive(Debug, Default)]
pub struct GlobalEventStats {
    /// Messages that are not `[topic, seq, payload]`, or whose topic is not
    /// `<prefix><pod>@<model>` for a configured model.
    pub malformed_messages: AtomicU64,
    /// Messages from a topic naming a pod discovery does not know (dropped when
    /// `requireKnownPods`).
    pub unknown_pod: AtomicU64,
    /// Replay requests sent.
    pub replay_requests: AtomicU64,
}

/// All ingestion counters. Shared as `Arc<EventStats>`.
#[derive(Debug, Default)]
pub struct EventStats {
    pub global: GlobalEventStats,
    pods: RwLock<HashMap<PodId, Arc<PodEventStats>>>,
}

impl EventStats {
    /// The counters of a pod, created on first use.
    pub(crate) fn pod(&self, id: PodId) -> Arc<PodEventStats> {
        if let Some(stats) = self.pods.read().get(&id) {
            return Arc::clone(stats);
        }
        Arc::clone(self.pods.write().entry(id).or_default())
    }

    /// Moves counters to another id (a publisher tracked before discovery listed its pod).
    pub(crate) fn rename(&self, from: PodId, to: PodId) {
        let mut pods = self.pods.write();
        if let Some(stats) = pods.remove(&from) {
            pods.insert(to, stats);
        }
    }

    pub(crate) fn forget(&self, id: PodId) {
        self.pods.write().remove(&id);
    }

    /// Counters of one pod, if it is tracked.
    pub fn of(&self, id: PodId) -> Option<PodEventCounts> {
        self.pods.read().get(&id).map(|s| s.snapshot())
    }

    /// The last parity disagreement of a pod.
    pub fn last_mismatch(&self, id: PodId) -> Option<String> {
        self.pods.read().get(&id).and_then(|s| s.last_mismatch())
    }

    /// Counters of every tracked pod, by pod id.
    pub fn pods(&self) -> Vec<(PodId, PodEventCounts)> {
        let mut all: Vec<_> = self
            .pods
            .read()
            .iter()
            .map(|(id, s)| (*id, s.snapshot()))
            .collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all
    }
}
