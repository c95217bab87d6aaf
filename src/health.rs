//! Background checks of every pod: vLLM's `/health` (active health checking, which
//! complements the passive ejection done on request failures) and `/metrics` (the
//! pod's own view of its load, for load-aware scorers).
//!
//! Health fails safe: every discovered pod is probed before kvgate reports ready, a pod
//! discovery adds is probed at once, and a pod failing its check is probed again every
//! `FAILING_RECHECK` (or the interval, when shorter) so that it is admitted as soon as
//! it recovers rather than a whole interval later. A refused connection on either check
//! means no process listens on the pod any more: what kvgate believed about its cache
//! is dropped ([`Pod::connection_refused`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::pods::{Pod, PodId, ScrapedLoad, ScrapedLora};

/// Upper bound on one probe, whatever the interval.
const MAX_PROBE_TIME: Duration = Duration::from_secs(5);
/// How often the intervals are re-read while both checks are switched off.
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// How often a pod failing its health check (or not checked yet) is probed again.
const FAILING_RECHECK: Duration = Duration::from_millis(500);

/// Runs the health checks and the metrics scrape on their configured intervals
/// (`server.healthCheckIntervalMs`, `server.scrapeIntervalMs`; 0 switches one off).
pub struct HealthChecker {
    gateway: Arc<Gateway>,
    client: reqwest::Client,
    /// Last health result per pod, to log only changes and to find failing pods.
    last: Mutex<HashMap<PodId, bool>>,
}

/// Whether `error` (or an error it wraps) is a refused TCP connection: nothing listens.
fn is_connection_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Tells the pod what a check's connection showed: a refusal ends its process.
fn observe_connection(pod: &Pod, error: Option<&reqwest::Error>) {
    match error {
        None => pod.connected(),
        Some(error) if is_connection_refused(error) => {
            if pod.connection_refused() {
                tracing::warn!(pod = %pod.addr(), name = %pod.endpoint.name, "pod refused a connection: its process is gone, and what kvgate knew of its cache with it");
            }
        }
        Some(_) => {}
    }
}

impl HealthChecker {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self {
            gateway,
            client: reqwest::Client::new(),
            last: Mutex::new(HashMap::new()),
        }
    }

    fn all_pods(&self) -> Vec<Arc<Pod>> {
        let registry = &self.gateway.pods;
        registry
            .models()
            .iter()
            .filter_map(|m| registry.pods(m))
            .flat_map(|set| set.pods.clone())
            .collect()
    }

    /// Pods whose last check failed or that were never checked.
    fn failing_pods(&self) -> Vec<Arc<Pod>> {
        let last = self.last.lock();
        let mut pods = self.all_pods();
        pods.retain(|pod| last.get(&pod.id) != Some(&true));
        pods
    }

    async fn check_health(&self, pods: Vec<Arc<Pod>>, timeout: Duration) {
        if pods.is_empty() {
            return;
        }
        let results = join_all(pods.iter().map(|pod| self.probe_health(pod, timeout))).await;
        let present = self.all_pods();
        let mut last = self.last.lock();
        last.retain(|id, _| present.iter().any(|p| p.id == *id));
        for (pod, ok) in pods.iter().zip(results) {
            pod.set_health_check(ok);
            let before = last.insert(pod.id, ok);
            if before != Some(ok) {
                if ok {
                    tracing::info!(pod = %pod.addr(), name = %pod.endpoint.name, "pod is healthy");
                } else {
                    tracing::warn!(pod = %pod.addr(), name = %pod.endpoint.name, "pod failed its health check");
                }
            }
        }
    }

    async fn probe_health(&self, pod: &Pod, timeout: Duration) -> bool {
        let url = format!("http://{}/health", pod.addr());
        let sent = self.client.get(&url).timeout(timeout).send().await;
        observe_connection(pod, sent.as_ref().err());
        match sent {
            Ok(response) => response.status().is_success(),
            Err(error) => {
                tracing::debug!(pod = %pod.addr(), %error, "health check failed");
                false
            }
        }
    }

    async fn scrape(&self, timeout: Duration) {
        let pods = self.all_pods();
        join_all(pods.iter().map(|pod| self.scrape_pod(pod, timeout))).await;
    }

    async fn scrape_pod(&self, pod: &Pod, timeout: Duration) {
        // What the page says about adapters describes the process that answered it.
        let epoch = pod.cache_epoch();
        let url = format!("http://{}/metrics", pod.addr());
        let sent = self.client.get(&url).timeout(timeout).send().await;
        observe_connection(pod, sent.as_ref().err());
        let text = match sent {
            Ok(response) if response.status().is_success() => response.text().await,
            Ok(response) => {
                tracing::debug!(pod = %pod.addr(), status = %response.status(), "metrics scrape refused");
                return;
            }
            Err(error) => Err(error),
        };
        match text {
            Ok(text) => {
                match parse_vllm_load(&text) {
                    Some(load) => pod.set_scraped(load),
                    None => tracing::debug!(pod = %pod.addr(), "no vLLM load metrics in /metrics"),
                }
                if let Some(lora) = parse_lora_info(&text) {
                    pod.set_scraped_lora(epoch, lora);
                }
            }
            Err(error) => tracing::debug!(pod = %pod.addr(), %error, "metrics scrape failed"),
        }
    }
}

/// The health check period and the probe timeout that goes with it (0: off).
fn health_every(gateway: &Gateway) -> Duration {
    Duration::from_millis(gateway.state().config.server.health_check_interval_ms)
}

#[async_trait]
impl BackgroundService for HealthChecker {
    /// Reports ready once every pod discovered so far has been probed (the service
    /// starts after discovery), so kvgate never opens with health it has not checked.
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let every = health_every(&self.gateway);
        if !every.is_zero() {
            self.check_health(self.all_pods(), every.min(MAX_PROBE_TIME))
                .await;
        }
        ready.notify_ready();
        let mut pod_changes = self.gateway.pods.subscribe();
        let mut next_health = Instant::now() + every;
        let mut next_recheck = Instant::now() + every.min(FAILING_RECHECK);
        let mut next_scrape = Instant::now();
        loop {
            // Re-read each round so a config reload takes effect.
            let health_every = health_every(&self.gateway);
            let scrape_every =
                Duration::from_millis(self.gateway.state().config.server.scrape_interval_ms);
            let recheck_every = health_every.min(FAILING_RECHECK);
            let probe_time = health_every.min(MAX_PROBE_TIME);
            let now = Instant::now();
            if !health_every.is_zero() && now >= next_health {
                self.check_health(self.all_pods(), probe_time).await;
                next_health = now + health_every;
                next_recheck = now + recheck_every;
            } else if !health_every.is_zero() && now >= next_recheck {
                self.check_health(self.failing_pods(), probe_time).await;
                next_recheck = now + recheck_every;
            }
            if !scrape_every.is_zero() && now >= next_scrape {
                self.scrape(scrape_every.min(MAX_PROBE_TIME)).await;
                next_scrape = now + scrape_every;
            }
            let mut wake = Instant::now() + IDLE_RECHECK;
            if !health_every.is_zero() {
                wake = wake.min(next_health).min(next_recheck);
            }
            if !scrape_every.is_zero() {
                wake = wake.min(next_scrape);
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(wake) => {}
                // Discovery added pods: probe them now rather than at the next recheck.
                Ok(()) = pod_changes.changed() => next_recheck = Instant::now(),
            }
        }
    }
}

/// Extracts running/waiting requests and KV-cache usage from vLLM's Prometheus text.
/// Series of one metric (per engine, per model label) are summed; usage takes the
/// fullest engine. `None` when the page has none of these metrics.
pub fn parse_vllm_load(text: &str) -> Option<ScrapedLoad> {
    let mut load = ScrapedLoad::default();
    let mut seen = false;
    let mut kv_usage_new: Option<f64> = None;
    let mut kv_usage_old: Option<f64> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = split_sample(line) else {
            continue;
        };
        match name {
            "vllm:num_requests_running" => load.running += value,
            "vllm:num_requests_waiting" => load.waiting += value,
            "vllm:kv_cache_usage_perc" => {
                kv_usage_new = Some(kv_usage_new.map_or(value, |u| u.max(value)))
            }
            "vllm:gpu_cache_usage_perc" => {
                kv_usage_old = Some(kv_usage_old.map_or(value, |u| u.max(value)))
            }
            _ => continue,
        }
        seen = true;
    }
    load.kv_usage = kv_usage_new.or(kv_usage_old).unwrap_or(0.0);
    seen.then_some(load)
}

const LORA_INFO: &str = "vllm:lora_requests_info";

/// Reads vLLM's `vllm:lora_requests_info`. vLLM sets a new series (its labels: the running
/// and waiting adapters, comma-separated, and `max_lora`) to the current time on every
/// state change and keeps the old ones, so the series with the highest value is the
/// current state. `None` when the page has no such series (LoRA is off on the pod).
pub fn parse_lora_info(text: &str) -> Option<ScrapedLora> {
    let mut latest: Option<(f64, &str)> = None;
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix(LORA_INFO) else {
            continue;
        };
        if !rest.starts_with('{') {
            continue;
        }
        let Some((_, value)) = split_sample(line) else {
            continue;
        };
        if latest.is_none_or(|(best, _)| value > best) {
            latest = Some((value, rest));
        }
    }
    let (_, sample) = latest?;
    let mut lora = ScrapedLora::default();
    for (name, value) in labels(sample)? {
        let names = || {
            value
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect()
        };
        match name {
            "running_lora_adapters" => lora.running = names(),
            "waiting_lora_adapters" => lora.waiting = names(),
            "max_lora" => lora.max_lora = value.trim().parse().ok()?,
            _ => {}
        }
    }
    Some(lora)
}

/// The labels of `{name="value",...} ...` as (name, unescaped value) pairs; `None` when
/// the block is malformed.
fn labels(block: &str) -> Option<Vec<(&str, String)>> {
    let mut rest = block.strip_prefix('{')?;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.starts_with('}') {
            return Some(out);
        }
        let (name, after) = rest.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((name.trim(), value));
        rest = &after[end + 2..];
    }
}

/// `name{labels} value [timestamp]` → (name, value). Label values may hold spaces and
/// escaped quotes, so the label block is skipped quote-aware.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = rest.get(close? + 1..)?;
    }
    let value: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
    value.is_finite().then_some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_metrics_page() {
        let page = r#"
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3 0.6B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3 0.6B"} 2.0
vllm:num_requests_waiting{engine="0",model_name="a \"quoted} name"} 4.0 1700000000000
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
vllm:prompt_tokens_total{model_name="m"} 12345.0
"#;
        assert_eq!(
            parse_vllm_load(page),
            Some(ScrapedLoad {
                running: 5.0,
                waiting: 4.0,
                kv_usage: 0.5
            })
        );
    }

    #[test]
    fn the_latest_lora_series_wins() {
        let page = r#"
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7000000001e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters="a \"b\",c"} 1.7000000003e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7000000002e+09
vllm:num_requests_running{engine="0",model_name="m"} 1.0
"#;
        assert_eq!(
            parse_lora_info(page),
            Some(ScrapedLora {
                running: vec!["sql".into(), "chat".into()],
                waiting: vec!["a \"b\"".into(), "c".into()],
                max_lora: 4,
            })
        );
        assert_eq!(parse_lora_info("vllm:num_requests_running 1\n"), None);
        assert_eq!(
            parse_lora_info("vllm:lora_requests_info{max_lora=\"x\"} 1\n"),
            None,
            "a malformed slot count is no state"
        );
        assert_eq!(
            parse_lora_info("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a\"\n"),
            None
        );
    }

    #[test]
    fn older_usage_metric_and_absent_metrics() {
        let page = "vllm:gpu_cache_usage_perc 0.75\nvllm:num_requests_running 1\n";
        assert_eq!(
            parse_vllm_load(page),
            Some(ScrapedLoad {
                running: 1.0,
                waiting: 0.0,
                kv_usage: 0.75
            })
        );
        assert_eq!(parse_vllm_load("process_cpu_seconds_total 3\n"), None);
        assert_eq!(
            parse_vllm_load("vllm:num_requests_running{broken 3\n"),
            None
        );
    }
}
