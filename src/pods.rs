//! The live set of pods per model and the router's own view of each pod:
//! load it has sent there, health, and whether its KV events can be trusted.
//! Discovery feeds snapshots in; the scheduler reads `PodSet`s lock-free.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::discovery::PodEndpoint;

/// Dense id of one pod incarnation. Never reused: a restarted pod gets a new id,
/// so index entries and late events of the old incarnation cannot leak into the new one.
pub type PodId = u32;

/// Whether a pod's KV events describe its cache right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventTrust {
    /// No events seen yet, or a gap that could not be replayed: treat the pod as cold.
    Unknown = 0,
    /// A contiguous event stream since the pod's index was last cleared.
    Synced = 1,
    /// Its announced hashes disagree with kvgate's (wrong seed, block size or algorithm):
    /// route it on load only until an operator fixes the settings.
    Untrusted = 2,
}

impl EventTrust {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Synced,
            2 => Self::Untrusted,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Synced => "synced",
            Self::Untrusted => "untrusted",
        }
    }
}

/// What vLLM's own `/metrics` said last (scraped in the background).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScrapedLoad {
    pub running: f64,
    pub waiting: f64,
    /// KV-cache usage, 0..1.
    pub kv_usage: f64,
}

/// One pod incarnation.
#[derive(Debug)]
pub struct Pod {
    pub id: PodId,
    pub endpoint: PodEndpoint,
    in_flight: AtomicU32,
    uncached_tokens_in_flight: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Milliseconds (on the registry clock) until which the pod is ejected.
    ejected_until_ms: AtomicU64,
    /// Result of the last active health check.
    health_ok: AtomicU8,
    trust: AtomicU8,
    scraped: ArcSwap<ScrapedLoad>,
    /// Requests this router began here minus those that ended, since the last scrape.
    in_flight_change_since_scrape: AtomicI32,
    /// Learned prefill rate in tokens/s (f64 bits); 0 = not learned yet.
    prefill_rate_bits: AtomicU64,
}

impl Pod {
    pub fn new(id: PodId, endpoint: PodEndpoint) -> Self {
        Self {
            id,
            endpoint,
            in_flight: AtomicU32::new(0),
            uncached_tokens_in_flight: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            health_ok: AtomicU8::new(1),
            trust: AtomicU8::new(EventTrust::Unknown as u8),
            scraped: ArcSwap::from_pointee(ScrapedLoad::default()),
            in_flight_change_since_scrape: AtomicI32::new(0),
            prefill_rate_bits: AtomicU64::new(0),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.http
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn uncached_tokens_in_flight(&self) -> u64 {
        self.uncached_tokens_in_flight.load(Ordering::Relaxed)
    }

    /// Accounts a request routed here until the returned guard drops (response
    /// finished, failed, or the client went away).
    pub fn begin_request(self: &Arc<Self>, uncached_tokens: u64) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_change_since_scrape
            .fetch_add(1, Ordering::Relaxed);
        self.uncached_tokens_in_flight
            .fetch_add(uncached_tokens, Ordering::Relaxed);
        InFlight {
            pod: Arc::clone(self),
            uncached_tokens,
            prefill_done: false,
        }
    }

    pub fn trust(&self) -> EventTrust {
        EventTrust::from_u8(self.trust.load(Ordering::Relaxed))
    }

    pub fn set_trust(&self, trust: EventTrust) {
        self.trust.store(trust as u8, Ordering::Relaxed);
    }

    pub fn scraped(&self) -> ScrapedLoad {
        **self.scraped.load()
    }

    pub fn set_scraped(&self, load: ScrapedLoad) {
        self.in_flight_change_since_scrape
            .store(0, Ordering::Relaxed);
        self.scraped.store(Arc::new(load));
    }

    /// Requests on the pod as far as this router can tell: its own in flight or, when
    /// higher, what the pod reported at the last scrape moved by what this router has
    /// begun and ended since. The scrape sees other replicas' traffic, which the router's
    /// own count cannot, so replicas sharing a fleet do not all pile onto the pod each
    /// thinks idle; alone, the estimate is the router's own count.
    pub fn estimated_requests(&self) -> f64 {
        let scraped = self.scraped();
        let reported = scraped.running.max(0.0)
            + scraped.waiting.max(0.0)
            + f64::from(self.in_flight_change_since_scrape.load(Ordering::Relaxed));
        f64::from(self.in_flight()).max(reported)
    }

    /// Usable for new requests at `now_ms`: passes health checks and is not ejected.
    pub fn is_healthy(&self, now_ms: u64) -> bool {
        self.health_ok.load(Ordering::Relaxed) == 1
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub fn set_health_check(&self, ok: bool) {
        self.health_ok.store(ok as u8, Ordering::Relaxed);
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Passive ejection: after `threshold` consecutive failures the pod sits out for `eject`.
    /// Returns true when this failure ejected it.
    pub fn record_failure(&self, now_ms: u64, threshold: u32, eject: Duration) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= threshold {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms
                .store(now_ms + eject.as_millis() as u64, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Prefill throughput learned from observed TTFTs (tokens/s), if any.
    pub fn prefill_rate(&self) -> Option<f64> {
        let rate = f64::from_bits(self.prefill_rate_bits.load(Ordering::Relaxed));
        (rate > 0.0).then_some(rate)
    }

    pub fn set_prefill_rate(&self, tokens_per_s: f64) {
        self.prefill_rate_bits
            .store(tokens_per_s.to_bits(), Ordering::Relaxed);
    }
}

/// Load accounting for one routed request; undone on drop, so every exit path
/// (success, upstream error, client disconnect) frees it.
#[derive(Debug)]
pub struct InFlight {
    pod: Arc<Pod>,
    uncached_tokens: u64,
    prefill_done: bool,
}

impl InFlight {
    pub fn pod(&self) -> &Arc<Pod> {
        &self.pod
    }

    /// The first token arrived: the prompt no longer weighs on the pod's prefill queue.
    pub fn prefill_finished(&mut self) {
        if !self.prefill_done {
            self.prefill_done = true;
            self.pod
                .uncached_tokens_in_flight
                .fetch_sub(self.uncached_tokens, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.prefill_finished();
        self.pod.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.pod
            .in_flight_change_since_scrape
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// An immutable snapshot of one model's pods.
#[derive(Debug, Default)]
pub struct PodSet {
    pub pods: Vec<Arc<Pod>>,
}

impl PodSet {
    pub fn get(&self, id: PodId) -> Option<&Arc<Pod>> {
        self.pods.iter().find(|p| p.id == id)
    }
}

/// What changed when a discovery snapshot was applied.
#[derive(Debug, Default)]
pub struct PodChanges {
    pub added: Vec<Arc<Pod>>,
    pub removed: Vec<Arc<Pod>>,
}

/// All models' pods. Writers (discovery, a config reload changing the models) serialize on
/// a mutex; readers load the model map and an `Arc<PodSet>` without locks.
#[derive(Debug)]
pub struct PodRegistry {
    models: ArcSwap<HashMap<String, Arc<ArcSwap<PodSet>>>>,
    next_id: AtomicU32,
    write: Mutex<()>,
    /// Bumped after every snapshot that added or removed a pod.
    generation: watch::Sender<u64>,
}

impl PodRegistry {
    pub fn new<'a>(models: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            models: ArcSwap::from_pointee(
                models
                    .into_iter()
                    .map(|m| {
                        (
                            m.to_string(),
                            Arc::new(ArcSwap::from_pointee(PodSet::default())),
                        )
                    })
                    .collect(),
            ),
            next_id: AtomicU32::new(0),
            write: Mutex::new(()),
            generation: watch::Sender::new(0),
        }
    }

    /// Notifies every change of the pod set: the value is a generation counter that
    /// `apply_snapshot` bumps whenever pods were added or removed. Followers re-read
    /// [`PodRegistry::pods`] and diff; a watch never loses the latest change, however
    /// slowly it is read.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// An id that no pod will ever get, for block-index targets that are not pods
    /// themselves (a data-parallel rank's own cache, a publisher not yet discovered).
    pub fn reserve_id(&self) -> PodId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn pods(&self, model: &str) -> Option<Arc<PodSet>> {
        self.models.load().get(model).map(|s| s.load_full())
    }

    /// The models pods are kept for.
    pub fn models(&self) -> Vec<String> {
        self.models.load().keys().cloned().collect()
    }

    /// Makes `models` the set of models (a config reload added or removed some): new
    /// models start with no pods, and the pods of dropped models are returned as removed.
    pub fn set_models<'a>(&self, models: impl IntoIterator<Item = &'a str>) -> PodChanges {
        let _guard = self.write.lock();
        let current = self.models.load_full();
        let mut next = HashMap::new();
        for model in models {
            let slot = current.get(model).map_or_else(
                || Arc::new(ArcSwap::from_pointee(PodSet::default())),
                Arc::clone,
            );
            next.insert(model.to_string(), slot);
        }
        let mut changes = PodChanges::default();
        for (model, slot) in current.iter() {
            if !next.contains_key(model) {
                changes.removed.extend(slot.load().pods.iter().cloned());
            }
        }
        let changed = next.len() != current.len() || !changes.removed.is_empty();
        self.models.store(Arc::new(next));
        if changed {
            self.generation.send_modify(|generation| *generation += 1);
        }
        changes
    }

    /// Replaces a model's pods with a discovery snapshot. Pods whose key is unchanged keep
    /// their id and state; new keys get fresh ids; missing keys are returned as removed.
    pub fn apply_snapshot(&self, model: &str, endpoints: &[PodEndpoint]) -> PodChanges {
        let _guard = self.write.lock();
        let Some(slot) = self.models.load().get(model).cloned() else {
            return PodChanges::default();
        };
        let current = slot.load_full();
        let mut changes = PodChanges::default();
        let mut pods = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            match current.pods.iter().find(|p| p.endpoint.key == endpoint.key) {
                Some(existing) if existing.endpoint == *endpoint => pods.push(Arc::clone(existing)),
                _ => {
                    let pod = Arc::new(Pod::new(
                        self.next_id.fetch_add(1, Ordering::Relaxed),
                        endpoint.clone(),
                    ));
                    changes.added.push(Arc::clone(&pod));
                    pods.push(pod);
                }
            }
        }
        for old in &current.pods {
            if !pods.iter().any(|p| p.id == old.id) {
                changes.removed.push(Arc::clone(old));
            }
        }
        slot.store(Arc::new(PodSet { pods }));
        if !changes.added.is_empty() || !changes.removed.is_empty() {
            self.generation.send_modify(|generation| *generation += 1);
        }
        changes
    }

    /// Finds the pod that publishes events under `topic_host` for `model` (bind mode).
    pub fn by_topic_host(&self, model: &str, topic_host: &str) -> Option<Arc<Pod>> {
        let set = self.pods(model)?;
        set.pods
            .iter()
            .find(|p| p.endpoint.topic_host == topic_host)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> PodEndpoint {
        let http = SocketAddr::from(([127, 0, 0, 1], port));
        PodEndpoint {
            key: http.to_string(),
            name: http.to_string(),
            http,
            events: None,
            replay: None,
            topic_host: http.to_string(),
        }
    }

    #[test]
    fn models_come_and_go_with_their_pods() {
        let registry = PodRegistry::new(["a", "b"]);
        let generations = registry.subscribe();
        registry.apply_snapshot("a", &[endpoint(1)]);
        registry.apply_snapshot("b", &[endpoint(2), endpoint(3)]);
        let kept = registry.pods("a").expect("a").pods[0].id;

        let changes = registry.set_models(["a", "c"]);
        let mut removed: Vec<u16> = changes.removed.iter().map(|p| p.addr().port()).collect();
        removed.sort_unstable();
        assert_eq!(removed, [2, 3]);
        assert!(changes.added.is_empty());
        assert!(registry.pods("b").is_none());
        assert_eq!(registry.pods("a").expect("a kept").pods[0].id, kept);
        assert!(registry.pods("c").expect("c added").pods.is_empty());
        let mut models = registry.models();
        models.sort_unstable();
        assert_eq!(models, ["a", "c"]);
        assert!(generations.has_changed().expect("registry alive"));

        // A late snapshot of a dropped model changes nothing.
        assert!(registry
            .apply_snapshot("b", &[endpoint(4)])
            .added
            .is_empty());
        assert!(registry.pods("b").is_none());
    }
}
