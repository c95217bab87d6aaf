//! The proof under load: sustained streaming traffic through the real `kvgate serve`
//! while its config is reloaded five times (one of them a bad config) and the process
//! is replaced twice by graceful upgrade (`kvgate serve -u`, then SIGQUIT to the old
//! one, Pingora's procedure).
//!
//! Pods are `kvgate sim` pods: they cache prompt blocks, report
//! `usage.prompt_tokens_details.cached_tokens`, and publish their KV events over
//! ZeroMQ to kvgate's bound SUB, with a replay ROUTER each. Requests reuse a set of
//! shared documents, so where they are sent decides how much of each prompt is a
//! cache hit. An upgrade that lost the index, or the event streams, would show as a
//! lower hit rate afterwards (and as pods whose entries were dropped).
//!
//! Checked: no request fails (status, complete SSE stream, no connection error); the
//! bad config is refused, counted, and the old config keeps serving; models can be
//! added and removed by reload; each upgrade hands every index entry and every event
//! stream to the new process, whose streams resume in sequence (a gap opened during
//! the switch is replayed, nothing is dropped); the hit rate after equals the hit
//! rate before. Printed: request rate, failures, p50/p99 latency at steady state and
//! during each switch, hit rates.

// Shared with the other tests that run `kvgate sim` pods, which use more of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use sim::{model_yaml, SimPods};
use upstream::{
    debug_pods, http_request, metric, scores, totals_weighted_by, wait_for, FakePod, Serve,
};

/// Target request rate of the load (the goal is at least 100/s).
const RATE: f64 = 125.0;
/// Upper bound on requests, whatever happens to the switches.
const MAX_REQUESTS: usize = 20_000;
const PODS: usize = 4;
/// Shared documents: enough that a new process without the index would take seconds
/// to relearn where each one is cached.
const DOCS: usize = 64;
/// How long after an upgrade the new process's hit rate is measured.
const TAKEOVER_WINDOW: Duration = Duration::from_secs(3);
/// Steady-state traffic before the first switch and after the last.
const STEADY: Duration = Duration::from_secs(4);
const STEP_LIMIT: Duration = Duration::from_secs(90);
/// Batches each simulated pod keeps for replay.
const REPLAY_BUFFER: usize = 500;

/// The knobs the reloads turn.
#[derive(Clone)]
struct Variant {
    kv_weight: u32,
    max_attempts: u32,
    level: &'static str,
    lite_model: bool,
    broken: bool,
}

impl Default for Variant {
    fn default() -> Self {
        Self {
            kv_weight: 2,
            max_attempts: 3,
            level: "info",
            lite_model: false,
            broken: false,
        }
    }
}

/// The model's pods, as (HTTP address, topic host, replay endpoint).
struct Sim {
    _pods: SimPods,
    pods: Vec<(String, String, String)>,
}

impl Sim {
    fn start(dir: &std::path::Path, events: &str) -> Self {
        let config = dir.join("sim.yaml");
        fs::write(&config, model_yaml("qwen", "[]")).expect("write sim config");
        let buffer = REPLAY_BUFFER.to_string();
        let sim = SimPods::start(
            &config,
            PODS,
            &[
                "--events-connect",
                events,
                "--replay-base-port",
                "0",
                "--time-scale",
                "0.25",
                // A replay buffer that covers the seconds of a switch, not the pods' whole
                // history: a new process that only replayed would start cold.
                "--buffer-steps",
                &buffer,
            ],
        );
        let pods = (0..PODS)
            .map(|i| {
                (
                    sim.field(i, "http").to_string(),
                    sim.topic_host(i, "qwen").to_string(),
                    sim.field(i, "replayEndpoint").to_string(),
                )
            })
            .collect();
        Self { _pods: sim, pods }
    }
}

/// Every port is the OS's pick: the first process binds port 0 and reports what it got;
/// each upgraded process inherits the listening sockets (its config still says port 0,
/// the key they are handed over under) and binds the event SUB on the port the first
/// one got, where the pods keep connecting.
struct Fleet {
    dir: tempfile::TempDir,
    listen: u16,
    admin: u16,
    events: String,
    sim: Sim,
    lite: FakePod,
}

impl Fleet {
    /// Starts the first gateway (no pods yet: they need its event port), then the pods,
    /// then names them in a reload.
    fn start(variant: &Variant) -> (Self, Gateway) {
        let dir = tempfile::tempdir().expect("tempdir");
        let lite = FakePod::start_with(&["--model", "qwen-lite"]);
        let first = dir.path().join(config_name(0));
        fs::write(&first, render(variant, "tcp://127.0.0.1:0", &[], &lite)).expect("config");
        let mut gateway = Gateway::start(dir.path(), 0, false);
        let listening = gateway.serve.listening(STEP_LIMIT);
        let events = listening.events.expect("a bound event SUB");
        let sim = Sim::start(dir.path(), &events);
        let fleet = Self {
            dir,
            listen: listening.proxy,
            admin: listening.admin,
            events,
            sim,
            lite,
        };
        reload_and_wait(&fleet, &gateway, variant, true, true);
        (fleet, gateway)
    }

    /// Writes `gateway`'s config atomically (rename), as editors and ConfigMaps do.
    fn write_config(&self, gateway: &Gateway, v: &Variant) {
        let events = if gateway.generation == 0 {
            "tcp://127.0.0.1:0"
        } else {
            &self.events
        };
        let text = render(v, events, &self.sim.pods, &self.lite);
        let tmp = self.dir.path().join("kvgate.yaml.tmp");
        fs::write(&tmp, text).expect("write config");
        fs::rename(&tmp, self.dir.path().join(config_name(gateway.generation)))
            .expect("rename config");
    }

    /// The config of a new generation, before it starts.
    fn write_next(&self, generation: usize, v: &Variant) {
        let text = render(v, &self.events, &self.sim.pods, &self.lite);
        fs::write(self.dir.path().join(config_name(generation)), text).expect("config");
    }

    fn reloads(&self) -> (f64, f64) {
        (
            metric(self.admin, "kvgate_config_reloads_total{result=\"ok\"}"),
            metric(self.admin, "kvgate_config_reloads_total{result=\"failed\"}"),
        )
    }

    /// The `qwen` pods as `/debug/pods` shows them.
    fn debug_pods(&self) -> Vec<Value> {
        debug_pods(self.admin, "qwen")
    }
}

fn config_name(generation: usize) -> String {
    format!("kvgate-{generation}.yaml")
}

fn render(v: &Variant, events: &str, pods: &[(String, String, String)], lite: &FakePod) -> String {
    let pods = pods
        .iter()
        .map(|(http, topic, replay)| {
            format!("{{http: \"{http}\", topicHost: \"{topic}\", replay: \"{replay}\"}}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let scorer = if v.broken {
        "no-such-scorer"
    } else {
        "kv-cache"
    };
    let mut out = format!(
        "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  maxAttempts: {attempts}
  connectTimeoutMs: 1000
  responseTimeoutMs: 30000
  healthCheckIntervalMs: 0
  scrapeIntervalMs: 0
  threads: 2
events:
  mode: bind
  bind: {events}
  replay: true
logging:
  level: \"{level}\"
  format: json
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: {scorer}, weight: {kv}}}, {{name: load, weight: 1}}]
    picker: {{name: max-score}}
",
        attempts = v.max_attempts,
        level = v.level,
        kv = v.kv_weight,
    );
    out.push_str(&model_yaml("qwen", &format!("[{pods}]")));
    if v.lite_model {
        let lite = model_yaml(
            "qwen-lite",
            &format!("[{{http: \"{}\", topicHost: lite}}]", lite.addr()),
        );
        out.push_str(lite.trim_start_matches("models:\n"));
    }
    out
}

/// One `kvgate serve` process of a generation; its JSON log goes to a file.
struct Gateway {
    serve: Serve,
    generation: usize,
}

impl Gateway {
    fn start(dir: &std::path::Path, generation: usize, upgrade: bool) -> Self {
        let serve = Serve::spawn_upgradable(
            &dir.join(config_name(generation)),
            &dir.join(format!("kvgate-{generation}.log")),
            &dir.join("upgrade.sock"),
            30,
            upgrade,
        );
        Self { serve, generation }
    }

    fn wait_log(&mut self, message: &str) -> Value {
        self.serve.wait_log(message, STEP_LIMIT)
    }
}

/// A chat request over document `doc`, asking question `n`.
fn chat(doc: usize, n: usize) -> String {
    const WORDS: [&str; 16] = [
        "cache", "prefix", "router", "block", "token", "engine", "replica", "stream", "batch",
        "index", "event", "shard", "policy", "weight", "pod", "model",
    ];
    let text: Vec<&str> = (0..90)
        .map(|k| WORDS[(doc * 7 + k * 5 + k * k) % WORDS.len()])
        .collect();
    json!({
        "model": "qwen",
        "messages": [
            {"role": "system", "content": format!("Reference document {doc}: {}", text.join(" "))},
            {"role": "user", "content": format!("Question {n:05}: what does the document say about item {:02}?", n % 97)},
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 6,
    })
    .to_string()
}

/// What one request of the load saw.
struct Outcome {
    id: String,
    start: Duration,
    total: Duration,
    error: Option<String>,
}

async fn one_request(client: reqwest::Client, url: String, n: usize, epoch: Instant) -> Outcome {
    let id = format!("load-{n}");
    let started = Instant::now();
    let result = async {
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-request-id", &id)
            .body(chat(n % DOCS, n))
            .send()
            .await
            .map_err(|e| format!("send: {e:?}"))?;
        let status = response.status();
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(|e| format!("body: {e:?}"))?);
        }
        let text = String::from_utf8_lossy(&body);
        if status != 200 {
            return Err(format!("status {status}: {text}"));
        }
        if !text.trim_end().ends_with("data: [DONE]") {
            return Err(format!("stream cut short: {text}"));
        }
        Ok(())
    }
    .await;
    Outcome {
        id,
        start: started - epoch,
        total: started.elapsed(),
        error: result.err(),
    }
}

/// Sends requests at `RATE` until `stop`, then waits for the ones in flight.
async fn load(url: String, stop: Arc<AtomicBool>, epoch: Instant) -> Vec<Outcome> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        ticker.tick().await;
        tasks.spawn(one_request(client.clone(), url.clone(), n, epoch));
    }
    let mut outcomes = Vec::new();
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.expect("request task"));
    }
    outcomes
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A switch and when it happened, relative to the load's start.
struct Switch {
    name: &'static str,
    from: Duration,
    to: Duration,
}

/// Cached over prompt tokens of the requests started in [from, to): as the pods
/// reported them (`actual`), and as kvgate predicted them.
struct HitRate {
    actual: f64,
    predicted: f64,
    requests: usize,
}

/// The `Request handled` line (its fields) of each request, by request id.
type Handled = std::collections::HashMap<String, Value>;

fn hit_rate(outcomes: &[Outcome], handled: &Handled, from: Duration, to: Duration) -> HitRate {
    let (mut prompt, mut predicted, mut actual, mut requests) = (0, 0, 0, 0);
    let count = |line: &Value, field: &str| line[field].as_u64().unwrap_or(0);
    for o in outcomes.iter().filter(|o| o.start >= from && o.start < to) {
        if let Some(line) = handled.get(&o.id) {
            prompt += count(line, "prompt_tokens");
            predicted += count(line, "predicted_cached_tokens");
            actual += count(line, "actual_cached_tokens");
            requests += 1;
        }
    }
    HitRate {
        actual: actual as f64 / prompt.max(1) as f64,
        predicted: predicted as f64 / prompt.max(1) as f64,
        requests,
    }
}

/// Writes `variant` (an atomic rename, which the file watch sees), sends SIGHUP when
/// `by_signal` (a signal and the watch may then both reload: at least one must), and
/// waits for the outcome in the metrics.
fn reload_and_wait(
    fleet: &Fleet,
    gateway: &Gateway,
    variant: &Variant,
    by_signal: bool,
    expect_ok: bool,
) {
    let (ok, failed) = fleet.reloads();
    fleet.write_config(gateway, variant);
    if by_signal {
        gateway.serve.signal("HUP");
    }
    wait_for("the reload's outcome in the metrics", STEP_LIMIT, || {
        let (now_ok, now_failed) = fleet.reloads();
        if expect_ok {
            assert_eq!(now_failed, failed, "a good config was refused");
            (now_ok > ok).then_some(())
        } else {
            assert_eq!(now_ok, ok, "a bad config was applied");
            (now_failed > failed).then_some(())
        }
    });
    // The other trigger's reload of the same file may still be under way.
    let mut last = fleet.reloads();
    let mut stable_since = Instant::now();
    wait_for("the reloads to settle", STEP_LIMIT, || {
        thread::sleep(Duration::from_millis(250));
        let now = fleet.reloads();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        (stable_since.elapsed() > Duration::from_secs(3)).then_some(())
    });
    let (now_ok, now_failed) = last;
    if expect_ok {
        assert_eq!(now_failed, failed, "a good config was refused");
    } else {
        assert_eq!(now_ok, ok, "a bad config was applied");
    }
}

/// Upgrades `old` to a new process; returns it, once the old one has exited, with the
/// time it became ready to take traffic.
fn upgrade(
    fleet: &Fleet,
    old: &mut Gateway,
    generation: usize,
    variant: &Variant,
) -> (Gateway, Instant) {
    fleet.write_next(generation, variant);
    let mut new = Gateway::start(fleet.dir.path(), generation, true);
    new.wait_log("waiting for the running kvgate to hand over its state");
    old.serve.signal("QUIT");
    new.wait_log("kvgate ready");
    let ready = Instant::now();
    let listening = new.serve.listening(STEP_LIMIT);
    assert_eq!(
        (listening.proxy, listening.admin),
        (fleet.listen, fleet.admin),
        "the listening sockets were handed over"
    );
    let sent = old.wait_log("state handed over to the new process");
    let taken =
        new.wait_log("block index and KV event streams taken over from the previous process");
    assert!(sent["entries"].as_u64() > Some(0), "{sent}");
    assert_eq!(
        taken["entries"], sent["entries"],
        "every index entry was handed over: {sent} {taken}"
    );
    assert_eq!(taken["skipped"], 0, "{taken}");
    assert_eq!(taken["publishers"], json!(PODS), "{taken}");
    old.serve.wait_exit(Duration::from_secs(60));
    (new, ready)
}

/// The new process follows every pod's events on from the handed-over positions:
/// each pod is synced, has applied batches, and none of its entries were dropped
/// for lost events or a restart. Returns the gaps the switch opened (all replayed).
fn streams_resumed(fleet: &Fleet) -> u64 {
    let pods = wait_for("every pod's event stream to resume", STEP_LIMIT, || {
        let pods = fleet.debug_pods();
        (pods.len() == PODS
            && pods.iter().all(|p| {
                p["events"] == "synced"
                    && p["event_batches"].as_u64() > Some(0)
                    && p["event_replays_ok"] == p["event_gaps"]
            }))
        .then_some(pods)
    });
    for p in &pods {
        assert_eq!(p["events_lost"], 0, "{p}");
        assert_eq!(p["event_restarts"], 0, "{p}");
    }
    pods.iter()
        .map(|p| p["event_gaps"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn reloads_and_upgrades_under_load_lose_no_request_and_keep_the_index() {
    let mut variant = Variant::default();
    let (fleet, mut gateway) = Fleet::start(&variant);

    // Each pod has served a share of the documents: it caches their blocks and says so.
    for doc in 0..DOCS {
        let (http, _, _) = &fleet.sim.pods[doc % PODS];
        let port = http
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("pod port");
        let (status, body) = http_request(
            port,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            chat(doc, 0).as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    wait_for("the pods' events to reach the index", STEP_LIMIT, || {
        let pods = fleet.debug_pods();
        let stored: u64 = pods
            .iter()
            .map(|p| p["blocks_stored"].as_u64().unwrap_or(0))
            .sum();
        (stored > 0 && pods.iter().all(|p| p["events"] == "synced")).then_some(())
    });

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", fleet.listen);
    let traffic = runtime.spawn(load(url, Arc::clone(&stop), epoch));

    let mut switches = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut()| {
        let from = epoch.elapsed();
        f();
        switches.push(Switch {
            name,
            from,
            to: epoch.elapsed(),
        });
    };
    thread::sleep(STEADY);

    step("reload 1: weights (SIGHUP)", &mut || {
        variant.kv_weight = 3;
        reload_and_wait(&fleet, &gateway, &variant, true, true);
    });
    step("reload 2: bad config refused (SIGHUP)", &mut || {
        let broken = Variant {
            broken: true,
            ..variant.clone()
        };
        reload_and_wait(&fleet, &gateway, &broken, true, false);
        let refused = gateway.wait_log("config reload refused; the running config stays in effect");
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.contains("no-such-scorer")),
            "{refused}"
        );
    });
    let mut generation = 1;
    let mut took_over = Vec::new();
    step("upgrade 1", &mut || {
        let ready;
        (gateway, ready) = upgrade(&fleet, &mut gateway, generation, &variant);
        took_over.push(ready - epoch);
        generation += 1;
    });
    let mut gaps = streams_resumed(&fleet);
    step("reload 3: model added (file watch)", &mut || {
        variant.lite_model = true;
        reload_and_wait(&fleet, &gateway, &variant, false, true);
    });
    let lite = json!({"model": "qwen-lite", "messages": [{"role": "user", "content": "hi"}]});
    let lite_status = || {
        http_request(
            fleet.listen,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            lite.to_string().as_bytes(),
        )
        .0
    };
    assert_eq!(lite_status(), 200, "the added model is served");
    step("reload 4: tunables and log level (SIGHUP)", &mut || {
        variant.max_attempts = 2;
        variant.level = "info,kvgate::discovery=debug";
        reload_and_wait(&fleet, &gateway, &variant, true, true);
    });
    step("upgrade 2", &mut || {
        let ready;
        (gateway, ready) = upgrade(&fleet, &mut gateway, generation, &variant);
        took_over.push(ready - epoch);
        generation += 1;
    });
    gaps += streams_resumed(&fleet);
    step("reload 5: model removed (file watch)", &mut || {
        variant.lite_model = false;
        reload_and_wait(&fleet, &gateway, &variant, false, true);
    });
    assert_eq!(lite_status(), 404, "the removed model is gone");

    thread::sleep(STEADY);
    stop.store(true, Ordering::Relaxed);
    let outcomes = runtime.block_on(traffic).expect("load task");
    let elapsed = epoch.elapsed();
    drop(runtime);

    // Every process's `Request handled` lines: prompt, predicted and reported cached tokens.
    let mut handled = Handled::new();
    for g in 0..generation {
        let text = fs::read_to_string(fleet.dir.path().join(format!("kvgate-{g}.log")))
            .unwrap_or_default();
        for line in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let f = &line["fields"];
            if f["message"] == "Request handled" && f["prompt_tokens"].is_u64() {
                if let Some(id) = f["request_id"].as_str() {
                    handled.insert(id.to_string(), f.clone());
                }
            }
        }
    }

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    let first = switches.first().map_or(elapsed, |s| s.from);
    let last = switches.last().map_or(Duration::ZERO, |s| s.to);
    let steady = |from: Duration, to: Duration| {
        outcomes
            .iter()
            .filter(|o| o.start >= from && o.start < to)
            .map(|o| o.total)
            .collect::<Vec<_>>()
    };
    let before = steady(Duration::from_secs(1), first);
    let hit_before = hit_rate(&outcomes, &handled, Duration::from_secs(1), first);
    let hit_after = hit_rate(&outcomes, &handled, last, elapsed);
    let hit_takeovers: Vec<HitRate> = took_over
        .iter()
        .map(|&t| hit_rate(&outcomes, &handled, t, t + TAKEOVER_WINDOW))
        .collect();

    println!(
        "requests: {} in {:.1} s ({:.0} req/s), failed: {}",
        outcomes.len(),
        elapsed.as_secs_f64(),
        outcomes.len() as f64 / elapsed.as_secs_f64(),
        failed.len()
    );
    println!(
        "steady before: p50 {:.1} ms, p99 {:.1} ms ({} requests)",
        ms(percentile(before.clone(), 50.0)),
        ms(percentile(before.clone(), 99.0)),
        before.len()
    );
    for s in &switches {
        let during = steady(s.from, s.to);
        println!(
            "{:<42} {:>5.1} s  p50 {:>6.1} ms  p99 {:>6.1} ms  ({} requests)",
            s.name,
            (s.to - s.from).as_secs_f64(),
            ms(percentile(during.clone(), 50.0)),
            ms(percentile(during.clone(), 99.0)),
            during.len()
        );
    }
    let all_switches: Vec<Duration> = switches.iter().flat_map(|s| steady(s.from, s.to)).collect();
    println!(
        "all switches: p99 {:.1} ms; event gaps opened by the upgrades: {gaps}, all replayed",
        ms(percentile(all_switches, 99.0)),
    );
    let windows = [("before the switches", &hit_before)]
        .into_iter()
        .chain(
            hit_takeovers
                .iter()
                .map(|h| ("in a new process's first 3 s", h)),
        )
        .chain([("after the switches", &hit_after)]);
    for (name, h) in windows {
        println!(
            "hit rate {name}: {:.3} reported by the pods, {:.3} predicted by kvgate ({} requests)",
            h.actual, h.predicted, h.requests
        );
    }
    for f in failed.iter().take(10) {
        println!("failed {} at {:?}: {:?}", f.id, f.start, f.error);
    }

    // Reload 1 took effect on the requests after it: every pod's total is 2 × kv-cache +
    // load before it, 3 × kv-cache + load after it (through the upgrades, to the end).
    let weighted = |from: Duration, to: Duration, kv: f64| {
        let lines: Vec<&Value> = outcomes
            .iter()
            .filter(|o| o.start >= from && o.start < to)
            .filter_map(|o| handled.get(&o.id))
            .collect();
        assert!(!lines.is_empty(), "no request between {from:?} and {to:?}");
        for line in &lines {
            assert!(
                totals_weighted_by(line, &[("kv-cache", kv), ("load", 1.0)]),
                "kv-cache weight {kv} expected: {line}"
            );
        }
        // Lines where the weight shows (a pod with cached blocks) tell 2 from 3.
        assert!(
            lines.iter().any(|line| scores(line).iter().any(|pod| pod
                .parts
                .iter()
                .any(|(name, score)| name == "kv-cache" && *score > 0.05))),
            "no cache score to weigh between {from:?} and {to:?}"
        );
    };
    weighted(Duration::ZERO, switches[0].from, 2.0);
    weighted(switches[0].to, elapsed, 3.0);

    assert!(failed.is_empty(), "{} requests failed", failed.len());
    assert!(
        outcomes.len() as f64 / elapsed.as_secs_f64() >= 100.0,
        "the load must reach 100 req/s"
    );
    assert!(
        hit_before.actual > 0.5,
        "the index routes the load: {}",
        hit_before.actual
    );
    for h in hit_takeovers.iter().chain([&hit_after]) {
        assert!(
            (h.actual - hit_before.actual).abs() < 0.05,
            "hit rate before {}, then {} over {} requests",
            hit_before.actual,
            h.actual,
            h.requests
        );
    }
}
