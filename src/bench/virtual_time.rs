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
//! A request of a recorded trace goes to the replica that recorded it, when the policy has
//! as many replicas as the trace names, so a replay splits the traffic as the fleet did.
//!
//! A pod restart ([`SimRestart`]) is what `kvgate sim` does to a pod: its process dies with
//! its in-flight requests (they fail), every replica drops it from its index as the
//! gateway does on losing the pod, requests go to the next ranked pod while it is down
//! (the gateway's retry of a refused connection), and it comes back with an empty cache.
//!
//! A disaggregated profile (one with a `prefill:` section) runs on pods with roles: the
//! first [`SimSetup::prefill_pods`] take prefill legs, the others decode legs. Its decode
//! pod is picked at arrival; unless that pod has all but `minUncachedTokens` of the prompt
//! cached, the prefill stage picks a prefill pod, which runs the prompt as a one-token
//! prefill leg; when it ends, the decode leg goes to the decode pod, which pulls the KV (its
//! engine models the transfer) and streams the answer. The request's time to first token
//! runs from its arrival to the decode pod's first token, and its hit rate is the prefill
//! leg's. Inter-token latencies are the gaps between a request's streamed tokens.
//!
//! With a flow stage ([`FlowStage`]) an arrival first meets the gateway's flow control:
//! while every pod is saturated (the same [`has_room`] check, on the first replica's view
//! of the pods) it waits in the same [`FlowQueue`], and it is dispatched, then routed, when
//! a request finishes or a scrape shows room; its time to first token includes the wait.

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
use crate::discovery::{PodEndpoint, PodRole};
use crate::flow::{has_room, FlowConfig, FlowQueue, Priority, QueueFull, QueueLimits, Ticket};
use crate::index::{BlockIndex, IndexConfig, PrefixMatch, ScopeId, Tier};
use crate::metrics::flow::ShedReason;
use crate::plugins::{PluginContext, PluginError, RequestOutcome, SchedulingRequest};
use crate::pods::{EventTrust, InFlight, Pod, PodId, PodSet, ScrapedLoad, ScrapedLora};
use crate::scheduler::Pipeline;
use crate::sim::{
    EngineEvent, KvChange, KvTransfer, ParamsError, PodEngine, PodParams, RequestId, SimRequest,
    StepOutput, SubmitError,
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
    /// Pods restarted during each run.
    pub restarts: Vec<SimRestart>,
    /// Disaggregated profiles: pods `0..prefill_pods` take prefill legs, the rest decode
    /// legs. Aggregated profiles use every pod for everything.
    pub prefill_pods: usize,
}

/// A pod that dies at `at_ms` and is back, with an empty cache, `down_ms` later.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimRestart {
    pub pod: usize,
    pub at_ms: f64,
    pub down_ms: f64,
}

impl SimSetup {
    /// `pods` simulated pods of `model` behind a gateway with `config`'s index budget and
    /// scrape period.
    pub fn for_model(
        config: &crate::config::Config,
        model: &str,
        pods: usize,
        pod_params: PodParams,
        seed: u64,
    ) -> Self {
        Self {
            pods,
            pod_params,
            model: model.to_string(),
            scope: crate::scope::scope_id(model, None),
            index: IndexConfig {
                budget_bytes: config.index.budget_bytes,
                shards: 64,
            },
            scrape_interval_ms: config.server.scrape_interval_ms as f64,
            seed,
            restarts: Vec::new(),
            prefill_pods: 0,
        }
    }
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
    #[error("profile {profile:?} is disaggregated: it needs 1 to {most} prefill pods of the {pods}, not {prefill_pods}", most = pods.saturating_sub(1))]
    PrefillPods {
        profile: String,
        prefill_pods: usize,
        pods: usize,
    },
    #[error("restart of pod {pod}: the cluster has {pods} pods")]
    RestartPod { pod: usize, pods: usize },
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
    /// A pod's process dies.
    PodDown(u32),
    /// A restarted pod is back.
    PodUp(u32),
    /// A queued request's `queueTimeoutMs` is up.
    QueueDeadline(u32),
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
    /// Down between a restart's two halves.
    up: bool,
    /// The step in progress belonged to an incarnation that died: its outcomes are lost.
    step_lost: bool,
}

/// One gateway replica: its own routing state, index and view of the pods.
struct Replica {
    pipeline: Pipeline,
    index: Arc<BlockIndex>,
    pods: PodSet,
    loss_rng: StdRng,
}

/// Flow control in front of the routing: its config and each request's class.
pub struct FlowStage {
    pub config: FlowConfig,
    /// Per request of the segment: its priority and tenant.
    pub classes: Vec<(Priority, String)>,
}

/// The flow stage's waiting requests during a run.
struct FlowState<'a> {
    stage: &'a FlowStage,
    queue: FlowQueue<u32>,
    tickets: Vec<Option<Ticket>>,
    /// When each request arrived (its wait counts in its time to first token).
    arrived_ms: Vec<f64>,
    waited_ms: Vec<f64>,
}

/// A routed request until it finishes.
struct Routed {
    load: InFlight,
    replica: usize,
    /// The pod that streams the answer (a disaggregated request's decode pod).
    pod: u32,
    queued_uncached_tokens: u64,
    predicted_cached_tokens: usize,
    /// Prompt tokens the best pod held at arrival (what an ideal router could reuse).
    available_tokens: u32,
    arrival_ms: f64,
    /// A disaggregated request's prefill leg, while it runs.
    prefill: Option<PrefillLeg>,
    /// Prompt tokens the prefill leg found cached, once it ended.
    prefill_cached_tokens: Option<u32>,
    last_token_ms: f64,
    itl_ms: Vec<f32>,
}

/// A prefill leg in flight.
struct PrefillLeg {
    load: InFlight,
    pod: u32,
    queued_uncached_tokens: u64,
    predicted_cached_tokens: usize,
}

fn sim_pod_endpoint(i: usize, role: PodRole) -> PodEndpoint {
    let port = u16::try_from(8001 + i).unwrap_or(u16::MAX);
    let http = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    PodEndpoint {
        key: format!("sim/pod-{i}"),
        name: format!("pod-{i}"),
        http,
        events: None,
        replay: None,
        topic_host: http.to_string(),
        role,
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
    /// Requests go to the replica that recorded them (a trace naming as many replicas).
    recorded_replicas: bool,
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
    flow: Option<FlowState<'a>>,
}

impl<'a> Run<'a> {
    fn stage_at(&self, at_ms: f64) -> Option<usize> {
        let i = self.stage_ends.partition_point(|&end| end <= at_ms);
        (i < self.stage_ends.len()).then_some(i)
    }

    /// Whether the pods (as the first replica sees them) can take one more request now.
    fn flow_room(&self, flow: &FlowState<'_>, now_ms: f64) -> bool {
        has_room(
            &flow.stage.config.saturation,
            &self.replicas[0].pods.pods,
            0,
            now_ms.max(0.0) as u64,
        )
    }

    /// Flow control at arrival: true when the request is routed now; otherwise it waits
    /// (with its deadline scheduled) or is refused.
    fn admit(&mut self, index: u32, now_ms: f64) -> bool {
        let Some(flow) = self.flow.as_ref() else {
            return true;
        };
        if flow.queue.is_empty() && self.flow_room(flow, now_ms) {
            return true;
        }
        let Some(flow) = self.flow.as_mut() else {
            return true;
        };
        let config = &flow.stage.config;
        let (priority, tenant) = &flow.stage.classes[index as usize];
        if *priority < config.shed_below {
            self.refuse(index, ShedReason::Sheddable);
            return false;
        }
        let limits = QueueLimits {
            max_requests: config.max_queued_requests,
            max_bytes: config.max_queued_bytes,
        };
        // A prompt of token ids weighs about 6 bytes a token as JSON.
        let bytes = self.segment.requests[index as usize].prompt_tokens as usize * 6;
        match flow.queue.push(*priority, tenant, bytes, index, limits) {
            Ok(pushed) => {
                flow.tickets[index as usize] = Some(pushed.ticket);
                flow.arrived_ms[index as usize] = now_ms;
                let deadline = now_ms + config.queue_timeout_ms as f64;
                self.queue.push(deadline, EventKind::QueueDeadline(index));
                for (_, displaced) in &pushed.displaced {
                    flow.tickets[*displaced as usize] = None;
                }
                for (_, displaced) in pushed.displaced {
                    self.refuse(displaced, ShedReason::Displaced);
                }
            }
            Err(QueueFull::Requests) => self.refuse(index, ShedReason::QueueFull),
            Err(QueueFull::Bytes) => self.refuse(index, ShedReason::QueueBytes),
        }
        false
    }

    fn refuse(&mut self, index: u32, reason: ShedReason) {
        self.data.refused.push((index, reason));
        self.finished += 1;
        self.progress.fetch_add(1, AtomicOrdering::Relaxed);
    }

    /// Routes waiting requests, best first, while the pods have room.
    fn dispatch_waiting(&mut self, now_ms: f64) -> Result<(), SimError> {
        loop {
            let Some(flow) = self.flow.as_ref() else {
                return Ok(());
            };
            if flow.queue.is_empty() || !self.flow_room(flow, now_ms) {
                return Ok(());
            }
            let Some(flow) = self.flow.as_mut() else {
                return Ok(());
            };
            let Some((_, index)) = flow.queue.pop() else {
                return Ok(());
            };
            flow.tickets[index as usize] = None;
            flow.waited_ms[index as usize] = now_ms - flow.arrived_ms[index as usize];
            self.route(index, now_ms)?;
        }
    }

    /// Whether request `index` waits in the flow queue.
    fn waits(&self, index: u32) -> bool {
        self.flow
            .as_ref()
            .is_some_and(|flow| flow.tickets[index as usize].is_some())
    }

    fn queue_deadline(&mut self, index: u32) {
        let Some(flow) = self.flow.as_mut() else {
            return;
        };
        let waiting = flow.tickets[index as usize]
            .take()
            .is_some_and(|ticket| flow.queue.remove(&ticket).is_some());
        if waiting {
            self.refuse(index, ShedReason::Deadline);
        }
    }

    fn arrive(&mut self, index: u32, now_ms: f64) -> Result<(), SimError> {
        if self.admit(index, now_ms) {
            self.route(index, now_ms)?;
        }
        Ok(())
    }

    fn route(&mut self, index: u32, now_ms: f64) -> Result<(), SimError> {
        let request = &self.segment.requests[index as usize];
        self.request_id.clear();
        let _ = write!(self.request_id, "{index}");
        let scheduling = SchedulingRequest {
            request_id: &self.request_id,
            model: &self.setup.model,
            scope: self.setup.scope,
            adapter: request.adapter.as_deref(),
            block_keys: &request.block_keys,
            block_size: self.setup.pod_params.block_size as usize,
            prompt_tokens: request.prompt_tokens as usize,
            session: None,
            now: Duration::from_secs_f64(now_ms.max(0.0) / 1e3),
        };
        let replica_index = match request.replica {
            Some(recorded) if self.recorded_replicas => recorded as usize,
            _ if self.replicas.len() > 1 => self.replica_rng.random_range(0..self.replicas.len()),
            _ => 0,
        };
        let replica = &self.replicas[replica_index];
        let started = Instant::now();
        let decision = replica.pipeline.schedule(&scheduling, &replica.pods);
        let pods = &self.pods;
        let Some(chosen) = decision
            .ranked
            .iter()
            .find(|c| pods.get(c.pod.id as usize).is_some_and(|p| p.up))
        else {
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

        // A disaggregated profile: a prefill pod computes the prompt first, unless the
        // decode pod holds enough of it (or no prefill pod is up: the decode pod computes it).
        let replica = &self.replicas[replica_index];
        let prefill = replica.pipeline.prefill().and_then(|stage| {
            if (uncached as usize) < stage.min_uncached_tokens {
                return None;
            }
            let decision = stage.pipeline.schedule(&scheduling, &replica.pods);
            let chosen = decision
                .ranked
                .iter()
                .find(|c| pods.get(c.pod.id as usize).is_some_and(|p| p.up))?;
            let leg = PrefillLeg {
                queued_uncached_tokens: chosen.pod.uncached_tokens_in_flight(),
                load: chosen
                    .pod
                    .begin_request(chosen.uncached_tokens(&scheduling) as u64),
                pod: chosen.pod.id,
                predicted_cached_tokens: (chosen.cached_blocks as usize * block_size)
                    .min(request.prompt_tokens as usize),
            };
            stage.pipeline.routed(&scheduling, chosen);
            Some(leg)
        });
        let (target, kv_transfer, max_tokens) = match &prefill {
            Some(leg) => (leg.pod, KvTransfer::KeepForRemoteDecode, 1),
            None => (pod, KvTransfer::None, request.output_tokens),
        };
        self.submit(target, index, now_ms, kv_transfer, max_tokens)?;
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
            arrival_ms: now_ms,
            prefill,
            prefill_cached_tokens: None,
            last_token_ms: now_ms,
            itl_ms: Vec::new(),
        });
        Ok(())
    }

    /// Hands request `index` (or one of its legs) to a pod's engine, and wakes the pod.
    fn submit(
        &mut self,
        pod: u32,
        index: u32,
        now_ms: f64,
        kv_transfer: KvTransfer,
        max_tokens: u32,
    ) -> Result<(), SimError> {
        let request = &self.segment.requests[index as usize];
        // What the gateway adds to the body with `forwardPriority`.
        let priority = self
            .flow
            .as_ref()
            .filter(|flow| flow.stage.config.forward_priority)
            .map_or(0, |flow| flow.stage.classes[index as usize].0.to_vllm());
        let sim = &mut self.pods[pod as usize];
        sim.engine
            .submit(
                now_ms,
                SimRequest {
                    id: RequestId(u64::from(index)),
                    block_keys: Arc::clone(&request.block_keys),
                    prompt_tokens: request.prompt_tokens,
                    max_tokens,
                    lora: request.adapter.clone(),
                    kv_transfer,
                    priority,
                },
            )
            .map_err(|source| SimError::Submit {
                pod,
                request: index,
                source,
            })?;
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
        if std::mem::take(&mut sim.step_lost) {
            sim.out.events.clear();
            sim.out.kv_events.clear();
            return if sim.up {
                self.start_step(pod, now_ms)
            } else {
                Ok(())
            };
        }
        let mut out = std::mem::take(&mut sim.out);
        for event in out.events.drain(..) {
            match event {
                EngineEvent::Token { id, index } => {
                    let mut routed = self.routed.get_mut(id.0 as usize).and_then(Option::as_mut);
                    if let Some(leg) = routed
                        .as_mut()
                        .and_then(|r| r.prefill.as_mut())
                        .filter(|leg| leg.pod == pod)
                    {
                        // A prefill leg's token never reaches the client.
                        leg.load.prefill_finished();
                        continue;
                    }
                    if let Some(tokens) =
                        stage.and_then(|s| self.data.stage_output_tokens.get_mut(s))
                    {
                        *tokens += 1;
                    }
                    if let Some(routed) = routed.filter(|r| r.pod == pod) {
                        if index == 0 {
                            routed.load.prefill_finished();
                        } else {
                            routed.itl_ms.push((now_ms - routed.last_token_ms) as f32);
                        }
                        routed.last_token_ms = now_ms;
                    }
                }
                EngineEvent::Preempted { .. } => {}
                EngineEvent::Finished(summary) => self.finish(summary, pod, now_ms)?,
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

    /// A request or a prefill leg finished on `pod`.
    fn finish(
        &mut self,
        summary: crate::sim::RequestSummary,
        pod: u32,
        now_ms: f64,
    ) -> Result<(), SimError> {
        let index = summary.id.0 as usize;
        let leg = self
            .routed
            .get_mut(index)
            .and_then(Option::as_mut)
            .filter(|r| r.prefill.as_ref().is_some_and(|leg| leg.pod == pod))
            .and_then(|r| {
                r.prefill_cached_tokens = Some(summary.cached_tokens);
                r.prefill.take().map(|leg| (leg, r.replica, r.pod))
            });
        if let Some((leg, replica, decode_pod)) = leg {
            // The prefill leg ended: the decode leg goes to its pod, which pulls the KV.
            let pod_arc = Arc::clone(leg.load.pod());
            drop(leg.load);
            if let Some(stage) = self.replicas[replica].pipeline.prefill() {
                stage.pipeline.completed(&RequestOutcome {
                    pod: pod_arc,
                    prompt_tokens: summary.prompt_tokens as usize,
                    queued_uncached_tokens: leg.queued_uncached_tokens,
                    predicted_cached_tokens: leg.predicted_cached_tokens,
                    actual_cached_tokens: Some(summary.cached_tokens as usize),
                    time_to_first_token: Some(Duration::from_secs_f64(
                        summary.ttft_ms().max(0.0) / 1e3,
                    )),
                    success: true,
                });
            }
            let output_tokens = self.segment.requests[index].output_tokens;
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            return self.submit(
                decode_pod,
                index,
                now_ms,
                KvTransfer::PullFromRemote,
                output_tokens,
            );
        }
        let Some(routed) = self.routed.get_mut(index).and_then(Option::take) else {
            return Ok(());
        };
        let Routed {
            load,
            replica,
            pod,
            queued_uncached_tokens,
            predicted_cached_tokens,
            available_tokens,
            arrival_ms,
            prefill: _,
            prefill_cached_tokens,
            last_token_ms: _,
            itl_ms,
        } = routed;
        let pod_arc = Arc::clone(load.pod());
        drop(load);
        let ttft_ms = summary.first_token_ms - arrival_ms;
        let waited_ms = self.flow.as_ref().map_or(0.0, |flow| flow.waited_ms[index]);
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
        // What the prompt's computation reused: the prefill leg's cache, when there was one.
        let cached_tokens = prefill_cached_tokens.unwrap_or(summary.cached_tokens);
        self.data.records.push(RequestRecord {
            request: u32::try_from(index).unwrap_or(u32::MAX),
            stage: request.stage,
            pod,
            ttft_ms: ttft_ms + waited_ms,
            tpot_ms: summary.tpot_ms(),
            e2e_ms: summary.finish_ms - arrival_ms + waited_ms,
            prompt_tokens: summary.prompt_tokens,
            cached_tokens,
            output_tokens: summary.output_tokens,
            missed_tokens: Some(available_tokens.saturating_sub(cached_tokens)),
            preemptions: summary.preemptions,
            itl_ms,
        });
        self.ended(index, now_ms);
        Ok(())
    }

    /// Request `index` finished or failed: its session's next turn follows after its think time.
    fn ended(&mut self, index: usize, now_ms: f64) {
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

    /// The pod's process dies: its requests fail, its step's outcomes are lost, and every
    /// replica forgets what it held.
    fn pod_down(&mut self, pod: u32, params: &PodParams, now_ms: f64) -> Result<(), SimError> {
        let sim = &mut self.pods[pod as usize];
        sim.engine = PodEngine::new(params.clone())?;
        sim.up = false;
        sim.wake_at = None;
        sim.step_lost = sim.stepping;
        sim.deliveries.clear();
        sim.relayed.clear();
        for index in 0..self.routed.len() {
            let on_pod =
                |r: &Routed| r.pod == pod || r.prefill.as_ref().is_some_and(|leg| leg.pod == pod);
            if self.routed[index].as_ref().is_some_and(on_pod) {
                self.routed[index] = None;
                self.data.failed += 1;
                self.ended(index, now_ms);
            }
        }
        for replica in &self.replicas {
            replica.index.clear_pod(pod);
        }
        Ok(())
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
            let lora = sim.engine.lora_info().map(|info| ScrapedLora {
                running: info.running.iter().map(|a| a.to_string()).collect(),
                waiting: info.waiting.iter().map(|a| a.to_string()).collect(),
                max_lora: info.max_loras,
            });
            let mut in_flight = 0u32;
            for replica in &self.replicas {
                if let Some(pod) = replica.pods.pods.get(i) {
                    pod.set_scraped(load);
                    if let Some(lora) = &lora {
                        pod.set_scraped_lora(pod.cache_epoch(), lora.clone());
                    }
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
    let disaggregated = policy.profile.prefill.is_some();
    if disaggregated && !(1..setup.pods).contains(&setup.prefill_pods) {
        return Err(SimError::PrefillPods {
            profile: policy.profile_name.clone(),
            prefill_pods: setup.prefill_pods,
            pods: setup.pods,
        });
    }
    let pods = (0..setup.pods)
        .map(|i| {
            let role = match (disaggregated, i < setup.prefill_pods) {
                (false, _) => PodRole::Both,
                (true, true) => PodRole::Prefill,
                (true, false) => PodRole::Decode,
            };
            let pod = Arc::new(Pod::new(
                PodId::try_from(i).unwrap_or(PodId::MAX),
                sim_pod_endpoint(i, role),
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
    simulate_with_flow(segment, policy, setup, None, progress)
}

/// [`simulate`], with flow control in front of the routing when `flow` is given.
pub fn simulate_with_flow(
    segment: &Segment,
    policy: &PolicySpec,
    setup: &SimSetup,
    flow: Option<&FlowStage>,
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
    if let Some(restart) = setup.restarts.iter().find(|r| r.pod >= setup.pods) {
        return Err(SimError::RestartPod {
            pod: restart.pod,
            pods: setup.pods,
        });
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
            up: true,
            step_lost: false,
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
    let recorded = requests.iter().filter_map(|r| r.replica).max();
    let recorded_replicas = recorded.is_some_and(|most| most as usize + 1 == replicas.len());
    let mut run = Run {
        segment,
        setup,
        feed: policy.feed,
        replicas,
        relayed: policy.relayed,
        replica_rng: StdRng::seed_from_u64(!policy_seed),
        recorded_replicas,
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
        flow: flow.map(|stage| FlowState {
            stage,
            queue: FlowQueue::default(),
            tickets: vec![None; requests.len()],
            arrived_ms: vec![0.0; requests.len()],
            waited_ms: vec![0.0; requests.len()],
        }),
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
    for restart in &setup.restarts {
        let pod = u32::try_from(restart.pod).unwrap_or(u32::MAX);
        run.queue.push(restart.at_ms, EventKind::PodDown(pod));
        run.queue
            .push(restart.at_ms + restart.down_ms, EventKind::PodUp(pod));
    }
    let mut now_ms = 0.0;
    while let Some(event) = run.queue.heap.pop() {
        // The deadline of a request no longer waiting is no event: it must not stretch the
        // run's span (the goodput's denominator).
        if matches!(event.kind, EventKind::QueueDeadline(i) if !run.waits(i)) {
            continue;
        }
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
            EventKind::StepDone(pod) => {
                run.step_done(pod, now_ms)?;
                run.dispatch_waiting(now_ms)?;
            }
            EventKind::Deliver(pod) => run.deliver(pod),
            EventKind::Relay(pod) => run.relay(pod),
            EventKind::PodDown(pod) => run.pod_down(pod, &setup.pod_params, now_ms)?,
            EventKind::PodUp(pod) => {
                run.pods[pod as usize].up = true;
                if !run.pods[pod as usize].stepping {
                    run.start_step(pod, now_ms)?;
                }
            }
            EventKind::QueueDeadline(i) => run.queue_deadline(i),
            EventKind::Scrape => {
                run.scrape(now_ms);
                run.dispatch_waiting(now_ms)?;
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
    data.adapter_loads = run.pods.iter().map(|p| p.engine.metrics().lora_loads).sum();
    data.index_bytes = stats.bytes;
    data.span_s = now_ms / 1e3;
    data.wall_s = wall.elapsed().as_secs_f64();
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{BenchRequest, Stage};

    /// One 31-block prefix, a request every 100 ms for 3 s.
    fn segment() -> Segment {
        let keys: Arc<[u64]> = (1..=31).collect();
        let requests = (0..30)
            .map(|i| BenchRequest {
                arrival_ms: f64::from(i) * 100.0,
                stage: 0,
                block_keys: Arc::clone(&keys),
                prompt_tokens: 2_000,
                output_tokens: 64,
                follows: None,
                live: None,
                replica: None,
                adapter: None,
            })
            .collect();
        Segment {
            label: "restart".into(),
            stages: vec![Stage {
                label: "all".into(),
                offered_qps: 10.0,
                start_ms: 0.0,
                end_ms: 3_000.0,
                measured: true,
            }],
            requests,
            pooled_hit_ceiling: 0.0,
        }
    }

    fn precise() -> PolicySpec {
        PolicySpec {
            name: "precise".into(),
            profile_name: "precise".into(),
            profile: yaml_serde::from_str(
                "{filters: [{name: healthy}], scorers: [{name: kv-cache, weight: 2}, {name: load, weight: 1}], picker: {name: max-score}}",
            )
            .expect("profile parses"),
            feed: IndexFeed::Events {
                delay_ms: 0.0,
                loss: 0.0,
            },
            replicas: 1,
            relayed: false,
        }
    }

    fn setup(restarts: Vec<SimRestart>) -> SimSetup {
        SimSetup {
            pods: 2,
            pod_params: PodParams::default(),
            model: "m".into(),
            scope: crate::scope::scope_id("m", None),
            index: IndexConfig {
                budget_bytes: 1 << 24,
                shards: 4,
            },
            scrape_interval_ms: 0.0,
            seed: 1,
            restarts,
            prefill_pods: 0,
        }
    }

    #[test]
    fn a_restarted_pod_fails_its_requests_and_comes_back_empty() {
        let segment = segment();
        let progress = AtomicUsize::new(0);
        let steady = simulate(&segment, &precise(), &setup(Vec::new()), &progress).unwrap();
        assert_eq!(steady.failed, 0);
        let busiest = (0..2).max_by_key(|&p| steady.pod_requests[p]).unwrap_or(0);
        let restart = SimRestart {
            pod: busiest,
            at_ms: 1_500.0,
            down_ms: 200.0,
        };
        let restarted = simulate(&segment, &precise(), &setup(vec![restart]), &progress).unwrap();
        // The requests on the pod when it died fail; every other one is served.
        assert!(restarted.failed > 0, "{restarted:?}");
        assert_eq!(
            restarted.records.len() as u64 + restarted.failed,
            segment.requests.len() as u64
        );
        // Steady, every request follows the prefix to one pod, which computed it once. With
        // that pod restarted, the requests after it go to the other pod (the index forgot the
        // dead one), which computes the prefix a second time.
        let other = 1 - busiest;
        let cold = |data: &RunData| {
            data.records
                .iter()
                .filter(|r| r.cached_tokens < 30 * 64)
                .count()
        };
        assert_eq!(
            (steady.pod_requests[other], cold(&steady)),
            (0, 1),
            "{steady:?}"
        );
        assert!(restarted.pod_requests[other] > 0, "{restarted:?}");
        assert_eq!(cold(&restarted), 2, "{restarted:?}");
        let nowhere = SimRestart { pod: 2, ..restart };
        assert!(matches!(
            simulate(&segment, &precise(), &setup(vec![nowhere]), &progress),
            Err(SimError::RestartPod { pod: 2, pods: 2 })
        ));
    }
}
