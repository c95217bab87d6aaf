//! Sequence tracking for one publisher (one pod's data-parallel rank), docs §5.
//!
//! vLLM numbers its batches 0, 1, 2, … per publisher process and never says
//! hello or goodbye, so everything kvgate knows about a publisher's state comes
//! from the numbers: `seq == last + 1` is applied; a higher seq is a gap, filled
//! from the replay ROUTER (or, without one, from batches that arrive out of
//! order within a short wait); a lower seq is a duplicate or a restarted
//! process. The batch timestamp (wall-clock seconds set by the publisher) tells
//! the two apart: a restarted process has a later clock, a duplicate the same
//! or an earlier one. A gap replay starts at the last applied seq rather than
//! the first missing one, so the replayed copy of that batch proves that the
//! ROUTER still belongs to the same process (same timestamp) before anything
//! after it is applied.
//!
//! The tracker is pure: it owns no sockets and no clock. The caller feeds it
//! what arrived and the time, and performs the [`Action`]s it emits in order.
//!
//! Trust: a publisher is [`SyncState::Synced`] while the index holds only
//! blocks it saw stored and not removed, applied contiguously since the index
//! was last cleared (by the publisher's first batch, an AllBlocksCleared, or a
//! loss kvgate could not repair). After a loss it is `Settling` (reported as
//! unknown, routed cold) until a contiguous stream from the clear point is
//! established again: two batches in a row and no gap open. One lost batch
//! therefore costs the pod its cache credit only until its stream flows again,
//! and what the index holds meanwhile is sound (only blocks seen stored since
//! the clear), if incomplete.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How a publisher's gaps are repaired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// The publisher has a replay ROUTER.
    pub replay: bool,
    /// Without replay: how long a gap waits for its batches to arrive out of
    /// order before they count as lost.
    pub reorder_wait: Duration,
    /// Longest one replay round may take before it counts as failed (the
    /// replay client's own timeout plus slack).
    pub replay_deadline: Duration,
    /// Most batches held while a gap is open; beyond it the gap counts as lost.
    pub max_held: usize,
    /// Without live traffic for this long, ask the replay ROUTER whether
    /// batches were published after the last one seen: a batch lost just
    /// before a publisher goes quiet is revealed by no later seq. Once per
    /// quiet stretch; `None` disables it.
    pub idle_probe: Option<Duration>,
    /// Replay requests per gap. More than one helps only when a replay came
    /// back with holes in the middle: the ROUTER of vLLM before 0.33 drops
    /// replies beyond its send high-water mark and still sends the end marker.
    pub max_replay_rounds: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            replay: true,
            reorder_wait: Duration::from_millis(100),
            replay_deadline: Duration::from_millis(2_500),
            idle_probe: Some(Duration::from_secs(1)),
            max_held: 12_000,
            max_replay_rounds: 3,
        }
    }
}

/// Whether the index describes the publisher's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Nothing applied yet.
    Unknown,
    /// Entries were lost (or the publisher was joined mid-stream without
    /// replay): the index was cleared and is rebuilding; routed as unknown
    /// until the next batch arrives in order.
    Settling,
    /// Contiguous since the index was last cleared.
    Synced,
}

/// Where a publisher's stream stood, for handing it to another kvgate process
/// (graceful upgrade) together with the index entries it describes.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StreamMark {
    /// The last applied batch.
    pub seq: u64,
    /// Carried as its bit pattern: a replay is checked against it bit for bit, and a
    /// decimal round trip (JSON) can be off by one unit in the last place.
    #[serde(with = "f64_bits")]
    pub ts: f64,
    /// The entries were contiguous since the index was last cleared.
    pub synced: bool,
}

mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(value.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        u64::deserialize(d).map(f64::from_bits)
    }
}

/// Identifies one replay request, so a late answer to an abandoned request is
/// ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplayToken(u64);

/// Why a publisher's entries must be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClearReason {
    /// A new publisher process: its cache starts empty.
    Restart,
    /// Batches were lost and could not be replayed.
    Lost,
}

/// What the caller must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<T> {
    /// Apply the batch passed to this [`SeqTracker::on_live`] call.
    ApplyLive,
    /// Apply a batch held earlier (live or replayed).
    ApplyHeld { seq: u64, item: T },
    /// Drop every index entry of this publisher.
    Clear(ClearReason),
    /// Ask the publisher's replay ROUTER for its buffered batches from `from`
    /// and report with [`SeqTracker::on_replay`].
    Replay { from: u64, token: ReplayToken },
}

/// What became of a live batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// In order (or the first batch): applied.
    Applied,
    /// Held until a gap before it is filled.
    Held,
    /// It opened a gap.
    Gap,
    /// Already applied, or older than what was applied: dropped.
    Duplicate,
    /// From a new publisher process: the old entries were cleared.
    Restart,
}

/// How a replay round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayEnd {
    /// The end marker arrived.
    Complete,
    /// Timeout or socket error; batches before it are still usable.
    Failed,
}

/// What a replay round achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// Not the current request (the gap was filled another way, or abandoned).
    Stale,
    /// Every missing batch was applied.
    Recovered,
    /// Holes remain and another round was requested.
    Retrying,
    /// The replayed batch at the last applied seq differs: the publisher
    /// restarted. Entries were cleared and a replay from 0 requested.
    Restarted,
    /// Holes remain that replay cannot fill: entries were cleared.
    Lost,
    /// An idle probe found nothing new.
    Probed,
}

/// A batch from the replay ROUTER.
#[derive(Debug)]
pub struct Replayed<T> {
    pub seq: u64,
    pub ts: f64,
    pub item: T,
}

#[derive(Clone, Copy, Debug)]
struct Mark {
    seq: u64,
    ts: f64,
}

impl Mark {
    fn same_batch(&self, seq: u64, ts: f64) -> bool {
        self.seq == seq && self.ts.to_bits() == ts.to_bits()
    }
}

#[derive(Debug)]
struct Held<T> {
    ts: f64,
    item: T,
}

#[derive(Clone, Copy, Debug)]
struct Recovery {
    token: ReplayToken,
    replay_in_flight: bool,
    rounds: u32,
    deadline: Instant,
    /// The last applied batch, which the replay must return unchanged.
    verify: Option<Mark>,
    /// Not a known gap: an idle publisher's ROUTER is asked whether anything
    /// was published after the last batch seen. Failing to ask loses nothing.
    probe: bool,
}

/// Sequence state of one publisher. `T` is what the caller needs to apply a
/// held batch later (the payload bytes).
#[derive(Debug)]
pub struct SeqTracker<T> {
    cfg: TrackerConfig,
    last: Option<Mark>,
    state: SyncState,
    held: BTreeMap<u64, Held<T>>,
    recovery: Option<Recovery>,
    next_token: u64,
    /// Batches applied in a row since entries were last lost.
    run: u32,
    /// Gaps opened since [`SeqTracker::take_gaps`] was last called.
    gaps: u32,
    /// When the last live batch arrived, and whether the quiet since was probed.
    last_live: Option<Instant>,
    probed: bool,
}

/// Batches in a row after a loss that re-establish the stream.
const SETTLED_RUN: u32 = 2;

impl<T> SeqTracker<T> {
    pub fn new(cfg: TrackerConfig) -> Self {
        Self {
            cfg,
            last: None,
            state: SyncState::Unknown,
            held: BTreeMap::new(),
            recovery: None,
            next_token: 0,
            run: 0,
            gaps: 0,
            last_live: None,
            probed: false,
        }
    }

    pub fn state(&self) -> SyncState {
        self.state
    }

    pub fn is_synced(&self) -> bool {
        self.state == SyncState::Synced
    }

    /// The last applied seq.
    pub fn last_seq(&self) -> Option<u64> {
        self.last.map(|m| m.seq)
    }

    /// The stream's position, once a batch was applied. Held batches are not part
    /// of it: the process that resumes from the mark replays them.
    pub fn mark(&self) -> Option<StreamMark> {
        self.last.map(|last| StreamMark {
            seq: last.seq,
            ts: last.ts,
            synced: self.state == SyncState::Synced,
        })
    }

    /// Continues a stream another process followed up to `mark`, whose entries the
    /// index now holds: the next batch is checked against it like any other, so a
    /// gap since the handover is replayed (the replay verifies the marked batch, which
    /// also catches a publisher that restarted meanwhile).
    pub fn resume(&mut self, mark: StreamMark) {
        self.last = Some(Mark {
            seq: mark.seq,
            ts: mark.ts,
        });
        self.state = if mark.synced {
            SyncState::Synced
        } else {
            SyncState::Settling
        };
        self.held.clear();
        self.recovery = None;
    }

    /// A gap is open (batches are held or a replay is outstanding).
    pub fn recovering(&self) -> bool {
        self.recovery.is_some()
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Gaps opened (live, or left after a loss) since the last call.
    pub fn take_gaps(&mut self) -> u32 {
        std::mem::take(&mut self.gaps)
    }

    /// The replay endpoint appeared or went away (discovery update).
    pub fn set_replay(&mut self, replay: bool) {
        self.cfg.replay = replay;
    }

    /// The publisher's process is known to be gone (its pod stopped accepting
    /// connections) and its entries were cleared: the next batch starts a new process's
    /// stream, whatever its seq.
    pub fn forget(&mut self) {
        self.last = None;
        self.state = SyncState::Unknown;
        self.held.clear();
        self.recovery = None;
        self.run = 0;
        self.last_live = None;
        self.probed = false;
    }

    /// The caller applied an AllBlocksCleared: from here the index is exact.
    pub fn mark_cleared(&mut self) {
        self.state = SyncState::Synced;
    }

    /// The caller could not apply a batch completely (undecodable events) and
    /// cleared the publisher's entries.
    pub fn mark_lost(&mut self) {
        self.state = SyncState::Settling;
        self.run = 0;
    }

    fn applied(&mut self, seq: u64, ts: f64) {
        self.last = Some(Mark { seq, ts });
        self.run = self.run.saturating_add(1);
    }

    /// A loss is behind us once the stream has flowed for a while with no gap open.
    fn settle(&mut self) {
        if self.state == SyncState::Settling && self.recovery.is_none() && self.run >= SETTLED_RUN {
            self.state = SyncState::Synced;
        }
    }

    fn expected(&self) -> u64 {
        self.last.map_or(0, |m| m.seq.saturating_add(1))
    }

    /// A batch from the PUB socket.
    pub fn on_live(
        &mut self,
        seq: u64,
        ts: f64,
        item: T,
        now: Instant,
        out: &mut Vec<Action<T>>,
    ) -> Verdict {
        self.last_live = Some(now);
        self.probed = false;
        let verdict = self.live(seq, ts, item, now, out);
        self.settle();
        verdict
    }

    fn live(
        &mut self,
        seq: u64,
        ts: f64,
        item: T,
        now: Instant,
        out: &mut Vec<Action<T>>,
    ) -> Verdict {
        if let Some(last) = self.last {
            if seq <= last.seq {
                if ts > last.ts {
                    self.restart(out);
                    self.first(seq, ts, item, now, out);
                    return Verdict::Restart;
                }
                return Verdict::Duplicate;
            }
        }
        if self.recovery.is_some() {
            self.held.entry(seq).or_insert(Held { ts, item });
            if self.held.len() > self.cfg.max_held {
                self.give_up(now, out);
            } else {
                self.drain(out);
                if self.held.is_empty() {
                    self.recovery = None;
                }
            }
            return Verdict::Held;
        }
        match self.last {
            None => self.first(seq, ts, item, now, out),
            Some(last) if seq == last.seq + 1 => {
                out.push(Action::ApplyLive);
                self.applied(seq, ts);
                Verdict::Applied
            }
            Some(last) => {
                self.held.insert(seq, Held { ts, item });
                self.begin_recovery(now, Some(last), 1, out);
                Verdict::Gap
            }
        }
    }

    /// The first batch of a publisher process.
    fn first(
        &mut self,
        seq: u64,
        ts: f64,
        item: T,
        now: Instant,
        out: &mut Vec<Action<T>>,
    ) -> Verdict {
        if seq == 0 {
            out.push(Action::ApplyLive);
            self.applied(seq, ts);
            self.state = SyncState::Synced;
            return Verdict::Applied;
        }
        if self.cfg.replay {
            // Joined mid-stream (slow joiner, or kvgate started after the pod):
            // the ROUTER may still hold the history from 0.
            self.held.insert(seq, Held { ts, item });
            self.begin_recovery(now, None, 1, out);
            return Verdict::Held;
        }
        out.push(Action::ApplyLive);
        self.state = SyncState::Settling;
        self.run = 0;
        self.applied(seq, ts);
        Verdict::Applied
    }

    fn restart(&mut self, out: &mut Vec<Action<T>>) {
        out.push(Action::Clear(ClearReason::Restart));
        // Held batches came from the old process.
        self.held.clear();
        self.recovery = None;
        self.last = None;
        self.state = SyncState::Unknown;
    }

    fn begin_recovery(
        &mut self,
        now: Instant,
        verify: Option<Mark>,
        rounds: u32,
        out: &mut Vec<Action<T>>,
    ) {
        let token = ReplayToken(self.next_token);
        self.next_token += 1;
        if rounds == 1 && verify.is_some() {
            self.gaps += 1;
        }
        let (replay_in_flight, deadline) = if self.cfg.replay {
            out.push(Action::Replay {
                from: verify.map_or(0, |m| m.seq),
                token,
            });
            (true, now + self.cfg.replay_deadline)
        } else {
            (false, now + self.cfg.reorder_wait)
        };
        self.recovery = Some(Recovery {
            token,
            replay_in_flight,
            rounds,
            deadline,
            verify,
            probe: false,
        });
    }

    fn begin_probe(&mut self, now: Instant, out: &mut Vec<Action<T>>) {
        let token = ReplayToken(self.next_token);
        self.next_token += 1;
        self.probed = true;
        out.push(Action::Replay {
            from: self.last.map_or(0, |m| m.seq),
            token,
        });
        self.recovery = Some(Recovery {
            token,
            replay_in_flight: true,
            rounds: 1,
            deadline: now + self.cfg.replay_deadline,
            verify: self.last,
            probe: true,
        });
    }

    fn probe_due(&self, now: Instant) -> bool {
        match (self.cfg.idle_probe, self.last_live) {
            (Some(idle), Some(at)) => {
                self.cfg.replay
                    && !self.probed
                    && self.last.is_some()
                    && now.duration_since(at) >= idle
            }
            _ => false,
        }
    }

    /// Applies held batches while they continue the sequence.
    fn drain(&mut self, out: &mut Vec<Action<T>>) {
        loop {
            let expected = self.expected();
            let Some(entry) = self.held.first_entry() else {
                break;
            };
            let seq = *entry.key();
            if seq > expected {
                break;
            }
            let held = entry.remove();
            if seq < expected {
                continue;
            }
            if seq == 0 && self.last.is_none() {
                // The whole history of the process: nothing can be missing.
                self.state = SyncState::Synced;
            }
            self.applied(seq, held.ts);
            out.push(Action::ApplyHeld {
                seq,
                item: held.item,
            });
        }
    }

    /// The answer to a [`Action::Replay`].
    pub fn on_replay(
        &mut self,
        token: ReplayToken,
        batches: Vec<Replayed<T>>,
        end: ReplayEnd,
        now: Instant,
        out: &mut Vec<Action<T>>,
    ) -> ReplayVerdict {
        let verdict = self.replayed(token, batches, end, now, out);
        self.settle();
        verdict
    }

    fn replayed(
        &mut self,
        token: ReplayToken,
        batches: Vec<Replayed<T>>,
        end: ReplayEnd,
        now: Instant,
        out: &mut Vec<Action<T>>,
    ) -> ReplayVerdict {
        let Some(recovery) = self.recovery.as_mut().filter(|r| r.token == token) else {
            return ReplayVerdict::Stale;
        };
        recovery.replay_in_flight = false;
        let recovery = *recovery;

        if let Some(verify) = recovery.verify {
            // The ROUTER sends every batch it keeps from the one asked for on, and a
            // process keeps at least the last it published: a complete answer with
            // nothing comes from a process that never got as far as the verified batch.
            let replaced = batches
                .iter()
                .any(|b| b.seq == verify.seq && !verify.same_batch(b.seq, b.ts))
                || (end == ReplayEnd::Complete && batches.is_empty());
            if replaced {
                // The ROUTER belongs to a new process; everything held and
                // replayed is from it, the applied entries are not.
                out.push(Action::Clear(ClearReason::Restart));
                self.last = None;
                self.state = SyncState::Unknown;
                for b in batches {
                    self.held.entry(b.seq).or_insert(Held {
                        ts: b.ts,
                        item: b.item,
                    });
                }
                self.begin_recovery(now, None, recovery.rounds + 1, out);
                return ReplayVerdict::Restarted;
            }
        }

        let first_returned = batches.first().map(|b| b.seq);
        let last_returned = batches.iter().map(|b| b.seq).max();
        let expected = self.expected();
        let before = self.last_seq();
        for b in batches {
            if b.seq >= expected {
                self.held.entry(b.seq).or_insert(Held {
                    ts: b.ts,
                    item: b.item,
                });
            }
        }
        self.drain(out);
        let progressed = self.last_seq() != before;
        if recovery.probe && progressed {
            // The quiet publisher had published more: it was a gap after all.
            self.gaps += 1;
        }
        if self.held.is_empty() {
            self.recovery = None;
            return if recovery.probe && !progressed {
                ReplayVerdict::Probed
            } else {
                ReplayVerdict::Recovered
            };
        }
        if recovery.probe && end == ReplayEnd::Failed {
            // Nothing learned from the ROUTER, but live batches arrived
            // meanwhile with a hole before them.
            self.begin_recovery(now, self.last, 1, out);
            return ReplayVerdict::Probed;
        }
        if end == ReplayEnd::Complete && last_returned.is_some_and(|last| self.expected() > last) {
            // Everything the ROUTER had is applied; what is still missing was
            // lost live after the replay was served: a new gap.
            self.begin_recovery(now, self.last, 1, out);
            return ReplayVerdict::Recovered;
        }
        // The ROUTER's buffer reached back to the hole, so the batch was lost
        // on the way (pre-0.33 HWM drop): asking again can fill it.
        let reached_hole = first_returned.is_some_and(|first| first <= self.expected());
        if end == ReplayEnd::Complete
            && reached_hole
            && recovery.rounds < self.cfg.max_replay_rounds
            && self.held.len() <= self.cfg.max_held
        {
            self.begin_recovery(now, self.last, recovery.rounds + 1, out);
            return ReplayVerdict::Retrying;
        }
        self.give_up(now, out);
        ReplayVerdict::Lost
    }

    /// Time passes: a gap whose wait (or replay) is over counts as lost.
    /// Returns whether entries were given up.
    pub fn on_tick(&mut self, now: Instant, out: &mut Vec<Action<T>>) -> bool {
        match self.recovery {
            Some(recovery) if now >= recovery.deadline && recovery.probe => {
                // An unanswered probe only means nothing was learned.
                self.recovery = None;
                self.drain(out);
                if !self.held.is_empty() {
                    self.begin_recovery(now, self.last, 1, out);
                }
                false
            }
            Some(recovery) if now >= recovery.deadline => {
                self.give_up(now, out);
                self.settle();
                true
            }
            None if self.probe_due(now) => {
                self.begin_probe(now, out);
                false
            }
            _ => false,
        }
    }

    /// The missing batches are gone: clear, and continue from the oldest
    /// batch held.
    fn give_up(&mut self, now: Instant, out: &mut Vec<Action<T>>) {
        self.recovery = None;
        out.push(Action::Clear(ClearReason::Lost));
        self.state = SyncState::Settling;
        self.run = 0;
        if let Some((seq, held)) = self.held.pop_first() {
            self.applied(seq, held.ts);
            out.push(Action::ApplyHeld {
                seq,
                item: held.item,
            });
            self.drain(out);
            if !self.held.is_empty() {
                self.begin_recovery(now, self.last, 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tracker = SeqTracker<u64>;

    fn tracker(replay: bool) -> Tracker {
        SeqTracker::new(TrackerConfig {
            replay,
            max_held: 8,
            ..TrackerConfig::default()
        })
    }

    /// Timestamps grow with seq within one process; `epoch` separates processes.
    fn ts(epoch: u32, seq: u64) -> f64 {
        f64::from(epoch) * 1_000.0 + seq as f64 * 0.01
    }

    struct Run {
        t: Tracker,
        now: Instant,
        applied: Vec<u64>,
        clears: Vec<ClearReason>,
        replays: Vec<(u64, ReplayToken)>,
    }

    impl Run {
        fn new(replay: bool) -> Self {
            Self {
                t: tracker(replay),
                now: Instant::now(),
                applied: Vec::new(),
                clears: Vec::new(),
                replays: Vec::new(),
            }
        }

        fn absorb(&mut self, live: Option<u64>, out: Vec<Action<u64>>) {
            for action in out {
                match action {
                    Action::ApplyLive => self.applied.push(live.expect("live batch")),
                    Action::ApplyHeld { seq, item } => {
                        assert_eq!(seq, item);
                        self.applied.push(seq)
                    }
                    Action::Clear(reason) => {
                        self.clears.push(reason);
                        self.applied.clear();
                    }
                    Action::Replay { from, token } => self.replays.push((from, token)),
                }
            }
        }

        fn live(&mut self, epoch: u32, seq: u64) -> Verdict {
            let mut out = Vec::new();
            let verdict = self.t.on_live(seq, ts(epoch, seq), seq, self.now, &mut out);
            self.absorb(Some(seq), out);
            verdict
        }

        fn replay(&mut self, epoch: u32, seqs: &[u64], end: ReplayEnd) -> ReplayVerdict {
            let (_, token) = self.replays.pop().expect("a replay was requested");
            let batches = seqs
                .iter()
                .map(|&seq| Replayed {
                    seq,
                    ts: ts(epoch, seq),
                    item: seq,
                })
                .collect();
            let mut out = Vec::new();
            let verdict = self.t.on_replay(token, batches, end, self.now, &mut out);
            self.absorb(None, out);
            verdict
        }

        fn tick(&mut self, after: Duration) -> bool {
            self.now += after;
            let mut out = Vec::new();
            let gave_up = self.t.on_tick(self.now, &mut out);
            self.absorb(None, out);
            gave_up
        }
    }

    #[test]
    fn in_order_stream_from_zero_is_synced() {
        let mut r = Run::new(true);
        assert_eq!(r.t.state(), SyncState::Unknown);
        for seq in 0..5 {
            assert_eq!(r.live(1, seq), Verdict::Applied);
        }
        assert_eq!(r.applied, [0, 1, 2, 3, 4]);
        assert!(r.t.is_synced());
        assert!(r.replays.is_empty());
    }

    #[test]
    fn gap_is_replayed_from_the_last_applied_batch() {
        let mut r = Run::new(true);
        r.live(1, 0);
        r.live(1, 1);
        assert_eq!(r.live(1, 4), Verdict::Gap);
        assert_eq!(r.replays.last().map(|x| x.0), Some(1));
        // Live traffic keeps arriving while the replay is out.
        assert_eq!(r.live(1, 5), Verdict::Held);
        assert_eq!(r.applied, [0, 1]);
        assert_eq!(
            r.replay(1, &[1, 2, 3, 4, 5], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.applied, [0, 1, 2, 3, 4, 5]);
        assert!(r.t.is_synced() && !r.t.recovering());
        assert_eq!(r.live(1, 6), Verdict::Applied);
    }

    #[test]
    fn a_resumed_stream_replays_what_it_missed_since_the_handover() {
        let mut old = Run::new(true);
        for seq in 0..3 {
            old.live(1, seq);
        }
        let mark = old.t.mark().expect("batches were applied");
        assert_eq!((mark.seq, mark.synced), (2, true));

        let mut new = Run::new(true);
        new.t.resume(mark);
        assert!(new.t.is_synced());
        // Batches 3 and 4 went out while no process listened.
        assert_eq!(new.live(1, 5), Verdict::Gap);
        assert_eq!(new.replays.last().map(|x| x.0), Some(2));
        assert_eq!(
            new.replay(1, &[2, 3, 4, 5], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(new.applied, [3, 4, 5]);
        assert!(new.clears.is_empty() && new.t.is_synced());

        // A publisher that restarted during the handover is caught by the verify.
        let mut new = Run::new(true);
        new.t.resume(mark);
        assert_eq!(new.live(2, 7), Verdict::Gap);
        assert_eq!(
            new.replay(2, &[2, 3, 4, 5, 6, 7], ReplayEnd::Complete),
            ReplayVerdict::Restarted
        );
        assert_eq!(new.clears, [ClearReason::Restart]);
    }

    #[test]
    fn reordered_batches_fill_the_gap_before_the_replay_answers() {
        let mut r = Run::new(true);
        r.live(1, 0);
        r.live(1, 2);
        r.live(1, 1);
        assert_eq!(r.applied, [0, 1, 2]);
        assert!(!r.t.recovering());
        assert_eq!(
            r.replay(1, &[0, 1, 2], ReplayEnd::Complete),
            ReplayVerdict::Stale
        );
        assert_eq!(r.applied, [0, 1, 2]);
    }

    #[test]
    fn without_replay_reordering_within_the_wait_is_repaired() {
        let mut r = Run::new(false);
        r.live(1, 0);
        assert_eq!(r.live(1, 2), Verdict::Gap);
        assert_eq!(r.live(1, 3), Verdict::Held);
        assert!(!r.tick(Duration::from_millis(10)));
        r.live(1, 1);
        assert_eq!(r.applied, [0, 1, 2, 3]);
        assert!(r.t.is_synced() && r.clears.is_empty());
    }

    #[test]
    fn without_replay_a_gap_clears_and_resynchronizes_on_the_next_batch() {
        let mut r = Run::new(false);
        r.live(1, 0);
        r.live(1, 1);
        r.live(1, 3);
        assert!(r.tick(Duration::from_millis(150)));
        assert_eq!(r.clears, [ClearReason::Lost]);
        assert_eq!(r.applied, [3]);
        assert_eq!(r.t.state(), SyncState::Settling);
        r.live(1, 4);
        assert!(r.t.is_synced());
        // The lost batch, arriving after all, is older than what was applied.
        assert_eq!(r.live(1, 2), Verdict::Duplicate);
        assert_eq!(r.applied, [3, 4]);
    }

    #[test]
    fn duplicates_are_dropped_and_restarts_clear() {
        let mut r = Run::new(true);
        for seq in 0..4 {
            r.live(1, seq);
        }
        assert_eq!(r.live(1, 3), Verdict::Duplicate);
        assert_eq!(r.live(1, 1), Verdict::Duplicate);
        assert_eq!(r.applied, [0, 1, 2, 3]);
        // A new process starts again at 0 with a later clock.
        assert_eq!(r.live(2, 0), Verdict::Restart);
        assert_eq!(r.clears, [ClearReason::Restart]);
        assert_eq!(r.applied, [0]);
        assert!(r.t.is_synced());
    }

    #[test]
    fn a_restarted_process_seen_mid_stream_is_replayed_from_zero() {
        let mut r = Run::new(true);
        for seq in 0..3 {
            r.live(1, seq);
        }
        // The new process's first batches were missed (slow joiner).
        assert_eq!(r.live(2, 1), Verdict::Restart);
        assert_eq!(r.replays.last().map(|x| x.0), Some(0));
        assert_eq!(r.t.state(), SyncState::Unknown);
        assert_eq!(
            r.replay(2, &[0, 1], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.applied, [0, 1]);
        assert!(r.t.is_synced());
    }

    #[test]
    fn replay_reveals_a_restart_that_looked_like_a_gap() {
        let mut r = Run::new(true);
        for seq in 0..3 {
            r.live(1, seq);
        }
        // The new process got past seq 2 before kvgate heard from it again.
        assert_eq!(r.live(2, 7), Verdict::Gap);
        assert_eq!(r.replays.last().map(|x| x.0), Some(2));
        assert_eq!(
            r.replay(2, &[2, 3, 4, 5, 6, 7], ReplayEnd::Complete),
            ReplayVerdict::Restarted
        );
        assert_eq!(r.clears, [ClearReason::Restart]);
        assert_eq!(r.replays.last().map(|x| x.0), Some(0));
        assert_eq!(
            r.replay(2, &[0, 1, 2, 3, 4, 5, 6, 7], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.applied, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(r.t.is_synced());
    }

    #[test]
    fn a_probe_answered_by_a_process_that_never_got_that_far_is_a_restart() {
        let mut r = Run::new(true);
        for seq in 0..3 {
            r.live(1, seq);
        }
        // The pod restarted while quiet: its new ROUTER has published nothing yet.
        r.tick(Duration::from_millis(1_100));
        assert_eq!(r.replays.last().map(|x| x.0), Some(2));
        assert_eq!(
            r.replay(2, &[], ReplayEnd::Complete),
            ReplayVerdict::Restarted
        );
        assert_eq!(r.clears, [ClearReason::Restart]);
        assert_eq!(r.t.state(), SyncState::Unknown);
        assert_eq!(
            r.replay(2, &[], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        // Its first batch starts the new stream.
        assert_eq!(r.live(2, 0), Verdict::Applied);
        assert!(r.t.is_synced());
        assert_eq!(r.applied, [0]);
    }

    #[test]
    fn a_forgotten_stream_starts_over_with_the_next_process() {
        let mut r = Run::new(false);
        for seq in 0..3 {
            r.live(1, seq);
        }
        r.t.forget();
        assert_eq!(r.t.state(), SyncState::Unknown);
        assert_eq!(r.live(2, 0), Verdict::Applied);
        assert!(r.t.is_synced() && r.clears.is_empty());
    }

    #[test]
    fn holes_inside_a_replay_are_asked_for_again() {
        let mut r = Run::new(true);
        r.live(1, 0);
        r.live(1, 6);
        // The ROUTER dropped 3 and 4 but still sent the end marker.
        assert_eq!(
            r.replay(1, &[0, 1, 2, 5, 6], ReplayEnd::Complete),
            ReplayVerdict::Retrying
        );
        assert_eq!(r.applied, [0, 1, 2]);
        assert_eq!(r.replays.last().map(|x| x.0), Some(2));
        assert_eq!(
            r.replay(1, &[2, 3, 4, 5, 6], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.applied, [0, 1, 2, 3, 4, 5, 6]);
        assert!(r.t.is_synced() && r.clears.is_empty());
    }

    #[test]
    fn a_loss_after_the_replay_was_served_is_a_new_gap() {
        let mut r = Run::new(true);
        r.live(1, 0);
        r.live(1, 2);
        // 3 is lost live after the ROUTER answered up to 2.
        r.live(1, 4);
        assert_eq!(
            r.replay(1, &[0, 1, 2], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.t.take_gaps(), 2);
        assert_eq!(r.replays.last().map(|x| x.0), Some(2));
        assert_eq!(
            r.replay(1, &[2, 3, 4], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.applied, [0, 1, 2, 3, 4]);
        assert!(r.t.is_synced() && !r.t.recovering());
    }

    #[test]
    fn a_quiet_publisher_is_probed_for_a_lost_tail() {
        let mut r = Run::new(true);
        r.live(1, 0);
        r.live(1, 1);
        // Batch 2 was lost and nothing follows it.
        assert!(!r.tick(Duration::from_millis(500)));
        assert!(r.replays.is_empty());
        r.tick(Duration::from_millis(600));
        assert_eq!(r.replays.last().map(|x| x.0), Some(1));
        assert_eq!(
            r.replay(1, &[1, 2], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.applied, [0, 1, 2]);
        assert_eq!(r.t.take_gaps(), 1);
        // Once per quiet stretch; nothing new is nothing lost.
        r.tick(Duration::from_secs(5));
        assert!(r.replays.is_empty());
        r.live(1, 3);
        r.tick(Duration::from_secs(2));
        assert_eq!(
            r.replay(1, &[3], ReplayEnd::Complete),
            ReplayVerdict::Probed
        );
        // A probe that cannot reach the ROUTER clears nothing.
        r.live(1, 4);
        r.tick(Duration::from_secs(2));
        assert!(!r.tick(Duration::from_secs(5)));
        assert_eq!(r.replay(1, &[4], ReplayEnd::Complete), ReplayVerdict::Stale);
        assert!(r.clears.is_empty() && r.t.is_synced());
        assert_eq!(r.applied, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn batches_aged_out_of_the_buffer_are_lost() {
        let mut r = Run::new(true);
        r.live(1, 0);
        r.live(1, 1);
        r.live(1, 9);
        assert_eq!(
            r.replay(1, &[5, 6, 7, 8, 9], ReplayEnd::Complete),
            ReplayVerdict::Lost
        );
        assert_eq!(r.clears, [ClearReason::Lost]);
        // Rebuilt from the oldest batch that is still known: a contiguous run
        // with no gap open, so the stream is established again.
        assert_eq!(r.applied, [5, 6, 7, 8, 9]);
        assert!(r.t.is_synced());
    }

    #[test]
    fn joining_mid_stream_replays_the_history() {
        let mut r = Run::new(true);
        assert_eq!(r.live(1, 3), Verdict::Held);
        assert_eq!(r.replays.last().map(|x| x.0), Some(0));
        assert_eq!(
            r.replay(1, &[0, 1, 2, 3], ReplayEnd::Complete),
            ReplayVerdict::Recovered
        );
        assert_eq!(r.applied, [0, 1, 2, 3]);
        assert!(r.t.is_synced());

        // History no longer complete: rebuilt from what the buffer has.
        let mut r = Run::new(true);
        r.live(1, 50);
        assert_eq!(
            r.replay(1, &[40, 41], ReplayEnd::Failed),
            ReplayVerdict::Lost
        );
        assert_eq!(r.applied, [40, 41]);
        assert_eq!(r.t.state(), SyncState::Settling);
        assert_eq!(r.replays.last().map(|x| x.0), Some(41));
    }

    #[test]
    fn failed_or_overdue_replay_counts_as_lost() {
        let mut r = Run::new(true);
        r.live(1, 0);
        r.live(1, 2);
        assert!(!r.tick(Duration::from_millis(100)));
        assert!(r.tick(Duration::from_secs(3)));
        assert_eq!(r.clears, [ClearReason::Lost]);
        assert_eq!(r.applied, [2]);
        // The late answer is ignored.
        assert_eq!(
            r.replay(1, &[0, 1, 2], ReplayEnd::Complete),
            ReplayVerdict::Stale
        );
        assert_eq!(r.applied, [2]);
    }

    #[test]
    fn holding_is_bounded() {
        let mut r = Run::new(true);
        r.live(1, 0);
        for seq in 2..=10 {
            r.live(1, seq);
        }
        assert_eq!(r.clears, [ClearReason::Lost]);
        assert_eq!(r.applied, (2..=10).collect::<Vec<_>>());
        assert!(!r.t.recovering());
    }

    #[test]
    fn without_replay_the_first_batch_settles() {
        let mut r = Run::new(false);
        assert_eq!(r.live(1, 7), Verdict::Applied);
        assert_eq!(r.t.state(), SyncState::Settling);
        r.live(1, 8);
        assert!(r.t.is_synced());
    }
}
