//! Discrete-event benchmark: the simulated pods ([`PodEngine`]) and the real routing
//! stack (profiles built by [`Pipeline::build`], [`Pod`] accounting, the [`BlockIndex`])
//! in one process, on a virtual clock.
//!
//! Events, in time order: request arrivals (routed through the pipeline, then submitted
//! to the chosen pod's engine); step completions of each pod (tokens, finished requests,
//! and the step's KV-event batch, which is delivered into the index after the configured
//! delay unless it is lost); and the load scrape every `scrape_interval_ms`, which copies
//! each engine's running/waiting/KV usage into its `Pod` as the gateway's scraper does.
//! Router-side accounting is the gateway's own: `Pod::begin_request` when a request is
//! routed, `prefill_finished` at its first token, release at its end.
//!
//! A step's outcomes take effect at its end time; the engine has already applied the
//! step to its state, which is what vLLM's scheduler sees for the next step. The oracle
//! feed mirrors that state into the index at once; real events arrive at the step's end.
//!
//! With several gateway replicas (connect mode, no shared store), each replica has its
//! own pipeline, index and `Pod` accounting; every replica receives every event batch
//! (each loses batches independently), and each request goes to a replica drawn at random,
//! as a `LoadBalancer` Service spreads connections. At each arrival the other replicas are
//! asked what they would pick, which gives the same-pick rate. In bind mode with the relay
//! (`-r<N>`), pod p's batches reach replica p mod N (its home) as above, and the others
//! `RELAY_LAG_MS` later; a lost batch is lost for all of them (the home never had it).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::metrics::{RequestRecord, RunData};
use super::policy::{IndexFeed, PolicySpec, RELAY_LAG_MS};
use super::workload::Segment;
use crate::discovery::PodEndpoint;
use crate::index::{BlockIndex, IndexConfig, PrefixMatch, ScopeId, Tier};
use crate::plugins::{PluginContext, PluginError, RequestOutcome, SchedulingRequest};
use crate::pods::{EventTrust, InFlight, Pod, PodId, PodSet, ScrapedLoad};
use crate::scheduler::Pipeline;
use crate::sim::{
    EngineEvent, KvChange, ParamsError, PodEngine, PodParams, RequestId, SimRequest, StepOutput,
    SubmitError,
};

/// The simulated cluster and router settings shared by every run of a benchmark.
#[derive(Clone, Debug)]
pub struct SimSetup {
    pub pods: usize,
    pub pod_params: PodParams,
    pub model: String,
    pub scope: ScopeId,
    pub index: IndexConfig,
    /// The gateway's metrics scrape period (`server.scrapeIntervalMs`; 0 = none).
    pub scrape_interval_ms: f64,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("pod parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("building profile {profile:?}: {source}")]
    Profile {
        profile: String,
        source: PluginError,
    },
    #[error("the cluster needs at least one pod")]
    NoPods,
    #[error("profile {profile:?} ranked no pod for request {request}")]
    NoPod { profile: String, request: u32 },
    #[error("pod {pod} refused request {request}: {source}")]
    Submit {
        pod: u32,
        request: u32,
        source: SubmitError,
    },
    #[error("pod {pod} has queued work it cannot schedule at {at_ms:.1} ms")]
    Stalled { pod: u32, at_ms: f64 },
    #[error("{finished} of {total} requests finished: the simulation ran out of events")]
    Unfinished { finished: usize, total: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventKind {
    Arrival(u32),
    /// An idle pod may have work (an arrival cleared its request overhead).
    Wake(u32),
    StepDone(u32),
    /// The oldest pending KV-event batch of a pod reaches a replica's index.
    Deliver(u32),
    /// The oldest relayed batch of a pod reaches every replica but its home.
    Relay(u32),
    Scrape,
}

#[derive(Debug)]
struct Event {
    at_ms: f64,
    seq: u64,
    kind: EventKind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Event {}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Event {
    /// Reversed: `BinaryHeap` pops the earliest event, ties in scheduling order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at_ms
            .total_cmp(&self.at_ms)
            .then(other.seq.cmp(&self.seq))
    }
}

struct Queue {
    heap: BinaryHeap<Event>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, at_ms: f64, kind: EventKind) {
        self.seq += 1;
        self.heap.push(Event {
            at_ms,
            seq: self.seq,
            kind,
        });
    }
}

struct SimPod {
    engine: PodEngine,
    out: StepOutput,
    stepping: bool,
    /// The pending wake-up, if any; a popped `Wake` at another time is stale.
    wake_at: Option<f64>,
    /// Delayed event batches on their way, oldest first, with the replica each goes to.
    deliveries: VecDeque<(usize, Arc<[KvChange]>)>,
    /// Batches its home replica relays, oldest first (relayed bind mode).
    relayed: VecDeque<Arc<[KvChange]>>,
}

/// One gateway replica: its own routing state, index and view of the pods.
struct Replica {
    pipeline: Pipeline,
    index: Arc<BlockIndex>,
    pods: PodSet,
    loss_rng: StdRng,
}

/// A routed request until it finishes.
struct Routed {
    load: InFlight,
    replica: usize,
    pod: u32,
    queued_uncached_tokens: u64,
    predicted_cached_tokens: usize,
    /// Prompt tokens the best pod held at arrival (what an ideal router could reuse).
    available_tokens: u32,
}

fn sim_pod_endpoint(i: usize) -> PodEndpoint {
    let port = u16::try_from(8001 + i).unwrap_or(u16::MAX);
    let http = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    PodEndpoint {
        key: format!("sim/pod-{i}"),
        name: format!("pod-{i}"),
        http,
        events: None,
        replay: None,
        topic_host: http.to_string(),
        role: Default::default(),
    }
}

/// Applies one pod's KV changes to the index, in order.
fn apply_changes(
    index: &BlockIndex,
    pod: PodId,
    scope: ScopeId,
    changes: &[KvChange],
    removed: &mut Vec<u64>,
) {
    removed.clear();
    for change in changes {
        match change {
            KvChange::BlockRemoved { key } => {
                removed.push(*key);
                continue;
            }
            KvChange::BlockStored {
                block_keys,
                first_block,
                blocks,
                ..
            } => {
                index.remove(pod, scope, Tier::Gpu, removed);
                removed.clear();
                let end = first_block.saturating_add(*blocks);
                if let Some(stored) = block_keys.get(*first_block..end) {
                    index.store(pod, scope, Tier::Gpu, stored);
                }
            }
            KvChange::AllCleared => {
                removed.clear();
                index.clear_pod(pod);
            }
        }
    }
    index.remove(pod, scope, Tier::Gpu, removed);
    removed.clear();
}

/// One policy over one segment.
struct Run<'a> {
    segment: &'a Segment,
    setup: &'a SimSetup,
    feed: IndexFeed,
    replicas: Vec<Replica>,
    /// Bind mode with the relay: each pod's events reach its home replica only, which relays.
    relayed: bool,
    /// Which replica the Service sends each request to.
    replica_rng: StdRng,
    /// Whether to ask the other replicas what they would pick: not for rotating or random
    /// pickers, whose state the question itself would move.
    probe_same_pick: bool,
    pods: Vec<SimPod>,
    queue: Queue,
    routed: Vec<Option<Routed>>,
    followers: Vec<Vec<u32>>,
    finished: usize,
    data: RunData,
    removed: Vec<u64>,
    prefix_match: PrefixMatch,
    request_id: String,
    progress: &'a AtomicUsize,
    stage_ends: Vec<f64>,
}

impl<'a> Run<'a> {
    fn stage_at(&self, at_ms: f64) -> Option<usize> {
        let i = self.stage_ends.partition_point(|&end| end <= at_ms);
        (i < self.stage_ends.len()).then_some(i)
    }

    fn arrive(&mut self, index: u32, now_ms: f64) -> Result<(), SimError> {
        let request = &self.segment.requests[index as usize];
        self.request_id.clear();
        let _ = write!(self.request_id, "{index}");
        let scheduling = SchedulingRequest {
            request_id: &self.request_id,
            model: &self.setup.model,
            scope: self.setup.scope,
            block_keys: &request.block_keys,
            block_size: self.setup.pod_params.block_size as usize,
            prompt_tokens: request.prompt_tokens as usize,
            session: None,
            now: Duration::from_secs_f64(now_ms.max(0.0) / 1e3),
        };
        let replica_index = if self.replicas.len() > 1 {
            self.replica_rng.random_range(0..self.replicas.len())
        } else {
            0
        };
        let replica = &self.replicas[replica_index];
        let started = Instant::now();
        let decision = replica.pipeline.schedule(&scheduling, &replica.pods);
        let Some(chosen) = decision.ranked.first() else {
            return Err(SimError::NoPod {
                profile: replica.pipeline.name().to_string(),
                request: index,
            });
        };
        let uncached = chosen.uncached_tokens(&scheduling) as u64;
        let queued_uncached_tokens = chosen.pod.uncached_tokens_in_flight();
        let load = chosen.pod.begin_request(uncached);
        replica.pipeline.routed(&scheduling, chosen);
        self.data
            .decision_us
            .push(started.elapsed().as_secs_f64() * 1e6);
        let pod = chosen.pod.id;
        for (i, other) in self.replicas.iter().enumerate() {
            if self.probe_same_pick && i != replica_index {
                let (same, asked) = &mut self.data.same_pick;
                let theirs = other.pipeline.schedule(&scheduling, &other.pods);
                *same += u64::from(theirs.ranked.first().is_some_and(|c| c.pod.id == pod));
                *asked += 1;
            }
        }
        let predicted_cached_tokens = (chosen.cached_blocks as usize
            * self.setup.pod_params.block_size as usize)
            .min(request.prompt_tokens as usize);

        let block_size = self.setup.pod_params.block_size as usize;
        let usable = request.prompt_tokens.saturating_sub(1) as usize / block_size.max(1);
        let keys = &request.block_keys[..request.block_keys.len().min(usable)];
        let mut best = 0;
        for sim in &self.pods {
            best = best.max(sim.engine.cached_prefix_blocks(keys));
        }
        if self.feed == IndexFeed::Oracle {
            self.replicas[replica_index].index.lookup(
                self.setup.scope,
                &request.block_keys,
                &mut self.prefix_match,
            );
            for (id, sim) in self.pods.iter().enumerate() {
                let id = PodId::try_from(id).unwrap_or(PodId::MAX);
                let indexed = self.prefix_match.get(id).any_blocks as usize;
                if indexed != sim.engine.cached_prefix_blocks(&request.block_keys) {
                    self.data.oracle_mismatches += 1;
                }
            }
        }

        let sim = &mut self.pods[pod as usize];
        sim.engine
            .submit(
                now_ms,
                SimRequest {
                    id: RequestId(u64::from(index)),
                    block_keys: Arc::clone(&request.block_keys),
                    prompt_tokens: request.prompt_tokens,
                    max_tokens: request.output_tokens,
                },
            )
            .map_err(|source| SimError::Submit {
                pod,
                request: index,
                source,
            })?;
        if let Some(count) = self.data.pod_requests.get_mut(pod as usize) {
            *count += 1;
        }
        self.routed[index as usize] = Some(Routed {
            load,
            replica: replica_index,
            pod,
            queued_uncached_tokens,
            predicted_cached_tokens,
            available_tokens: u32::try_from(best * block_size).unwrap_or(u32::MAX),
        });
        if !sim.stepping {
            if let Some(wake) = sim.engine.next_wakeup() {
                if sim.wake_at.is_none_or(|w| wake < w) {
                    sim.wake_at = Some(wake);
                    self.queue.push(wake, EventKind::Wake(pod));
                }
            }
        }
        Ok(())
    }

    fn start_step(&mut self, pod: u32, now_ms: f64) -> Result<(), SimError> {
        let sim = &mut self.pods[pod as usize];
        match sim.engine.step(now_ms, &mut sim.out) {
            Some(end_ms) => {
                sim.stepping = true;
                if self.feed == IndexFeed::Oracle {
                    for replica in &self.replicas {
                        apply_changes(
                            &replica.index,
                            pod,
                            self.setup.scope,
                            &sim.out.kv_events,
                            &mut self.removed,
                        );
                    }
                }
                self.queue.push(end_ms, EventKind::StepDone(pod));
            }
            None => match sim.engine.next_wakeup() {
                Some(wake) if wake > now_ms => {
                    sim.wake_at = Some(wake);
                    self.queue.push(wake, EventKind::Wake(pod));
                }
                Some(_) => return Err(SimError::Stalled { pod, at_ms: now_ms }),
                None => {}
            },
        }
        Ok(())
    }

    fn step_done(&mut self, pod: u32, now_ms: f64) -> Result<(), SimError> {
        let stage = self.stage_at(now_ms);
        let sim = &mut self.pods[pod as usize];
        sim.stepping = false;
        let mut out = std::mem::take(&mut sim.out);
        for event in out.events.drain(..) {
            match event {
                EngineEvent::Token { id, index } => {
                    if let Some(tokens) =
                        stage.and_then(|s| self.data.stage_output_tokens.get_mut(s))
                    {
                        *tokens += 1;
                    }
                    if index == 0 {
                        if let Some(Some(routed)) = self.routed.get_mut(id.0 as usize) {
                            routed.load.prefill_finished();
                        }
                    }
                }
                EngineEvent::Preempted { .. } => {}
                EngineEvent::Finished(summary) => self.finish(summary, now_ms),
            }
        }
        match self.feed {
            IndexFeed::Events { delay_ms, loss } if !out.kv_events.is_empty() && self.relayed => {
                let home = pod as usize % self.replicas.len();
                let replica = &mut self.replicas[home];
                if loss > 0.0 && replica.loss_rng.random_bool(loss) {
                    self.data.event_batches_lost += 1;
                } else {
                    self.data.event_batches += 1;
                    let batch: Arc<[KvChange]> = Arc::from(out.kv_events.as_slice());
                    if delay_ms <= 0.0 {
                        apply_changes(
                            &replica.index,
                            pod,
                            self.setup.scope,
                            &batch,
                            &mut self.removed,
                        );
                    } else {
                        self.pods[pod as usize]
                            .deliveries
                            .push_back((home, Arc::clone(&batch)));
                        self.queue.push(now_ms + delay_ms, EventKind::Deliver(pod));
                    }
                    if self.replicas.len() > 1 {
                        self.pods[pod as usize].relayed.push_back(batch);
                        self.queue
                            .push(now_ms + delay_ms + RELAY_LAG_MS, EventKind::Relay(pod));
                    }
                }
            }
            IndexFeed::Events { delay_ms, loss } if !out.kv_events.is_empty() => {
                let mut delayed: Option<Arc<[KvChange]>> = None;
                for (r, replica) in self.replicas.iter_mut().enumerate() {
                    if loss > 0.0 && replica.loss_rng.random_bool(loss) {
                        self.data.event_batches_lost += 1;
                        continue;
                    }
                    self.data.event_batches += 1;
                    if delay_ms <= 0.0 {
                        apply_changes(
                            &replica.index,
                            pod,
                            self.setup.scope,
                            &out.kv_events,
                            &mut self.removed,
                        );
                    } else {
                        let batch =
                            delayed.get_or_insert_with(|| Arc::from(out.kv_events.as_slice()));
                        self.pods[pod as usize]
                            .deliveries
                            .push_back((r, Arc::clone(batch)));
                        self.queue.push(now_ms + delay_ms, EventKind::Deliver(pod));
                    }
                }
            }
            IndexFeed::Oracle if !out.kv_events.is_empty() => self.data.event_batches += 1,
            _ => {}
        }
        self.pods[pod as usize].out = out;
        self.start_step(pod, now_ms)
    }

    fn finish(&mut self, summary: crate::sim::RequestSummary, now_ms: f64) {
        let index = summary.id.0 as usize;
        let Some(routed) = self.routed.get_mut(index).and_then(Option::take) else {
            return;
        };
        let Routed {
            load,
            replica,
            pod,
            queued_uncached_tokens,
            predicted_cached_tokens,
            available_tokens,
        } = routed;
        let pod_arc = Arc::clone(load.pod());
        drop(load);
        let ttft_ms = summary.ttft_ms();
        self.replicas[replica].pipeline.completed(&RequestOutcome {
            pod: pod_arc,
            prompt_tokens: summary.prompt_tokens as usize,
            queued_uncached_tokens,
            predicted_cached_tokens,
            actual_cached_tokens: Some(summary.cached_tokens as usize),
            time_to_first_token: Some(Duration::from_secs_f64(ttft_ms.max(0.0) / 1e3)),
            success: true,
        });
        let request = &self.segment.requests[index];
        self.data.records.push(RequestRecord {
            stage: request.stage,
            pod,
            ttft_ms,
            tpot_ms: summary.tpot_ms(),
            e2e_ms: summary.e2e_ms(),
            prompt_tokens: summary.prompt_tokens,
            cached_tokens: summary.cached_tokens,
            output_tokens: summary.output_tokens,
            missed_tokens: Some(available_tokens.saturating_sub(summary.cached_tokens)),
            preemptions: summary.preemptions,
        });
        self.finished += 1;
        self.progress.fetch_add(1, AtomicOrdering::Relaxed);
        for &next in &self.followers[index] {
            let think = self.segment.requests[next as usize]
                .follows
                .map_or(0.0, |f| f.think_ms);
            self.queue.push(now_ms + think, EventKind::Arrival(next));
        }
    }

    fn deliver(&mut self, pod: u32) {
        let sim = &mut self.pods[pod as usize];
        if let Some((replica, batch)) = sim.deliveries.pop_front() {
            if let Some(replica) = self.replicas.get(replica) {
                apply_changes(
                    &replica.index,
                    pod,
                    self.setup.scope,
                    &batch,
                    &mut self.removed,
                );
            }
        }
    }

    /// A home replica's relay of a pod's batch reaches the other replicas.
    fn relay(&mut self, pod: u32) {
        let home = pod as usize % self.replicas.len();
        if let Some(batch) = self.pods[pod as usize].relayed.pop_front() {
            for (r, replica) in self.replicas.iter().enumerate() {
                if r != home {
                    apply_changes(
                        &replica.index,
                        pod,
                        self.setup.scope,
                        &batch,
                        &mut self.removed,
                    );
                }
            }
        }
    }

    fn scrape(&mut self, now_ms: f64) {
        let mut in_flight_max = 0u32;
        let mut in_flight_sum = 0u64;
        for (i, sim) in self.pods.iter().enumerate() {
            let metrics = sim.engine.metrics();
            let load = ScrapedLoad {
                running: f64::from(metrics.running),
                waiting: f64::from(metrics.waiting),
                kv_usage: metrics.kv_cache_usage,
            };
            let mut in_flight = 0u32;
            for replica in &self.replicas {
                if let Some(pod) = replica.pods.pods.get(i) {
                    pod.set_scraped(load);
                    in_flight += pod.in_flight();
                }
            }
            in_flight_max = in_flight_max.max(in_flight);
            in_flight_sum += u64::from(in_flight);
        }
        if in_flight_sum > 0 {
            if let Some(stage) = self.stage_at(now_ms) {
                let mean = in_flight_sum as f64 / self.pods.len() as f64;
                let (sum, n) = &mut self.data.stage_balance[stage];
                *sum += f64::from(in_flight_max) / mean;
                *n += 1;
            }
        }
    }
}

/// A gateway replica with a fresh index and its own view of the simulated pods.
fn replica(setup: &SimSetup, policy: &PolicySpec, seed: u64) -> Result<Replica, SimError> {
    let index = Arc::new(BlockIndex::new(setup.index.clone()));
    let ctx = PluginContext {
        index: Arc::clone(&index),
        targets: Arc::default(),
        block_size: setup.pod_params.block_size as usize,
        pod_kv_blocks: setup.pod_params.kv_blocks as usize,
    };
    let pipeline =
        Pipeline::build(&policy.profile_name, &policy.profile, &ctx).map_err(|source| {
            SimError::Profile {
                profile: policy.profile_name.clone(),
                source,
            }
        })?;
    let pods = (0..setup.pods)
        .map(|i| {
            let pod = Arc::new(Pod::new(
                PodId::try_from(i).unwrap_or(PodId::MAX),
                sim_pod_endpoint(i),
            ));
            if policy.feed != IndexFeed::None {
                pod.set_trust(pod.cache_epoch(), EventTrust::Synced);
            }
            pod
        })
        .collect();
    Ok(Replica {
        pipeline,
        index,
        pods: PodSet { pods },
        loss_rng: StdRng::seed_from_u64(seed),
    })
}

/// Runs one policy over one segment from cold pods. `progress` counts finished requests.
pub fn simulate(
    segment: &Segment,
    policy: &PolicySpec,
    setup: &SimSetup,
    progress: &AtomicUsize,
) -> Result<RunData, SimError> {
    let wall = Instant::now();
    if setup.pods == 0 {
        return Err(SimError::NoPods);
    }
    let policy_seed = setup.seed ^ xxhash_rust::xxh3::xxh3_64(policy.name.as_bytes());
    let mut replicas = Vec::with_capacity(policy.replicas.max(1));
    for r in 0..policy.replicas.max(1) {
        replicas.push(replica(setup, policy, policy_seed.wrapping_add(r as u64))?);
    }
    let mut pods = Vec::with_capacity(setup.pods);
    for _ in 0..setup.pods {
        pods.push(SimPod {
            engine: PodEngine::new(setup.pod_params.clone())?,
            out: StepOutput::default(),
            stepping: false,
            wake_at: None,
            deliveries: VecDeque::new(),
            relayed: VecDeque::new(),
        });
    }
    let requests = &segment.requests;
    let mut followers = vec![Vec::new(); requests.len()];
    let mut first_turns = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        match request.follows {
            Some(follow) => {
                if let Some(list) = followers.get_mut(follow.previous as usize) {
                    list.push(i);
                }
            }
            None => first_turns.push(i),
        }
    }
    let stages = segment.stages.len();
    let probe_same_pick = replicas.iter().all(|r| r.pipeline.ranking_is_pure());
    let mut run = Run {
        segment,
        setup,
        feed: policy.feed,
        replicas,
        relayed: policy.relayed,
        replica_rng: StdRng::seed_from_u64(!policy_seed),
        probe_same_pick,
        pods,
        queue: Queue {
            heap: BinaryHeap::new(),
            seq: 0,
        },
        routed: (0..requests.len()).map(|_| None).collect(),
        followers,
        finished: 0,
        data: RunData {
            stage_output_tokens: vec![0; stages],
            stage_balance: vec![(0.0, 0); stages],
            pod_requests: vec![0; setup.pods],
            replicas: policy.replicas.max(1),
            ..RunData::default()
        },
        removed: Vec::new(),
        prefix_match: PrefixMatch::new(),
        request_id: String::new(),
        progress,
        stage_ends: segment.stages.iter().map(|s| s.end_ms).collect(),
    };
    // First turns arrive at their times, fed into the queue one at a time.
    let mut next_first = 0;
    let push_next_first = |run: &mut Run<'_>, next_first: &mut usize| {
        if let Some(&i) = first_turns.get(*next_first) {
            run.queue
                .push(requests[i as usize].arrival_ms, EventKind::Arrival(i));
            *next_first += 1;
        }
    };
    push_next_first(&mut run, &mut next_first);
    // A zero interval switches the gateway's scraper off: no scrapes here either.
    let scrape_every = setup.scrape_interval_ms;
    if scrape_every > 0.0 {
        run.queue.push(0.0, EventKind::Scrape);
    }
    let mut now_ms = 0.0;
    while let Some(event) = run.queue.heap.pop() {
        now_ms = event.at_ms;
        match event.kind {
            EventKind::Arrival(i) => {
                if requests[i as usize].follows.is_none() {
                    push_next_first(&mut run, &mut next_first);
                }
                run.arrive(i, now_ms)?;
            }
            EventKind::Wake(pod) => {
                let sim = &mut run.pods[pod as usize];
                if sim.stepping || sim.wake_at != Some(now_ms) {
                    continue;
                }
                sim.wake_at = None;
                run.start_step(pod, now_ms)?;
            }
            EventKind::StepDone(pod) => run.step_done(pod, now_ms)?,
            EventKind::Deliver(pod) => run.deliver(pod),
            EventKind::Relay(pod) => run.relay(pod),
            EventKind::Scrape => {
                run.scrape(now_ms);
                // Only while something else can still happen: a stalled run must end.
                if run.finished < requests.len() && !run.queue.heap.is_empty() {
                    run.queue.push(now_ms + scrape_every, EventKind::Scrape);
                }
            }
        }
    }
    if run.finished < requests.len() {
        return Err(SimError::Unfinished {
            finished: run.finished,
            total: requests.len(),
        });
    }
    let stats = run.replicas[0].index.stats();
    let mut data = run.data;
    data.index_blocks = stats.blocks;
    data.index_bytes = stats.bytes;
    data.span_s = now_ms / 1e3;
    data.wall_s = wall.elapsed().as_secs_f64();
    Ok(data)
}
