//! The waiting requests of one model: priority bands, highest first; inside a band,
//! tenants take turns (round robin, one request per turn), FCFS within a tenant. Bounded
//! in requests and in body bytes: a request that finds the queue full displaces the newest
//! requests of the lowest bands below its own, as many as it needs room, or is refused
//! when even all of those would not make room. Plain data, no clock and no I/O: the gateway and the
//! virtual-time benchmark drive the same queue.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::config::Priority;

/// Where a queued request sits, to take it out again (deadline, disconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub priority: Priority,
    pub tenant: String,
    seq: u64,
}

/// Why a request could not join the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    Requests,
    Bytes,
}

/// A request that joined the queue, and the less important ones it displaced to fit.
#[derive(Debug, PartialEq)]
pub struct Pushed<T> {
    pub ticket: Ticket,
    /// Newest of the lowest band first.
    pub displaced: Vec<(Priority, T)>,
}

/// The bounds of a queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_requests: usize,
    pub max_bytes: usize,
}

struct Entry<T> {
    seq: u64,
    bytes: usize,
    item: T,
}

struct Band<T> {
    /// Tenants with waiting requests, in the order of their next turn.
    turns: VecDeque<String>,
    tenants: HashMap<String, VecDeque<Entry<T>>>,
    len: usize,
    bytes: usize,
}

impl<T> Default for Band<T> {
    fn default() -> Self {
        Self {
            turns: VecDeque::new(),
            tenants: HashMap::new(),
            len: 0,
            bytes: 0,
        }
    }
}

/// One model's waiting requests.
pub struct FlowQueue<T> {
    bands: BTreeMap<Reverse<Priority>, Band<T>>,
    len: usize,
    bytes: usize,
    next_seq: u64,
}

impl<T> Default for FlowQueue<T> {
    fn default() -> Self {
        Self {
            bands: BTreeMap::new(),
            len: 0,
            bytes: 0,
            next_seq: 0,
        }
    }
}

impl<T> FlowQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Requests waiting at `priority`.
    pub fn depth(&self, priority: Priority) -> usize {
        self.bands.get(&Reverse(priority)).map_or(0, |b| b.len)
    }

    /// Queues `item` last in its tenant's line. When a bound would be exceeded, the newest
    /// requests of the lowest bands below `priority` leave to make room (returned in
    /// [`Pushed::displaced`]); when even all of them would not, nothing changes and the
    /// bound is the error.
    pub fn push(
        &mut self,
        priority: Priority,
        tenant: &str,
        bytes: usize,
        item: T,
        limits: QueueLimits,
    ) -> Result<Pushed<T>, QueueFull> {
        if let Some(full) = self.over(self.len, self.bytes, bytes, limits) {
            let (lower_len, lower_bytes) = priority.0.checked_sub(1).map_or((0, 0), |below| {
                self.bands
                    .range(Reverse(Priority(below))..)
                    .fold((0, 0), |(n, b), (_, band)| (n + band.len, b + band.bytes))
            });
            if self
                .over(
                    self.len - lower_len,
                    self.bytes - lower_bytes,
                    bytes,
                    limits,
                )
                .is_some()
            {
                return Err(full);
            }
        }
        let mut displaced = Vec::new();
        while self.over(self.len, self.bytes, bytes, limits).is_some() {
            match self.displace_newest_below(priority) {
                Some(out) => displaced.push(out),
                None => break,
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let band = self.bands.entry(Reverse(priority)).or_default();
        let line = band.tenants.entry(tenant.to_string()).or_default();
        if line.is_empty() {
            band.turns.push_back(tenant.to_string());
        }
        line.push_back(Entry { seq, bytes, item });
        band.len += 1;
        band.bytes += bytes;
        self.len += 1;
        self.bytes += bytes;
        Ok(Pushed {
            ticket: Ticket {
                priority,
                tenant: tenant.to_string(),
                seq,
            },
            displaced,
        })
    }

    /// Which bound `len` requests of `bytes` leave no room under for one more of `adding`.
    fn over(
        &self,
        len: usize,
        bytes: usize,
        adding: usize,
        limits: QueueLimits,
    ) -> Option<QueueFull> {
        if len >= limits.max_requests {
            Some(QueueFull::Requests)
        } else if bytes.saturating_add(adding) > limits.max_bytes {
            Some(QueueFull::Bytes)
        } else {
            None
        }
    }

    /// Takes out the newest request of the lowest band, if that band is below `priority`.
    fn displace_newest_below(&mut self, priority: Priority) -> Option<(Priority, T)> {
        let (&Reverse(lowest), band) = self.bands.iter_mut().next_back()?;
        if lowest >= priority {
            return None;
        }
        let tenant = band
            .tenants
            .iter()
            .filter_map(|(tenant, line)| Some((line.back()?.seq, tenant)))
            .max()
            .map(|(_, tenant)| tenant.clone())?;
        let line = band.tenants.get_mut(&tenant)?;
        let entry = line.pop_back()?;
        if line.is_empty() {
            band.tenants.remove(&tenant);
            band.turns.retain(|t| *t != tenant);
        }
        self.taken(lowest, entry.bytes);
        Some((lowest, entry.item))
    }

    /// The next request to dispatch: the highest band's tenant whose turn it is, its
    /// oldest request.
    pub fn pop(&mut self) -> Option<(Priority, T)> {
        let (&Reverse(priority), band) = self.bands.iter_mut().next()?;
        let tenant = band.turns.pop_front()?;
        let line = band.tenants.get_mut(&tenant)?;
        let entry = line.pop_front()?;
        if line.is_empty() {
            band.tenants.remove(&tenant);
        } else {
            band.turns.push_back(tenant);
        }
        self.taken(priority, entry.bytes);
        Some((priority, entry.item))
    }

    /// Takes a queued request out (it timed out, or its client left); `None` when it was
    /// dispatched already.
    pub fn remove(&mut self, ticket: &Ticket) -> Option<T> {
        let band = self.bands.get_mut(&Reverse(ticket.priority))?;
        let line = band.tenants.get_mut(&ticket.tenant)?;
        let at = line.iter().position(|e| e.seq == ticket.seq)?;
        let entry = line.remove(at)?;
        if line.is_empty() {
            band.tenants.remove(&ticket.tenant);
            band.turns.retain(|t| *t != ticket.tenant);
        }
        self.taken(ticket.priority, entry.bytes);
        Some(entry.item)
    }

    /// Everything still waiting, highest band first (the model's flow control was removed
    /// or the model was).
    pub fn drain(&mut self) -> Vec<(Priority, T)> {
        let mut out = Vec::with_capacity(self.len);
        while let Some(next) = self.pop() {
            out.push(next);
        }
        out
    }

    fn taken(&mut self, priority: Priority, bytes: usize) {
        self.len -= 1;
        self.bytes -= bytes;
        if let Some(band) = self.bands.get_mut(&Reverse(priority)) {
            band.len -= 1;
            band.bytes -= bytes;
            if band.len == 0 {
                self.bands.remove(&Reverse(priority));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: QueueLimits = QueueLimits {
        max_requests: 100,
        max_bytes: 1 << 20,
    };

    #[test]
    fn higher_bands_first_tenants_in_turn_fcfs_within_a_tenant() {
        let mut q = FlowQueue::default();
        for (priority, tenant, item) in [
            (0, "a", "a1"),
            (0, "a", "a2"),
            (0, "a", "a3"),
            (0, "b", "b1"),
            (-1, "c", "batch"),
            (1, "d", "critical"),
            (0, "b", "b2"),
        ] {
            q.push(Priority(priority), tenant, 10, item, ROOMY).unwrap();
        }
        assert_eq!(q.depth(Priority(0)), 5);
        let order: Vec<&str> = q.drain().into_iter().map(|(_, item)| item).collect();
        assert_eq!(order, ["critical", "a1", "b1", "a2", "b2", "a3", "batch"]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn bounded_in_requests_and_bytes() {
        let limits = QueueLimits {
            max_requests: 2,
            max_bytes: 100,
        };
        let mut q = FlowQueue::default();
        assert_eq!(
            q.push(Priority(0), "", 101, (), limits),
            Err(QueueFull::Bytes)
        );
        q.push(Priority(0), "", 60, (), limits).unwrap();
        assert_eq!(
            q.push(Priority(0), "", 41, (), limits),
            Err(QueueFull::Bytes)
        );
        q.push(Priority(0), "", 40, (), limits).unwrap();
        assert_eq!(
            q.push(Priority(0), "", 0, (), limits),
            Err(QueueFull::Requests)
        );
    }

    #[test]
    fn a_full_queue_displaces_the_newest_of_the_lowest_band_below() {
        let limits = QueueLimits {
            max_requests: 4,
            max_bytes: 100,
        };
        let mut q = FlowQueue::default();
        for (priority, tenant, item) in [
            (-1, "a", "batch-a1"),
            (-1, "b", "batch-b1"),
            (-1, "a", "batch-a2"),
            (-2, "c", "eval"),
        ] {
            q.push(Priority(priority), tenant, 10, item, limits)
                .unwrap();
        }
        // Full in requests: the lowest band goes first.
        let pushed = q.push(Priority(1), "d", 10, "critical-1", limits).unwrap();
        assert_eq!(pushed.displaced, [(Priority(-2), "eval")]);
        // Then the newest of the next band up, whichever tenant holds it.
        let pushed = q.push(Priority(0), "d", 10, "standard", limits).unwrap();
        assert_eq!(pushed.displaced, [(Priority(-1), "batch-a2")]);
        // Nothing below the lowest band, nor below an equal one: refused, nothing moves.
        assert_eq!(
            q.push(Priority(-1), "e", 10, "batch-e1", limits),
            Err(QueueFull::Requests)
        );
        assert_eq!(q.len(), 4);
        // Full in bytes: as many go as the body needs, newest of the lowest band first.
        let pushed = q.push(Priority(1), "d", 75, "critical-2", limits).unwrap();
        assert_eq!(
            pushed.displaced,
            [(Priority(-1), "batch-b1"), (Priority(-1), "batch-a1")]
        );
        assert_eq!((q.len(), q.bytes()), (3, 95));
        // More than every lower request could free: refused, nothing displaced.
        assert_eq!(
            q.push(Priority(5), "f", 101, "too-big", limits),
            Err(QueueFull::Bytes)
        );
        assert_eq!((q.len(), q.bytes()), (3, 95));
        let order: Vec<&str> = q.drain().into_iter().map(|(_, item)| item).collect();
        assert_eq!(order, ["critical-1", "critical-2", "standard"]);
        assert_eq!(
            FlowQueue::default().push(Priority(i32::MIN), "", 101, (), limits),
            Err(QueueFull::Bytes)
        );
    }

    #[test]
    fn a_removed_request_leaves_no_trace_and_a_dispatched_one_cannot_be_removed() {
        let mut q = FlowQueue::default();
        let first = q.push(Priority(0), "a", 5, 1, ROOMY).unwrap().ticket;
        let second = q.push(Priority(0), "a", 7, 2, ROOMY).unwrap().ticket;
        let other = q.push(Priority(0), "b", 9, 3, ROOMY).unwrap().ticket;
        assert_eq!(q.remove(&second), Some(2));
        assert_eq!(q.remove(&second), None);
        assert_eq!((q.len(), q.bytes()), (2, 14));
        assert_eq!(q.pop(), Some((Priority(0), 1)));
        assert_eq!(q.remove(&first), None);
        assert_eq!(q.remove(&other), Some(3));
        assert!(q.is_empty());
        assert_eq!(q.depth(Priority(0)), 0);
        assert_eq!(q.pop(), None);
    }
}
