//! kvgate's metrics as a real Prometheus sees them: the admin listener serves
//! `/metrics`, the Debian `prometheus` scrapes it every second, and PromQL over
//! its HTTP API must return exactly the values recorded; every query of the
//! Grafana dashboard (`deploy/grafana/kvgate-dashboard.json`) must return data.
//!
//! Most tests run the admin listener and `Metrics` in this process with known
//! recordings; the last one scrapes the real `kvgate serve` in a child process while
//! it proxies traffic to fake vLLM pods and reloads its config.

mod support;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvgate::metrics::flow::{QueueOutcome, ShedReason};
use kvgate::metrics::relay::SnapshotResult;
use kvgate::metrics::{
    AdminError, AdminListener, AdminState, IndexSample, Metrics, PodLoad, RequestRecord,
};
use kvgate::pods::ScrapedLoad;
use serde_json::{json, Value};
use support::prometheus::{Prometheus, Sample};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const POD_A: &str = "10.0.0.1:8000";
const POD_B: &str = "10.0.0.2:8000";
const POD_C: &str = "10.0.0.3:8000";
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/kvgate-dashboard.json"
);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("literal address")
}

fn ok_request(
    pod: &str,
    prompt: usize,
    predicted: usize,
    actual: Option<usize>,
) -> RequestRecord<'static> {
    RequestRecord {
        model: "qwen3",
        pod: Some(addr(pod)),
        policy: "precise",
        status: 200,
        ttft: Some(Duration::from_millis(300)),
        total: Duration::from_millis(1200),
        prompt_tokens: prompt,
        predicted_cached: predicted,
        actual_cached: actual,
    }
}

/// Known traffic touching every collector. The expected PromQL answers below are
/// computed from these numbers.
fn record_known_traffic(m: &Metrics) {
    for pod in [POD_A, POD_B, POD_C] {
        m.add_pod(addr(pod));
    }
    // Pod A: 3 responses with usage (prompt 128, predicted 96, actual 64) and one without.
    for _ in 0..3 {
        m.request_finished(&ok_request(POD_A, 128, 96, Some(64)));
    }
    m.request_finished(&ok_request(POD_A, 128, 96, None));
    // Pod B: one exact prediction, and a 503 under another profile.
    m.request_finished(&ok_request(POD_B, 256, 128, Some(128)));
    m.request_finished(&RequestRecord {
        policy: "load",
        status: 503,
        ttft: None,
        total: Duration::from_millis(50),
        ..ok_request(POD_B, 64, 0, None)
    });
    // Refused before routing.
    m.request_finished(&RequestRecord {
        pod: None,
        status: 413,
        ttft: None,
        total: Duration::from_millis(1),
        ..ok_request(POD_A, 0, 0, None)
    });
    for _ in 0..4 {
        m.decision_latency(Duration::from_micros(40));
    }
    // Flow control: two waiting at priority 1, one dispatched after 0.2 s, two shed.
    m.flow.queue_depth("qwen3", 1, 2);
    m.flow.waited(
        "qwen3",
        QueueOutcome::Dispatched,
        Duration::from_millis(200),
    );
    m.flow.shed("qwen3", ShedReason::Sheddable);
    m.flow.shed("qwen3", ShedReason::Deadline);
    m.decision_latency(Duration::from_millis(2));
    m.event_batch(addr(POD_A), 10);
    m.event_batch(addr(POD_A), 10);
    m.event_batch(addr(POD_B), 5);
    m.seq_gap(addr(POD_A), 3);
    m.replay(addr(POD_A), true);
    m.replay(addr(POD_B), false);
    m.malformed_event(Some(addr(POD_B)), "decode");
    m.malformed_event(None, "topic");
    m.parity(addr(POD_A), true);
    m.parity(addr(POD_B), false);
    m.pod_events_synced(addr(POD_A), true);
    m.pod_events_synced(addr(POD_B), false);
    m.pod_health(addr(POD_A), true);
    m.pod_health(addr(POD_B), false);
    m.pod_health(addr(POD_C), true);
    m.index_stats(IndexSample {
        entries: 1000,
        blocks: 400,
        bytes: 65536,
        budget_bytes: 1 << 20,
        evicted_blocks_total: 7,
        rejected_stores_total: 1,
    });
    m.config_reload(true);
    m.config_reload(false);
    m.config_reload(true);
    m.traffic_policy("inference-policy", true);
    m.traffic_policy("estimation-policy", false);
    // Disaggregated requests: two with both legs, one whose prefill leg failed. The prefill
    // leg is recorded without its pod, so the per-pod cache figures above stay as they are.
    m.disaggregated("qwen3", "two_legs");
    m.disaggregated("qwen3", "two_legs");
    m.disaggregated("qwen3", "prefill_failed");
    m.prefill_leg_finished(&RequestRecord {
        pod: None,
        ttft: None,
        total: Duration::from_millis(80),
        ..ok_request(POD_A, 128, 96, Some(64))
    });
    // The replica relay: two peers (one unreachable), two followers, 3 batches each way.
    m.relay.peer("10.0.0.7:5558", true);
    m.relay.peer("10.0.0.8:5558", false);
    m.relay.subscribers(2);
    m.relay.sent(3, 3000);
    for _ in 0..3 {
        m.relay.received(Some(Duration::from_micros(300)));
    }
    m.relay.snapshot(SnapshotResult::Sent);
    m.relay.snapshot(SnapshotResult::Applied);
    m.relay.rejected("unauthenticated");
    m.relay.secret_reload(true);
    m.tls_certificate_reload(true);
    m.tls_handshake_failed();
}

fn pod_a_load() -> PodLoad {
    PodLoad {
        scraped: ScrapedLoad {
            running: 3.0,
            waiting: 1.0,
            kv_usage: 0.5,
        },
        in_flight: 2,
    }
}

struct Admin {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    scrapes: Arc<AtomicUsize>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), AdminError>>,
}

/// Serves `metrics` on a free loopback port. The scrape hook refreshes pod A's
/// load, as the gateway's hook samples the pod registry.
fn serve(metrics: Arc<Metrics>) -> Admin {
    let listener = AdminListener::bind(addr("127.0.0.1:0")).expect("bind admin");
    let ready = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicUsize::new(0));
    let state = AdminState {
        metrics,
        ready: {
            let ready = Arc::clone(&ready);
            Arc::new(move || ready.load(Ordering::SeqCst))
        },
        pods: Arc::new(
            || json!([{"addr": POD_A, "healthy": true}, {"addr": POD_B, "healthy": false}]),
        ),
        before_scrape: Some({
            let scrapes = Arc::clone(&scrapes);
            Arc::new(move |m: &Metrics| {
                scrapes.fetch_add(1, Ordering::SeqCst);
                m.pod_load(addr(POD_A), pod_a_load());
            })
        }),
    };
    let addr = listener.local_addr();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(listener.serve(state, async {
        let _ = stopped.await;
    }));
    Admin {
        addr,
        ready,
        scrapes,
        stop,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_metrics_health_readiness_and_pods() {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    record_known_traffic(&metrics);
    let admin = serve(Arc::clone(&metrics));
    let base = format!("http://{}", admin.addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let get = |path: &str| http.get(format!("{base}{path}")).send();

    let health = get("/healthz").await.expect("healthz");
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.expect("body"), "ok\n");

    assert_eq!(get("/readyz").await.expect("readyz").status(), 503);
    admin.ready.store(true, Ordering::SeqCst);
    assert_eq!(get("/readyz").await.expect("readyz").status(), 200);

    let pods: Value = get("/debug/pods")
        .await
        .expect("pods")
        .json()
        .await
        .expect("json");
    assert_eq!(pods[1]["addr"], POD_B);

    let scrape = get("/metrics").await.expect("metrics");
    assert_eq!(scrape.status(), 200);
    assert_eq!(
        scrape.headers()["content-type"],
        "text/plain; version=0.0.4"
    );
    let text = scrape.text().await.expect("body");
    assert!(
        text.contains(&format!("kvgate_pod_in_flight{{pod=\"{POD_A}\"}} 2\n")),
        "{text}"
    );
    assert_eq!(admin.scrapes.load(Ordering::SeqCst), 1);
    assert_eq!(get("/metric").await.expect("404").status(), 404);

    // The admin port is exclusive: a second bind fails with the address in the error.
    let err = AdminListener::bind(admin.addr).expect_err("port is taken");
    assert!(err.to_string().contains(&admin.addr.to_string()), "{err}");

    admin.stop.send(()).expect("stop");
    let served = tokio::time::timeout(Duration::from_secs(5), admin.task)
        .await
        .expect("admin listener stops on shutdown");
    served.expect("join").expect("serve");
}

#[test]
fn the_exposition_passes_promtool_lint() {
    let metrics = Metrics::new().expect("metrics");
    record_known_traffic(&metrics);
    metrics.pod_load(addr(POD_A), pod_a_load());
    let text = metrics.render().expect("render");
    let mut lint =
        std::process::Command::new(std::env::var("PROMTOOL").unwrap_or("promtool".into()))
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool (apt-get install prometheus)");
    use std::io::Write as _;
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write exposition");
    let out = lint.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("read dashboard");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// `(panel title, refId, expr)` of every query.
fn queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap_or("").to_string(),
                target["refId"].as_str().unwrap_or("").to_string(),
                target["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

#[test]
fn dashboard_is_a_well_formed_grafana_model_covering_every_metric() {
    let dash = load_dashboard();
    assert_eq!(dash["uid"], "kvgate-overview");
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, BTreeSet::from(["datasource", "model", "pod"]));

    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in panels(&dash) {
        let title = panel["title"].as_str().expect("title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "duplicate id: {title}"
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64(),
            g["y"].as_u64(),
            g["w"].as_u64(),
            g["h"].as_u64(),
        );
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
            panic!("{title}: gridPos {g}");
        };
        assert!(x + w <= 24, "{title} is wider than the grid");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let ref_ids: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
        assert_eq!(ref_ids.len(), targets.len(), "{title}: refIds");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }

    // Every exported family has a panel.
    let metrics = Metrics::new().expect("metrics");
    record_known_traffic(&metrics);
    metrics.pod_load(addr(POD_A), pod_a_load());
    let exprs: Vec<String> = queries(&dash).into_iter().map(|(_, _, e)| e).collect();
    let text = metrics.render().expect("render");
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(families.len() >= 30, "{families:?}");
    for family in families {
        assert!(
            exprs.iter().any(|e| e.contains(family)),
            "no dashboard panel queries {family}"
        );
    }
}

/// Grafana's rendering of a query for one choice of the variables.
fn substitute(expr: &str, model: &str, pod: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "10s")
        .replace("$__range", "1m")
        .replace("$model", model)
        .replace("$pod", pod);
    assert!(!out.contains('$'), "unknown variable in {expr}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_reads_the_recorded_values_and_every_dashboard_query_returns_data() {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    record_known_traffic(&metrics);
    let admin = serve(Arc::clone(&metrics));
    let prom = Prometheus::start(&[admin.addr]).await;
    prom.wait_for_scrapes(1, 1).await;

    let a = format!("pod=\"{POD_A}\"");
    let b = format!("pod=\"{POD_B}\"");
    let checks: Vec<(String, f64)> = vec![
        (format!("kvgate_requests_total{{model=\"qwen3\",{a},policy=\"precise\",status=\"200\"}}"), 4.0),
        (format!("kvgate_requests_total{{{b},policy=\"load\",status=\"503\"}}"), 1.0),
        ("kvgate_requests_total{pod=\"none\",status=\"413\"}".into(), 1.0),
        ("sum(kvgate_requests_total)".into(), 7.0),
        // Routing accuracy: A predicted 3×96 and got 3×64; B was exact.
        (format!("kvgate_actual_cached_tokens_total{{{a}}} / kvgate_predicted_cached_tokens_total{{{a}}}"), 192.0 / 288.0),
        (format!("kvgate_actual_cached_tokens_total{{{b}}} / kvgate_predicted_cached_tokens_total{{{b}}}"), 1.0),
        ("sum(kvgate_actual_cached_tokens_total) / sum(kvgate_predicted_cached_tokens_total)".into(), 320.0 / 416.0),
        // Prefix hit ratio over the responses that reported usage.
        ("sum(kvgate_actual_cached_tokens_total) / sum(kvgate_prompt_tokens_total)".into(), 320.0 / 640.0),
        ("sum(kvgate_cached_tokens_mispredicted_total{direction=\"over\"})".into(), 96.0),
        (format!("kvgate_cache_unreported_requests_total{{{a}}}"), 1.0),
        (format!("kvgate_cache_unreported_requests_total{{{b}}}"), 0.0),
        ("sum(kvgate_time_to_first_token_seconds_count)".into(), 5.0),
        ("sum(kvgate_request_duration_seconds_count)".into(), 7.0),
        // All TTFTs are 0.3 s: the median interpolates inside the (0.2, 0.35] bucket.
        ("histogram_quantile(0.5, sum by (le) (kvgate_time_to_first_token_seconds_bucket))".into(), 0.275),
        ("kvgate_schedule_duration_seconds_count".into(), 5.0),
        ("kvgate_index_entries".into(), 1000.0),
        ("kvgate_index_blocks".into(), 400.0),
        ("kvgate_index_bytes".into(), 65536.0),
        ("kvgate_index_budget_bytes".into(), 1048576.0),
        ("kvgate_index_evicted_blocks_total".into(), 7.0),
        ("kvgate_index_rejected_stores_total".into(), 1.0),
        ("sum(kvgate_kv_events_total)".into(), 25.0),
        (format!("kvgate_kv_event_batches_total{{{a}}}"), 2.0),
        (format!("kvgate_kv_event_sequence_gaps_total{{{a}}}"), 1.0),
        (format!("kvgate_kv_event_batches_missed_total{{{a}}}"), 3.0),
        (format!("kvgate_kv_event_replays_total{{{a},result=\"ok\"}}"), 1.0),
        (format!("kvgate_kv_event_replays_total{{{b},result=\"failed\"}}"), 1.0),
        (format!("kvgate_kv_events_malformed_total{{{b},reason=\"decode\"}}"), 1.0),
        ("kvgate_kv_events_malformed_total{pod=\"unknown\",reason=\"topic\"}".into(), 1.0),
        (format!("kvgate_hash_parity{{{a}}}"), 1.0),
        (format!("kvgate_hash_parity{{{b}}}"), 0.0),
        (format!("kvgate_pod_events_synced{{{b}}}"), 0.0),
        (format!("kvgate_pod_healthy{{{b}}}"), 0.0),
        ("count(kvgate_pod_healthy == 1)".into(), 2.0),
        (format!("kvgate_pod_requests_running{{{a}}}"), 3.0),
        (format!("kvgate_pod_requests_waiting{{{a}}}"), 1.0),
        (format!("kvgate_pod_kv_usage_ratio{{{a}}}"), 0.5),
        (format!("kvgate_pod_in_flight{{{a}}}"), 2.0),
        ("kvgate_config_reloads_total{result=\"ok\"}".into(), 2.0),
        ("kvgate_config_reloads_total{result=\"failed\"}".into(), 1.0),
        ("kvgate_tls_certificate_reloads_total{result=\"ok\"}".into(), 1.0),
        ("kvgate_downstream_tls_handshake_failures_total".into(), 1.0),
        ("kvgate_config_last_reload_successful".into(), 1.0),
        (
            format!(
                "kvgate_build_info{{version=\"{}\",commit=\"{}\"}}",
                env!("CARGO_PKG_VERSION"),
                env!("KVGATE_COMMIT")
            ),
            1.0,
        ),
        ("kvgate_traffic_policy_applied{policy=\"inference-policy\"}".into(), 1.0),
        ("kvgate_traffic_policy_applied{policy=\"estimation-policy\"}".into(), 0.0),
        ("kvgate_flow_queue_depth{model=\"qwen3\",priority=\"1\"}".into(), 2.0),
        ("sum(kvgate_flow_queue_wait_seconds_count)".into(), 1.0),
        ("sum(kvgate_flow_shed_total)".into(), 2.0),
        (
            "kvgate_disaggregated_requests_total{model=\"qwen3\",path=\"two_legs\"}".into(),
            2.0,
        ),
        (
            "kvgate_disaggregated_requests_total{model=\"qwen3\",path=\"prefill_failed\"}"
                .into(),
            1.0,
        ),
        ("kvgate_prefill_leg_duration_seconds_count".into(), 1.0),
        ("sum(kvgate_relay_peer_up)".into(), 1.0),
        ("kvgate_relay_subscribers".into(), 2.0),
        ("kvgate_relay_batches_sent_total".into(), 3.0),
        ("kvgate_relay_bytes_sent_total".into(), 3000.0),
        ("kvgate_relay_batches_received_total".into(), 3.0),
        ("kvgate_relay_lag_seconds_count".into(), 3.0),
        ("kvgate_relay_snapshots_total{result=\"applied\"}".into(), 1.0),
        ("kvgate_relay_rejected_total{reason=\"unauthenticated\"}".into(), 1.0),
        ("kvgate_relay_secret_reloads_total{result=\"applied\"}".into(), 1.0),
    ];
    for (promql, expected) in &checks {
        prom.wait_for_value(promql, *expected).await;
    }
    let p99 = prom
        .wait_for(
            "histogram_quantile(0.99, sum by (le) (kvgate_schedule_duration_seconds_bucket))",
            |s| s.len() == 1,
        )
        .await;
    assert!(
        (1e-3..=2.5e-3).contains(&p99[0].value),
        "p99 decision latency {p99:?}"
    );
    assert!(admin.scrapes.load(Ordering::SeqCst) >= 1);

    // A pod that leaves takes its series with it (Prometheus marks them stale).
    metrics.forget_pod(addr(POD_C));
    prom.wait_for(&format!("{{pod=\"{POD_C}\"}}"), <[Sample]>::is_empty)
        .await;

    // Live traffic, so that every rate and quantile has something to show.
    let traffic_stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let m = Arc::clone(&metrics);
        let stop = Arc::clone(&traffic_stop);
        async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                for pod in [POD_A, POD_B] {
                    m.request_finished(&RecordTick::request(pod, i));
                    m.event_batch(addr(pod), 4);
                    m.seq_gap(addr(pod), 1);
                    m.replay(addr(pod), i % 2 == 0);
                }
                m.request_finished(&RequestRecord {
                    status: 503,
                    ttft: None,
                    actual_cached: None,
                    ..RecordTick::request(POD_B, i)
                });
                m.malformed_event(Some(addr(POD_A)), "decode");
                m.disaggregated("qwen3", "two_legs");
                m.prefill_leg_finished(&RecordTick::request(POD_A, i));
                m.relay.sent(2, 2048);
                m.relay.received(Some(Duration::from_micros(100 + i % 900)));
                m.relay.snapshot(SnapshotResult::Applied);
                m.relay.rejected("slow");
                m.flow.waited(
                    "qwen3",
                    QueueOutcome::Dispatched,
                    Duration::from_millis(5 + i % 500),
                );
                m.flow.shed("qwen3", ShedReason::QueueFull);
                m.decision_latency(Duration::from_micros(20 + i % 200));
                m.index_stats(IndexSample {
                    entries: 1000 + i,
                    blocks: 400 + i,
                    bytes: 65536,
                    budget_bytes: 1 << 20,
                    evicted_blocks_total: 7 + i,
                    rejected_stores_total: 1 + i / 10,
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    prom.wait_for("sum(rate(kvgate_requests_total[10s]))", |s| {
        s.len() == 1 && s[0].value > 0.0
    })
    .await;
    prom.wait_for_scrapes(1, 8).await;

    // Grafana variables (label_values queries) list the live models and pods.
    let dash = load_dashboard();
    let mut pods = Vec::new();
    for var in dash["templating"]["list"].as_array().expect("templating") {
        let Some(def) = var["definition"].as_str() else {
            continue;
        };
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .expect("label_values(selector, label)");
        let (selector, label) = inner.rsplit_once(',').expect("selector, label");
        let values = prom
            .label_values(label.trim(), selector.trim())
            .await
            .expect("label values");
        match var["name"].as_str() {
            Some("model") => assert_eq!(values, ["qwen3"]),
            Some("pod") => {
                assert!(
                    values.contains(&POD_A.to_string()) && values.contains(&POD_B.to_string()),
                    "{values:?}"
                );
                pods = values;
            }
            other => panic!("unexpected variable {other:?}"),
        }
    }
    assert!(!pods.is_empty());

    // Every panel query returns data, with "All" selected and with one model and pod.
    let one_pod = POD_A.replace('.', "\\\\.");
    let mut failures = Vec::new();
    let all = queries(&dash);
    for (title, ref_id, expr) in &all {
        for (model, pod) in [(".*", ".*"), ("qwen3", one_pod.as_str())] {
            let promql = substitute(expr, model, pod);
            match prom.query(&promql).await {
                Ok(s) if s.iter().any(|x| x.value.is_finite()) => {}
                other => failures.push(format!("{title} [{ref_id}] {promql}: {other:?}")),
            }
        }
    }
    traffic_stop.store(true, Ordering::SeqCst);
    traffic.await.expect("traffic task");
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries returned no data:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} dashboard queries returned data against {}",
        all.len(),
        prom.url()
    );

    admin.stop.send(()).expect("stop");
    drop(prom);
}

struct RecordTick;

impl RecordTick {
    /// A successful request whose latencies and cache figures vary with `i`.
    fn request(pod: &'static str, i: u64) -> RequestRecord<'static> {
        let ms = 50 + (i * 37) % 900;
        RequestRecord {
            ttft: Some(Duration::from_millis(ms)),
            total: Duration::from_millis(ms * 4),
            ..ok_request(
                pod,
                512,
                256 + (i % 5) as usize * 16,
                Some(256 + (i % 3) as usize * 32),
            )
        }
    }
}

/// End to end: real requests through the real gateway, scraped by the real Prometheus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_gateway_serving_traffic_and_reloading() {
    let pods = [upstream::FakePod::start(), upstream::FakePod::start()];
    let addrs: Vec<String> = pods.iter().map(upstream::FakePod::addr).collect();
    let config = upstream::GatewayConfig {
        health_check_interval_ms: 200,
        scrape_interval_ms: 200,
        ..upstream::GatewayConfig::default()
    }
    .with_model("qwen", &addrs);
    let gateway = upstream::Kvgate::start(&config);
    let client = reqwest::Client::new();
    let chat = |i: usize, stream: bool| {
        client
            .post(gateway.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-fake-cached-tokens", "7")
            .body(upstream::chat_body(
                "qwen",
                &format!("question {i}"),
                stream,
            ))
            .send()
    };
    for i in 0..10 {
        let response = chat(i, i < 6).await.expect("request");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let unknown = client
        .post(gateway.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(upstream::chat_body("no-such-model", "hi", false))
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status(), 404);

    let prom = Prometheus::start(&[gateway.admin_addr()]).await;
    prom.wait_for_scrapes(1, 1).await;
    let pod = |i: usize| format!("pod=\"{}\"", addrs[i]);
    let checks: Vec<(String, f64)> = vec![
        (
            "sum(kvgate_requests_total{model=\"qwen\",status=\"200\"})".into(),
            10.0,
        ),
        (
            "kvgate_requests_total{model=\"unknown\",pod=\"none\",status=\"404\"}".into(),
            1.0,
        ),
        (
            "sum(kvgate_time_to_first_token_seconds_count{model=\"qwen\"})".into(),
            6.0,
        ),
        (
            "sum(kvgate_request_duration_seconds_count{model=\"qwen\"})".into(),
            10.0,
        ),
        ("kvgate_schedule_duration_seconds_count".into(), 10.0),
        ("sum(kvgate_actual_cached_tokens_total)".into(), 70.0),
        ("count(kvgate_pod_healthy == 1)".into(), 2.0),
        (format!("kvgate_pod_in_flight{{{}}}", pod(0)), 0.0),
        (format!("kvgate_pod_in_flight{{{}}}", pod(1)), 0.0),
        ("kvgate_index_budget_bytes".into(), f64::from(1u32 << 30)),
        ("kvgate_build_info".into(), 1.0),
    ];
    for (promql, expected) in &checks {
        prom.wait_for_value(promql, *expected).await;
    }
    // The router's prompt token counts are positive wherever a pod reported its cache.
    prom.wait_for("sum(kvgate_prompt_tokens_total) > 0", |s| s.len() == 1)
        .await;

    // A good reload, then a bad one: both counted, the running config stays.
    gateway.reload(&config);
    prom.wait_for("kvgate_config_reloads_total{result=\"ok\"} >= 1", |s| {
        s.len() == 1
    })
    .await;
    gateway.reload(&upstream::GatewayConfig {
        max_attempts: 0,
        ..upstream::GatewayConfig::default()
    });
    prom.wait_for("kvgate_config_reloads_total{result=\"failed\"} >= 1", |s| {
        s.len() == 1
    })
    .await;
    prom.wait_for_value("kvgate_config_last_reload_successful", 0.0)
        .await;
    let response = chat(10, false).await.expect("request");
    assert_eq!(response.status(), 200, "the running config still serves");
}
