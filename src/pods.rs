//! The live set of pods per model and the router's own view of each pod:
//! load it has sent there, health, and whether its KV events can be trusted.
//! Discovery feeds snapshots in; the scheduler reads `PodSet`s lock-free.
//!
//! Everything kvgate believes about a pod's cache (index entries, speculative credit,
//! the approximate prefix memory, the learned prefill rate) describes one process of the
//! pod and one generation of its cache. The pod's [`CacheEpoch`] names that generation:
//! beliefs are recorded under the epoch they were formed in and ignored once it moved
//! on, so whoever learns that the cache is gone (event ingestion on a restart, a clear
//! or a loss; a refused connection, which means no process listens any more) drops all
//! of them with one bump, without each holder having to be told.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

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

/// A generation of a pod's cache as kvgate knows it: bumped whenever what kvgate believed
/// about the cache must be dropped (a new process, the cache cleared, events lost). Beliefs
/// carry the epoch they were formed in and count only while it is current.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CacheEpoch(u64);

impl CacheEpoch {
    /// The epoch after this one, when nothing else moved it meanwhile.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

/// The trust word packs the epoch it was set in above the trust byte.
const TRUST_BITS: u32 = 8;

/// What vLLM's own `/metrics` said last (scraped in the background).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScrapedLoad {
    pub running: f64,
    pub waiting: f64,
    /// KV-cache usage, 0..1.
    pub kv_usage: f64,
}

/// What vLLM's `vllm:lora_requests_info` said last: which LoRA adapters the pod's
/// running and waiting requests use, and how many adapter slots (`--max-loras`) it has.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrapedLora {
    pub running: Vec<String>,
    pub waiting: Vec<String>,
    pub max_lora: u32,
}

impl ScrapedLora {
    /// Whether `adapter` is in one of the pod's slots (a running or waiting request uses it).
    pub fn is_active(&self, adapter: &str) -> bool {
        self.running
            .iter()
            .chain(&self.waiting)
            .any(|a| a == adapter)
    }

    /// Whether an adapter not active yet could be swapped in without waiting for a slot:
    /// fewer distinct adapters are in use than the pod has slots.
    pub fn has_free_slot(&self) -> bool {
        let mut in_use: Vec<&str> = self
            .running
            .iter()
            .chain(&self.waiting)
            .map(String::as_str)
            .collect();
        in_use.sort_unstable();
        in_use.dedup();
        in_use.len() < self.max_lora as usize
    }
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
    /// Whether the pod's HTTP port accepted kvgate's last connection attempt.
    listening: AtomicBool,
    /// The current [`CacheEpoch`].
    epoch: AtomicU64,
    /// Processes seen to replace one another on this pod (restarts).
    process: AtomicU32,
    /// `epoch << TRUST_BITS | trust`: the trust holds only in the epoch it was set in.
    trust: AtomicU64,
    scraped: ArcSwap<ScrapedLoad>,
    /// The last scraped adapter state and the cache epoch it was scraped in: a new process
    /// starts with no adapter loaded, so the state counts only while that epoch is current.
    scraped_lora: ArcSwapOption<(CacheEpoch, ScrapedLora)>,
    /// Requests this router began here minus those that ended, since the last scrape.
    in_flight_change_since_scrape: AtomicI32,
    /// Prefill rate in tokens/s (f64 bits) learned from the current process; 0 = not learned yet.
    prefill_rate_bits: AtomicU64,
    /// Signalled when the pod may take more: a request ended, a scrape, a passed health
    /// check (flow control dispatches waiting requests on it).
    load_eased: Arc<Notify>,
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
            listening: AtomicBool::new(true),
            epoch: AtomicU64::new(0),
            process: AtomicU32::new(0),
            trust: AtomicU64::new(EventTrust::Unknown as u64),
            scraped: ArcSwap::from_pointee(ScrapedLoad::default()),
            scraped_lora: ArcSwapOption::empty(),
            in_flight_change_since_scrape: AtomicI32::new(0),
            prefill_rate_bits: AtomicU64::new(0),
            load_eased: Arc::default(),
        }
    }

    /// Signals `load_eased` (shared by a registry's pods) when the pod may take more.
    pub fn signalling(mut self, load_eased: Arc<Notify>) -> Self {
        self.load_eased = load_eased;
        self
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

    /// The generation of the pod's cache that beliefs about it must have been formed in.
    pub fn cache_epoch(&self) -> CacheEpoch {
        CacheEpoch(self.epoch.load(Ordering::Acquire))
    }

    /// How many times a new process was seen to take over the pod.
    pub fn process(&self) -> u32 {
        self.process.load(Ordering::Acquire)
    }

    /// kvgate's knowledge of the pod's cache is void from here (the cache was cleared, or
    /// events describing it were lost): every belief formed before is dropped. Returns the
    /// new epoch.
    pub fn cache_cleared(&self) -> CacheEpoch {
        CacheEpoch(self.epoch.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// A new process serves the pod: its cache starts empty and what was learned of the
    /// old process (prefill rate, scraped load) no longer describes it. Returns the new epoch.
    pub fn process_replaced(&self) -> CacheEpoch {
        self.process.fetch_add(1, Ordering::AcqRel);
        self.prefill_rate_bits.store(0, Ordering::Relaxed);
        self.set_scraped(ScrapedLoad::default());
        self.cache_cleared()
    }

    /// A connection to the pod's HTTP port was refused: no process listens there, so the
    /// one that held its cache is gone (a vLLM engine does not outlive its API server).
    /// The first refusal of an outage ends the process; returns whether this one did.
    pub fn connection_refused(&self) -> bool {
        let ended = self.listening.swap(false, Ordering::AcqRel);
        if ended {
            self.process_replaced();
        }
        ended
    }

    /// The pod's HTTP port accepted a connection.
    pub fn connected(&self) {
        if !self.listening.load(Ordering::Relaxed) {
            self.listening.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the pod's KV events describe its cache in the current epoch.
    pub fn trust(&self) -> EventTrust {
        let word = self.trust.load(Ordering::Acquire);
        if word >> TRUST_BITS == self.epoch.load(Ordering::Acquire) {
            EventTrust::from_u8(word as u8)
        } else {
            EventTrust::Unknown
        }
    }

    /// Sets the trust of the pod's events as of `epoch` (the epoch the setter's view of
    /// the cache belongs to). It holds only while that epoch is current: a view of an
    /// older cache never vouches for the current one.
    pub fn set_trust(&self, epoch: CacheEpoch, trust: EventTrust) {
        self.trust
            .store((epoch.0 << TRUST_BITS) | trust as u64, Ordering::Release);
    }

    pub fn scraped(&self) -> ScrapedLoad {
        **self.scraped.load()
    }

    pub fn set_scraped(&self, load: ScrapedLoad) {
        self.in_flight_change_since_scrape
            .store(0, Ordering::Relaxed);
        self.scraped.store(Arc::new(load));
        self.load_eased.notify_one();
    }

    /// The pod's LoRA adapter state from its last scrape, while it describes the current
    /// cache epoch; `None` before the first scrape that had it, or once the epoch moved.
    /// Read in place: scoring looks at it for every candidate, without copying.
    pub fn with_scraped_lora<R>(&self, read: impl FnOnce(Option<&ScrapedLora>) -> R) -> R {
        let scraped = self.scraped_lora.load();
        let current = scraped
            .as_deref()
            .filter(|(epoch, _)| *epoch == self.cache_epoch())
            .map(|(_, lora)| lora);
        read(current)
    }

    /// Records adapter state scraped from the process of `epoch` (read before the scrape
    /// was sent, so a restart meanwhile voids it).
    pub fn set_scraped_lora(&self, epoch: CacheEpoch, lora: ScrapedLora) {
        self.scraped_lora.store(Some(Arc::new((epoch, lora))));
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
        self.health_ok.load(Ordering::Relaxed) == 1 && !self.is_ejected(now_ms)
    }

    /// Passively ejected at `now_ms`: requests to it failed in a row.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn set_health_check(&self, ok: bool) {
        self.health_ok.store(ok as u8, Ordering::Relaxed);
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.load_eased.notify_one();
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

    /// The pod answered a request: it serves, whatever its last health check said (a
    /// pod that recovers is admitted at once, not a health interval later).
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.health_ok.store(1, Ordering::Relaxed);
    }

    /// Prefill throughput learned from observed TTFTs (tokens/s) of the current process, if any.
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
        self.pod.load_eased.notify_one();
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
    /// Every pod's `load_eased`.
    load_eased: Arc<Notify>,
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
            load_eased: Arc::default(),
        }
    }

    /// Notifies every change of the pod set: the value is a generation counter that
    /// `apply_snapshot` bumps whenever pods were added or removed. Followers re-read
    /// [`PodRegistry::pods`] and diff; a watch never loses the latest change, however
    /// slowly it is read.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Signalled whenever one of the pods may take more load (see `Pod::signalling`). One
    /// waiter consumes it: a signal sent while nobody waits is kept for the next wait.
    pub fn load_eased(&self) -> Arc<Notify> {
        Arc::clone(&self.load_eased)
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
                    let pod = Arc::new(
                        Pod::new(
                            self.next_id.fetch_add(1, Ordering::Relaxed),
                            endpoint.clone(),
                        )
                        .signalling(Arc::clone(&self.load_eased)),
                    );
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
pub(crate) mod tests {
    use super::*;

    /// A static pod on loopback `port`.
    pub(crate) fn endpoint(port: u16) -> PodEndpoint {
        let http = SocketAddr::from(([127, 0, 0, 1], port));
        PodEndpoint {
            key: http.to_string(),
            name: http.to_string(),
            http,
            events: None,
            replay: None,
            topic_host: http.to_string(),
            role: Default::default(),
        }
    }

    #[test]
    fn a_new_epoch_voids_trust_and_a_new_process_what_was_learned_of_the_old() {
        let pod = Pod::new(0, endpoint(1));
        let epoch = pod.cache_epoch();
        pod.set_trust(epoch, EventTrust::Synced);
        pod.set_prefill_rate(9_000.0);
        let scraped = ScrapedLoad {
            running: 3.0,
            ..ScrapedLoad::default()
        };
        pod.set_scraped(scraped);
        assert_eq!(pod.trust(), EventTrust::Synced);

        // A clear: trust must be vouched for again, in the new epoch only.
        let cleared = pod.cache_cleared();
        assert_eq!(cleared, epoch.next());
        assert_eq!(pod.trust(), EventTrust::Unknown);
        pod.set_trust(epoch, EventTrust::Synced);
        assert_eq!(pod.trust(), EventTrust::Unknown, "a stale view vouched");
        pod.set_trust(cleared, EventTrust::Synced);
        assert_eq!(pod.trust(), EventTrust::Synced);
        assert_eq!((pod.process(), pod.prefill_rate()), (0, Some(9_000.0)));
        assert_eq!(pod.scraped(), scraped);

        // Refusals: the first of an outage ends the process, the rest change nothing.
        assert!(pod.connection_refused());
        assert!(!pod.connection_refused());
        assert_eq!(pod.process(), 1);
        assert_eq!(pod.cache_epoch(), cleared.next());
        assert_eq!(pod.trust(), EventTrust::Unknown);
        assert_eq!(pod.prefill_rate(), None);
        assert_eq!(pod.scraped(), ScrapedLoad::default());
        pod.connected();
        assert!(pod.connection_refused());
        assert_eq!(pod.process(), 2);
    }

    #[test]
    fn scraped_adapters_count_only_in_the_epoch_they_were_scraped_in() {
        let pod = Pod::new(0, endpoint(1));
        assert_eq!(pod.with_scraped_lora(|l| l.cloned()), None);
        let lora = ScrapedLora {
            running: vec!["sql".into(), "chat".into()],
            waiting: vec!["sql".into()],
            max_lora: 3,
        };
        pod.set_scraped_lora(pod.cache_epoch(), lora.clone());
        assert_eq!(pod.with_scraped_lora(|l| l.cloned()), Some(lora.clone()));
        assert!(pod.with_scraped_lora(|l| l.is_some_and(|l| l.is_active("chat"))));
        assert!(pod.with_scraped_lora(|l| l.is_some_and(ScrapedLora::has_free_slot)));

        // A scrape begun before the restart describes the old process.
        let before = pod.cache_epoch();
        assert!(pod.connection_refused());
        pod.set_scraped_lora(before, lora);
        assert_eq!(pod.with_scraped_lora(|l| l.cloned()), None);
    }

    #[test]
    fn free_slots_count_distinct_adapters() {
        let full = ScrapedLora {
            running: vec!["a".into(), "b".into()],
            waiting: vec!["a".into()],
            max_lora: 2,
        };
        assert!(!full.has_free_slot());
        assert!(!full.is_active("c"));
        assert!(ScrapedLora {
            max_lora: 3,
            ..full
        }
        .has_free_slot());
    }

    #[test]
    fn a_new_incarnation_or_a_relisted_pod_is_a_new_pod() {
        let registry = PodRegistry::new(["a"]);
        registry.apply_snapshot("a", &[endpoint(1)]);
        let first = Arc::clone(&registry.pods("a").expect("a").pods[0]);
        first.set_trust(first.cache_epoch(), EventTrust::Synced);

        // The same address under another key (a Kubernetes pod with a new UID).
        let mut restarted = endpoint(1);
        restarted.key = "ns/vllm-0/uid-2".into();
        let changes = registry.apply_snapshot("a", std::slice::from_ref(&restarted));
        assert_eq!((changes.added.len(), changes.removed.len()), (1, 1));
        let second = Arc::clone(&registry.pods("a").expect("a").pods[0]);
        assert_ne!(second.id, first.id);
        assert_eq!(second.trust(), EventTrust::Unknown);

        // Removed, then listed again under the same key.
        registry.apply_snapshot("a", &[]);
        registry.apply_snapshot("a", &[restarted]);
        assert_ne!(registry.pods("a").expect("a").pods[0].id, second.id);
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
