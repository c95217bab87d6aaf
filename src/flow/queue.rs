//! The waiting requests of one model: priority bands, highest first; inside a band,
//! tenants take turns (round robin, one request per turn), FCFS within a tenant. Bounded
//! in requests and in body bytes. Plain data, no clock and no I/O: the gateway and the
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
}

impl<T> Default for Band<T> {
    fn default() -> Self {
        Self {
            turns: VecDeque::new(),
            tenants: HashMap::new(),
            len: 0,
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

    /// Queues `item` last in its tenant's line, unless a bound would be exceeded.
    pub fn push(
        &mut self,
        priority: Priority,
        tenant: &str,
        bytes: usize,
        item: T,
        limits: QueueLimits,
    ) -> Result<Ticket, QueueFull> {
        if self.len >= limits.max_requests {
            return Err(QueueFull::Requests);
        }
        if self.bytes.saturating_add(bytes) > limits.max_bytes {
            return Err(QueueFull::Bytes);
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
        self.len += 1;
        self.bytes += bytes;
        Ok(Ticket {
            priority,
            tenant: tenant.to_string(),
            seq,
        })
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
    fn a_removed_request_leaves_no_trace_and_a_dispatched_one_cannot_be_removed() {
        let mut q = FlowQueue::default();
        let first = q.push(Priority(0), "a", 5, 1, ROOMY).unwrap();
        let second = q.push(Priority(0), "a", 7, 2, ROOMY).unwrap();
        let other = q.push(Priority(0), "b", 9, 3, ROOMY).unwrap();
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
