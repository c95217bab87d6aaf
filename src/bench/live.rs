//! Live benchmark: the same workloads sent over HTTP through a running gateway to real
//! (or simulated) vLLM pods, one policy at a time, selected per request with the
//! gateway's profile header. Requests stream, so TTFT and TPOT are measured by the
//! client; cache hits come from `usage.prompt_tokens_details.cached_tokens`, and how
//! many requests each pod served from the pods' own `/metrics`. Every pod's prefix
//! cache is reset before each policy so each starts cold.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::metrics::{RequestRecord, RunData};
use super::policy::PolicySpec;
use super::workload::{BenchRequest, LivePrompt, Segment};

/// Where a live run sends its requests.
#[derive(Clone, Debug)]
pub struct LiveSetup {
    /// The gateways' OpenAI base URLs, e.g. `http://127.0.0.1:8080`: one, or every replica
    /// of a deployment, each request going to one of them ([`gateway_of`]).
    pub gateways: Vec<String>,
    /// The pods behind it, for cache resets and request counts.
    pub pods: Vec<SocketAddr>,
    pub model: String,
    /// The header that selects a profile (`server.profileHeader`).
    pub profile_header: String,
    /// Wall seconds per workload second, as the pods run (`kvgate sim --time-scale`):
    /// arrivals are stretched by it and measured times divided by it.
    pub time_scale: f64,
    /// Most requests in flight at once (open loop below it).
    pub max_in_flight: usize,
    /// A pod restarted mid-run, with an empty cache (simulated pods only).
    pub restart: Option<PodRestart>,
}

/// A restart of one simulated pod during each policy's run, through `kvgate sim`'s
/// control port: the pod's process dies (its in-flight requests with it) and comes back
/// `down_ms` later with an empty cache and fresh event sequence numbers.
#[derive(Clone, Debug)]
pub struct PodRestart {
    /// The control port's base URL, e.g. `http://127.0.0.1:9000`.
    pub control: String,
    /// The pod's index in the simulation.
    pub pod: usize,
    /// When, in workload seconds from the run's start.
    pub at_s: f64,
    pub down_ms: u64,
}

/// Which gateway request `index` goes to: spread evenly and independently of the policy,
/// as a `LoadBalancer` Service spreads connections, and the same in every run.
pub fn gateway_of(index: usize, gateways: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(&(index as u64).to_le_bytes()) % gateways.max(1) as u64) as usize
}

/// The `x-request-id` request `index` of a policy's run is sent with.
pub fn request_id(profile: &str, index: usize) -> String {
    format!("bench-{profile}-{index}")
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("pod {pod} did not reset its prefix cache: {message}")]
    Reset { pod: SocketAddr, message: String },
    #[error("policy {policy:?} cannot run live: {reason}")]
    NotLive { policy: String, reason: String },
    #[error("request {request} of the workload has no prompt to send (built for virtual time)")]
    NoPrompt { request: usize },
    #[error("restarting pod {pod} through {url}: {message}")]
    Restart {
        pod: usize,
        url: String,
        message: String,
    },
}

fn http_error(url: &str, error: impl std::fmt::Display) -> LiveError {
    LiveError::Http {
        url: url.to_string(),
        message: error.to_string(),
    }
}

/// `POST /reset_prefix_cache` on every pod. A pod refuses while requests hold blocks,
/// so refusals are retried for a while.
pub async fn reset_pods(client: &reqwest::Client, pods: &[SocketAddr]) -> Result<(), LiveError> {
    for &pod in pods {
        let url = format!("http://{pod}/reset_prefix_cache");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let response = client
                .post(&url)
                .send()
                .await
                .map_err(|e| http_error(&url, e))?;
            if response.status().is_success() {
                break;
            }
            if attempt >= 50 {
                return Err(LiveError::Reset {
                    pod,
                    message: format!("{} after {attempt} attempts", response.status()),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// `vllm:request_success_total` of each pod (summed over its label sets).
pub async fn pod_request_counts(
    client: &reqwest::Client,
    pods: &[SocketAddr],
) -> Result<Vec<u64>, LiveError> {
    let mut counts = Vec::with_capacity(pods.len());
    for pod in pods {
        let url = format!("http://{pod}/metrics");
        let text = client
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| http_error(&url, e))?
            .text()
            .await
            .map_err(|e| http_error(&url, e))?;
        counts.push(counter_sum(&text, "vllm:request_success_total") as u64);
    }
    Ok(counts)
}

/// Sum of a counter's samples in Prometheus text (`name{labels} value`).
fn counter_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| {
            let value = match line.rfind('}') {
                Some(close) => line.get(close + 1..)?,
                None => line.get(name.len()..)?,
            };
            value.split_ascii_whitespace().next()?.parse::<f64>().ok()
        })
        .filter(|v| v.is_finite())
        .sum()
}

/// What the client saw of one streamed response.
#[derive(Debug, Default)]
struct Streamed {
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    tokens: u32,
    prompt_tokens: Option<u32>,
    cached_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

impl Streamed {
    /// Applies one SSE `data:` payload; false at `[DONE]`.
    fn event(&mut self, payload: &str, at: Instant) -> Result<bool, String> {
        if payload == "[DONE]" {
            return Ok(false);
        }
        let chunk: Value = serde_json::from_str(payload).map_err(|e| e.to_string())?;
        if let Some(error) = chunk.get("error") {
            return Err(error.to_string());
        }
        let text = chunk["choices"][0]["text"]
            .as_str()
            .or_else(|| chunk["choices"][0]["delta"]["content"].as_str())
            .unwrap_or_default();
        if !text.is_empty() {
            self.first_token.get_or_insert(at);
            self.last_token = Some(at);
            self.tokens += 1;
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let number = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
            self.prompt_tokens = number(&usage["prompt_tokens"]);
            self.completion_tokens = number(&usage["completion_tokens"]);
            self.cached_tokens = number(&usage["prompt_tokens_details"]["cached_tokens"]);
        }
        Ok(true)
    }
}

/// The request body a workload request is sent as, and its path.
fn body(model: &str, request: &BenchRequest, prompt: &LivePrompt) -> (&'static str, Value) {
    let stream = json!({"include_usage": true});
    match prompt {
        LivePrompt::Tokens(tokens) => (
            "/v1/completions",
            json!({
                "model": model,
                "prompt": tokens,
                "max_tokens": request.output_tokens,
                "stream": true,
                "stream_options": stream,
            }),
        ),
        LivePrompt::Chat(messages) => (
            "/v1/chat/completions",
            json!({
                "model": model,
                "messages": messages,
                "max_tokens": request.output_tokens,
                "stream": true,
                "stream_options": stream,
            }),
        ),
    }
}

/// Shared state of one policy's run.
struct RunState<'a> {
    client: &'a reqwest::Client,
    setup: &'a LiveSetup,
    segment: &'a Segment,
    profile: &'a str,
    started: Instant,
    /// Stage ends in wall time since `started`.
    stage_ends: Vec<Duration>,
    stage_tokens: Vec<AtomicU64>,
    records: Mutex<Vec<RequestRecord>>,
    failed: AtomicU64,
    progress: &'a AtomicUsize,
    slots: Semaphore,
}

impl RunState<'_> {
    fn stage_at(&self, at: Instant) -> Option<usize> {
        let since = at.saturating_duration_since(self.started);
        let i = self.stage_ends.partition_point(|&end| end <= since);
        (i < self.stage_ends.len()).then_some(i)
    }

    /// Sends one request and records it; returns when its response ended.
    async fn send(&self, index: usize) -> Result<(), LiveError> {
        let request = &self.segment.requests[index];
        let prompt = request
            .live
            .as_deref()
            .ok_or(LiveError::NoPrompt { request: index })?;
        let (path, body) = body(&self.setup.model, request, prompt);
        let gateway = gateway_of(index, self.setup.gateways.len());
        let url = format!("{}{path}", self.setup.gateways[gateway]);
        let _slot = self.slots.acquire().await;
        let sent = Instant::now();
        let outcome = self.exchange(&url, &body, index).await;
        self.progress.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(streamed) => {
                let scale = self.setup.time_scale;
                let ms = |d: Duration| d.as_secs_f64() * 1e3 / scale;
                let first = streamed.first_token.unwrap_or_else(Instant::now);
                let last = streamed.last_token.unwrap_or(first);
                let tokens = streamed.completion_tokens.unwrap_or(streamed.tokens);
                self.records.lock().push(RequestRecord {
                    request: u32::try_from(index).unwrap_or(u32::MAX),
                    stage: request.stage,
                    pod: u32::MAX,
                    ttft_ms: ms(first - sent),
                    tpot_ms: (streamed.tokens > 1)
                        .then(|| ms(last - first) / f64::from(streamed.tokens - 1)),
                    e2e_ms: ms(sent.elapsed()),
                    prompt_tokens: streamed.prompt_tokens.unwrap_or(request.prompt_tokens),
                    cached_tokens: streamed.cached_tokens.unwrap_or(0),
                    output_tokens: tokens,
                    missed_tokens: None,
                    preemptions: 0,
                    itl_ms: Vec::new(),
                });
            }
            Err(message) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(request = index, %message, "live request failed");
            }
        }
        Ok(())
    }

    async fn exchange(&self, url: &str, body: &Value, index: usize) -> Result<Streamed, String> {
        let response = self
            .client
            .post(url)
            .header(self.setup.profile_header.as_str(), self.profile)
            .header("x-request-id", request_id(self.profile, index))
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("{status}: {text}"));
        }
        let mut streamed = Streamed::default();
        let mut buffer: Vec<u8> = Vec::new();
        let mut bytes = response.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let at = Instant::now();
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                for line in text.lines() {
                    let Some(payload) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let before = streamed.tokens;
                    if !streamed.event(payload.trim(), at)? {
                        return Ok(streamed);
                    }
                    if streamed.tokens > before {
                        if let Some(tokens) =
                            self.stage_at(at).and_then(|s| self.stage_tokens.get(s))
                        {
                            tokens.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        // Cut short (the pod died mid-answer): a failed request, not one with nothing cached.
        Err(format!(
            "the stream ended before [DONE], after {} tokens",
            streamed.tokens
        ))
    }

    /// Sends a session: the request at `index`, then each follow-up after its think time.
    async fn session(&self, index: usize, followers: &[Vec<usize>]) -> Result<(), LiveError> {
        let mut next = Some(index);
        while let Some(current) = next {
            self.send(current).await?;
            next = followers[current].first().copied();
            if let Some(follow) = next.and_then(|n| self.segment.requests[n].follows) {
                let think = follow.think_ms / 1e3 * self.setup.time_scale;
                tokio::time::sleep(Duration::from_secs_f64(think.max(0.0))).await;
            }
        }
        Ok(())
    }
}

/// Runs one policy over one segment through the gateway, from cold pods.
pub async fn run_policy(
    client: &reqwest::Client,
    setup: &LiveSetup,
    segment: &Segment,
    policy: &PolicySpec,
    progress: &AtomicUsize,
) -> Result<RunData, LiveError> {
    reset_pods(client, &setup.pods).await?;
    let before = pod_request_counts(client, &setup.pods).await?;
    let scale = setup.time_scale;
    let mut followers: Vec<Vec<usize>> = vec![Vec::new(); segment.requests.len()];
    for (i, request) in segment.requests.iter().enumerate() {
        if let Some(follow) = request.follows {
            if let Some(list) = followers.get_mut(follow.previous as usize) {
                list.push(i);
            }
        }
    }
    let state = RunState {
        client,
        setup,
        segment,
        profile: &policy.profile_name,
        started: Instant::now(),
        stage_ends: segment
            .stages
            .iter()
            .map(|s| Duration::from_secs_f64(s.end_ms.max(0.0) / 1e3 * scale))
            .collect(),
        stage_tokens: segment.stages.iter().map(|_| AtomicU64::new(0)).collect(),
        records: Mutex::new(Vec::with_capacity(segment.requests.len())),
        failed: AtomicU64::new(0),
        progress,
        slots: Semaphore::new(setup.max_in_flight.max(1)),
    };
    let wall = Instant::now();
    let sessions = segment
        .requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.follows.is_none())
        .map(|(i, r)| {
            let state = &state;
            let followers = &followers;
            let at = state.started + Duration::from_secs_f64(r.arrival_ms.max(0.0) / 1e3 * scale);
            async move {
                tokio::time::sleep_until(at.into()).await;
                state.session(i, followers).await
            }
        });
    let restart = async {
        match &setup.restart {
            Some(restart) => {
                let at = state.started + Duration::from_secs_f64(restart.at_s.max(0.0) * scale);
                tokio::time::sleep_until(at.into()).await;
                let asked = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                restart_pod(client, restart).await.map(|()| Some(asked))
            }
            None => Ok(None),
        }
    };
    let (results, restarted) = tokio::join!(futures::future::join_all(sessions), restart);
    let restarted_unix_ms = restarted?;
    for result in results {
        result?;
    }
    let after = pod_request_counts(client, &setup.pods).await?;
    let RunState {
        records,
        failed,
        stage_tokens,
        ..
    } = state;
    Ok(RunData {
        records: records.into_inner(),
        failed: failed.into_inner(),
        stage_output_tokens: stage_tokens
            .into_iter()
            .map(AtomicU64::into_inner)
            .collect(),
        stage_balance: vec![(0.0, 0); segment.stages.len()],
        pod_requests: after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
        span_s: wall.elapsed().as_secs_f64() / scale,
        wall_s: wall.elapsed().as_secs_f64(),
        restarted_unix_ms,
        ..RunData::default()
    })
}

async fn restart_pod(client: &reqwest::Client, restart: &PodRestart) -> Result<(), LiveError> {
    let url = format!(
        "{}/sim/pods/{}/restart?downMs={}",
        restart.control, restart.pod, restart.down_ms
    );
    let failed = |message: String| LiveError::Restart {
        pod: restart.pod,
        url: url.clone(),
        message,
    };
    let response = client
        .post(&url)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(response.status().to_string()));
    }
    tracing::info!(
        pod = restart.pod,
        down_ms = restart.down_ms,
        "pod restarted"
    );
    Ok(())
}

/// Checks that a policy can be selected on the gateway: its profile is in the gateway's
/// config and its index is fed by real events (no simulated delay, loss or oracle).
pub fn check_live(policy: &PolicySpec, profiles: &[&str]) -> Result<(), LiveError> {
    use super::policy::IndexFeed;
    let not_live = |reason: String| LiveError::NotLive {
        policy: policy.name.clone(),
        reason,
    };
    match policy.feed {
        IndexFeed::Oracle => return Err(not_live("the oracle exists only in virtual time".into())),
        IndexFeed::Events { delay_ms, loss } if delay_ms > 0.0 || loss > 0.0 => {
            return Err(not_live(
                "event delay and loss are simulated in virtual time only (use the pods' /sim/faults live)"
                    .into(),
            ))
        }
        _ => {}
    }
    if policy.replicas > 1 {
        return Err(not_live(
            "replicas are simulated in virtual time only (live, run the gateways and list each in --live)"
                .into(),
        ));
    }
    if !profiles.contains(&policy.profile_name.as_str()) {
        return Err(not_live(format!(
            "the gateway config has no profile {:?} (it has {})",
            policy.profile_name,
            profiles.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_give_tokens_and_usage() {
        let mut streamed = Streamed::default();
        let at = Instant::now();
        assert!(streamed
            .event(r#"{"choices":[{"index":0,"text":"Hello"}]}"#, at)
            .unwrap());
        assert!(streamed
            .event(
                r#"{"choices":[{"index":0,"delta":{"content":" world"}}]}"#,
                at
            )
            .unwrap());
        assert!(streamed
            .event(
                r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
                at
            )
            .unwrap());
        assert!(streamed
            .event(
                r#"{"choices":[],"usage":{"prompt_tokens":90,"completion_tokens":2,"total_tokens":92,"prompt_tokens_details":{"cached_tokens":64}}}"#,
                at
            )
            .unwrap());
        assert!(!streamed.event("[DONE]", at).unwrap());
        assert_eq!(streamed.tokens, 2);
        assert_eq!(streamed.prompt_tokens, Some(90));
        assert_eq!(streamed.cached_tokens, Some(64));
        assert!(streamed
            .event(r#"{"error":{"message":"boom"}}"#, at)
            .is_err());
    }

    #[test]
    fn counters_are_summed_over_label_sets() {
        let text = "# HELP vllm:request_success_total x\n\
                    vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 7\n\
                    vllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 3.0\n\
                    vllm:request_success_totals 100\n";
        assert_eq!(counter_sum(text, "vllm:request_success_total"), 10.0);
    }
}
