//! Flow control: a stage before scheduling. While every healthy pod of a model is
//! saturated ([`SaturationDetector`]), new requests for it wait in kvgate, in priority
//! bands shared fairly between tenants ([`FlowQueue`]), instead of piling into the pods'
//! own queues; a waiting request is dispatched, and only then scored and routed, when a
//! pod drops below saturation.
//!
//! * **Fast path.** A request passes at once when nothing waits for its model and some
//!   pod has room: atomic loads of the pods' accounting, no lock.
//! * **Wake-ups.** The dispatcher (`FlowControl`'s [`BackgroundService`]) sleeps on the pods' `load_eased`
//!   signal (a request ended, a scrape, a health check passed) and on pod-set changes;
//!   it never polls.
//! * **One at a time.** A dispatched request holds a reservation until it is placed on a
//!   pod ([`Dispatch::placed`]): reservations count against the pods with room, so a wake-up
//!   does not release a burst onto one free slot before the pods' accounting shows it.
//! * **Refusals.** A request below `shedBelow` that would wait, or one past the queue's
//!   bounds, is refused at once (429); one that waits past `queueTimeoutMs` is refused
//!   then (503). A request that finds the queue full takes the place of the newest
//!   waiting ones of lower bands ([`FlowQueue::push`]), which are refused then (429
//!   `displaced`). A waiting request whose client leaves is taken out at once (dropping
//!   its [`QueuedRequest`] does it).
//!
//! The config is reloaded with the rest ([`FlowControl::configure`]); requests already
//! waiting keep their place, and a model whose flow control is switched off releases them.

mod config;
mod queue;
mod saturation;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use http::HeaderMap;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{oneshot, Notify};

pub use config::{
    FlowConfig, Priority, PriorityHeader, SaturationThresholds, DEFAULT_FAIRNESS_HEADER,
    OBJECTIVE_HEADER,
};
pub use queue::{FlowQueue, QueueFull, QueueLimits, Ticket};
pub use saturation::{has_room, SaturationDetector};

use crate::config::Config;
use crate::metrics::flow::{FlowMetrics, QueueOutcome, ShedReason};
use crate::pods::PodRegistry;

/// What the stage decided for a request.
pub enum Admission {
    /// Go on to scheduling now.
    Pass,
    /// Refused without waiting.
    Shed {
        reason: ShedReason,
        retry_after_secs: u32,
    },
    /// Wait for [`QueuedRequest::wait`].
    Queued(QueuedRequest),
}

/// A request let through; hold it until the request is placed on a pod.
#[derive(Debug, Default)]
pub struct Dispatch {
    reservation: Option<Reservation>,
}

impl Dispatch {
    /// The request is on a pod (the pod's accounting shows it): the next waiting request
    /// may be weighed against the pods' load.
    pub fn placed(&mut self) {
        self.reservation = None;
    }
}

#[derive(Debug)]
struct Reservation {
    reserved: Arc<AtomicUsize>,
    wake: Arc<Notify>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
        self.wake.notify_one();
    }
}

/// Why a queued request left the queue without being dispatched: it waited longer than
/// `queueTimeoutMs` ([`ShedReason::Deadline`]), or a more important request took its place
/// ([`ShedReason::Displaced`]).
#[derive(Debug, Clone, Copy)]
pub struct QueueRefusal {
    pub reason: ShedReason,
    pub waited: Duration,
    pub retry_after_secs: u32,
}

/// What the queue sends a waiting request.
enum Grant {
    Dispatch(Dispatch),
    Displaced,
}

struct Waiter {
    grant: oneshot::Sender<Grant>,
}

/// One model's queue and the requests dispatched from it but not yet placed.
struct ModelFlow {
    name: String,
    config: ArcSwapOption<FlowConfig>,
    queue: Mutex<FlowQueue<Waiter>>,
    /// `queue.len()`, readable without the lock.
    queued: AtomicUsize,
    reserved: Arc<AtomicUsize>,
}

impl ModelFlow {
    fn has_room(&self, config: &FlowConfig, pods: &PodRegistry, now_ms: u64) -> bool {
        let Some(set) = pods.pods(&self.name) else {
            return true;
        };
        has_room(
            &config.saturation,
            &set.pods,
            self.reserved.load(Ordering::Acquire),
            now_ms,
        )
    }

    /// Updates the lock-free length and the depth gauge of `priority`'s band.
    fn changed(&self, queue: &FlowQueue<Waiter>, priority: Priority, metrics: &FlowMetrics) {
        self.queued.store(queue.len(), Ordering::Release);
        metrics.queue_depth(&self.name, priority.0, queue.depth(priority));
    }
}

/// Flow control of every model; lives as long as the gateway, across reloads.
pub struct FlowControl {
    models: ArcSwap<HashMap<String, Arc<ModelFlow>>>,
    pods: Arc<PodRegistry>,
    /// The gateway's clock (pods' health and ejection are kept in its milliseconds).
    epoch: Instant,
    wake: Arc<Notify>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl FlowControl {
    pub fn new(
        config: &Config,
        pods: Arc<PodRegistry>,
        epoch: Instant,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let wake = pods.load_eased();
        let control = Self {
            models: ArcSwap::default(),
            pods,
            epoch,
            wake,
            metrics,
        };
        control.configure(config);
        control
    }

    /// Applies a (validated) config: each model's flow control from now on.
    pub fn configure(&self, config: &Config) {
        let current = self.models.load_full();
        let mut next = HashMap::with_capacity(config.models.len());
        for model in &config.models {
            let flow = current.get(&model.name).cloned().unwrap_or_else(|| {
                Arc::new(ModelFlow {
                    name: model.name.clone(),
                    config: ArcSwapOption::empty(),
                    queue: Mutex::default(),
                    queued: AtomicUsize::new(0),
                    reserved: Arc::default(),
                })
            });
            flow.config.store(model.flow_control.clone().map(Arc::new));
            next.insert(model.name.clone(), flow);
        }
        // A model gone from the config releases what waits for it (it then finds no pod).
        for (name, flow) in current.iter() {
            if !next.contains_key(name) {
                flow.config.store(None);
                next.insert(name.clone(), Arc::clone(flow));
            }
        }
        self.models.store(Arc::new(next));
        self.wake.notify_one();
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Decides whether a request for `model` with `headers` and a body of `bytes` may go on.
    pub fn admit(&self, model: &str, headers: &HeaderMap, bytes: usize) -> Admission {
        let models = self.models.load();
        let Some(flow) = models.get(model) else {
            return Admission::Pass;
        };
        let config_guard = flow.config.load();
        let Some(config) = config_guard.as_deref() else {
            return Admission::Pass;
        };
        if flow.queued.load(Ordering::Acquire) == 0
            && flow.has_room(config, &self.pods, self.now_ms())
        {
            return Admission::Pass;
        }
        let priority = priority_of(config, headers);
        let metrics = &self.metrics.flow;
        let shed = |reason| {
            metrics.shed(model, reason);
            Admission::Shed {
                reason,
                retry_after_secs: config.retry_after_secs,
            }
        };
        if priority < config.shed_below {
            return shed(ShedReason::Sheddable);
        }
        let tenant = headers
            .get(config.fairness_header.as_str())
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let (grant, granted) = oneshot::channel();
        let limits = QueueLimits {
            max_requests: config.max_queued_requests,
            max_bytes: config.max_queued_bytes,
        };
        let ticket = {
            let mut queue = flow.queue.lock();
            match queue.push(priority, tenant, bytes, Waiter { grant }, limits) {
                Ok(pushed) => {
                    flow.changed(&queue, priority, metrics);
                    for (band, waiter) in pushed.displaced {
                        flow.changed(&queue, band, metrics);
                        metrics.shed(model, ShedReason::Displaced);
                        // A waiter whose client left meanwhile is gone already.
                        let _ = waiter.grant.send(Grant::Displaced);
                    }
                    pushed.ticket
                }
                Err(QueueFull::Requests) => return shed(ShedReason::QueueFull),
                Err(QueueFull::Bytes) => return shed(ShedReason::QueueBytes),
            }
        };
        // The pods may have eased between the check above and the push.
        self.wake.notify_one();
        let now = Instant::now();
        Admission::Queued(QueuedRequest {
            flow: Arc::clone(flow),
            ticket: Some(ticket),
            granted,
            since: now,
            deadline: now + Duration::from_millis(config.queue_timeout_ms),
            retry_after_secs: config.retry_after_secs,
            metrics: Arc::clone(&self.metrics),
        })
    }

    /// The `priority` field to add to a request's body for vLLM, when `model`'s flow control
    /// forwards priorities.
    pub fn vllm_priority(&self, model: &str, headers: &HeaderMap) -> Option<i32> {
        let models = self.models.load();
        let config = models.get(model)?.config.load_full()?;
        config
            .forward_priority
            .then(|| priority_of(&config, headers).to_vllm())
    }

    /// Lets waiting requests go, best first, while their model's pods have room.
    fn dispatch_ready(&self) {
        let now_ms = self.now_ms();
        for flow in self.models.load().values() {
            while flow.queued.load(Ordering::Acquire) > 0 {
                let config = flow.config.load_full();
                if config.is_some_and(|c| !flow.has_room(&c, &self.pods, now_ms)) {
                    break;
                }
                let next = {
                    let mut queue = flow.queue.lock();
                    let next = queue.pop();
                    if let Some((priority, _)) = &next {
                        flow.changed(&queue, *priority, &self.metrics.flow);
                    }
                    next
                };
                let Some((_, waiter)) = next else { break };
                flow.reserved.fetch_add(1, Ordering::AcqRel);
                let dispatch = Dispatch {
                    reservation: Some(Reservation {
                        reserved: Arc::clone(&flow.reserved),
                        wake: Arc::clone(&self.wake),
                    }),
                };
                // A waiter that gave up meanwhile drops the grant, and its reservation with it.
                let _ = waiter.grant.send(Grant::Dispatch(dispatch));
            }
        }
    }
}

/// The dispatcher: wakes whenever the pods' load eases or the pod set changes, never polls.
#[async_trait]
impl BackgroundService for FlowControl {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut generations = self.pods.subscribe();
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                changed = generations.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = shutdown.changed() => return,
            }
            self.dispatch_ready();
        }
    }
}

/// A request's priority: its `InferenceObjective`'s, else the configured header value's,
/// else the model's default. An objective this config does not name counts as unnamed
/// (as GIE treats an objective it has no resource for).
fn priority_of(config: &FlowConfig, headers: &HeaderMap) -> Priority {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header(OBJECTIVE_HEADER)
        .and_then(|objective| config.objectives.get(objective).copied())
        .or_else(|| {
            let rule = config.priority_header.as_ref()?;
            rule.values.get(header(&rule.name)?).copied()
        })
        .unwrap_or(config.default_priority)
}

/// A request waiting in its model's queue. Dropping it (its client left) takes it out.
pub struct QueuedRequest {
    flow: Arc<ModelFlow>,
    /// `None` once the request has left the queue one way or another.
    ticket: Option<Ticket>,
    granted: oneshot::Receiver<Grant>,
    since: Instant,
    deadline: Instant,
    retry_after_secs: u32,
    metrics: Arc<crate::metrics::Metrics>,
}

impl QueuedRequest {
    /// Waits for dispatch, for the queue deadline, or for a more important request to take
    /// its place.
    pub async fn wait(mut self) -> Result<Dispatch, QueueRefusal> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let grant = match tokio::time::timeout_at(deadline, &mut self.granted).await {
            Ok(grant) => grant,
            Err(_) if self.leave() => {
                self.ticket = None;
                let waited = self.since.elapsed();
                let metrics = &self.metrics.flow;
                metrics.shed(&self.flow.name, ShedReason::Deadline);
                metrics.waited(&self.flow.name, QueueOutcome::Deadline, waited);
                return Err(QueueRefusal {
                    reason: ShedReason::Deadline,
                    waited,
                    retry_after_secs: self.retry_after_secs,
                });
            }
            // Dispatched or displaced as the deadline passed: the grant is on its way or here.
            Err(_) => (&mut self.granted).await,
        };
        self.ticket = None;
        let waited = self.since.elapsed();
        match grant {
            Ok(Grant::Displaced) => {
                // Counted as shed by the request that displaced it.
                self.metrics
                    .flow
                    .waited(&self.flow.name, QueueOutcome::Displaced, waited);
                Err(QueueRefusal {
                    reason: ShedReason::Displaced,
                    waited,
                    retry_after_secs: self.retry_after_secs,
                })
            }
            Ok(Grant::Dispatch(dispatch)) => {
                self.metrics
                    .flow
                    .waited(&self.flow.name, QueueOutcome::Dispatched, waited);
                Ok(dispatch)
            }
            // The queue let go of it without a grant: it no longer exists (never the case
            // while the gateway runs), so the request goes on unqueued.
            Err(_) => {
                self.metrics
                    .flow
                    .waited(&self.flow.name, QueueOutcome::Dispatched, waited);
                Ok(Dispatch::default())
            }
        }
    }

    /// Takes the request out of the queue; false when it was dispatched already.
    fn leave(&mut self) -> bool {
        let Some(ticket) = self.ticket.take() else {
            return false;
        };
        let mut queue = self.flow.queue.lock();
        let left = queue.remove(&ticket).is_some();
        if left {
            self.flow
                .changed(&queue, ticket.priority, &self.metrics.flow);
        }
        left
    }
}

impl Drop for QueuedRequest {
    fn drop(&mut self) {
        if self.ticket.is_some() && self.leave() {
            self.metrics.flow.waited(
                &self.flow.name,
                QueueOutcome::ClientGone,
                self.since.elapsed(),
            );
        }
    }
}
