//! The proof under load: sustained streaming traffic through the real `kvgate serve`
//! while its config is reloaded five times (one of them a bad config) and the process
//! is replaced twice by graceful upgrade (`kvgate serve -u`, then SIGQUIT to the old
//! one, Pingora's procedure).
//!
//! Pods are fake vLLM pods (`upstream/fake_vllm.py`) that publish real KV events over
//! ZeroMQ: before the load, each publishes BlockStored for the prompts of the shared
//! documents it "served", with the block hashes kvgate's own hasher computes for them
//! (the parity check re-hashes the token ids, so the events must be right). Requests
//! then reuse those documents, so the index decides where they go. An upgrade that
//! lost the index would show as a drop of the predicted hit rate afterwards.
//!
//! Checked: no request fails (status, complete SSE stream, no connection error); the
//! bad config is refused, counted, and the old config keeps serving; models can be
//! added and removed by reload; each upgrade hands the whole index and every event
//! stream to the new process, which goes on applying the pods' next batches in
//! sequence; the hit rate after equals the hit rate before. Printed: request rate,
//! failures, p50/p99 latency at steady state and during each switch, hit rates.

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
use kvgate::config::Config;
use kvgate::hash::{BlockHasher, ExtraKeys};
use kvgate::tokenize::{parse_request, Endpoint, ModelTokenizer};
use serde_json::{json, Value};
use upstream::{free_port, http_request, wait_for, FakePod, TOKENIZER_DIR};

/// Target request rate of the load (the goal is at least 100/s).
const RATE: f64 = 125.0;
/// Upper bound on requests, whatever happens to the switches.
const MAX_REQUESTS: usize = 20_000;
const PODS: usize = 4;
const DOCS: usize = 8;
const BLOCK: usize = 16;
/// Steady-state traffic before the first switch and after the last.
const STEADY: Duration = Duration::from_secs(4);
const STEP_LIMIT: Duration = Duration::from_secs(90);

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

struct Fleet {
    dir: tempfile::TempDir,
    listen: u16,
    admin: u16,
    events: u16,
    pods: Vec<FakePod>,
    lite: FakePod,
}

impl Fleet {
    fn start() -> Self {
        let events = free_port();
        let zmq = format!("tcp://127.0.0.1:{events}");
        let pods = (0..PODS)
            .map(|i| {
                let host = format!("pod{i}");
                FakePod::start_with(&["--model", "qwen", "--zmq", &zmq, "--topic-host", &host])
            })
            .collect();
        let lite = FakePod::start_with(&["--model", "qwen-lite"]);
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            listen: free_port(),
            admin: free_port(),
            events,
            pods,
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
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{{http: \"{}\", topicHost: pod{i}}}", p.addr()))
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
  replay: false
logging:
  level: \"{level}\"
  format: json
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: {scorer}, weight: {kv}}}, {{name: load, weight: 1}}]
    picker: {{name: max-score}}
models:
  - name: qwen
    tokenizer: {TOKENIZER_DIR}/tokenizer.json
    tokenizerConfig: {TOKENIZER_DIR}/tokenizer_config.json
    blockSize: {BLOCK}
    hashAlgo: sha256_cbor
    hashSeed: \"0\"
    vllmRelease: \"0.11.0\"
    discovery: {{static: {{pods: [{pods}]}}}}
",
            listen = self.listen,
            admin = self.admin,
            attempts = v.max_attempts,
            events = self.events,
            level = v.level,
            kv = v.kv_weight,
        );
        if v.lite_model {
            out.push_str(&format!(
                "  - name: qwen-lite
    tokenizer: {TOKENIZER_DIR}/tokenizer.json
    tokenizerConfig: {TOKENIZER_DIR}/tokenizer_config.json
    blockSize: {BLOCK}
    hashAlgo: sha256_cbor
    hashSeed: \"0\"
    vllmRelease: \"0.11.0\"
    discovery: {{static: {{pods: [{{http: \"{}\", topicHost: lite}}]}}}}
",
                self.lite.addr()
            ));
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
            {"role": "user", "content": format!("Question {n}: what does the document say about item {}?", n % 97)},
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 6,
    })
    .to_string()
}

/// The BlockStored event a pod would publish after serving `body`: every full block.
fn stored_event(config: &Config, tokenizer: &ModelTokenizer, body: &str) -> (Value, usize) {
    let model = &config.models[0];
    let request = parse_request(Endpoint::ChatCompletions, body.as_bytes()).expect("request");
    let tokens = tokenizer.tokens(&request).expect("tokens");
    let hasher = BlockHasher::new(&model.hash_settings()).expect("hasher");
    let mut hashes = Vec::new();
    hasher.hash_prompt(&tokens, &ExtraKeys::default(), &mut hashes);
    let full = hashes.len();
    let keys: Vec<u64> = hashes.iter().map(|h| h.key).collect();
    let token_ids = &tokens[..full * BLOCK];
    let event = json!(["BlockStored", keys, null, token_ids, BLOCK, null, "GPU"]);
    (event, full)
}

fn publish(pod: &FakePod, events: &[Value]) {
    let body = json!({ "events": events }).to_string();
    let (status, answer) = http_request(pod.port, "POST", "/_test/publish", &[], body.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
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
            .header("x-fake-tokens", "6")
            .header("x-fake-delay-ms", "4")
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

/// Predicted-cached over prompt tokens of the requests started in [from, to).
fn hit_rate(
    outcomes: &[Outcome],
    handled: &std::collections::HashMap<String, (u64, u64)>,
    from: Duration,
    to: Duration,
) -> (f64, usize) {
    let (mut cached, mut prompt, mut n) = (0, 0, 0);
    for o in outcomes.iter().filter(|o| o.start >= from && o.start < to) {
        if let Some((p, c)) = handled.get(&o.id) {
            prompt += p;
            cached += c;
            n += 1;
        }
    }
    (cached as f64 / prompt.max(1) as f64, n)
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

/// Upgrades `old` to a new process; returns it.
fn upgrade(fleet: &Fleet, old: &mut Gateway, generation: usize, published: usize) -> Gateway {
    let mut new = Gateway::start(fleet, generation, true);
    new.wait_log("waiting for the running kvgate to hand over its state");
    old.signal("QUIT");
    new.wait_log("kvgate ready");
    let taken =
        new.wait_log("block index and KV event streams taken over from the previous process");
    assert_eq!(
        taken["fields"]["blocks"],
        json!(published),
        "the whole index was handed over: {taken}"
    );
    assert_eq!(taken["fields"]["publishers"], json!(PODS), "{taken}");
    old.wait_exit(Duration::from_secs(60));
    new
}

/// Each pod publishes one more batch: the new process must apply it in sequence
/// (no gap, pods stay synced). Returns the blocks now published in total.
fn pods_go_on_publishing(
    fleet: &Fleet,
    config: &Config,
    tokenizer: &ModelTokenizer,
    round: usize,
    published: usize,
) -> usize {
    // The pods' PUB sockets reconnect to the new process's SUB every 100 ms.
    thread::sleep(Duration::from_millis(500));
    let before: u64 = fleet
        .debug_pods()
        .iter()
        .map(|p| p["blocks_stored"].as_u64().unwrap_or(0))
        .sum();
    let mut added = 0;
    for (i, pod) in fleet.pods.iter().enumerate() {
        let (event, blocks) = stored_event(config, tokenizer, &chat(100 + round * PODS + i, 0));
        publish(pod, &[event]);
        added += blocks;
    }
    wait_for(
        "the new process to apply the pods' next batches",
        STEP_LIMIT,
        || {
            let pods = fleet.debug_pods();
            let stored: u64 = pods
                .iter()
                .map(|p| p["blocks_stored"].as_u64().unwrap_or(0))
                .sum();
            (stored == before + added as u64).then_some(pods)
        },
    )
    .iter()
    .for_each(|p| {
        assert_eq!(p["events"], "synced", "{p}");
        assert_eq!(p["event_gaps"], 0, "{p}");
    });
    published + added
}

#[test]
fn reloads_and_upgrades_under_load_lose_no_request_and_keep_the_index() {
    let fleet = Fleet::start();
    let mut variant = Variant::default();
    fleet.write_config(&variant);
    let config = Config::load(&fleet.config_path()).expect("config");
    let model = &config.models[0];
    let tokenizer = ModelTokenizer::load(
        &model.tokenizer,
        model.tokenizer_config.as_deref(),
        model.chat_template.as_deref(),
    )
    .expect("tokenizer");

    let mut gateway = Gateway::start(&fleet, 0, false);
    gateway.wait_log("kvgate ready");

    // Each pod has served the documents it holds: it announces their blocks. Its PUB
    // socket reconnects to kvgate's SUB every 100 ms; a batch sent before that is lost.
    thread::sleep(Duration::from_secs(1));
    let mut published = 0;
    for (i, pod) in fleet.pods.iter().enumerate() {
        let events: Vec<Value> = (0..DOCS)
            .filter(|doc| doc % PODS == i)
            .map(|doc| {
                let (event, blocks) = stored_event(&config, &tokenizer, &chat(doc, 0));
                published += blocks;
                event
            })
            .collect();
        publish(pod, &events);
    }
    wait_for("every pod's events to be applied", STEP_LIMIT, || {
        let pods = fleet.debug_pods();
        let stored: u64 = pods
            .iter()
            .map(|p| p["blocks_stored"].as_u64().unwrap_or(0))
            .sum();
        (stored == published as u64 && pods.iter().all(|p| p["events"] == "synced")).then_some(())
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
    step("upgrade 1", &mut || {
        gateway = upgrade(&fleet, &mut gateway, generation, published);
        generation += 1;
    });
    published = pods_go_on_publishing(&fleet, &config, &tokenizer, 1, published);
    step("reload 3: model added (file watch)", &mut || {
        variant.lite_model = true;
        reload_and_wait(&fleet, &gateway, &variant, false, true);
    });
    let lite = json!({"model": "qwen-lite", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _) = http_request(
        fleet.listen,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        lite.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "the added model is served");
    step("reload 4: tunables and log level (SIGHUP)", &mut || {
        variant.max_attempts = 2;
        variant.level = "info,kvgate::discovery=debug";
        reload_and_wait(&fleet, &gateway, &variant, true, true);
    });
    step("upgrade 2", &mut || {
        gateway = upgrade(&fleet, &mut gateway, generation, published);
        generation += 1;
    });
    pods_go_on_publishing(&fleet, &config, &tokenizer, 2, published);
    step("reload 5: model removed (file watch)", &mut || {
        variant.lite_model = false;
        reload_and_wait(&fleet, &gateway, &variant, false, true);
    });
    let (status, _) = http_request(
        fleet.listen,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        lite.to_string().as_bytes(),
    );
    assert_eq!(status, 404, "the removed model is gone");

    thread::sleep(STEADY);
    stop.store(true, Ordering::Relaxed);
    let outcomes = runtime.block_on(traffic).expect("load task");
    let elapsed = epoch.elapsed();
    drop(runtime);

    // Every process's `Request handled` lines: prompt and predicted cached tokens.
    let mut handled = std::collections::HashMap::new();
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
                    let c = f["predicted_cached_tokens"].as_u64().unwrap_or(0);
                    handled.insert(id.to_string(), (p, c));
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
    let (hit_before, n_before) = hit_rate(&outcomes, &handled, Duration::from_secs(1), first);
    let (hit_after, n_after) = hit_rate(&outcomes, &handled, last, elapsed);

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
        ms(percentile(before, 99.0)),
        n_before
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
        "all switches: p99 {:.1} ms; hit rate (predicted cached / prompt tokens) before {:.3} ({} requests), after {:.3} ({} requests)",
        ms(percentile(all_switches, 99.0)),
        hit_before,
        n_before,
        hit_after,
        n_after
    );
    for f in failed.iter().take(10) {
        println!("failed {} at {:?}: {:?}", f.id, f.start, f.error);
    }

    assert!(failed.is_empty(), "{} requests failed", failed.len());
    assert!(
        outcomes.len() as f64 / elapsed.as_secs_f64() >= 100.0,
        "the load must reach 100 req/s"
    );
    assert!(hit_before > 0.5, "the index routes the load: {hit_before}");
    assert!(
        (hit_after - hit_before).abs() < 0.05,
        "hit rate before {hit_before}, after {hit_after}"
    );
}
