//! The ingest core: messages in, block index and pod trust out. Synchronous
//! and single-owner (one task runs it), so the per-publisher state needs no
//! locks; the index it writes is shared with the request path, which only
//! ever waits for one shard's lock for the length of one block update.
//!
//! Per message: split the frames, find the pod (connect mode: the socket;
//! bind mode: the topic, cached), decode the batch into reused buffers, let the
//! publisher's [`SeqTracker`] decide, and apply what it says: stores and removes
//! into the index under the pod's index target for that data-parallel rank,
//! clears, and replay requests that the service carries out and feeds back.
//!
//! Every clear of a pod's entries moves the pod's [`CacheEpoch`] on, which voids
//! whatever else kvgate believed about its cache (the kv-cache scorer's speculative
//! credit, the trust ingestion set): a restart (sequence reset, or a replay that shows
//! another process), an AllBlocksCleared, a loss that replay could not repair. The
//! epoch may also move without ingestion: a refused connection tells the proxy or the
//! health checker that the pod's process is gone. Ingestion then catches up: the pod's
//! entries are dropped and each stream is expected to start over from a new process.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use zeromq::ZmqMessage;

use crate::config::{EventsMode, ModelConfig};
use crate::events::codec::{decode_batch_into, parse_pub_frames, EventBatch, KvEvent, Medium};
use crate::events::parity::{ParityChecker, ParityOutcome};
use crate::events::replay::ReplayReply;
use crate::events::stats::{bump, EventStats, PodEventStats};
use crate::events::subscriber::{endpoint_for_rank, Origin, PodDelta, PublisherEndpoint};
use crate::events::tracker::{
    Action, ClearReason, ReplayToken, ReplayVerdict, Replayed, SeqTracker, StreamMark,
    TrackerConfig, Verdict,
};
use crate::hash::{BlockHasher, HashConfigError, LoraKey};
use crate::index::{BlockIndex, IndexTargets, ScopeId, Tier};
use crate::pods::{CacheEpoch, EventTrust, Pod, PodId, PodRegistry};
use crate::relay::{PodSnapshot, PublisherSnapshot};
use crate::scope::scope_id;

/// Distinct topics remembered in bind mode; the cache is dropped beyond it, so
/// a peer inventing topics costs lookups, not memory.
const TOPIC_CACHE_MAX: usize = 4_096;
/// Publishers tracked before discovery knows them (`requireKnownPods: false`).
const MAX_PROVISIONAL: usize = 1_024;
/// A publisher discovery never listed is forgotten after this much silence.
const PROVISIONAL_IDLE: Duration = Duration::from_secs(600);

/// How events are taken in.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub mode: EventsMode,
    /// Topic prefix before `<pod>@<model>` (bind mode).
    pub topic_prefix: String,
    /// Ask replay ROUTERs for missed batches.
    pub replay: bool,
    /// Bind mode: drop events of pods discovery does not list.
    pub require_known_pods: bool,
    /// Fraction of BlockStored runs re-hashed.
    pub parity_sample: f64,
    /// Data-parallel ranks per pod (rank r publishes on port + r).
    pub data_parallel_size: u32,
    pub tracker: TrackerConfig,
}

impl IngestConfig {
    pub fn from_events(events: &crate::config::EventsConfig) -> Self {
        let replay_timeout = Duration::from_millis(events.replay_timeout_ms);
        Self {
            mode: events.mode,
            topic_prefix: events.topic_prefix.clone(),
            replay: events.replay,
            require_known_pods: events.require_known_pods,
            parity_sample: events.parity_sample,
            data_parallel_size: events.data_parallel_size.max(1),
            tracker: TrackerConfig {
                replay: events.replay,
                replay_deadline: replay_timeout + Duration::from_millis(500),
                ..TrackerConfig::default()
            },
        }
    }
}

/// A served model as events see it: its index scopes and how its pods hash.
#[derive(Debug)]
pub struct ModelEvents {
    pub name: String,
    pub scope: ScopeId,
    pub hasher: BlockHasher,
    adapters: Vec<AdapterEvents>,
}

#[derive(Debug)]
struct AdapterEvents {
    key: LoraKey,
    scope: ScopeId,
}

enum Adapter<'a> {
    Base,
    Known(&'a AdapterEvents),
    Unknown,
}

impl ModelEvents {
    pub fn from_config(model: &ModelConfig) -> Result<Self, HashConfigError> {
        Ok(Self {
            name: model.name.clone(),
            scope: scope_id(&model.name, None),
            hasher: BlockHasher::new(&model.hash_settings())?,
            adapters: model
                .lora_adapters
                .iter()
                .map(|a| AdapterEvents {
                    key: LoraKey {
                        name: a.name.clone(),
                        int_id: a.int_id,
                        path: a.path.clone(),
                    },
                    scope: scope_id(&model.name, Some(&a.name)),
                })
                .collect(),
        })
    }

    /// The adapter an event names: by name (0.14+) or by vLLM's int id.
    fn adapter(&self, name: Option<&str>, id: Option<i64>) -> Adapter<'_> {
        let found = match (name, id) {
            (Some(name), _) => self.adapters.iter().find(|a| a.key.name == name),
            (None, Some(id)) => self.adapters.iter().find(|a| a.key.int_id == id),
            (None, None) => return Adapter::Base,
        };
        found.map_or(Adapter::Unknown, Adapter::Known)
    }
}

/// A replay the service must carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayRequest {
    pub pod: PodId,
    pub rank: u32,
    pub endpoint: String,
    pub from: u64,
    pub token: ReplayToken,
}

/// A replay's answer, for [`Ingestor::on_replay`].
#[derive(Debug)]
pub struct ReplayDone {
    pub pod: PodId,
    pub rank: u32,
    pub token: ReplayToken,
    pub reply: ReplayReply,
}

/// One pod's event state as a kvgate process hands it to the one taking over from
/// it (graceful upgrade). Pod ids are per process, so the pod is named by its
/// discovery key, and each publisher carries the index id its entries are under in
/// the handing process, for the index snapshot to be mapped onto the new ids.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PodHandover {
    pub model: String,
    pub key: String,
    pub publishers: Vec<PublisherHandover>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PublisherHandover {
    pub rank: u32,
    /// Index id of its entries in the handing process.
    pub target: PodId,
    /// Scopes it stored into (a BlockRemoved names none).
    pub scopes: Vec<ScopeId>,
    pub mark: StreamMark,
}

/// One publisher: a pod's data-parallel rank.
#[derive(Debug)]
struct Publisher {
    rank: u32,
    /// Index id of this rank's blocks.
    target: PodId,
    tracker: SeqTracker<Bytes>,
    /// Scopes it stored into; BlockRemoved names no scope.
    scopes: Vec<ScopeId>,
    replay: Option<String>,
}

#[derive(Debug)]
struct PodEntry {
    /// `None` while the publisher is known only by its topic.
    pod: Option<Arc<Pod>>,
    model: Arc<ModelEvents>,
    topic_host: String,
    replay: Option<String>,
    publishers: Vec<Publisher>,
    parity: ParityChecker,
    stats: Arc<PodEventStats>,
    trust: EventTrust,
    /// The pod's cache epoch that the index entries and `trust` describe.
    epoch: CacheEpoch,
    last_seen: Instant,
    /// Its last batch came to this replica directly (not relayed by a peer): this replica is
    /// the one its PUB is connected to, and hands its state to peers that join.
    home: bool,
}

#[derive(Clone, Copy, Debug)]
enum TopicRoute {
    Pod(PodId),
    UnknownPod,
    Malformed,
}

/// Decodes and applies events; see the module docs.
pub struct Ingestor {
    cfg: IngestConfig,
    index: Arc<BlockIndex>,
    registry: Arc<PodRegistry>,
    stats: Arc<EventStats>,
    targets: Arc<IndexTargets>,
    models: HashMap<String, Arc<ModelEvents>>,
    pods: HashMap<PodId, PodEntry>,
    by_topic_host: HashMap<(String, String), PodId>,
    topics: HashMap<Bytes, TopicRoute>,
    batch: EventBatch,
    scratch: Scratch,
    actions: Vec<Action<Bytes>>,
    replays: Vec<ReplayRequest>,
    /// Handed-over state of pods not discovered yet, by (model, key).
    handed_over: HashMap<(String, String), PodHandover>,
    /// Index id in the handing process → index id here, of every resumed publisher.
    resumed: HashMap<PodId, PodId>,
}

impl Ingestor {
    pub fn new(
        cfg: IngestConfig,
        models: Vec<ModelEvents>,
        index: Arc<BlockIndex>,
        registry: Arc<PodRegistry>,
        stats: Arc<EventStats>,
        targets: Arc<IndexTargets>,
    ) -> Self {
        Self {
            cfg,
            index,
            registry,
            stats,
            targets,
            models: models
                .into_iter()
                .map(|m| (m.name.clone(), Arc::new(m)))
                .collect(),
            pods: HashMap::new(),
            by_topic_host: HashMap::new(),
            topics: HashMap::new(),
            batch: EventBatch::default(),
            scratch: Scratch::default(),
            actions: Vec::new(),
            replays: Vec::new(),
            handed_over: HashMap::new(),
            resumed: HashMap::new(),
        }
    }

    /// The stream position of every discovered pod's publishers, for the process
    /// taking over. Publishers that never applied a batch have nothing to hand over.
    pub fn handover(&self) -> Vec<PodHandover> {
        self.pods
            .values()
            .filter_map(|entry| {
                let pod = entry.pod.as_ref()?;
                let publishers: Vec<PublisherHandover> = entry
                    .publishers
                    .iter()
                    .filter_map(|p| {
                        Some(PublisherHandover {
                            rank: p.rank,
                            target: p.target,
                            scopes: p.scopes.clone(),
                            mark: p.tracker.mark()?,
                        })
                    })
                    .collect();
                (!publishers.is_empty()).then(|| PodHandover {
                    model: entry.model.name.clone(),
                    key: pod.endpoint.key.clone(),
                    publishers,
                })
            })
            .collect()
    }

    /// Takes the state a previous process handed over. Each pod resumes when
    /// discovery lists it ([`Ingestor::sync_pods`]); [`Ingestor::resumed_targets`]
    /// then maps the handed-over index ids onto this process's.
    pub fn resume(&mut self, pods: Vec<PodHandover>) {
        self.handed_over = pods
            .into_iter()
            .map(|p| ((p.model.clone(), p.key.clone()), p))
            .collect();
    }

    /// Index ids of the handing process → ids here, for every publisher resumed.
    pub fn resumed_targets(&self) -> &HashMap<PodId, PodId> {
        &self.resumed
    }

    /// Drops what was handed over for pods discovery has not listed (they left
    /// during the upgrade); returns how many.
    pub fn finish_resume(&mut self) -> usize {
        self.resumed.clear();
        let dropped = self.handed_over.len();
        self.handed_over.clear();
        dropped
    }

    /// Replays requested since the last call.
    pub fn take_replays(&mut self) -> std::vec::Drain<'_, ReplayRequest> {
        self.replays.drain(..)
    }

    /// Replaces the models' hash settings (config reload). Parity verdicts are
    /// forgotten, so a pod condemned under the old settings gets a new chance.
    pub fn reload(&mut self, models: Vec<ModelEvents>) {
        self.models = models
            .into_iter()
            .map(|m| (m.name.clone(), Arc::new(m)))
            .collect();
        for entry in self.pods.values_mut() {
            if let Some(model) = self.models.get(&entry.model.name) {
                entry.model = Arc::clone(model);
            }
            entry.parity.reset();
            entry.stats.set_parity(entry.parity.verdict());
            refresh_trust(entry);
        }
    }

    /// Follows the registry: tracks new pods, retires removed ones (their index
    /// entries are dropped and their ids refused from then on, so late events
    /// cannot bring them back). Returns what a connect source must (un)subscribe.
    pub fn sync_pods(&mut self, now: Instant) -> PodDelta {
        let mut delta = PodDelta::default();
        let mut present = HashSet::new();
        for model in self.models.keys() {
            if let Some(set) = self.registry.pods(model) {
                present.extend(set.pods.iter().map(|pod| pod.id));
            }
        }
        let gone: Vec<PodId> = self
            .pods
            .iter()
            .filter(|(id, entry)| entry.pod.is_some() && !present.contains(*id))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.retire(id);
            delta.removed.push(id);
        }
        let models: Vec<Arc<ModelEvents>> = self.models.values().cloned().collect();
        for model in &models {
            let Some(set) = self.registry.pods(&model.name) else {
                continue;
            };
            for pod in &set.pods {
                if !self.pods.contains_key(&pod.id) {
                    self.add_pod(Arc::clone(pod), Arc::clone(model), now, &mut delta);
                }
            }
        }
        self.topics.clear();
        delta
    }

    fn add_pod(
        &mut self,
        pod: Arc<Pod>,
        model: Arc<ModelEvents>,
        now: Instant,
        delta: &mut PodDelta,
    ) {
        let topic_key = (model.name.clone(), pod.endpoint.topic_host.clone());
        let provisional = self
            .by_topic_host
            .get(&topic_key)
            .copied()
            .filter(|id| self.pods.get(id).is_some_and(|e| e.pod.is_none()));
        let mut entry = match provisional.and_then(|id| self.pods.remove(&id).map(|e| (id, e))) {
            Some((provisional, entry)) => {
                // Its blocks stay under the publishers' index ids; the pod maps to them.
                self.stats.rename(provisional, pod.id);
                tracing::info!(pod = %pod.endpoint.name, "KV events of a publisher seen before discovery now belong to its pod");
                entry
            }
            None => PodEntry {
                pod: None,
                model: Arc::clone(&model),
                topic_host: pod.endpoint.topic_host.clone(),
                replay: None,
                publishers: Vec::new(),
                parity: ParityChecker::new(self.cfg.parity_sample),
                stats: self.stats.pod(pod.id),
                trust: EventTrust::Unknown,
                epoch: pod.cache_epoch(),
                last_seen: now,
                home: false,
            },
        };
        entry.replay = pod.endpoint.replay.clone();
        entry.pod = Some(Arc::clone(&pod));
        if let Some(handed) = self
            .handed_over
            .remove(&(model.name.clone(), pod.endpoint.key.clone()))
        {
            for handed in handed.publishers {
                let at = publisher_index(
                    &self.cfg,
                    &self.registry,
                    &self.targets,
                    &mut entry,
                    pod.id,
                    handed.rank,
                );
                let publisher = &mut entry.publishers[at];
                publisher.tracker.resume(handed.mark);
                publisher.scopes = handed.scopes;
                self.resumed.insert(handed.target, publisher.target);
            }
            tracing::info!(pod = %pod.endpoint.name, "KV event stream resumed from the previous process");
        }
        for publisher in &mut entry.publishers {
            publisher.replay = entry
                .replay
                .as_deref()
                .and_then(|e| endpoint_for_rank(e, publisher.rank));
            publisher
                .tracker
                .set_replay(self.cfg.replay && publisher.replay.is_some());
        }
        if self.cfg.mode == EventsMode::Connect {
            match pod.endpoint.events.clone() {
                Some(events) => {
                    for rank in 0..self.cfg.data_parallel_size {
                        let Some(endpoint) = endpoint_for_rank(&events, rank) else {
                            tracing::warn!(pod = %pod.endpoint.name, %events, rank, "no event endpoint for this data-parallel rank");
                            continue;
                        };
                        publisher_index(
                            &self.cfg,
                            &self.registry,
                            &self.targets,
                            &mut entry,
                            pod.id,
                            rank,
                        );
                        delta.added.push(PublisherEndpoint {
                            pod: pod.id,
                            rank,
                            endpoint,
                        });
                    }
                }
                None => tracing::warn!(
                    pod = %pod.endpoint.name,
                    "events.mode is connect but discovery gives this pod no event endpoint; it stays unknown"
                ),
            }
        }
        self.targets.set(pod.id, &publisher_targets(&entry));
        entry.epoch = pod.cache_epoch();
        refresh_trust(&mut entry);
        if let Some(other) = self.by_topic_host.insert(topic_key, pod.id) {
            if self.pods.get(&other).is_some_and(|e| e.pod.is_some()) {
                tracing::warn!(
                    pod = %pod.endpoint.name,
                    topic_host = %pod.endpoint.topic_host,
                    "two pods of one model publish under the same topic host; only the newer gets events \
                     (give every pod a distinct topic, kv@<pod-ip>@<model>)"
                );
            }
        }
        self.pods.insert(pod.id, entry);
    }

    /// The pod is gone: its entries are dropped and its index ids retired.
    fn retire(&mut self, id: PodId) {
        let Some(entry) = self.pods.remove(&id) else {
            return;
        };
        for publisher in &entry.publishers {
            self.index.retire_pod(publisher.target);
        }
        self.index.retire_pod(id);
        self.targets.set(id, &[]);
        self.stats.forget(id);
        self.by_topic_host.retain(|_, pod| *pod != id);
        tracing::info!(pod = id, topic_host = %entry.topic_host, "pod removed: its KV index entries are retired");
    }

    fn resolve_topic(&mut self, topic: &[u8], now: Instant) -> Option<PodId> {
        let route = match self.topics.get(topic) {
            Some(route) => *route,
            None => {
                let route = self.route_topic(topic, now);
                if self.topics.len() >= TOPIC_CACHE_MAX {
                    self.topics.clear();
                }
                self.topics.insert(Bytes::copy_from_slice(topic), route);
                route
            }
        };
        match route {
            TopicRoute::Pod(id) => Some(id),
            TopicRoute::UnknownPod => {
                bump(&self.stats.global.unknown_pod, 1);
                None
            }
            TopicRoute::Malformed => {
                bump(&self.stats.global.malformed_messages, 1);
                None
            }
        }
    }

    fn route_topic(&mut self, topic: &[u8], now: Instant) -> TopicRoute {
        let Some((host, model)) = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| t.strip_prefix(self.cfg.topic_prefix.as_str()))
            .and_then(|t| t.split_once('@'))
            .filter(|(host, model)| !host.is_empty() && !model.is_empty())
        else {
            return TopicRoute::Malformed;
        };
        let Some(model) = self.models.get(model) else {
            return TopicRoute::Malformed;
        };
        let key = (model.name.clone(), host.to_string());
        if let Some(&id) = self.by_topic_host.get(&key) {
            return TopicRoute::Pod(id);
        }
        let provisional = self.pods.values().filter(|e| e.pod.is_none()).count();
        if self.cfg.require_known_pods || provisional >= MAX_PROVISIONAL {
            return TopicRoute::UnknownPod;
        }
        let id = self.registry.reserve_id();
        tracing::info!(topic_host = host, model = %model.name, "KV events from a pod discovery does not list yet: tracking them");
        self.pods.insert(
            id,
            PodEntry {
                pod: None,
                model: Arc::clone(model),
                topic_host: host.to_string(),
                replay: None,
                publishers: Vec::new(),
                parity: ParityChecker::new(self.cfg.parity_sample),
                stats: self.stats.pod(id),
                trust: EventTrust::Unknown,
                epoch: CacheEpoch::default(),
                last_seen: now,
                home: false,
            },
        );
        self.by_topic_host.insert(key, id);
        TopicRoute::Pod(id)
    }

    /// One message from a SUB socket.
    pub fn on_message(&mut self, origin: Origin, message: &ZmqMessage, now: Instant) {
        let (Some(topic), Some(seq), Some(payload), 3) = (
            message.get(0),
            message.get(1),
            message.get(2),
            message.len(),
        ) else {
            bump(&self.stats.global.malformed_messages, 1);
            return;
        };
        let seq = match parse_pub_frames(&[topic, seq, payload]) {
            Ok(parsed) => parsed.seq,
            Err(_) => {
                bump(&self.stats.global.malformed_messages, 1);
                return;
            }
        };
        let pod_id = match origin {
            Origin::Pod { pod, .. } => pod,
            Origin::Bound | Origin::Relayed => match self.resolve_topic(topic, now) {
                Some(id) => id,
                None => return,
            },
        };
        let Self {
            cfg,
            registry,
            targets,
            pods,
            batch,
            scratch,
            actions,
            replays,
            index,
            ..
        } = self;
        let Some(entry) = pods.get_mut(&pod_id) else {
            // A pod removed while its messages were queued.
            return;
        };
        follow_epoch(index, entry);
        entry.last_seen = now;
        entry.home = origin != Origin::Relayed;
        bump(&entry.stats.batches, 1);
        if decode_batch_into(payload, batch).is_err() {
            // Treated as lost: the gap it leaves is replayed, or cleared.
            bump(&entry.stats.malformed, 1);
            return;
        }
        let rank = match origin {
            Origin::Pod { rank, .. } => rank,
            Origin::Bound | Origin::Relayed => batch.dp_rank.unwrap_or(0),
        };
        let at = publisher_index(cfg, registry, targets, entry, pod_id, rank);
        let verdict =
            entry.publishers[at]
                .tracker
                .on_live(seq, batch.ts, payload.clone(), now, actions);
        match verdict {
            Verdict::Applied | Verdict::Held | Verdict::Restart => {}
            Verdict::Gap => {
                tracing::debug!(pod = pod_id, rank, seq, last = ?entry.publishers[at].tracker.last_seq(), "KV event gap");
            }
            Verdict::Duplicate => bump(&entry.stats.duplicates, 1),
        }
        perform(
            index,
            pod_id,
            entry,
            at,
            Some(batch),
            scratch,
            actions,
            replays,
        );
        follow_epoch(index, entry);
        refresh_trust(entry);
    }

    /// The state of every pod whose events reach this replica directly, for a peer replica
    /// that joins (bind mode with a relay): each publisher's index entries and stream mark,
    /// as of the last batch applied. Publishers that applied nothing have nothing to give.
    pub fn home_snapshots(&self) -> Vec<PodSnapshot> {
        self.pods
            .values()
            .filter(|entry| entry.home && entry.pod.is_some())
            .filter_map(|entry| {
                let publishers: Vec<PublisherSnapshot> = entry
                    .publishers
                    .iter()
                    .filter_map(|p| {
                        let mark = p.tracker.mark()?;
                        let mut entries = Vec::with_capacity(self.index.pod_block_count(p.target));
                        self.index.for_each_block_of(p.target, |scope, tier, hash| {
                            entries.push((scope, tier, hash));
                        });
                        Some(PublisherSnapshot {
                            rank: p.rank,
                            mark,
                            entries,
                        })
                    })
                    .collect();
                let topic = format!(
                    "{}{}@{}",
                    self.cfg.topic_prefix, entry.topic_host, entry.model.name
                );
                (!publishers.is_empty()).then(|| PodSnapshot {
                    topic: Bytes::from(topic),
                    publishers,
                })
            })
            .collect()
    }

    /// A peer replica's snapshot of a pod it is home to: each publisher this replica is not
    /// already as far on takes the peer's entries and stream position. Returns whether
    /// anything was taken.
    pub fn adopt_snapshot(&mut self, snapshot: PodSnapshot, now: Instant) -> bool {
        let Some(pod_id) = self.resolve_topic(&snapshot.topic, now) else {
            return false;
        };
        let Self {
            cfg,
            registry,
            targets,
            pods,
            scratch,
            actions,
            replays,
            index,
            ..
        } = self;
        let Some(entry) = pods.get_mut(&pod_id) else {
            return false;
        };
        let mut adopted = false;
        for publisher in snapshot.publishers {
            let at = publisher_index(cfg, registry, targets, entry, pod_id, publisher.rank);
            let local = &mut entry.publishers[at];
            // A stream this replica follows whole and at least as far needs nothing; one it
            // joined mid-stream (or lost batches of) takes the home's exact state instead.
            let ahead = local.tracker.is_synced()
                && local
                    .tracker
                    .mark()
                    .is_some_and(|mine| mine.seq >= publisher.mark.seq);
            if ahead {
                continue;
            }
            index.clear_pod(local.target);
            let mut groups: HashMap<(ScopeId, Tier), Vec<u64>> = HashMap::new();
            for (scope, tier, hash) in publisher.entries {
                groups.entry((scope, tier)).or_default().push(hash);
            }
            local.scopes.clear();
            for ((scope, tier), hashes) in &groups {
                index.store(local.target, *scope, *tier, hashes);
                if !local.scopes.contains(scope) {
                    local.scopes.push(*scope);
                }
            }
            local.tracker.adopt(publisher.mark, now, actions);
            perform(index, pod_id, entry, at, None, scratch, actions, replays);
            adopted = true;
        }
        refresh_trust(entry);
        adopted
    }

    /// The answer to a replay request.
    pub fn on_replay(&mut self, done: ReplayDone, now: Instant) {
        let Self {
            pods,
            scratch,
            actions,
            replays,
            index,
            ..
        } = self;
        let Some(entry) = pods.get_mut(&done.pod) else {
            return;
        };
        follow_epoch(index, entry);
        let Some(at) = entry.publishers.iter().position(|p| p.rank == done.rank) else {
            return;
        };
        let reply = done.reply;
        let mut replayed = Vec::with_capacity(reply.batches.len());
        for (seq, payload) in reply.batches {
            match batch_ts(&payload) {
                Some(ts) => replayed.push(Replayed {
                    seq,
                    ts,
                    item: payload,
                }),
                None => bump(&entry.stats.malformed, 1),
            }
        }
        if reply.malformed > 0 {
            bump(&entry.stats.malformed, reply.malformed as u64);
        }
        if let Some(error) = &reply.error {
            tracing::warn!(pod = done.pod, rank = done.rank, %error, "KV event replay incomplete");
        }
        let verdict = entry.publishers[at]
            .tracker
            .on_replay(done.token, replayed, reply.end, now, actions);
        match verdict {
            ReplayVerdict::Stale | ReplayVerdict::Probed => {}
            ReplayVerdict::Recovered => bump(&entry.stats.replays_ok, 1),
            ReplayVerdict::Retrying | ReplayVerdict::Lost => bump(&entry.stats.replays_failed, 1),
            ReplayVerdict::Restarted => {}
        }
        perform(index, done.pod, entry, at, None, scratch, actions, replays);
        follow_epoch(index, entry);
        refresh_trust(entry);
    }

    /// Periodic: epochs moved by others are caught up with, gaps whose wait is
    /// over are given up; publishers never discovered and long silent are forgotten.
    pub fn on_tick(&mut self, now: Instant) {
        let Self {
            pods,
            scratch,
            actions,
            replays,
            index,
            ..
        } = self;
        let mut idle = Vec::new();
        for (&id, entry) in pods.iter_mut() {
            if entry.pod.is_none() && now.duration_since(entry.last_seen) > PROVISIONAL_IDLE {
                idle.push(id);
                continue;
            }
            follow_epoch(index, entry);
            for at in 0..entry.publishers.len() {
                if entry.publishers[at].tracker.on_tick(now, actions) {
                    tracing::debug!(
                        pod = id,
                        rank = entry.publishers[at].rank,
                        "KV event gap wait over"
                    );
                }
                if !actions.is_empty() {
                    perform(index, id, entry, at, None, scratch, actions, replays);
                }
            }
            follow_epoch(index, entry);
            refresh_trust(entry);
        }
        for id in idle {
            tracing::info!(
                id,
                "forgetting KV events of a publisher discovery never listed"
            );
            self.retire(id);
        }
    }
}

fn publisher_targets(entry: &PodEntry) -> Vec<PodId> {
    entry.publishers.iter().map(|p| p.target).collect()
}

/// Index of the publisher for `rank` in `entry`, created on first use. Rank 0
/// of a pod indexes under the pod's own id; other ranks under ids of their own.
fn publisher_index(
    cfg: &IngestConfig,
    registry: &PodRegistry,
    targets: &IndexTargets,
    entry: &mut PodEntry,
    pod_id: PodId,
    rank: u32,
) -> usize {
    if let Some(i) = entry.publishers.iter().position(|p| p.rank == rank) {
        return i;
    }
    let target = if rank == 0 && entry.publishers.iter().all(|p| p.target != pod_id) {
        pod_id
    } else {
        registry.reserve_id()
    };
    let replay = entry
        .replay
        .as_deref()
        .and_then(|e| endpoint_for_rank(e, rank));
    let mut tracker_cfg = cfg.tracker.clone();
    tracker_cfg.replay = cfg.replay && replay.is_some();
    // Kept in rank order, so a pod's index targets are listed by rank.
    let at = entry.publishers.partition_point(|p| p.rank < rank);
    entry.publishers.insert(
        at,
        Publisher {
            rank,
            target,
            tracker: SeqTracker::new(tracker_cfg),
            scopes: Vec::new(),
            replay,
        },
    );
    if entry.pod.is_some() {
        targets.set(pod_id, &publisher_targets(entry));
    }
    at
}

/// Buffers reused across batches.
#[derive(Default)]
struct Scratch {
    /// A held batch being applied.
    held: EventBatch,
    /// Hashes of consecutive BlockRemoved events (vLLM sends one per block),
    /// applied with one index call.
    removals: Vec<u64>,
}

/// Carries out the tracker's actions for publisher `at` of `entry`.
#[allow(clippy::too_many_arguments)]
fn perform(
    index: &BlockIndex,
    pod_id: PodId,
    entry: &mut PodEntry,
    at: usize,
    live: Option<&EventBatch>,
    scratch: &mut Scratch,
    actions: &mut Vec<Action<Bytes>>,
    replays: &mut Vec<ReplayRequest>,
) {
    let gaps = entry.publishers[at].tracker.take_gaps();
    if gaps > 0 {
        bump(&entry.stats.gaps, u64::from(gaps));
    }
    for action in actions.drain(..) {
        match action {
            Action::ApplyLive => {
                if let Some(batch) = live {
                    apply_batch(index, entry, at, batch, &mut scratch.removals);
                }
            }
            Action::ApplyHeld { item, .. } => match decode_batch_into(&item, &mut scratch.held) {
                Ok(()) => apply_batch(index, entry, at, &scratch.held, &mut scratch.removals),
                Err(_) => {
                    bump(&entry.stats.malformed, 1);
                    let publisher = &mut entry.publishers[at];
                    index.clear_pod(publisher.target);
                    publisher.tracker.mark_lost();
                    advance_epoch(entry.pod.as_deref(), &mut entry.epoch, false);
                }
            },
            Action::Clear(reason) => {
                let publisher = &entry.publishers[at];
                index.clear_pod(publisher.target);
                match reason {
                    ClearReason::Restart => {
                        // A new process may run corrected hash settings.
                        entry.parity.reset();
                        entry.stats.set_parity(entry.parity.verdict());
                        advance_epoch(entry.pod.as_deref(), &mut entry.epoch, true);
                        bump(&entry.stats.restarts, 1);
                        tracing::info!(
                            pod = pod_id,
                            rank = publisher.rank,
                            "KV event publisher restarted: its entries are cleared"
                        );
                    }
                    ClearReason::Lost => {
                        advance_epoch(entry.pod.as_deref(), &mut entry.epoch, false);
                        bump(&entry.stats.unrecoverable, 1);
                        tracing::warn!(
                            pod = pod_id,
                            rank = publisher.rank,
                            replay = publisher.replay.is_some(),
                            "KV events lost and not replayable: the pod's entries are cleared and rebuilt from live events"
                        );
                    }
                }
            }
            Action::Replay { from, token } => {
                let publisher = &entry.publishers[at];
                if let Some(endpoint) = &publisher.replay {
                    replays.push(ReplayRequest {
                        pod: pod_id,
                        rank: publisher.rank,
                        endpoint: endpoint.clone(),
                        from,
                        token,
                    });
                }
            }
        }
    }
}

fn tier(medium: &Medium) -> Tier {
    Tier::from_medium(Some(medium.as_str()))
}

/// Removes `hashes` (all on `tier`) from every scope the publisher stored into.
fn remove_all(index: &BlockIndex, publisher: &Publisher, tier: Tier, hashes: &mut Vec<u64>) {
    if hashes.is_empty() {
        return;
    }
    for &scope in &publisher.scopes {
        index.remove(publisher.target, scope, tier, hashes);
    }
    hashes.clear();
}

/// Applies one decoded batch's events in order. Runs of BlockRemoved on one
/// tier go to the index together; any other event applies them first, so a
/// block removed and stored again in one batch stays stored.
fn apply_batch(
    index: &BlockIndex,
    entry: &mut PodEntry,
    at: usize,
    batch: &EventBatch,
    removals: &mut Vec<u64>,
) {
    let stats = &*entry.stats;
    let model = &*entry.model;
    let publisher = &mut entry.publishers[at];
    let target = publisher.target;
    let mut removal_tier = Tier::Gpu;
    for event in &batch.events {
        match event {
            KvEvent::Removed(removed) => {
                let tier = tier(&removed.medium);
                if tier != removal_tier {
                    remove_all(index, publisher, removal_tier, removals);
                    removal_tier = tier;
                }
                removals.extend_from_slice(&removed.block_hashes);
                bump(&stats.blocks_removed, removed.block_hashes.len() as u64);
            }
            KvEvent::Stored(stored) => {
                remove_all(index, publisher, removal_tier, removals);
                let (scope, lora) = match model.adapter(stored.lora_name.as_deref(), stored.lora_id)
                {
                    Adapter::Base => (model.scope, None),
                    Adapter::Known(adapter) => (adapter.scope, Some(&adapter.key)),
                    Adapter::Unknown => {
                        bump(&stats.unknown_adapter, 1);
                        continue;
                    }
                };
                index.store(target, scope, tier(&stored.medium), &stored.block_hashes);
                if !publisher.scopes.contains(&scope) {
                    publisher.scopes.push(scope);
                }
                bump(&stats.blocks_stored, stored.block_hashes.len() as u64);
                let was_untrusted = entry.parity.untrusted();
                match entry.parity.check(&model.hasher, stored, lora) {
                    ParityOutcome::NotSampled | ParityOutcome::Unverifiable(_) => {}
                    ParityOutcome::Agree => {
                        bump(&stats.parity_checked, 1);
                        stats.set_parity(entry.parity.verdict());
                    }
                    ParityOutcome::Disagree(mismatch) => {
                        bump(&stats.parity_checked, 1);
                        bump(&stats.parity_mismatched, 1);
                        stats.set_parity(entry.parity.verdict());
                        let description = mismatch.to_string();
                        if entry.parity.untrusted() && !was_untrusted {
                            tracing::error!(
                                pod = %entry.topic_host,
                                model = %model.name,
                                mismatch = %description,
                                "KV event hash parity FAILED: this pod's block hashes differ from kvgate's; \
                                 routing it on load only until the config is fixed and reloaded, or the pod restarts"
                            );
                        } else {
                            tracing::warn!(pod = %entry.topic_host, model = %model.name, mismatch = %description, "KV event hash parity disagreement");
                        }
                        stats.record_mismatch(description);
                    }
                }
            }
            KvEvent::AllCleared => {
                removals.clear();
                index.clear_pod(target);
                publisher.tracker.mark_cleared();
                advance_epoch(entry.pod.as_deref(), &mut entry.epoch, false);
                bump(&stats.all_cleared, 1);
            }
        }
    }
    remove_all(index, publisher, removal_tier, removals);
    bump(&stats.events, batch.events.len() as u64);
    if !batch.dropped.is_empty() {
        // Events it could not read may have removed blocks: nothing indexed
        // for this publisher can be vouched for any more.
        bump(&stats.malformed, 1);
        index.clear_pod(target);
        publisher.tracker.mark_lost();
        advance_epoch(entry.pod.as_deref(), &mut entry.epoch, false);
        tracing::warn!(
            pod = %entry.topic_host,
            skipped = batch.dropped.len(),
            first = %batch.dropped[0],
            "KV event batch with undecodable events: the pod's entries are cleared"
        );
    }
}

/// Moves the pod's cache epoch on after entries of one of its publishers were cleared, so
/// every other belief about its cache goes with them (`new_process`: a restart, which
/// also voids what was learned of the old process). `seen` advances with it only when
/// nothing else moved the epoch meanwhile; otherwise it stays behind for
/// [`follow_epoch`] to catch up with.
fn advance_epoch(pod: Option<&Pod>, seen: &mut CacheEpoch, new_process: bool) {
    let Some(pod) = pod else {
        return;
    };
    let next = if new_process {
        pod.process_replaced()
    } else {
        pod.cache_cleared()
    };
    if next == seen.next() {
        *seen = next;
    }
}

/// Catches up with a cache epoch that moved without ingestion (a refused connection:
/// the pod's process is gone): every publisher's entries are dropped and each stream
/// is expected to start over from a new process, whose hash settings may differ.
fn follow_epoch(index: &BlockIndex, entry: &mut PodEntry) {
    let Some(current) = entry.pod.as_ref().map(|pod| pod.cache_epoch()) else {
        return;
    };
    if current == entry.epoch {
        return;
    }
    for publisher in &mut entry.publishers {
        index.clear_pod(publisher.target);
        publisher.tracker.forget();
    }
    entry.parity.reset();
    entry.stats.set_parity(entry.parity.verdict());
    bump(&entry.stats.restarts, 1);
    entry.epoch = current;
    tracing::info!(
        pod = %entry.topic_host,
        "the pod's process is gone: its KV index entries are cleared and its event streams start over"
    );
}

/// Sets the pod's trust from its publishers and parity, for the epoch the entry describes.
fn refresh_trust(entry: &mut PodEntry) {
    let trust = if entry.parity.untrusted() {
        EventTrust::Untrusted
    } else if !entry.publishers.is_empty() && entry.publishers.iter().all(|p| p.tracker.is_synced())
    {
        EventTrust::Synced
    } else {
        EventTrust::Unknown
    };
    if trust != entry.trust {
        tracing::info!(pod = %entry.topic_host, from = entry.trust.as_str(), to = trust.as_str(), "KV event trust changed");
        entry.trust = trust;
    }
    if let Some(pod) = &entry.pod {
        if pod.trust() != trust {
            pod.set_trust(entry.epoch, trust);
        }
    }
}

/// The `ts` of a msgpack `KVEventBatch` (`[ts, events, dp_rank]`), read
/// without decoding the events.
fn batch_ts(payload: &[u8]) -> Option<f64> {
    let rest = match payload.first()? {
        0x90..=0x9f => payload.get(1..)?,
        0xdc => payload.get(3..)?,
        0xdd => payload.get(5..)?,
        _ => return None,
    };
    match rest.first()? {
        0xcb => Some(f64::from_be_bytes(rest.get(1..9)?.try_into().ok()?)),
        0xca => Some(f64::from(f32::from_be_bytes(
            rest.get(1..5)?.try_into().ok()?,
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::discovery::PodEndpoint;
    use crate::events::codec::{EventEncoder, ExtraKeys, OutEvent, WireHash};
    use crate::index::{IndexConfig, PrefixMatch};
    use crate::vllm::VllmRelease;

    const MODEL: &str = "m";

    fn ingestor() -> (
        Ingestor,
        Arc<BlockIndex>,
        Arc<PodRegistry>,
        Arc<IndexTargets>,
    ) {
        let config = Config::parse(
            "events: {mode: bind, replay: false, paritySample: 0, dataParallelSize: 2}\nmodels:\n  - name: m\n    tokenizer: t.json\n    blockSize: 4\n    \
             hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.26.0\"\n    discovery: {static: {pods: []}}\n",
        )
        .expect("config");
        let index = Arc::new(BlockIndex::new(crate::index::IndexConfig::default()));
        let registry = Arc::new(PodRegistry::new([MODEL]));
        let targets = Arc::new(IndexTargets::default());
        let ingestor = Ingestor::new(
            IngestConfig::from_events(&config.events),
            vec![ModelEvents::from_config(&config.models[0]).expect("model")],
            Arc::clone(&index),
            Arc::clone(&registry),
            Arc::new(EventStats::default()),
            Arc::clone(&targets),
        );
        (ingestor, index, registry, targets)
    }

    enum Ev<'a> {
        Store(&'a [u64]),
        Remove(u64),
    }

    fn message(seq: u64, rank: u32, events: &[Ev<'_>]) -> ZmqMessage {
        let hashes: Vec<Vec<WireHash<'_>>> = events
            .iter()
            .map(|e| match e {
                Ev::Store(keys) => keys.iter().map(|&k| WireHash::Int(k)).collect(),
                Ev::Remove(key) => vec![WireHash::Int(*key)],
            })
            .collect();
        let tokens = vec![7u32; 64];
        let plain = ExtraKeys::Plain;
        let out: Vec<OutEvent<'_>> = events
            .iter()
            .zip(&hashes)
            .map(|(e, block_hashes)| match e {
                Ev::Store(keys) => OutEvent::Stored {
                    block_hashes,
                    parent: None,
                    token_ids: &tokens[..keys.len() * 4],
                    block_size: 4,
                    lora_id: None,
                    lora_name: None,
                    medium: "GPU",
                    extra_keys: &plain,
                },
                Ev::Remove(_) => OutEvent::Removed {
                    block_hashes,
                    medium: "GPU",
                },
            })
            .collect();
        let mut payload = Vec::new();
        EventEncoder::new(VllmRelease::new(0, 26, 0)).encode_batch(
            seq as f64,
            &out,
            rank,
            &mut payload,
        );
        let mut message = ZmqMessage::from(Bytes::from_static(b"kv@10.0.0.1@m"));
        message.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
        message.push_back(Bytes::from(payload));
        message
    }

    fn holds(index: &BlockIndex, target: PodId, key: u64) -> bool {
        let mut found = PrefixMatch::new();
        index.lookup(scope_id(MODEL, None), &[key], &mut found);
        found.get(target).any_blocks == 1
    }

    #[test]
    fn events_apply_in_order_per_rank_and_removed_pods_are_retired() {
        let (mut ingest, index, registry, targets) = ingestor();
        let endpoint = PodEndpoint {
            key: "p".into(),
            name: "p".into(),
            http: ([10, 0, 0, 1], 8000).into(),
            events: None,
            replay: None,
            topic_host: "10.0.0.1".into(),
            role: Default::default(),
        };
        registry.apply_snapshot(MODEL, &[endpoint]);
        ingest.sync_pods(Instant::now());
        let pod = registry.pods(MODEL).expect("model").pods[0].clone();
        let now = Instant::now();
        ingest.on_message(Origin::Bound, &message(0, 0, &[Ev::Store(&[1, 2, 3])]), now);
        // Evicted and cached again in one step: stays cached.
        ingest.on_message(
            Origin::Bound,
            &message(
                1,
                0,
                &[Ev::Remove(2), Ev::Store(&[2]), Ev::Remove(3), Ev::Remove(1)],
            ),
            now,
        );
        // Rank 1 of the same pod (same topic) has a cache of its own.
        ingest.on_message(Origin::Bound, &message(0, 1, &[Ev::Store(&[1, 9])]), now);
        let ranks = targets.of(pod.id).expect("a target per rank");
        assert_eq!(ranks[0], pod.id);
        assert!(
            holds(&index, ranks[0], 2)
                && !holds(&index, ranks[0], 1)
                && !holds(&index, ranks[0], 3)
        );
        assert!(holds(&index, ranks[1], 1) && holds(&index, ranks[1], 9));
        assert_eq!(index.pod_block_count(ranks[0]), 1);
        assert_eq!(pod.trust(), EventTrust::Synced);

        registry.apply_snapshot(MODEL, &[]);
        let delta = ingest.sync_pods(now);
        assert_eq!(delta.removed, [pod.id]);
        assert_eq!(
            index.pod_block_count(ranks[0]) + index.pod_block_count(ranks[1]),
            0
        );
        // A late message for the removed pod changes nothing.
        ingest.on_message(Origin::Bound, &message(2, 0, &[Ev::Store(&[5])]), now);
        assert!(!holds(&index, ranks[0], 5));
        assert!(targets.of(pod.id).is_none());
    }

    const CONFIG: &str = "
events: {mode: bind, replay: false, paritySample: 0}
models:
  - name: m
    tokenizer: t.json
    blockSize: 16
    hashAlgo: sha256_cbor
    hashSeed: \"0\"
    vllmRelease: \"0.11.0\"
    discovery: {static: {pods: []}}
";

    fn endpoint(port: u16, topic_host: &str) -> PodEndpoint {
        let http = std::net::SocketAddr::from(([10, 0, 0, 1], port));
        PodEndpoint {
            key: http.to_string(),
            name: topic_host.into(),
            http,
            events: None,
            replay: None,
            topic_host: topic_host.into(),
            role: Default::default(),
        }
    }

    /// One process's ingestion: its registry, index and ingestor.
    struct Process {
        registry: Arc<PodRegistry>,
        index: Arc<BlockIndex>,
        ingestor: Ingestor,
    }

    impl Process {
        fn new(config: &Config, pods: &[PodEndpoint]) -> Self {
            let registry = Arc::new(PodRegistry::new(["m"]));
            registry.apply_snapshot("m", pods);
            let index = Arc::new(BlockIndex::new(IndexConfig {
                budget_bytes: 1 << 20,
                shards: 4,
            }));
            let ingestor = Ingestor::new(
                IngestConfig::from_events(&config.events),
                vec![ModelEvents::from_config(&config.models[0]).expect("model")],
                Arc::clone(&index),
                Arc::clone(&registry),
                Arc::new(EventStats::default()),
                Arc::new(IndexTargets::default()),
            );
            Self {
                registry,
                index,
                ingestor,
            }
        }

        fn id_of(&self, topic_host: &str) -> PodId {
            self.registry
                .by_topic_host("m", topic_host)
                .expect("pod listed")
                .id
        }

        fn store(&mut self, topic_host: &str, seq: u64, hashes: &[u64]) {
            let message = Self::stored(topic_host, seq, hashes);
            self.ingestor
                .on_message(Origin::Bound, &message, Instant::now());
        }

        /// The same batch, as a peer replica relays it.
        fn relayed(&mut self, topic_host: &str, seq: u64, hashes: &[u64]) {
            let message = Self::stored(topic_host, seq, hashes);
            self.ingestor
                .on_message(Origin::Relayed, &message, Instant::now());
        }

        fn stored(topic_host: &str, seq: u64, hashes: &[u64]) -> ZmqMessage {
            let wire: Vec<WireHash<'_>> = hashes.iter().map(|&h| WireHash::Int(h)).collect();
            let tokens = vec![1u32; hashes.len() * 16];
            let event = OutEvent::Stored {
                block_hashes: &wire,
                parent: None,
                token_ids: &tokens,
                block_size: 16,
                lora_id: None,
                lora_name: None,
                medium: "GPU",
                extra_keys: &ExtraKeys::Plain,
            };
            let mut payload = Vec::new();
            EventEncoder::new("0.11.0".parse().expect("release")).encode_batch(
                1_000.0 + seq as f64,
                &[event],
                0,
                &mut payload,
            );
            let frames = vec![
                Bytes::from(format!("kv@{topic_host}@m")),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                Bytes::from(payload),
            ];
            ZmqMessage::try_from(frames).expect("frames")
        }

        fn trust(&self, topic_host: &str) -> EventTrust {
            self.registry
                .by_topic_host("m", topic_host)
                .expect("pod listed")
                .trust()
        }

        fn cached_blocks(&self, topic_host: &str, hashes: &[u64]) -> u32 {
            let mut found = PrefixMatch::new();
            self.index
                .lookup(crate::scope::scope_id("m", None), hashes, &mut found);
            found.get(self.id_of(topic_host)).any_blocks
        }
    }

    #[test]
    fn a_handed_over_stream_resumes_under_the_new_pod_ids() {
        let config = Config::parse(CONFIG).expect("config");
        let a = endpoint(8001, "a");
        let mut old = Process::new(&config, std::slice::from_ref(&a));
        old.ingestor.sync_pods(Instant::now());
        old.store("a", 0, &[11, 12, 13]);
        old.store("a", 1, &[14]);
        assert_eq!(old.cached_blocks("a", &[11, 12, 13, 14]), 4);
        let handover = old.ingestor.handover();
        assert_eq!(handover.len(), 1);
        let mut snapshot = Vec::new();
        old.index.snapshot(&mut snapshot).expect("snapshot");

        // Another pod comes first in the new process: ids differ from the old ones.
        let mut new = Process::new(&config, &[endpoint(8002, "b"), a]);
        assert_ne!(new.id_of("a"), old.id_of("a"));
        new.ingestor.resume(handover);
        new.ingestor.sync_pods(Instant::now());
        let remap = new.ingestor.resumed_targets().clone();
        let restored = new
            .index
            .restore(&mut snapshot.as_slice(), |id| remap.get(&id).copied())
            .expect("restore");
        assert_eq!(restored.entries, 4);
        assert_eq!(new.ingestor.finish_resume(), 0);
        assert_eq!(new.cached_blocks("a", &[11, 12, 13, 14]), 4);
        assert_eq!(new.trust("a"), EventTrust::Synced);

        // The stream goes on where the old process left it.
        new.store("a", 2, &[15]);
        assert_eq!(new.cached_blocks("a", &[11, 12, 13, 14, 15]), 5);
        assert_eq!(new.trust("a"), EventTrust::Synced);
        assert!(new.ingestor.take_replays().next().is_none());
    }

    #[test]
    fn a_joining_replica_adopts_the_home_snapshot_and_follows_the_relay() {
        let config = Config::parse(CONFIG).expect("config");
        let (a, b) = (endpoint(8001, "a"), endpoint(8002, "b"));
        // `home` receives pod a directly; pod b's batches reach it relayed.
        let mut home = Process::new(&config, &[a.clone(), b.clone()]);
        home.ingestor.sync_pods(Instant::now());
        home.store("a", 0, &[11, 12, 13]);
        home.store("a", 1, &[14]);
        home.relayed("b", 0, &[21]);
        let snapshots = home.ingestor.home_snapshots();
        assert_eq!(snapshots.len(), 1, "only the pod it is home to");
        assert_eq!(&snapshots[0].topic[..], b"kv@a@m");
        assert_eq!(snapshots[0].publishers[0].mark.seq, 1);
        assert_eq!(snapshots[0].publishers[0].entries.len(), 4);

        let mut peer = Process::new(&config, &[b, a]);
        peer.ingestor.sync_pods(Instant::now());
        for snapshot in snapshots {
            assert!(peer.ingestor.adopt_snapshot(snapshot, Instant::now()));
        }
        assert_eq!(peer.cached_blocks("a", &[11, 12, 13, 14]), 4);
        assert_eq!(peer.trust("a"), EventTrust::Synced);
        peer.relayed("a", 2, &[15]);
        assert_eq!(peer.cached_blocks("a", &[11, 12, 13, 14, 15]), 5);
        assert_eq!(peer.trust("a"), EventTrust::Synced);
        // The home relays on; a copy that arrives twice counts once.
        peer.relayed("a", 3, &[16]);
        peer.relayed("a", 3, &[16]);
        assert_eq!(peer.cached_blocks("a", &[11, 12, 13, 14, 15, 16]), 6);
        // A snapshot behind what the peer has is not taken.
        let stale = home.ingestor.home_snapshots();
        assert!(!peer
            .ingestor
            .adopt_snapshot(stale[0].clone(), Instant::now()));
        // The pod's PUB moves to the peer (its home died): the sequence goes on directly.
        peer.store("a", 4, &[17]);
        assert_eq!(peer.cached_blocks("a", &[11, 12, 13, 14, 15, 16, 17]), 7);
        assert_eq!(peer.trust("a"), EventTrust::Synced);
        assert_eq!(peer.ingestor.home_snapshots().len(), 1);
    }

    #[test]
    fn a_pod_whose_process_is_gone_loses_its_entries_and_its_stream_starts_over() {
        let config = Config::parse(CONFIG).expect("config");
        let mut p = Process::new(&config, &[endpoint(8001, "a")]);
        p.ingestor.sync_pods(Instant::now());
        p.store("a", 0, &[11, 12]);
        p.store("a", 1, &[13]);
        assert_eq!(p.cached_blocks("a", &[11, 12, 13]), 3);
        assert_eq!(p.trust("a"), EventTrust::Synced);

        // The proxy or the health checker found the pod's port refusing connections.
        let pod = p.registry.by_topic_host("m", "a").expect("pod listed");
        assert!(pod.connection_refused());
        assert_eq!(p.trust("a"), EventTrust::Unknown);
        p.ingestor.on_tick(Instant::now());
        assert_eq!(p.cached_blocks("a", &[11, 12, 13]), 0);

        // The new process publishes from seq 0 again: its stream is applied as a new one.
        p.store("a", 0, &[21]);
        assert_eq!(p.cached_blocks("a", &[21]), 1);
        assert_eq!(p.trust("a"), EventTrust::Synced);
    }

    #[test]
    fn batch_ts_reads_the_first_field() {
        let mut payload = vec![0x93, 0xcb];
        payload.extend_from_slice(&1754006400.5f64.to_be_bytes());
        payload.extend_from_slice(&[0x90, 0x00]);
        assert_eq!(batch_ts(&payload), Some(1754006400.5));
        assert_eq!(batch_ts(&[0x93, 0xcb, 0x00]), None);
        assert_eq!(batch_ts(&[0x80]), None);
    }
}
