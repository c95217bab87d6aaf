//! kvgate's own Prometheus metrics: every collector lives in one [`Metrics`]
//! (its own `Registry`), and the rest of the code records through small typed
//! methods. The admin listener ([`admin`]) serves them on `server.admin`.
//!
//! Hot-path methods resolve their label handles once and keep them in
//! copy-on-write maps, so a recording is a lock-free map load plus atomic adds.
//! Per-pod series are labelled with the pod's address and live exactly as long
//! as discovery lists the pod: [`Metrics::add_pod`] creates them,
//! [`Metrics::forget_pod`] removes them, and recordings for an address that is
//! not registered are dropped (a request still in flight when its pod left, a
//! late event) rather than resurrecting a departed pod's series.
//!
//! Ratios (routing accuracy, prefix hit ratio) are not exported as gauges: they
//! are PromQL over the counters (see `deploy/grafana/kvgate-dashboard.json`),
//! which keeps them correct over any window and across kvgate replicas.
//!
//! Every family is declared once, in a `metric_families!` table (`family.rs`): name,
//! type, labels, buckets and help. The table makes the handles recording goes
//! through, registers them, and writes the family list into its struct's docs:
//! [`Families`] here, [`relay::RelayMetrics`] and [`flow::FlowMetrics`].

pub mod admin;
mod family;
pub mod flow;
pub mod relay;

use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use hashbrown::{Equivalent, HashMap};
use parking_lot::Mutex;
use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Registry, TextEncoder,
};

use self::family::metric_families;
use crate::pods::{EventTrust, PodChanges, PodRegistry, ScrapedLoad};

pub use admin::{AdminError, AdminListener, AdminState, PodsView, ReadyCheck, ScrapeHook};

/// `pod` label of requests answered before any pod was chosen (400, 404, 413, no pod left).
pub const NO_POD: &str = "none";
/// Label value for what kvgate cannot name from its config: a model or profile a
/// request asked for that does not exist, the sender of an undecodable event.
/// Callers pass it instead of the client's string, which would make the label unbounded.
pub const UNKNOWN: &str = "unknown";

const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Scheduling is tokenize + hash + index lookup + scoring: microseconds to a few milliseconds.
const SCHEDULE_BUCKETS: &[f64] = &[
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metric {name}: {source}")]
    Register {
        name: &'static str,
        source: prometheus::Error,
    },
    #[error("encoding metrics in the text format: {0}")]
    Encode(prometheus::Error),
}

/// The process-wide metrics, created on first use. Recording sites (proxy, event
/// ingestion, discovery, config reload) are spread over Pingora services and
/// background tasks that share no context object, and there is exactly one
/// `/metrics` per process, so a global avoids threading a handle through every
/// constructor for no gain. Tests that need isolation build their own [`Metrics`].
pub fn global() -> &'static Arc<Metrics> {
    static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        // The definitions are constants (names, help, labels, buckets); the unit tests build them.
        Arc::new(Metrics::new().expect("kvgate's metric definitions are valid"))
    })
}

/// One pod's scraped and router-side load, for [`Metrics::pod_load`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodLoad {
    pub scraped: ScrapedLoad,
    /// Requests kvgate has in flight to the pod.
    pub in_flight: u32,
}

/// Running totals of one pod's KV events, as the ingestion service counts them.
#[derive(Clone, Copy, Debug, Default)]
pub struct EventTotals {
    pub batches: u64,
    pub events: u64,
    pub gaps: u64,
    pub replays_ok: u64,
    pub replays_failed: u64,
}

/// A sample of the block index's counters and sizes, for [`Metrics::index_stats`].
/// Totals are cumulative since the index was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexSample {
    /// (block, pod) pairs.
    pub entries: u64,
    /// Distinct (scope, block hash) keys.
    pub blocks: u64,
    pub bytes: u64,
    pub budget_bytes: u64,
    pub evicted_blocks_total: u64,
    pub rejected_stores_total: u64,
}

/// What kvgate was waiting for from a client when it gave up on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientWait {
    /// The rest of a request header (`server.headerTimeoutMs`).
    Header,
    /// The next request on a kept-alive connection (`server.keepAliveTimeoutMs`).
    Idle,
    /// The rest of a request body (`server.bodyTimeoutMs`).
    Body,
}

impl ClientWait {
    pub const ALL: [Self; 3] = [Self::Header, Self::Idle, Self::Body];

    /// Why the connection was cut, as the I/O error that cuts it says.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Header => "request header not complete in time",
            Self::Idle => "keep-alive connection idle too long",
            Self::Body => "request body not complete in time",
        }
    }
}

/// How one proxied request ended, for [`Metrics::request_finished`].
#[derive(Clone, Copy, Debug)]
pub struct RequestRecord<'a> {
    /// A configured model name, or [`UNKNOWN`] (never the client's string: it becomes a label).
    pub model: &'a str,
    /// The pod that answered; `None` when kvgate answered before choosing one.
    pub pod: Option<SocketAddr>,
    /// The scheduling profile that routed it (or would have: a configured name, or [`UNKNOWN`]).
    pub policy: &'a str,
    /// HTTP status sent to the client (499 when the client went away first).
    pub status: u16,
    /// Time to the first streamed token; `None` for non-streaming responses.
    pub ttft: Option<Duration>,
    pub total: Duration,
    pub prompt_tokens: usize,
    /// Prompt tokens the router expected the pod to have cached.
    pub predicted_cached: usize,
    /// `usage.prompt_tokens_details.cached_tokens`, when the pod reported it.
    pub actual_cached: Option<usize>,
}

metric_families! {
    /// The families of kvgate's core (the relay's and flow control's are beside it).
    pub struct Families {
        requests: IntCounterVec {
            name: kvgate_requests_total,
            help: "Requests answered, by model, pod, scheduling profile and HTTP status.",
            labels: [model, pod, policy, status],
        },
        request_duration: HistogramVec {
            name: kvgate_request_duration_seconds,
            help: "Time from receiving a request to the end of its response.",
            labels: [model, policy],
            buckets: REQUEST_DURATION_BUCKETS,
        },
        ttft: HistogramVec {
            name: kvgate_time_to_first_token_seconds,
            help: "Time from receiving a streaming request to its first token.",
            labels: [model, policy],
            buckets: TTFT_BUCKETS,
        },
        prompt_tokens: IntCounterVec {
            name: kvgate_prompt_tokens_total,
            help: "Prompt tokens of requests whose pod reported cached tokens (hit ratio \
                   denominator).",
            labels: [pod],
        },
        predicted_cached: IntCounterVec {
            name: kvgate_predicted_cached_tokens_total,
            help: "Prompt tokens kvgate predicted cached, over the requests of \
                   kvgate_prompt_tokens_total.",
            labels: [pod],
        },
        actual_cached: IntCounterVec {
            name: kvgate_actual_cached_tokens_total,
            help: "Prompt tokens the pod reported cached \
                   (usage.prompt_tokens_details.cached_tokens).",
            labels: [pod],
        },
        mispredicted: IntCounterVec {
            name: kvgate_cached_tokens_mispredicted_total,
            help: "Cached-token prediction error: over = predicted above actual, under = below.",
            labels: [pod, direction],
        },
        cache_unreported: IntCounterVec {
            name: kvgate_cache_unreported_requests_total,
            help: "Successful responses without a cached-token count (left out of the cache \
                   accounting).",
            labels: [pod],
        },
        schedule: Histogram {
            name: kvgate_schedule_duration_seconds,
            help: "Time to choose a pod: tokenize, hash, index lookup, filters, scorers, picker.",
            buckets: SCHEDULE_BUCKETS,
        },
        index_entries: IntGauge {
            name: kvgate_index_entries,
            help: "(block, pod) pairs in the KV block index.",
        },
        index_blocks: IntGauge {
            name: kvgate_index_blocks,
            help: "Distinct block hashes in the KV block index.",
        },
        index_bytes: IntGauge {
            name: kvgate_index_bytes,
            help: "Bytes of block storage in the KV block index.",
        },
        index_budget_bytes: IntGauge {
            name: kvgate_index_budget_bytes,
            help: "Configured memory budget of the KV block index.",
        },
        index_evicted_blocks: IntCounter {
            name: kvgate_index_evicted_blocks_total,
            help: "Blocks evicted from the index to stay within its budget.",
        },
        index_rejected_stores: IntCounter {
            name: kvgate_index_rejected_stores_total,
            help: "Block stores dropped because nothing could be evicted to make room.",
        },
        kv_events: IntCounterVec {
            name: kvgate_kv_events_total,
            help: "KV-cache events applied to the index.",
            labels: [pod],
        },
        kv_event_batches: IntCounterVec {
            name: kvgate_kv_event_batches_total,
            help: "KV-cache event batches received.",
            labels: [pod],
        },
        seq_gaps: IntCounterVec {
            name: kvgate_kv_event_sequence_gaps_total,
            help: "Gaps in a pod's event batch sequence numbers.",
            labels: [pod],
        },
        missed_batches: IntCounterVec {
            name: kvgate_kv_event_batches_missed_total,
            help: "Event batches the sequence gaps skipped.",
            labels: [pod],
        },
        replays: IntCounterVec {
            name: kvgate_kv_event_replays_total,
            help: "Replay requests after a gap, by result (ok: the gap was filled).",
            labels: [pod, result],
        },
        malformed: IntCounterVec {
            name: kvgate_kv_events_malformed_total,
            help: "Event messages that could not be decoded, by reason.",
            labels: [pod, reason],
        },
        hash_parity: IntGaugeVec {
            name: kvgate_hash_parity,
            help: "1 when the pod's announced block hashes match kvgate's, 0 on a mismatch.",
            labels: [pod],
        },
        pod_healthy: IntGaugeVec {
            name: kvgate_pod_healthy,
            help: "1 when the pod passes health checks and is not ejected.",
            labels: [pod],
        },
        pod_events_synced: IntGaugeVec {
            name: kvgate_pod_events_synced,
            help: "1 when the pod's KV events describe its cache (contiguous and hash-compatible).",
            labels: [pod],
        },
        pod_running: GaugeVec {
            name: kvgate_pod_requests_running,
            help: "Requests running on the pod (vLLM's own metrics).",
            labels: [pod],
        },
        pod_waiting: GaugeVec {
            name: kvgate_pod_requests_waiting,
            help: "Requests waiting on the pod (vLLM's own metrics).",
            labels: [pod],
        },
        pod_kv_usage: GaugeVec {
            name: kvgate_pod_kv_usage_ratio,
            help: "The pod's KV-cache usage, 0 to 1 (vLLM's own metrics).",
            labels: [pod],
        },
        pod_in_flight: IntGaugeVec {
            name: kvgate_pod_in_flight,
            help: "Requests kvgate has in flight to the pod.",
            labels: [pod],
        },
        downstream_connections: IntGauge {
            name: kvgate_downstream_connections,
            help: "Client connections open on the public listener.",
        },
        connections_refused: IntCounter {
            name: kvgate_downstream_connections_refused_total,
            help: "Client connections refused with 503 because server.maxConnections were open.",
        },
        body_buffered: IntGauge {
            name: kvgate_request_body_buffered_bytes,
            help: "Request-body bytes held in memory across all connections (bounded by \
                   server.maxBufferedBodyBytes).",
        },
        body_buffer_full: IntCounter {
            name: kvgate_request_body_buffer_full_total,
            help: "Requests refused with 503 because their body would have exceeded \
                   server.maxBufferedBodyBytes.",
        },
        timeouts: IntCounterVec {
            name: kvgate_downstream_timeouts_total,
            help: "Client connections closed for waiting too long: header (a request header not \
                   complete within server.headerTimeoutMs), body (a request body not complete \
                   within server.bodyTimeoutMs, answered 408) or idle (keep-alive expired).",
            labels: [phase],
        },
        tls_handshake_failures: IntCounter {
            name: kvgate_downstream_tls_handshake_failures_total,
            help: "Client connections closed because their TLS handshake failed (a stalled one \
                   counts as a header timeout).",
        },
        tls_reloads: IntCounterVec {
            name: kvgate_tls_certificate_reloads_total,
            help: "Reloads of the public listener's certificate and key after their files changed, \
                   by result (failed: the old pair stays in use).",
            labels: [result],
        },
        reloads: IntCounterVec {
            name: kvgate_config_reloads_total,
            help: "Configuration reloads, by result.",
            labels: [result],
        },
        last_reload_ok: IntGauge {
            name: kvgate_config_last_reload_successful,
            help: "1 when the last configuration reload was applied, 0 when it was refused.",
        },
        traffic_policy_applied: IntGaugeVec {
            name: kvgate_traffic_policy_applied,
            help: "1 when the InferenceTrafficPolicy's current version is applied, 0 when it was \
                   refused (the previous configuration keeps serving).",
            labels: [policy],
        },
        disaggregated: IntCounterVec {
            name: kvgate_disaggregated_requests_total,
            help: "Requests of disaggregated profiles, by path: two_legs (prefill pod, then decode \
                   pod), decode_alone (the decode pod had enough cached), prefill_failed (the \
                   prefill leg failed or timed out; the decode pod computed the prompt itself).",
            labels: [model, path],
        },
        prefill_leg: HistogramVec {
            name: kvgate_prefill_leg_duration_seconds,
            help: "Time from sending a disaggregated request's prefill leg to the prefill pod's \
                   answer.",
            labels: [model],
            buckets: TTFT_BUCKETS,
        },
        trace: IntCounterVec {
            name: kvgate_trace_records_total,
            help: "Traffic trace records: written, dropped (the writer's queue was full) or failed \
                   (the trace file could not be written).",
            labels: [result],
        },
        build_info: IntGaugeVec {
            name: kvgate_build_info,
            help: "Always 1; labelled with the running kvgate version and the git commit it was \
                   built from.",
            labels: [version, commit],
        },
    }
}

/// Every collector kvgate exports.
pub struct Metrics {
    registry: Registry,
    families: Families,
    index_evicted_blocks: MirroredCounter,
    index_rejected_stores: MirroredCounter,
    header_timeouts: IntCounter,
    idle_timeouts: IntCounter,
    body_timeouts: IntCounter,
    tls_reloads_ok: IntCounter,
    tls_reloads_failed: IntCounter,
    reloads_ok: IntCounter,
    reloads_failed: IntCounter,
    trace_written: IntCounter,
    trace_dropped: IntCounter,
    trace_failed: IntCounter,
    /// The replica relay's metrics.
    pub relay: relay::RelayMetrics,
    /// Flow control's metrics.
    pub flow: flow::FlowMetrics,
    pods: CowMap<SocketAddr, Arc<PodSeries>>,
    routes: CowMap<RouteKey, Arc<RouteSeries>>,
    unrouted_requests: CowMap<RequestKey, IntCounter>,
    unknown_malformed: CowMap<&'static str, IntCounter>,
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let families = Families::register(&registry)?;
        families
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::COMMIT])
            .set(1);
        let f = &families;
        Ok(Self {
            index_evicted_blocks: MirroredCounter::new(f.index_evicted_blocks.clone()),
            index_rejected_stores: MirroredCounter::new(f.index_rejected_stores.clone()),
            header_timeouts: f.timeouts.with_label_values(&["header"]),
            idle_timeouts: f.timeouts.with_label_values(&["idle"]),
            body_timeouts: f.timeouts.with_label_values(&["body"]),
            tls_reloads_ok: f.tls_reloads.with_label_values(&["ok"]),
            tls_reloads_failed: f.tls_reloads.with_label_values(&["failed"]),
            reloads_ok: f.reloads.with_label_values(&["ok"]),
            reloads_failed: f.reloads.with_label_values(&["failed"]),
            trace_written: f.trace.with_label_values(&["written"]),
            trace_dropped: f.trace.with_label_values(&["dropped"]),
            trace_failed: f.trace.with_label_values(&["failed"]),
            relay: relay::RelayMetrics::register(&registry)?,
            flow: flow::FlowMetrics::register(&registry)?,
            pods: CowMap::new(),
            routes: CowMap::new(),
            unrouted_requests: CowMap::new(),
            unknown_malformed: CowMap::new(),
            families,
            registry,
        })
    }

    /// The Prometheus text exposition (format 0.0.4) of every series.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .map_err(MetricsError::Encode)?;
        Ok(out)
    }

    /// Starts the series of a pod discovery listed. An address listed under several
    /// models is one pod to Prometheus; it is registered once per listing.
    pub fn add_pod(&self, pod: SocketAddr) {
        let _writer = self.pods.write.lock();
        let current = self.pods.map.load_full();
        if let Some(series) = current.get(&pod) {
            series.registrations.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let series = Arc::new(PodSeries::new(self, pod.to_string()));
        let mut next = HashMap::clone(&current);
        next.insert(pod, series);
        self.pods.map.store(Arc::new(next));
    }

    /// Removes every series of a pod that left (once its last listing is gone).
    pub fn forget_pod(&self, pod: SocketAddr) {
        let series = {
            let _writer = self.pods.write.lock();
            let current = self.pods.map.load_full();
            let Some(series) = current.get(&pod) else {
                return;
            };
            if series.registrations.fetch_sub(1, Ordering::Relaxed) > 1 {
                return;
            }
            let mut next = HashMap::clone(&current);
            next.remove(&pod);
            self.pods.map.store(Arc::new(next));
            Arc::clone(series)
        };
        series.retire(self);
    }

    /// Applies a discovery snapshot's changes. Additions go first, so a pod that
    /// restarted on the same address keeps its series.
    pub fn pods_changed(&self, changes: &PodChanges) {
        for pod in &changes.added {
            self.add_pod(pod.addr());
        }
        for pod in &changes.removed {
            self.forget_pod(pod.addr());
        }
    }

    fn with_pod(&self, pod: SocketAddr, f: impl FnOnce(&PodSeries)) {
        if let Some(series) = self.pods.map.load().get(&pod) {
            f(series);
        }
    }

    /// Records a finished request. Latency always counts; the per-pod counters
    /// (requests, cached tokens) are dropped when the pod has already left.
    pub fn request_finished(&self, rec: &RequestRecord<'_>) {
        let route = RouteKeyRef {
            model: rec.model,
            policy: rec.policy,
        };
        self.routes.with(
            &route,
            || Some((route.to_owned(), Arc::new(RouteSeries::new(self, &route)))),
            |series| {
                series.duration.observe(rec.total.as_secs_f64());
                if let Some(ttft) = rec.ttft {
                    series.ttft.observe(ttft.as_secs_f64());
                }
            },
        );
        let key = RequestKeyRef {
            model: rec.model,
            policy: rec.policy,
            status: rec.status,
        };
        let Some(pod) = rec.pod else {
            self.unrouted_requests.with(
                &key,
                || Some((key.to_owned(), self.request_counter(&key, NO_POD))),
                IntCounter::inc,
            );
            return;
        };
        self.with_pod(pod, |series| {
            series.requests.with(
                &key,
                || {
                    let retired = series.retired.lock();
                    (!*retired).then(|| (key.to_owned(), self.request_counter(&key, &series.label)))
                },
                IntCounter::inc,
            );
            series.account_cache(rec);
        });
    }

    fn request_counter(&self, key: &RequestKeyRef<'_>, pod: &str) -> IntCounter {
        let status = key.status.to_string();
        self.families
            .requests
            .with_label_values(&[key.model, pod, key.policy, &status])
    }

    pub fn decision_latency(&self, elapsed: Duration) {
        self.families.schedule.observe(elapsed.as_secs_f64());
    }

    /// A batch of `events` KV events from `pod` was applied.
    pub fn event_batch(&self, pod: SocketAddr, events: usize) {
        self.with_pod(pod, |s| {
            s.event_batches.inc();
            s.events.inc_by(events as u64);
        });
    }

    /// Brings `pod`'s event counters up to the running totals the ingestion
    /// service keeps (it counts on its own hot path; this runs once per scrape).
    pub fn event_totals(&self, pod: SocketAddr, totals: &EventTotals) {
        fn catch_up(counter: &IntCounter, total: u64) {
            let current = counter.get();
            if total > current {
                counter.inc_by(total - current);
            }
        }
        self.with_pod(pod, |s| {
            catch_up(&s.event_batches, totals.batches);
            catch_up(&s.events, totals.events);
            catch_up(&s.seq_gaps, totals.gaps);
            catch_up(&s.replays_ok, totals.replays_ok);
            catch_up(&s.replays_failed, totals.replays_failed);
        });
    }

    /// `pod`'s batch sequence jumped, skipping `missed` batches.
    pub fn seq_gap(&self, pod: SocketAddr, missed: u64) {
        self.with_pod(pod, |s| {
            s.seq_gaps.inc();
            s.missed_batches.inc_by(missed);
        });
    }

    /// A replay after a gap finished: `ok` when it filled the gap.
    pub fn replay(&self, pod: SocketAddr, ok: bool) {
        self.with_pod(pod, |s| {
            if ok {
                s.replays_ok.inc();
            } else {
                s.replays_failed.inc();
            }
        });
    }

    /// An event message could not be decoded. `pod` is `None` when the message
    /// did not identify a known sender; `reason` must come from a fixed set.
    pub fn malformed_event(&self, pod: Option<SocketAddr>, reason: &'static str) {
        let Some(pod) = pod else {
            self.unknown_malformed.with(
                &reason,
                || {
                    Some((
                        reason,
                        self.families
                            .malformed
                            .with_label_values(&[UNKNOWN, reason]),
                    ))
                },
                IntCounter::inc,
            );
            return;
        };
        self.with_pod(pod, |s| {
            s.malformed.with(
                &reason,
                || {
                    let retired = s.retired.lock();
                    (!*retired).then(|| {
                        (
                            reason,
                            self.families
                                .malformed
                                .with_label_values(&[&s.label, reason]),
                        )
                    })
                },
                IntCounter::inc,
            );
        });
    }

    /// Result of re-hashing a sampled `BlockStored` run from `pod`.
    pub fn parity(&self, pod: SocketAddr, ok: bool) {
        self.with_pod(pod, |s| {
            if let Some(g) = s.gauge(&s.parity, &self.families.hash_parity) {
                g.set(ok as i64);
            }
        });
    }

    pub fn pod_health(&self, pod: SocketAddr, healthy: bool) {
        self.with_pod(pod, |s| {
            if let Some(g) = s.gauge(&s.healthy, &self.families.pod_healthy) {
                g.set(healthy as i64);
            }
        });
    }

    pub fn pod_events_synced(&self, pod: SocketAddr, synced: bool) {
        self.with_pod(pod, |s| {
            if let Some(g) = s.gauge(&s.events_synced, &self.families.pod_events_synced) {
                g.set(synced as i64);
            }
        });
    }

    pub fn pod_load(&self, pod: SocketAddr, load: PodLoad) {
        self.with_pod(pod, |s| {
            if let Some(g) = s.gauge(&s.running, &self.families.pod_running) {
                g.set(load.scraped.running);
            }
            if let Some(g) = s.gauge(&s.waiting, &self.families.pod_waiting) {
                g.set(load.scraped.waiting);
            }
            if let Some(g) = s.gauge(&s.kv_usage, &self.families.pod_kv_usage) {
                g.set(load.scraped.kv_usage);
            }
            if let Some(g) = s.gauge(&s.in_flight, &self.families.pod_in_flight) {
                g.set(i64::from(load.in_flight));
            }
        });
    }

    /// Sets every pod's health, event trust and load gauges from the registry.
    /// Meant for the scrape hook ([`AdminState::before_scrape`]): gauges that change
    /// per request are read when Prometheus asks instead of written per request.
    pub fn sample_pods(&self, registry: &PodRegistry, now_ms: u64) {
        for model in &registry.models() {
            let Some(set) = registry.pods(model) else {
                continue;
            };
            for pod in &set.pods {
                let addr = pod.addr();
                self.pod_health(addr, pod.is_healthy(now_ms));
                self.pod_events_synced(addr, pod.trust() == EventTrust::Synced);
                self.pod_load(
                    addr,
                    PodLoad {
                        scraped: pod.scraped(),
                        in_flight: pod.in_flight(),
                    },
                );
            }
        }
    }

    pub fn index_stats(&self, sample: IndexSample) {
        self.families
            .index_entries
            .set(saturating_i64(sample.entries));
        self.families
            .index_blocks
            .set(saturating_i64(sample.blocks));
        self.families.index_bytes.set(saturating_i64(sample.bytes));
        self.families
            .index_budget_bytes
            .set(saturating_i64(sample.budget_bytes));
        self.index_evicted_blocks
            .mirror(sample.evicted_blocks_total);
        self.index_rejected_stores
            .mirror(sample.rejected_stores_total);
    }

    /// A client connection was accepted on the public listener.
    pub fn connection_opened(&self) {
        self.families.downstream_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.families.downstream_connections.dec();
    }

    /// A client connection was turned away at `server.maxConnections`.
    pub fn connection_refused(&self) {
        self.families.connections_refused.inc();
    }

    /// Request-body bytes held right now, across all connections.
    pub fn body_bytes_buffered(&self, bytes: usize) {
        self.families
            .body_buffered
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A request was refused because its body would not fit the body budget.
    pub fn body_buffer_full(&self) {
        self.families.body_buffer_full.inc();
    }

    pub fn connection_timed_out(&self, waiting_for: ClientWait) {
        match waiting_for {
            ClientWait::Header => self.header_timeouts.inc(),
            ClientWait::Idle => self.idle_timeouts.inc(),
            ClientWait::Body => self.body_timeouts.inc(),
        }
    }

    /// How a disaggregated profile served a request (`path`: see the family's help).
    pub fn disaggregated(&self, model: &str, path: &str) {
        self.families
            .disaggregated
            .with_label_values(&[model, path])
            .inc();
    }

    /// A prefill leg that got its answer: its time, and the prefill pod's cache accounting
    /// (the same per-pod counters the requests a pod serves alone feed).
    pub fn prefill_leg_finished(&self, rec: &RequestRecord<'_>) {
        self.families
            .prefill_leg
            .with_label_values(&[rec.model])
            .observe(rec.total.as_secs_f64());
        if let Some(pod) = rec.pod {
            self.with_pod(pod, |series| series.account_cache(rec));
        }
    }

    /// Whether a configured InferenceTrafficPolicy's current version was applied.
    pub fn traffic_policy(&self, policy: &str, applied: bool) {
        self.families
            .traffic_policy_applied
            .with_label_values(&[policy])
            .set(i64::from(applied));
    }

    pub fn tls_handshake_failed(&self) {
        self.families.tls_handshake_failures.inc();
    }

    pub fn tls_certificate_reload(&self, ok: bool) {
        if ok {
            self.tls_reloads_ok.inc();
        } else {
            self.tls_reloads_failed.inc();
        }
    }

    pub fn config_reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.inc();
        } else {
            self.reloads_failed.inc();
        }
        self.families.last_reload_ok.set(ok as i64);
    }

    /// Counts traffic trace records by what became of them.
    pub fn trace_records(&self, outcome: TraceOutcome, count: u64) {
        match outcome {
            TraceOutcome::Written => self.trace_written.inc_by(count),
            TraceOutcome::Dropped => self.trace_dropped.inc_by(count),
            TraceOutcome::Failed => self.trace_failed.inc_by(count),
        }
    }
}

/// What became of a traffic trace record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceOutcome {
    Written,
    /// The writer's queue was full: dropped rather than making the request wait.
    Dropped,
    /// The trace file could not be opened or written.
    Failed,
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A counter that mirrors a cumulative total kept elsewhere (the index's own
/// eviction counts), fed by periodic samples.
struct MirroredCounter {
    counter: IntCounter,
    last: AtomicU64,
}

impl MirroredCounter {
    fn new(counter: IntCounter) -> Self {
        Self {
            counter,
            last: AtomicU64::new(0),
        }
    }

    fn mirror(&self, total: u64) {
        let previous = self.last.swap(total, Ordering::Relaxed);
        // A smaller total means the source was rebuilt and counts from zero again.
        let delta = total.checked_sub(previous).unwrap_or(total);
        self.counter.inc_by(delta);
    }
}

/// A map read on every recording and written only when a new key (pod, route,
/// status code) first appears: readers load a snapshot without locking, writers
/// copy it under a mutex.
struct CowMap<K, V> {
    map: ArcSwap<HashMap<K, V>>,
    write: Mutex<()>,
}

impl<K: Hash + Eq + Clone, V: Clone> CowMap<K, V> {
    fn new() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
        }
    }

    /// Runs `f` on the value under `key`, first inserting `make()` when the key is
    /// new; `make` returning `None` declines the insertion and skips `f`.
    fn with<Q, R>(
        &self,
        key: &Q,
        make: impl FnOnce() -> Option<(K, V)>,
        f: impl FnOnce(&V) -> R,
    ) -> Option<R>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        if let Some(v) = self.map.load().get(key) {
            return Some(f(v));
        }
        let _writer = self.write.lock();
        let current = self.map.load_full();
        if let Some(v) = current.get(key) {
            return Some(f(v));
        }
        let (k, v) = make()?;
        let mut next = HashMap::clone(&current);
        next.insert(k, v.clone());
        self.map.store(Arc::new(next));
        Some(f(&v))
    }

    /// The map once no insertion is in progress.
    fn settled(&self) -> Arc<HashMap<K, V>> {
        let _writer = self.write.lock();
        self.map.load_full()
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct RouteKey {
    model: Box<str>,
    policy: Box<str>,
}

/// Borrowed form of [`RouteKey`] for allocation-free lookups; hashes identically.
#[derive(Clone, Copy, Hash)]
struct RouteKeyRef<'a> {
    model: &'a str,
    policy: &'a str,
}

impl RouteKeyRef<'_> {
    fn to_owned(self) -> RouteKey {
        RouteKey {
            model: self.model.into(),
            policy: self.policy.into(),
        }
    }
}

impl Equivalent<RouteKey> for RouteKeyRef<'_> {
    fn equivalent(&self, key: &RouteKey) -> bool {
        self.model == &*key.model && self.policy == &*key.policy
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct RequestKey {
    model: Box<str>,
    policy: Box<str>,
    status: u16,
}

/// Borrowed form of [`RequestKey`]; hashes identically.
#[derive(Clone, Copy, Hash)]
struct RequestKeyRef<'a> {
    model: &'a str,
    policy: &'a str,
    status: u16,
}

impl RequestKeyRef<'_> {
    fn to_owned(self) -> RequestKey {
        RequestKey {
            model: self.model.into(),
            policy: self.policy.into(),
            status: self.status,
        }
    }
}

impl Equivalent<RequestKey> for RequestKeyRef<'_> {
    fn equivalent(&self, key: &RequestKey) -> bool {
        self.status == key.status && self.model == &*key.model && self.policy == &*key.policy
    }
}

/// Latency histograms of one (model, profile). Not per pod: their cardinality is
/// bounded by the config, not by the fleet's size.
struct RouteSeries {
    duration: Histogram,
    ttft: Histogram,
}

impl RouteSeries {
    fn new(m: &Metrics, key: &RouteKeyRef<'_>) -> Self {
        let labels = [key.model, key.policy];
        Self {
            duration: m.families.request_duration.with_label_values(&labels),
            ttft: m.families.ttft.with_label_values(&labels),
        }
    }
}

/// One pod's resolved series. Counters exist from registration (so `rate()` sees
/// them start at zero); gauges and label combinations appear on first recording,
/// since a gauge at 0 before anything was measured would claim "unhealthy" or
/// "parity mismatch".
struct PodSeries {
    label: Box<str>,
    /// How many model pod sets list this address.
    registrations: AtomicUsize,
    /// Set once the pod left. Series created after it would outlive the pod, so
    /// every lazy creation checks it under this lock.
    retired: Mutex<bool>,
    prompt_tokens: IntCounter,
    predicted_cached: IntCounter,
    actual_cached: IntCounter,
    overpredicted: IntCounter,
    underpredicted: IntCounter,
    cache_unreported: IntCounter,
    events: IntCounter,
    event_batches: IntCounter,
    seq_gaps: IntCounter,
    missed_batches: IntCounter,
    replays_ok: IntCounter,
    replays_failed: IntCounter,
    parity: OnceLock<IntGauge>,
    healthy: OnceLock<IntGauge>,
    events_synced: OnceLock<IntGauge>,
    running: OnceLock<Gauge>,
    waiting: OnceLock<Gauge>,
    kv_usage: OnceLock<Gauge>,
    in_flight: OnceLock<IntGauge>,
    requests: CowMap<RequestKey, IntCounter>,
    malformed: CowMap<&'static str, IntCounter>,
}

impl PodSeries {
    fn new(m: &Metrics, label: String) -> Self {
        let f = &m.families;
        let l = [label.as_str()];
        Self {
            registrations: AtomicUsize::new(1),
            retired: Mutex::new(false),
            prompt_tokens: f.prompt_tokens.with_label_values(&l),
            predicted_cached: f.predicted_cached.with_label_values(&l),
            actual_cached: f.actual_cached.with_label_values(&l),
            overpredicted: f.mispredicted.with_label_values(&[label.as_str(), "over"]),
            underpredicted: f.mispredicted.with_label_values(&[label.as_str(), "under"]),
            cache_unreported: f.cache_unreported.with_label_values(&l),
            events: f.kv_events.with_label_values(&l),
            event_batches: f.kv_event_batches.with_label_values(&l),
            seq_gaps: f.seq_gaps.with_label_values(&l),
            missed_batches: f.missed_batches.with_label_values(&l),
            replays_ok: f.replays.with_label_values(&[label.as_str(), "ok"]),
            replays_failed: f.replays.with_label_values(&[label.as_str(), "failed"]),
            parity: OnceLock::new(),
            healthy: OnceLock::new(),
            events_synced: OnceLock::new(),
            running: OnceLock::new(),
            waiting: OnceLock::new(),
            kv_usage: OnceLock::new(),
            in_flight: OnceLock::new(),
            requests: CowMap::new(),
            malformed: CowMap::new(),
            label: label.into_boxed_str(),
        }
    }

    /// The pod's gauge in `vec`, created on first use unless the pod has left.
    fn gauge<'a, B: MetricVecBuilder>(
        &self,
        cell: &'a OnceLock<B::M>,
        vec: &MetricVec<B>,
    ) -> Option<&'a B::M> {
        if let Some(g) = cell.get() {
            return Some(g);
        }
        let retired = self.retired.lock();
        if *retired {
            return None;
        }
        Some(cell.get_or_init(|| vec.with_label_values(&[&*self.label])))
    }

    /// Cached-token accounting. Only responses that report cached tokens count, so
    /// prompt, predicted and actual totals cover the same requests and their
    /// ratios are exact.
    fn account_cache(&self, rec: &RequestRecord<'_>) {
        match rec.actual_cached {
            Some(actual) => {
                let predicted = rec.predicted_cached as u64;
                let actual = actual as u64;
                self.prompt_tokens.inc_by(rec.prompt_tokens as u64);
                self.predicted_cached.inc_by(predicted);
                self.actual_cached.inc_by(actual);
                if predicted > actual {
                    self.overpredicted.inc_by(predicted - actual);
                } else {
                    self.underpredicted.inc_by(actual - predicted);
                }
            }
            None if (200..300).contains(&rec.status) => self.cache_unreported.inc(),
            None => {}
        }
    }

    /// Removes every series of this pod from `m`'s vectors.
    fn retire(&self, m: &Metrics) {
        *self.retired.lock() = true;
        // From here on no series of this pod can be created; `settled` waits for
        // an insertion that passed the check just before.
        let f = &m.families;
        let label = &*self.label;
        for key in self.requests.settled().keys() {
            let status = key.status.to_string();
            let _ = f
                .requests
                .remove_label_values(&[&*key.model, label, &*key.policy, &status]);
        }
        for reason in self.malformed.settled().keys() {
            let _ = f.malformed.remove_label_values(&[label, reason]);
        }
        for direction in ["over", "under"] {
            let _ = f.mispredicted.remove_label_values(&[label, direction]);
        }
        for result in ["ok", "failed"] {
            let _ = f.replays.remove_label_values(&[label, result]);
        }
        // Gauges that were never set have no series: NotFound is expected there.
        for vec in [
            &f.prompt_tokens,
            &f.predicted_cached,
            &f.actual_cached,
            &f.cache_unreported,
            &f.kv_events,
            &f.kv_event_batches,
            &f.seq_gaps,
            &f.missed_batches,
        ] {
            let _ = vec.remove_label_values(&[label]);
        }
        for vec in [
            &f.hash_parity,
            &f.pod_healthy,
            &f.pod_events_synced,
            &f.pod_in_flight,
        ] {
            let _ = vec.remove_label_values(&[label]);
        }
        for vec in [&f.pod_running, &f.pod_waiting, &f.pod_kv_usage] {
            let _ = vec.remove_label_values(&[label]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Series of the text exposition: (name, sorted labels) → value.
    fn scrape(m: &Metrics) -> BTreeMap<(String, Vec<(String, String)>), f64> {
        let text = m.render().expect("render");
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut pairs: Vec<(String, String)> = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').expect("label pair");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            pairs.sort();
            out.insert((name.to_string(), pairs), value.parse().expect("value"));
        }
        out
    }

    fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        scrape(m).get(&(name.to_string(), labels)).copied()
    }

    fn series_mentioning(m: &Metrics, text: &str) -> Vec<String> {
        scrape(m)
            .keys()
            .filter(|(_, labels)| labels.iter().any(|(_, v)| v == text))
            .map(|(name, labels)| format!("{name}{labels:?}"))
            .collect()
    }

    const POD: &str = "10.0.0.1:8000";

    fn pod() -> SocketAddr {
        POD.parse().expect("literal address")
    }

    fn request(status: u16, predicted: usize, actual: Option<usize>) -> RequestRecord<'static> {
        RequestRecord {
            model: "qwen3",
            pod: Some(pod()),
            policy: "precise",
            status,
            ttft: Some(Duration::from_millis(300)),
            total: Duration::from_millis(1200),
            prompt_tokens: 128,
            predicted_cached: predicted,
            actual_cached: actual,
        }
    }

    #[test]
    fn event_counters_follow_the_ingestion_totals() {
        let m = Metrics::new().expect("metrics");
        m.add_pod(pod());
        let totals = EventTotals {
            batches: 10,
            events: 40,
            gaps: 2,
            replays_ok: 1,
            replays_failed: 1,
        };
        m.event_totals(pod(), &totals);
        // A second scrape with the same totals adds nothing; counters never go back.
        m.event_totals(pod(), &totals);
        m.event_totals(
            pod(),
            &EventTotals {
                batches: 3,
                ..totals
            },
        );
        let get = |name: &str| value(&m, name, &[("pod", POD)]);
        assert_eq!(get("kvgate_kv_event_batches_total"), Some(10.0));
        assert_eq!(get("kvgate_kv_events_total"), Some(40.0));
        assert_eq!(get("kvgate_kv_event_sequence_gaps_total"), Some(2.0));
        let replays = |result: &str| {
            value(
                &m,
                "kvgate_kv_event_replays_total",
                &[("pod", POD), ("result", result)],
            )
        };
        assert_eq!(replays("ok"), Some(1.0));
        assert_eq!(replays("failed"), Some(1.0));
    }

    #[test]
    fn build_info_carries_the_version() {
        let m = Metrics::new().expect("metrics");
        let v = value(
            &m,
            "kvgate_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", crate::COMMIT),
            ],
        );
        assert_eq!(v, Some(1.0));
    }

    #[test]
    fn requests_count_by_labels_and_cache_accounting_covers_reported_responses() {
        let m = Metrics::new().expect("metrics");
        m.add_pod(pod());
        m.request_finished(&request(200, 96, Some(64)));
        m.request_finished(&request(200, 32, Some(48)));
        m.request_finished(&request(200, 64, None));
        m.request_finished(&RequestRecord {
            ttft: None,
            ..request(503, 64, None)
        });
        let labels = |status| {
            [
                ("model", "qwen3"),
                ("pod", POD),
                ("policy", "precise"),
                ("status", status),
            ]
        };
        assert_eq!(
            value(&m, "kvgate_requests_total", &labels("200")),
            Some(3.0)
        );
        assert_eq!(
            value(&m, "kvgate_requests_total", &labels("503")),
            Some(1.0)
        );
        let p = [("pod", POD)];
        assert_eq!(value(&m, "kvgate_prompt_tokens_total", &p), Some(256.0));
        assert_eq!(
            value(&m, "kvgate_predicted_cached_tokens_total", &p),
            Some(128.0)
        );
        assert_eq!(
            value(&m, "kvgate_actual_cached_tokens_total", &p),
            Some(112.0)
        );
        let over = [("pod", POD), ("direction", "over")];
        let under = [("pod", POD), ("direction", "under")];
        assert_eq!(
            value(&m, "kvgate_cached_tokens_mispredicted_total", &over),
            Some(32.0)
        );
        assert_eq!(
            value(&m, "kvgate_cached_tokens_mispredicted_total", &under),
            Some(16.0)
        );
        // The 503 has no usage block because it failed, not because the pod omits it.
        assert_eq!(
            value(&m, "kvgate_cache_unreported_requests_total", &p),
            Some(1.0)
        );
        let route = [("model", "qwen3"), ("policy", "precise")];
        assert_eq!(
            value(&m, "kvgate_request_duration_seconds_count", &route),
            Some(4.0)
        );
        assert_eq!(
            value(&m, "kvgate_time_to_first_token_seconds_count", &route),
            Some(3.0)
        );
        let le = [("model", "qwen3"), ("policy", "precise"), ("le", "0.35")];
        assert_eq!(
            value(&m, "kvgate_time_to_first_token_seconds_bucket", &le),
            Some(3.0)
        );
    }

    #[test]
    fn requests_answered_before_routing_count_under_no_pod() {
        let m = Metrics::new().expect("metrics");
        m.request_finished(&RequestRecord {
            pod: None,
            ..request(413, 0, None)
        });
        let labels = [
            ("model", "qwen3"),
            ("pod", NO_POD),
            ("policy", "precise"),
            ("status", "413"),
        ];
        assert_eq!(value(&m, "kvgate_requests_total", &labels), Some(1.0));
    }

    #[test]
    fn gauges_appear_when_first_measured() {
        let m = Metrics::new().expect("metrics");
        m.add_pod(pod());
        let p = [("pod", POD)];
        assert_eq!(value(&m, "kvgate_pod_healthy", &p), None);
        assert_eq!(value(&m, "kvgate_hash_parity", &p), None);
        assert_eq!(value(&m, "kvgate_kv_events_total", &p), Some(0.0));
        m.pod_health(pod(), true);
        m.parity(pod(), false);
        m.pod_load(
            pod(),
            PodLoad {
                scraped: ScrapedLoad {
                    running: 3.0,
                    waiting: 1.0,
                    kv_usage: 0.5,
                },
                in_flight: 4,
            },
        );
        assert_eq!(value(&m, "kvgate_pod_healthy", &p), Some(1.0));
        assert_eq!(value(&m, "kvgate_hash_parity", &p), Some(0.0));
        assert_eq!(value(&m, "kvgate_pod_requests_running", &p), Some(3.0));
        assert_eq!(value(&m, "kvgate_pod_requests_waiting", &p), Some(1.0));
        assert_eq!(value(&m, "kvgate_pod_kv_usage_ratio", &p), Some(0.5));
        assert_eq!(value(&m, "kvgate_pod_in_flight", &p), Some(4.0));
    }

    #[test]
    fn recordings_for_unregistered_pods_are_dropped() {
        let m = Metrics::new().expect("metrics");
        m.event_batch(pod(), 5);
        m.pod_health(pod(), true);
        m.request_finished(&request(200, 1, Some(1)));
        assert_eq!(series_mentioning(&m, POD), Vec::<String>::new());
    }

    #[test]
    fn forget_pod_removes_every_series_and_a_return_starts_fresh() {
        let m = Metrics::new().expect("metrics");
        m.add_pod(pod());
        m.request_finished(&request(200, 96, Some(64)));
        m.event_batch(pod(), 7);
        m.seq_gap(pod(), 3);
        m.replay(pod(), true);
        m.malformed_event(Some(pod()), "decode");
        m.parity(pod(), true);
        m.pod_health(pod(), true);
        m.pod_events_synced(pod(), true);
        m.pod_load(pod(), PodLoad::default());
        assert!(series_mentioning(&m, POD).len() >= 20);

        m.forget_pod(pod());
        assert_eq!(series_mentioning(&m, POD), Vec::<String>::new());
        m.event_batch(pod(), 1);
        assert_eq!(series_mentioning(&m, POD), Vec::<String>::new());

        m.add_pod(pod());
        let p = [("pod", POD)];
        assert_eq!(value(&m, "kvgate_kv_events_total", &p), Some(0.0));
        assert_eq!(value(&m, "kvgate_pod_healthy", &p), None);
    }

    #[test]
    fn an_address_listed_twice_leaves_with_its_last_listing() {
        let m = Metrics::new().expect("metrics");
        m.add_pod(pod());
        m.add_pod(pod());
        m.event_batch(pod(), 2);
        m.forget_pod(pod());
        assert_eq!(
            value(&m, "kvgate_kv_events_total", &[("pod", POD)]),
            Some(2.0)
        );
        m.forget_pod(pod());
        assert_eq!(value(&m, "kvgate_kv_events_total", &[("pod", POD)]), None);
    }

    #[test]
    fn no_series_outlives_a_pod_forgotten_while_others_record() {
        for _ in 0..50 {
            let m = Arc::new(Metrics::new().expect("metrics"));
            m.add_pod(pod());
            let writers: Vec<_> = (0..4u16)
                .map(|t| {
                    let m = Arc::clone(&m);
                    std::thread::spawn(move || {
                        for i in 0..200u16 {
                            m.request_finished(&request(200 + (t * 200 + i) % 300, 1, Some(1)));
                            m.malformed_event(
                                Some(pod()),
                                if i % 2 == 0 { "decode" } else { "topic" },
                            );
                            m.pod_health(pod(), true);
                        }
                    })
                })
                .collect();
            m.forget_pod(pod());
            for w in writers {
                w.join().expect("writer");
            }
            assert_eq!(series_mentioning(&m, POD), Vec::<String>::new());
        }
    }

    fn endpoint(key: &str, http: &str) -> crate::discovery::PodEndpoint {
        crate::discovery::PodEndpoint {
            key: key.into(),
            name: key.into(),
            http: http.parse().expect("literal address"),
            events: None,
            replay: None,
            topic_host: http.into(),
            role: Default::default(),
        }
    }

    #[test]
    fn discovery_changes_and_registry_samples_drive_pod_series() {
        let m = Metrics::new().expect("metrics");
        let registry = PodRegistry::new(["qwen3"]);
        let other = "10.0.0.2:8000";
        let changes = registry.apply_snapshot("qwen3", &[endpoint("a", POD), endpoint("b", other)]);
        m.pods_changed(&changes);
        let set = registry.pods("qwen3").expect("model");
        let a = set.pods.iter().find(|p| p.addr() == pod()).expect("pod a");
        a.set_scraped(ScrapedLoad {
            running: 2.0,
            waiting: 5.0,
            kv_usage: 0.25,
        });
        a.set_trust(a.cache_epoch(), EventTrust::Synced);
        let _in_flight = a.begin_request(100);
        set.pods
            .iter()
            .find(|p| p.addr() != pod())
            .expect("pod b")
            .set_health_check(false);
        m.sample_pods(&registry, 0);
        let p = [("pod", POD)];
        assert_eq!(value(&m, "kvgate_pod_healthy", &p), Some(1.0));
        assert_eq!(
            value(&m, "kvgate_pod_healthy", &[("pod", other)]),
            Some(0.0)
        );
        assert_eq!(value(&m, "kvgate_pod_events_synced", &p), Some(1.0));
        assert_eq!(value(&m, "kvgate_pod_requests_waiting", &p), Some(5.0));
        assert_eq!(value(&m, "kvgate_pod_in_flight", &p), Some(1.0));

        // Pod a restarts on the same address (new key), pod b leaves.
        m.event_batch(pod(), 3);
        let changes = registry.apply_snapshot("qwen3", &[endpoint("a2", POD)]);
        assert_eq!((changes.added.len(), changes.removed.len()), (1, 2));
        m.pods_changed(&changes);
        assert_eq!(value(&m, "kvgate_kv_events_total", &p), Some(3.0));
        assert_eq!(series_mentioning(&m, other), Vec::<String>::new());
    }

    #[test]
    fn malformed_events_without_a_known_sender_count_as_unknown() {
        let m = Metrics::new().expect("metrics");
        m.malformed_event(None, "topic");
        m.malformed_event(None, "topic");
        let labels = [("pod", UNKNOWN), ("reason", "topic")];
        assert_eq!(
            value(&m, "kvgate_kv_events_malformed_total", &labels),
            Some(2.0)
        );
    }

    #[test]
    fn index_counters_follow_cumulative_totals_across_rebuilds() {
        let m = Metrics::new().expect("metrics");
        let sample = |evicted| IndexSample {
            entries: 10,
            blocks: 5,
            bytes: 4096,
            budget_bytes: 1 << 20,
            evicted_blocks_total: evicted,
            rejected_stores_total: 0,
        };
        m.index_stats(sample(10));
        m.index_stats(sample(25));
        assert_eq!(
            value(&m, "kvgate_index_evicted_blocks_total", &[]),
            Some(25.0)
        );
        m.index_stats(sample(5));
        assert_eq!(
            value(&m, "kvgate_index_evicted_blocks_total", &[]),
            Some(30.0)
        );
        assert_eq!(value(&m, "kvgate_index_entries", &[]), Some(10.0));
        assert_eq!(value(&m, "kvgate_index_bytes", &[]), Some(4096.0));
    }

    #[test]
    fn listener_connections_refusals_and_timeouts_are_counted() {
        let m = Metrics::new().expect("metrics");
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.connection_refused();
        m.connection_timed_out(ClientWait::Header);
        m.connection_timed_out(ClientWait::Idle);
        m.connection_timed_out(ClientWait::Idle);
        assert_eq!(value(&m, "kvgate_downstream_connections", &[]), Some(1.0));
        assert_eq!(
            value(&m, "kvgate_downstream_connections_refused_total", &[]),
            Some(1.0)
        );
        let timeouts = |phase| value(&m, "kvgate_downstream_timeouts_total", &[("phase", phase)]);
        assert_eq!(
            (timeouts("header"), timeouts("idle")),
            (Some(1.0), Some(2.0))
        );
    }

    #[test]
    fn config_reloads_count_by_result_and_the_last_one_shows() {
        let m = Metrics::new().expect("metrics");
        m.config_reload(true);
        m.config_reload(false);
        let ok = value(&m, "kvgate_config_reloads_total", &[("result", "ok")]);
        let failed = value(&m, "kvgate_config_reloads_total", &[("result", "failed")]);
        assert_eq!((ok, failed), (Some(1.0), Some(1.0)));
        assert_eq!(
            value(&m, "kvgate_config_last_reload_successful", &[]),
            Some(0.0)
        );
    }
}
