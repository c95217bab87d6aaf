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
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use sim::{model_yaml, SimPods};
use upstream::{free_port, http_request, wait_for, FakePod};

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
    fn start(dir: &std::path::Path, events: u16) -> Self {
        let config = dir.join("sim.yaml");
        fs::write(&config, model_yaml("qwen", "[]")).expect("write sim config");
        let events = format!("tcp://127.0.0.1:{events}");
        let buffer = REPLAY_BUFFER.to_string();
        let sim = SimPods::start(
            &config,
            PODS,
            &[
                "--events-connect",
                &events,
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

struct Fleet {
    dir: tempfile::TempDir,
    listen: u16,
    admin: u16,
    events: u16,
    sim: Sim,
    lite: FakePod,
}

impl Fleet {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = free_port();
        let sim = Sim::start(dir.path(), events);
        let lite = FakePod::start_with(&["--model", "qwen-lite"]);
        Self {
            dir,
            listen: free_port(),
            admin: free_port(),
            events,
            sim,
            lite,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("kvgate.yaml")
    }

    fn upgrade_sock(&self) -> PathBuf {
        self.dir.path().join("upgrade.sock")
    }

    /// Writes the config atomically (rename), as editors and ConfigMaps do.
    fn write_config(&self, v: &Variant) {
        let tmp = self.dir.path().join("kvgate.yaml.tmp");
        fs::write(&tmp, self.render(v)).expect("write config");
        fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    fn render(&self, v: &Variant) -> String {
        let pods = self
            .sim
            .pods
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
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:{admin}
  maxAttempts: {attempts}
  connectTimeoutMs: 1000
  responseTimeoutMs: 30000
  healthCheckIntervalMs: 0
  scrapeIntervalMs: 0
  threads: 2
events:
  mode: bind
  bind: tcp://127.0.0.1:{events}
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
            listen = self.listen,
            admin = self.admin,
            attempts = v.max_attempts,
            events = self.events,
            level = v.level,
            kv = v.kv_weight,
        );
        out.push_str(&model_yaml("qwen", &format!("[{pods}]")));
        if v.lite_model {
            let lite = model_yaml(
                "qwen-lite",
                &format!("[{{http: \"{}\", topicHost: lite}}]", self.lite.addr()),
            );
            out.push_str(lite.trim_start_matches("models:\n"));
        }
        out
    }

    fn admin_get(&self, path: &str) -> (u16, String) {
        let (status, body) = http_request(self.admin, "GET", path, &[], b"");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn reloads(&self) -> (f64, f64) {
        (
            self.metric("kvgate_config_reloads_total{result=\"ok\"}"),
            self.metric("kvgate_config_reloads_total{result=\"failed\"}"),
        )
    }

    /// The `qwen` pods as `/debug/pods` shows them.
    fn debug_pods(&self) -> Vec<Value> {
        let (_, body) = self.admin_get("/debug/pods");
        let v: Value = serde_json::from_str(&body).expect("debug pods JSON");
        v["models"]["qwen"].as_array().cloned().unwrap_or_default()
    }
}

/// One `kvgate serve` process; its JSON log goes to a file.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn start(fleet: &Fleet, generation: usize, upgrade: bool) -> Self {
        let log = fleet.dir.path().join(format!("kvgate-{generation}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_kvgate"));
        command
            .arg("serve")
            .arg("--config")
            .arg(fleet.config_path())
            .arg("--upgrade-sock")
            .arg(fleet.upgrade_sock())
            .args(["--grace-period-secs", "30"]);
        if upgrade {
            command.arg("--upgrade");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start kvgate");
        Self { child, log }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    fn find(&self, message: &str) -> Option<Value> {
        self.lines()
            .into_iter()
            .find(|l| l["fields"]["message"] == message)
    }

    fn wait_log(&mut self, message: &str) -> Value {
        wait_for(&format!("log line {message:?}"), STEP_LIMIT, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kvgate exited ({status}):\n{}", self.log_text());
            }
            self.find(message)
        })
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    fn wait_exit(&mut self, limit: Duration) {
        wait_for("the old kvgate to drain and exit", limit, || {
            self.child.try_wait().ok().flatten()
        });
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log_text());
        }
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

/// `Request handled` figures of one request: prompt, predicted and reported cached tokens.
type Handled = std::collections::HashMap<String, (u64, u64, u64)>;

fn hit_rate(outcomes: &[Outcome], handled: &Handled, from: Duration, to: Duration) -> HitRate {
    let (mut prompt, mut predicted, mut actual, mut requests) = (0, 0, 0, 0);
    for o in outcomes.iter().filter(|o| o.start >= from && o.start < to) {
        if let Some((p, pc, ac)) = handled.get(&o.id) {
            prompt += p;
            predicted += pc;
            actual += ac;
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
    fleet.write_config(variant);
    if by_signal {
        gateway.signal("HUP");
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
fn upgrade(fleet: &Fleet, old: &mut Gateway, generation: usize) -> (Gateway, Instant) {
    let mut new = Gateway::start(fleet, generation, true);
    new.wait_log("waiting for the running kvgate to hand over its state");
    old.signal("QUIT");
    new.wait_log("kvgate ready");
    let ready = Instant::now();
    let sent = old.wait_log("state handed over to the new process");
    let taken =
        new.wait_log("block index and KV event streams taken over from the previous process");
    assert!(sent["fields"]["entries"].as_u64() > Some(0), "{sent}");
    assert_eq!(
        taken["fields"]["entries"], sent["fields"]["entries"],
        "every index entry was handed over: {sent} {taken}"
    );
    assert_eq!(taken["fields"]["skipped"], 0, "{taken}");
    assert_eq!(taken["fields"]["publishers"], json!(PODS), "{taken}");
    old.wait_exit(Duration::from_secs(60));
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
    let fleet = Fleet::start();
    let mut variant = Variant::default();
    fleet.write_config(&variant);
    let mut gateway = Gateway::start(&fleet, 0, false);
    gateway.wait_log("kvgate ready");

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
            refused["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("no-such-scorer")),
            "{refused}"
        );
        // The file is put right again without a reload: the running config serves on.
        fleet.write_config(&variant);
    });
    let mut generation = 1;
    let mut took_over = Vec::new();
    step("upgrade 1", &mut || {
        let ready;
        (gateway, ready) = upgrade(&fleet, &mut gateway, generation);
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
        (gateway, ready) = upgrade(&fleet, &mut gateway, generation);
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
            if f["message"] == "Request handled" {
                if let (Some(id), Some(p)) = (f["request_id"].as_str(), f["prompt_tokens"].as_u64())
                {
                    let predicted = f["predicted_cached_tokens"].as_u64().unwrap_or(0);
                    let actual = f["actual_cached_tokens"].as_u64().unwrap_or(0);
                    handled.insert(id.to_string(), (p, predicted, actual));
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
