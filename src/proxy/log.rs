//! Per-request context and the one structured `Request handled` line it becomes.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pingora::http::RequestHeader;

use super::disagg::DisaggPath;
use super::REQUEST_ID_HEADER;
use crate::gateway::ActiveRequest;
use crate::metrics::{Metrics, RequestRecord, UNKNOWN};
use crate::trace::TraceEntry;

/// Longest client-supplied request id that is kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// What a request did, filled in as it goes and logged once at the end.
#[derive(Debug, Default)]
pub struct RequestCtx {
    pub request_id: String,
    started: Option<Instant>,
    method: String,
    path: String,
    /// `model` as the client sent it.
    pub model: Option<String>,
    /// The adapter (or model) a canary split chose for `model`; it replaced `model` in the
    /// forwarded body.
    pub split_choice: Option<String>,
    /// The served base model it resolved to (differs for LoRA adapters).
    pub target_model: Option<String>,
    /// The pod that answered, or was tried last.
    pub endpoint: Option<SocketAddr>,
    pub policy: Option<String>,
    pub prompt_tokens: Option<usize>,
    /// The prompt's block keys and the model's block size, kept for the traffic trace.
    pub prompt_blocks: Vec<u64>,
    pub block_size: usize,
    pub output_tokens: Option<u64>,
    pub predicted_cached_tokens: Option<usize>,
    pub actual_cached_tokens: Option<u64>,
    pub scores: Option<String>,
    pub attempts: u32,
    pub upstream_status: Option<u16>,
    pub time_to_first_byte: Option<Duration>,
    /// The answering pod's requests in flight once this one was released.
    pub pod_in_flight: Option<u32>,
    pub error: Option<String>,
    /// How a disaggregated profile served it; `None` for aggregated profiles.
    pub disaggregation: Option<DisaggPath>,
    /// The prefill leg, when one ran (the fields above describe the decode leg then).
    pub prefill: Option<PrefillLeg>,
    /// Counts the request as in progress (drain on shutdown) until the context drops.
    pub active: Option<ActiveRequest>,
}

/// What the prefill leg of a disaggregated request did.
#[derive(Debug, Default)]
pub struct PrefillLeg {
    /// The prefill pod that answered, or was tried last.
    pub endpoint: Option<SocketAddr>,
    pub predicted_cached_tokens: Option<usize>,
    pub actual_cached_tokens: Option<u64>,
    pub status: Option<u16>,
    pub duration: Option<Duration>,
    pub scores: String,
    pub error: Option<String>,
}

impl RequestCtx {
    /// Takes the client's `x-request-id` when it is usable, else makes one.
    pub fn begin(&mut self, header: &RequestHeader) {
        self.started = Some(Instant::now());
        self.method = header.method.as_str().to_string();
        self.path = header.uri.path().to_string();
        self.request_id = header
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID)
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    }

    pub fn log_handled(&self, status: u16, error: Option<&pingora::Error>) {
        let duration_ms = self
            .started
            .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
        let error = error.map(|e| e.to_string()).or_else(|| self.error.clone());
        let prefill = self.prefill.as_ref();
        tracing::info!(
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            status,
            model = self.model.as_deref(),
            split_choice = self.split_choice.as_deref(),
            target_model = self.target_model.as_deref(),
            endpoint = self.endpoint.map(tracing::field::display),
            policy = self.policy.as_deref(),
            prompt_tokens = self.prompt_tokens,
            predicted_cached_tokens = self.predicted_cached_tokens,
            actual_cached_tokens = self.actual_cached_tokens,
            scores = self.scores.as_deref(),
            attempts = self.attempts,
            upstream_status = self.upstream_status,
            ttfb_ms = self.time_to_first_byte.map(|d| d.as_secs_f64() * 1e3),
            pod_in_flight = self.pod_in_flight,
            disaggregation = self.disaggregation.map(DisaggPath::as_str),
            prefill_endpoint = prefill
                .and_then(|p| p.endpoint)
                .map(tracing::field::display),
            prefill_predicted_cached_tokens = prefill.and_then(|p| p.predicted_cached_tokens),
            prefill_actual_cached_tokens = prefill.and_then(|p| p.actual_cached_tokens),
            prefill_status = prefill.and_then(|p| p.status),
            prefill_ms = prefill
                .and_then(|p| p.duration)
                .map(|d| d.as_secs_f64() * 1e3),
            prefill_scores = prefill.map(|p| p.scores.as_str()),
            prefill_error = prefill.and_then(|p| p.error.as_deref()),
            duration_ms,
            error = error.as_deref(),
            "Request handled"
        );
    }

    /// The request as the traffic trace records it, when a pod answered a prompt kvgate
    /// read; moves the context's buffers out (the context is done once logged).
    pub fn take_trace_entry(&mut self) -> Option<TraceEntry> {
        let prompt_tokens = self.prompt_tokens.filter(|&n| n > 0)?;
        self.endpoint?;
        let arrived = SystemTime::now() - self.started.map_or(Duration::ZERO, |s| s.elapsed());
        Some(TraceEntry {
            arrived_unix_ms: arrived
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            model: self.target_model.take(),
            block_keys: std::mem::take(&mut self.prompt_blocks),
            block_size: self.block_size,
            prompt_tokens,
            output_tokens: self.output_tokens,
            pod: self.endpoint,
            policy: self.policy.take(),
            predicted_cached_tokens: self.predicted_cached_tokens,
            actual_cached_tokens: self.actual_cached_tokens,
            status: self.upstream_status,
            prefill_pod: self.prefill.as_ref().and_then(|p| p.endpoint),
            prefill_predicted_cached_tokens: self
                .prefill
                .as_ref()
                .and_then(|p| p.predicted_cached_tokens),
            prefill_actual_cached_tokens: self
                .prefill
                .as_ref()
                .and_then(|p| p.actual_cached_tokens),
        })
    }

    /// Records the request in the Prometheus metrics. `status` is what the client got
    /// (0 when nothing was written: the client went away first, counted as 499).
    pub fn record_metrics(&self, metrics: &Metrics, status: u16, streamed: bool) {
        let total = self.started.map_or(Duration::ZERO, |s| s.elapsed());
        if let Some(path) = self.disaggregation {
            metrics.disaggregated(
                self.target_model.as_deref().unwrap_or(UNKNOWN),
                path.as_str(),
            );
        }
        metrics.request_finished(&RequestRecord {
            model: self.target_model.as_deref().unwrap_or(UNKNOWN),
            pod: self.endpoint,
            policy: self.policy.as_deref().unwrap_or(UNKNOWN),
            status: if status == 0 { 499 } else { status },
            ttft: self.time_to_first_byte.filter(|_| streamed),
            total,
            prompt_tokens: self.prompt_tokens.unwrap_or(0),
            predicted_cached: self.predicted_cached_tokens.unwrap_or(0),
            actual_cached: self.actual_cached_tokens.map(|n| n as usize),
        });
    }
}
