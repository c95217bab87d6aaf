//! Issue 16.6, the soak: streaming multi-turn load through two `kvgate serve` replicas
//! in front of four `kvgate sim` pods (the stand-in for vLLM; they bind their KV-event
//! PUB and replay ROUTER, the replicas connect, as in Kubernetes) while a seeded
//! schedule disturbs them: a pod killed mid-stream and revived, a pod restarted with an
//! empty cache, 5 % of KV events dropped (on one pod, later on all), the weights
//! reloaded (SIGHUP) on both replicas, and one replica upgraded in place (`-u`, then
//! SIGQUIT to the old process).
//!
//! Runs `KVGATE_SOAK_SECS` seconds (75 by default); the full soak is
//! `KVGATE_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`. Checked at
//! the end, each with its own message:
//!
//! * (a) every request got a complete stream (`[DONE]` after a usage chunk) or a clean
//!   OpenAI-style error, and only requests on a pod that went down while they ran did not;
//! * (b) no request id reached two pods, or one pod twice (the pods' own `Received
//!   request` lines), and each completed request reached the pod kvgate logged;
//! * (c) predicted == reported cached tokens on every request whose pod was settled in
//!   the replica's view (see [`settled`]);
//! * (d) once the load stops, each replica's index holds, for each pod, as many blocks
//!   as the pod's prefix cache;
//! * (e) each replica's RSS over its last process's final third stays within
//!   [`RSS_GROWTH`] of its first third (from its first reload on, see [`RSS_GROWTH`]).

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sim::{SimPods, PUBLISHING};
use upstream::{debug_pods, http_request, metric, wait_for, Serve};

const MODEL: &str = "qwen";
const PODS: usize = 4;
const REPLICAS: usize = 2;
/// Concurrent conversations, each one request at a time.
const CLIENTS: usize = 16;
/// A user reads the answer and types for up to this long before the next turn.
const THINK_MS: u64 = 800;
const TURNS: usize = 4;
/// Shared system documents: conversations on the same one share its prefix.
const DOCS: usize = 12;
const SEED: u64 = 0x16_06;
const DEFAULT_SECS: u64 = 75;
/// The chaos schedule repeats every round (one round for the CI-length run).
const ROUND: Duration = Duration::from_secs(75);
/// Health checks every 200 ms: a pod that went down is out of rotation soon after.
const HEALTH_MS: u64 = 200;
/// A pod killed mid-stream stays down this long before it is revived.
const KILLED_FOR: Duration = Duration::from_millis(1500);
const RESTART_DOWN_MS: u64 = 1000;
const DROP_PROBABILITY: f64 = 0.05;
/// How long after a disturbance of a pod (or an upgrade of the replica) its requests
/// are not held to exact predictions: the replica's health checks, reconnect and
/// replay catch up well within it.
const SETTLE: Duration = Duration::from_secs(3);
/// How long a pod's KV events may take to reach a replica's index on a loaded 2-core
/// machine. A request may hit blocks that another request on the same pod stored while
/// running, or this shortly before it started, before their events reached the replica
/// (vLLM publishes a step's events as that step's tokens stream out): no router can
/// predict those, so such requests are left out of the exact check (see [`settled`]).
const EVENT_LAG: Duration = Duration::from_millis(500);
/// The replicas' tokenizer piece cache, small so that it is full within the first third
/// of the run and the memory check sees the steady state rather than the cache filling.
const TOKEN_CACHE_BYTES: usize = 8 << 20;
/// Bound on RSS growth, last third's median over the first third's: the index is
/// bounded by the pods' caches (4 × 4,802 blocks), the tokenizer's piece cache by
/// [`TOKEN_CACHE_BYTES`] and the connection pools by configuration, so a process that
/// holds only what it should stays flat. 25 % (and at least 16 MiB) leaves room for
/// allocator noise and caches still filling after the first third. A reload builds the
/// new config's tokenizer beside the running one and the allocator keeps that
/// high-water mark (an idle replica went 134 → 266 → 312 → 322 → 322 → 322 MiB over six
/// reloads, debug build): a process's samples count from the end of its first reload.
const RSS_GROWTH: f64 = 0.25;
const RSS_SLACK_KIB: u64 = 16 << 10;
const STEP_LIMIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------

/// A replica's config: the sim pods' gateway config (connect mode with replay, JSON
/// logs, ports 0) with the weights the reloads change.
fn gateway_yaml(sim: &SimPods, kv_weight: u32) -> String {
    sim.gateway_config(MODEL, 0, 0, HEALTH_MS)
        + &format!(
            "    tokenCacheBytes: {TOKEN_CACHE_BYTES}
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: kv-cache, weight: {kv_weight}}}, {{name: load, weight: 1}}]
    picker: {{name: max-score}}
"
        )
}

/// One replica: its current process (a new one after an upgrade), on ports that stay.
struct Replica {
    n: usize,
    dir: PathBuf,
    generation: usize,
    serve: Serve,
    listen: u16,
    admin: u16,
    /// Every log file of its processes so far.
    logs: Vec<PathBuf>,
}

impl Replica {
    /// The config file of replica `n`'s process of `generation`.
    fn config(dir: &Path, n: usize, generation: usize) -> PathBuf {
        dir.join(format!("kvgate-{n}-{generation}.yaml"))
    }

    fn log(dir: &Path, n: usize, generation: usize) -> PathBuf {
        dir.join(format!("kvgate-{n}-{generation}.log"))
    }

    fn spawn(dir: &Path, n: usize, generation: usize, upgrade: bool) -> Serve {
        Serve::spawn_upgradable(
            &Self::config(dir, n, generation),
            &Self::log(dir, n, generation),
            &dir.join(format!("upgrade-{n}.sock")),
            15,
            upgrade,
        )
    }

    fn start(dir: &Path, n: usize, yaml: &str) -> Self {
        fs::write(Self::config(dir, n, 0), yaml).expect("write config");
        let mut serve = Self::spawn(dir, n, 0, false);
        let listening = serve.listening(STEP_LIMIT);
        let replica = Self {
            n,
            dir: dir.to_path_buf(),
            generation: 0,
            serve,
            listen: listening.proxy,
            admin: listening.admin,
            logs: vec![Self::log(dir, n, 0)],
        };
        wait_for("replica ready", STEP_LIMIT, || {
            (http_request(replica.admin, "GET", "/readyz", &[], b"").0 == 200).then_some(())
        });
        replica
    }

    fn reloads(&self) -> (f64, f64) {
        (
            metric(self.admin, "kvgate_config_reloads_total{result=\"ok\"}"),
            metric(self.admin, "kvgate_config_reloads_total{result=\"failed\"}"),
        )
    }

    /// Rewrites the config (an atomic rename, as ConfigMaps do), sends SIGHUP and waits
    /// for a successful reload in the metrics.
    fn reload(&self, yaml: &str) {
        let (ok, failed) = self.reloads();
        let tmp = self.dir.join(format!("kvgate-{}.yaml.tmp", self.n));
        fs::write(&tmp, yaml).expect("write config");
        fs::rename(&tmp, Self::config(&self.dir, self.n, self.generation)).expect("rename config");
        self.serve.signal("HUP");
        wait_for("the reload in the metrics", STEP_LIMIT, || {
            let (now_ok, now_failed) = self.reloads();
            assert_eq!(
                now_failed, failed,
                "replica {}: a good config was refused",
                self.n
            );
            (now_ok > ok).then_some(())
        });
    }

    /// Replaces the process by a new one that takes over its sockets, index and event
    /// streams; returns once the old one has drained and exited.
    fn upgrade(&mut self, yaml: &str) {
        let generation = self.generation + 1;
        fs::write(Self::config(&self.dir, self.n, generation), yaml).expect("write config");
        let mut new = Self::spawn(&self.dir, self.n, generation, true);
        self.logs.push(Self::log(&self.dir, self.n, generation));
        new.wait_log(
            "waiting for the running kvgate to hand over its state",
            STEP_LIMIT,
        );
        self.serve.signal("QUIT");
        new.wait_log("kvgate ready", STEP_LIMIT);
        let listening = new.listening(STEP_LIMIT);
        assert_eq!(
            (listening.proxy, listening.admin),
            (self.listen, self.admin),
            "the upgrade handed the listening sockets over"
        );
        let sent = self
            .serve
            .wait_log("state handed over to the new process", STEP_LIMIT);
        let taken = new.wait_log(
            "block index and KV event streams taken over from the previous process",
            STEP_LIMIT,
        );
        assert_eq!(
            taken["entries"], sent["entries"],
            "every index entry was handed over: {sent} {taken}"
        );
        let mut old = std::mem::replace(&mut self.serve, new);
        old.wait_exit(STEP_LIMIT);
        self.generation = generation;
    }

    /// Every `Request handled` line of every process of this replica, by request id.
    fn handled(&self) -> HashMap<String, Value> {
        let mut out = HashMap::new();
        for log in &self.logs {
            let text = fs::read_to_string(log).unwrap_or_default();
            for line in text.lines() {
                let Ok(value) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                let fields = &value["fields"];
                if fields["message"] == "Request handled" {
                    if let Some(id) = fields["request_id"].as_str() {
                        out.insert(id.to_string(), fields.clone());
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

/// A shared system document of about 400 tokens.
fn document(doc: usize) -> String {
    (0..60)
        .map(|w| format!("item{doc}x{w} sits on shelf {}.", (doc * 13 + w * 5) % 41))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a client saw of one request.
enum Seen {
    /// 200, a usage chunk, then `data: [DONE]`.
    Complete { usage: Value, reply: String },
    /// An error status with an OpenAI-style error body.
    CleanError { status: u16, body: Value },
    /// Anything else: a cut stream, a connection error, an error without its shape.
    Broken(String),
}

struct Outcome {
    id: String,
    doc: usize,
    replica: usize,
    start: Duration,
    end: Duration,
    seen: Seen,
}

fn is_openai_error(body: &Value) -> bool {
    let error = &body["error"];
    error["message"].is_string()
        && error["type"].is_string()
        && ["param", "code"]
            .iter()
            .all(|k| error.as_object().is_some_and(|e| e.contains_key(*k)))
}

/// Reads an SSE response: the reply text and the usage chunk, when it ended in `[DONE]`.
fn read_stream(text: &str) -> Result<(String, Value), String> {
    let mut reply = String::new();
    let mut usage = Value::Null;
    let mut done = false;
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value =
            serde_json::from_str(data).map_err(|e| format!("bad chunk {data:?}: {e}"))?;
        if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str() {
            reply.push_str(delta);
        }
        if chunk["usage"].is_object() {
            usage = chunk["usage"].clone();
        }
    }
    if !done {
        return Err(format!("stream cut short: {text:?}"));
    }
    if !usage["prompt_tokens"].is_u64() {
        return Err(format!("no usage chunk: {text:?}"));
    }
    Ok((reply, usage))
}

async fn one_request(client: &reqwest::Client, port: u16, id: &str, body: &Value) -> Seen {
    let response = match client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(body.to_string())
        .send()
        .await
    {
        Ok(response) => response,
        Err(error) => return Seen::Broken(format!("send: {error:?}")),
    };
    let status = response.status().as_u16();
    let mut bytes = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(error) => {
                return Seen::Broken(format!(
                    "status {status}, body broken off: {error:?} after {:?}",
                    String::from_utf8_lossy(&bytes)
                ))
            }
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    if status != 200 {
        return match serde_json::from_slice::<Value>(&bytes) {
            Ok(body) if is_openai_error(&body) => Seen::CleanError { status, body },
            _ => Seen::Broken(format!("status {status} without an OpenAI error: {text}")),
        };
    }
    match read_stream(&text) {
        Ok((reply, usage)) => Seen::Complete { usage, reply },
        Err(error) => Seen::Broken(error),
    }
}

/// One client: conversations of [`TURNS`] turns over a shared document, each turn on a
/// replica the seeded generator picks, until `stop`.
async fn client(
    c: usize,
    ports: [u16; REPLICAS],
    stop: Arc<AtomicBool>,
    epoch: Instant,
) -> Vec<Outcome> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut rng = StdRng::seed_from_u64(SEED ^ (c as u64) << 8);
    let mut outcomes = Vec::new();
    let mut n = 0;
    'conversations: while !stop.load(Ordering::Relaxed) {
        let doc = rng.random_range(0..DOCS);
        let mut messages = vec![json!({"role": "system", "content": document(doc)})];
        for turn in 0..TURNS {
            if stop.load(Ordering::Relaxed) {
                break 'conversations;
            }
            messages.push(json!({"role": "user", "content": format!(
                "Client {c}, question {n}: where is item{doc}x{}?",
                rng.random_range(0..60)
            )}));
            let body = json!({
                "model": MODEL,
                "messages": messages,
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 8,
            });
            let replica = rng.random_range(0..REPLICAS);
            let id = format!("soak-{c}-{n}");
            n += 1;
            let start = epoch.elapsed();
            let seen = one_request(&http, ports[replica], &id, &body).await;
            let end = epoch.elapsed();
            let reply = match &seen {
                Seen::Complete { reply, .. } => Some(reply.clone()),
                _ => None,
            };
            outcomes.push(Outcome {
                id,
                doc,
                replica,
                start,
                end,
                seen,
            });
            match reply {
                Some(reply) if turn + 1 < TURNS => {
                    messages.push(json!({"role": "assistant", "content": reply}))
                }
                _ => continue 'conversations,
            }
            let think = rng.random_range(0..THINK_MS);
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
    }
    outcomes
}

// ---------------------------------------------------------------------------
// Chaos
// ---------------------------------------------------------------------------

/// A disturbance and when it lasted, relative to the load's start.
#[derive(Clone, Debug)]
struct Disturbance {
    what: String,
    /// The pods it touched (every pod for a fault on all).
    pods: Vec<usize>,
    /// The replica it touched (an upgrade).
    replica: Option<usize>,
    /// Whether requests running on the pods meanwhile may fail.
    pod_down: bool,
    from: Duration,
    to: Duration,
}

impl Disturbance {
    fn overlaps(&self, from: Duration, to: Duration, slack: Duration) -> bool {
        from <= self.to + slack && to + slack >= self.from
    }
}

/// The sim's control port.
struct Control {
    port: u16,
}

impl Control {
    fn post(&self, path: &str, body: &str) -> Value {
        let (status, reply) = http_request(
            self.port,
            "POST",
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        assert!(
            status == 200 || status == 202,
            "POST {path}: {status} {}",
            String::from_utf8_lossy(&reply)
        );
        serde_json::from_slice(&reply).unwrap_or(Value::Null)
    }

    fn pod(&self, i: usize) -> Value {
        let (_, body) = http_request(self.port, "GET", "/sim/pods", &[], b"");
        let pods: Value = serde_json::from_slice(&body).expect("pods JSON");
        pods[i].clone()
    }

    fn incarnation(&self, i: usize) -> u64 {
        self.pod(i)["incarnation"].as_u64().expect("incarnation")
    }

    fn drop_events(&self, i: usize, probability: f64) {
        self.post(
            &format!("/sim/pods/{i}/faults"),
            &json!({"dropEventsProbability": probability}).to_string(),
        );
    }

    /// Waits for pod `i` to run again as a process newer than `incarnation`.
    fn wait_up(&self, i: usize, incarnation: u64) {
        wait_for(&format!("pod {i} to come back"), STEP_LIMIT, || {
            let pod = self.pod(i);
            (pod["state"] == "running" && pod["incarnation"].as_u64() > Some(incarnation))
                .then_some(())
        });
    }
}

/// The pod's `/sim/state` (`None` while it is down).
fn sim_state(http: &str) -> Option<Value> {
    let port: u16 = http.rsplit_once(':')?.1.parse().ok()?;
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    drop(stream);
    let (status, body) = http_request(port, "GET", "/sim/state", &[], b"");
    (status == 200)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten()
}

/// The seeded schedule of one round, at fractions of [`ROUND`] (scaled to the run when
/// it is shorter): (fraction, step).
#[derive(Clone, Copy, Debug)]
enum Step {
    DropOn(usize),
    DropOff(usize),
    Upgrade(usize),
    KillMidStream(usize),
    Reload,
    Restart(usize),
    DropOnAll,
    DropOffAll,
}

fn schedule(rng: &mut StdRng, round: usize) -> Vec<(f64, Step)> {
    let mut pods: Vec<usize> = (0..PODS).collect();
    for i in (1..PODS).rev() {
        pods.swap(i, rng.random_range(0..=i));
    }
    let mut steps: Vec<(f64, Step)> = vec![
        (0.04, Step::Reload),
        (0.08, Step::DropOn(pods[0])),
        (0.25, Step::DropOff(pods[0])),
        (0.38, Step::KillMidStream(pods[1])),
        (0.55, Step::Restart(pods[2])),
        (0.70, Step::DropOnAll),
        (0.80, Step::DropOffAll),
    ];
    if round == 0 {
        steps.push((0.15, Step::Upgrade(0)));
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    steps
}

// ---------------------------------------------------------------------------
// Observation
// ---------------------------------------------------------------------------

/// One `/debug/pods` sample of a replica: by pod index, whether its events are synced
/// with every gap replayed.
struct PodsSample {
    at: Duration,
    replica: usize,
    caught_up: Vec<bool>,
}

/// One RSS sample of a replica's process.
struct RssSample {
    at: Duration,
    replica: usize,
    pid: u32,
    kib: u64,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Pod index by HTTP address.
fn pod_of(sim: &SimPods, http: &str) -> Option<usize> {
    (0..PODS).find(|&i| sim.field(i, "http") == http)
}

fn caught_up(pod: &Value) -> bool {
    pod["events"] == "synced" && pod["event_gaps"] == pod["event_replays_ok"]
}

/// Whether request `o` on `pod`, which found `cached` tokens there, was settled: no
/// disturbance of the pod (or of the replica) within [`SETTLE`] of it; no other request
/// that could have stored blocks within those `cached` tokens — one over the same
/// document on the same pod that found fewer cached tokens (it stored from there on) —
/// running, or ended within [`EVENT_LAG`], when it started; and the replica's last
/// `/debug/pods` sample before it started showed the pod's events synced with every gap
/// replayed. `others`: every request with its pod and the cached tokens it found
/// (`None` when it did not complete).
fn settled(
    o: &Outcome,
    pod: usize,
    cached: u64,
    others: &[(&Outcome, usize, Option<u64>)],
    disturbances: &[Disturbance],
    samples: &[PodsSample],
) -> bool {
    let quiet = disturbances.iter().all(|d| {
        let touches = d.pods.contains(&pod) || d.replica == Some(o.replica);
        !(touches && d.overlaps(o.start, o.end, SETTLE))
    });
    let alone = others.iter().all(|(q, q_pod, q_cached)| {
        q.id == o.id
            || *q_pod != pod
            || q.doc != o.doc
            || q.start > o.start
            || q.end + EVENT_LAG <= o.start
            || q_cached.is_some_and(|c| c >= cached)
    });
    quiet
        && alone
        && samples
            .iter()
            .rev()
            .find(|s| s.replica == o.replica && s.at <= o.start)
            .is_some_and(|s| s.caught_up[pod])
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// `line` without its ANSI colour sequences (`ESC [ ... m`).
fn without_colors(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The pods' `Received request` lines: pod indices by request id.
fn received(log: &Path) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    for raw in fs::read_to_string(log).expect("sim log").lines() {
        let line = without_colors(raw);
        if !line.contains("Received request") {
            continue;
        }
        let field = |name: &str| {
            let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
            Some(rest.split(' ').next()?.trim_matches('"').to_string())
        };
        let (Some(pod), Some(id)) = (field("pod"), field("request_id")) else {
            panic!("unreadable line {line}");
        };
        out.entry(id)
            .or_default()
            .push(pod.parse().expect("pod index"));
    }
    out
}

#[test]
fn a_soak_of_streams_through_two_replicas_under_chaos_keeps_every_invariant() {
    let secs = std::env::var("KVGATE_SOAK_SECS")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("KVGATE_SOAK_SECS is a number of seconds")
        })
        .unwrap_or(DEFAULT_SECS);
    let run = Duration::from_secs(secs);
    let dir = tempfile::tempdir().expect("tempdir");
    let sim_config = dir.path().join("sim.yaml");
    fs::write(&sim_config, sim::model_yaml(MODEL, "[]")).expect("sim config");
    let sim_log = dir.path().join("sim.log");
    let mut args = PUBLISHING.to_vec();
    args.extend(["--control-port", "0"]);
    let sim = SimPods::start_logging(
        &sim_config,
        PODS,
        &args,
        "warn,kvgate::sim::requests=debug",
        &sim_log,
    );
    let control = Control {
        port: sim
            .control
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .expect("the sim's control port"),
    };
    let mut kv_weight = 2;
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|n| Replica::start(dir.path(), n, &gateway_yaml(&sim, kv_weight)))
        .collect();

    // Samplers: each replica's RSS and pod view, through the run.
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let pids: Arc<Vec<AtomicU32>> = Arc::new(
        replicas
            .iter()
            .map(|r| AtomicU32::new(r.serve.pid()))
            .collect(),
    );
    let admins: Vec<u16> = replicas.iter().map(|r| r.admin).collect();
    let http_of: Vec<String> = (0..PODS)
        .map(|i| sim.field(i, "http").to_string())
        .collect();
    let samples = Arc::new(Mutex::new((
        Vec::<PodsSample>::new(),
        Vec::<RssSample>::new(),
    )));
    let sampler = thread::spawn({
        let (stop, pids, samples) = (Arc::clone(&stop), Arc::clone(&pids), Arc::clone(&samples));
        move || {
            while !stop.load(Ordering::Relaxed) {
                for (replica, admin) in admins.iter().enumerate() {
                    let pid = pids[replica].load(Ordering::Relaxed);
                    let at = epoch.elapsed();
                    let view = debug_pods(*admin, MODEL);
                    let caught_up = http_of
                        .iter()
                        .map(|http| {
                            view.iter()
                                .find(|p| p["http"] == http.as_str())
                                .is_some_and(caught_up)
                        })
                        .collect();
                    let mut samples = samples.lock().expect("samples");
                    samples.0.push(PodsSample {
                        at,
                        replica,
                        caught_up,
                    });
                    if let Some(kib) = rss_kib(pid) {
                        samples.1.push(RssSample {
                            at,
                            replica,
                            pid,
                            kib,
                        });
                    }
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ports = [replicas[0].listen, replicas[1].listen];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| runtime.spawn(client(c, ports, Arc::clone(&stop), epoch)))
        .collect();

    // The chaos schedule, round after round, until the run's time is up.
    let mut rng = StdRng::seed_from_u64(SEED);
    let round = ROUND.min(run);
    let mut disturbances: Vec<Disturbance> = Vec::new();
    // When each reload of a replica was done: (replica, time).
    let mut reloaded: Vec<(usize, Duration)> = Vec::new();
    let mut open: BTreeMap<usize, usize> = BTreeMap::new();
    let mut round_start = Duration::ZERO;
    'rounds: for r in 0.. {
        for (at, step) in schedule(&mut rng, r) {
            let due = round_start + round.mul_f64(at);
            if due >= run {
                break 'rounds;
            }
            if let Some(wait) = due.checked_sub(epoch.elapsed()) {
                thread::sleep(wait);
            }
            let from = epoch.elapsed();
            // (what, pods, replica, whether the pods went down)
            let happened: Option<(String, Vec<usize>, Option<usize>, bool)> = match step {
                Step::DropOn(pod) => {
                    control.drop_events(pod, DROP_PROBABILITY);
                    open.insert(pod, disturbances.len());
                    Some((
                        format!("pod {pod}: 5 % of events dropped"),
                        vec![pod],
                        None,
                        false,
                    ))
                }
                Step::DropOnAll => {
                    for pod in 0..PODS {
                        control.drop_events(pod, DROP_PROBABILITY);
                    }
                    open.insert(PODS, disturbances.len());
                    let all = (0..PODS).collect();
                    Some(("every pod: 5 % of events dropped".into(), all, None, false))
                }
                Step::DropOff(pod) => {
                    control.drop_events(pod, 0.0);
                    let d = open.remove(&pod).expect("a drop to end");
                    disturbances[d].to = epoch.elapsed();
                    None
                }
                Step::DropOffAll => {
                    for pod in 0..PODS {
                        control.drop_events(pod, 0.0);
                    }
                    let d = open.remove(&PODS).expect("a drop to end");
                    disturbances[d].to = epoch.elapsed();
                    None
                }
                Step::Upgrade(n) => {
                    replicas[n].upgrade(&gateway_yaml(&sim, kv_weight));
                    pids[n].store(replicas[n].serve.pid(), Ordering::Relaxed);
                    Some((format!("replica {n} upgraded"), vec![], Some(n), false))
                }
                Step::KillMidStream(pod) => {
                    // Mid-stream: once the pod runs a request (or after a second).
                    let http = sim.field(pod, "http");
                    let running = || {
                        sim_state(http).is_some_and(|s| s["metrics"]["running"].as_u64() > Some(0))
                    };
                    let deadline = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < deadline && !running() {
                        thread::sleep(Duration::from_millis(5));
                    }
                    let incarnation = control.incarnation(pod);
                    control.post(&format!("/sim/pods/{pod}/kill"), "");
                    thread::sleep(KILLED_FOR);
                    control.post(&format!("/sim/pods/{pod}/revive"), "");
                    control.wait_up(pod, incarnation);
                    Some((
                        format!("pod {pod}: killed mid-stream, revived"),
                        vec![pod],
                        None,
                        true,
                    ))
                }
                Step::Restart(pod) => {
                    let incarnation = control.incarnation(pod);
                    control.post(
                        &format!("/sim/pods/{pod}/restart?downMs={RESTART_DOWN_MS}"),
                        "",
                    );
                    control.wait_up(pod, incarnation);
                    Some((
                        format!("pod {pod}: restarted with an empty cache"),
                        vec![pod],
                        None,
                        true,
                    ))
                }
                Step::Reload => {
                    kv_weight = if kv_weight == 2 { 3 } else { 2 };
                    for replica in &replicas {
                        replica.reload(&gateway_yaml(&sim, kv_weight));
                        reloaded.push((replica.n, epoch.elapsed()));
                    }
                    Some((
                        format!("weights reloaded (kv-cache {kv_weight})"),
                        vec![],
                        None,
                        false,
                    ))
                }
            };
            if let Some((what, pods, replica, pod_down)) = happened {
                eprintln!("{:>7.1} s  {what}", from.as_secs_f64());
                disturbances.push(Disturbance {
                    what,
                    pods,
                    replica,
                    pod_down,
                    from,
                    to: epoch.elapsed(),
                });
            }
        }
        round_start += round;
    }
    if let Some(wait) = run.checked_sub(epoch.elapsed()) {
        thread::sleep(wait);
    }
    stop.store(true, Ordering::Relaxed);
    let mut outcomes: Vec<Outcome> = Vec::new();
    for c in clients {
        outcomes.extend(runtime.block_on(c).expect("client task"));
    }
    let elapsed = epoch.elapsed();
    drop(runtime);

    // (d) Quiesced: each replica indexes, for each pod, what the pod caches.
    let mut index_view = String::new();
    let agree = (0..200).any(|_| {
        index_view.clear();
        let mut all = true;
        for (n, r) in replicas.iter().enumerate() {
            let view = debug_pods(r.admin, MODEL);
            for i in 0..PODS {
                let http = sim.field(i, "http");
                let ours = view.iter().find(|p| p["http"] == http);
                let indexed = ours.and_then(|p| p["index_blocks"].as_u64());
                let cached = sim_state(http).and_then(|s| s["metrics"]["cachedBlocks"].as_u64());
                let events = ours.map(|p| p["events"].clone());
                all &= indexed.is_some() && indexed == cached;
                index_view.push_str(&format!(
                    "replica {n} pod {i}: indexed {indexed:?}, cached {cached:?}, events {events:?}\n"
                ));
            }
        }
        all || {
            thread::sleep(Duration::from_millis(100));
            false
        }
    });
    sampler.join().expect("sampler");
    let (pod_samples, rss) = {
        let mut samples = samples.lock().expect("samples");
        (
            std::mem::take(&mut samples.0),
            std::mem::take(&mut samples.1),
        )
    };

    let handled: Vec<HashMap<String, Value>> = replicas.iter().map(Replica::handled).collect();
    let received = received(&sim_log);

    // (a) Complete or a clean error, and only on a pod that went down meanwhile.
    let mut complete = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for o in &outcomes {
        let line = handled[o.replica].get(&o.id);
        let pod = line
            .and_then(|l| l["endpoint"].as_str())
            .and_then(|http| pod_of(&sim, http));
        let on_downed_pod = pod.is_some_and(|p| {
            disturbances.iter().any(|d| {
                d.pod_down
                    && d.pods.contains(&p)
                    && d.overlaps(o.start, o.end, Duration::from_millis(500))
            })
        });
        match &o.seen {
            Seen::Complete { .. } => complete += 1,
            Seen::CleanError { status, body } => {
                let code = body["error"]["code"].as_str().unwrap_or("none");
                *failures
                    .entry(format!("error {status} ({code})"))
                    .or_default() += 1;
                if !on_downed_pod {
                    unexplained.push(format!("{} ({status}): {body} / {line:?}", o.id));
                }
            }
            Seen::Broken(why) => {
                *failures.entry("stream cut".into()).or_default() += 1;
                if !on_downed_pod {
                    unexplained.push(format!("{}: {why} / {line:?}", o.id));
                }
            }
        }
    }

    // (b) No request reached two pods, or one pod twice; each reached the pod kvgate logged.
    let mut twice = Vec::new();
    for o in &outcomes {
        let pods = received.get(&o.id).cloned().unwrap_or_default();
        if pods.len() > 1 {
            twice.push(format!("{} reached pods {pods:?}", o.id));
        }
        if let Seen::Complete { .. } = o.seen {
            let logged = handled[o.replica]
                .get(&o.id)
                .and_then(|l| l["endpoint"].as_str())
                .and_then(|http| pod_of(&sim, http));
            if pods.len() != 1 || logged != Some(pods[0]) {
                twice.push(format!(
                    "{} completed via pod {logged:?} but reached pods {pods:?}",
                    o.id
                ));
            }
        }
    }

    // (c) Exact predictions on settled pods.
    let on_pods: Vec<(&Outcome, usize, Option<u64>)> = outcomes
        .iter()
        .filter_map(|o| {
            let line = handled[o.replica].get(&o.id)?;
            let pod = pod_of(&sim, line["endpoint"].as_str()?)?;
            let cached = match o.seen {
                Seen::Complete { .. } => line["actual_cached_tokens"].as_u64(),
                _ => None,
            };
            Some((o, pod, cached))
        })
        .collect();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for o in &outcomes {
        let Seen::Complete { usage, .. } = &o.seen else {
            continue;
        };
        let Some(line) = handled[o.replica].get(&o.id) else {
            wrong.push(format!("{}: no Request handled line", o.id));
            continue;
        };
        let Some(pod) = line["endpoint"].as_str().and_then(|h| pod_of(&sim, h)) else {
            continue;
        };
        assert_eq!(
            line["actual_cached_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
            "kvgate logged the cached tokens the pod reported: {line}"
        );
        let cached = line["actual_cached_tokens"].as_u64().unwrap_or(0);
        if !settled(o, pod, cached, &on_pods, &disturbances, &pod_samples) {
            continue;
        }
        checked += 1;
        if line["predicted_cached_tokens"] != line["actual_cached_tokens"] {
            wrong.push(format!(
                "{} on pod {pod} at {:.2} s: predicted {}, actual {}",
                o.id,
                o.start.as_secs_f64(),
                line["predicted_cached_tokens"],
                line["actual_cached_tokens"]
            ));
        }
    }

    // (e) Memory: each replica's last process, first third against last third.
    let mut memory = Vec::new();
    for (n, r) in replicas.iter().enumerate() {
        let pid = r.serve.pid();
        let born = rss
            .iter()
            .find(|s| s.pid == pid)
            .map_or(Duration::ZERO, |s| s.at);
        let warm = reloaded
            .iter()
            .find(|&&(r, t)| r == n && t > born)
            .map_or(born, |&(_, t)| t);
        let own: Vec<&RssSample> = rss
            .iter()
            .filter(|s| s.replica == n && s.pid == pid && s.at >= warm)
            .collect();
        let third = own.len() / 3;
        let first = median(own[..third].iter().map(|s| s.kib).collect());
        let last = median(own[own.len() - third..].iter().map(|s| s.kib).collect());
        let span = own.last().map_or(0.0, |s| s.at.as_secs_f64())
            - own.first().map_or(0.0, |s| s.at.as_secs_f64());
        let deciles: Vec<String> = (0..10)
            .filter_map(|d| own.get(d * own.len() / 10))
            .map(|s| format!("{:.0}", s.kib as f64 / 1024.0))
            .collect();
        println!(
            "  replica {n} RSS by tenths of its last process (MiB): {}",
            deciles.join(" ")
        );
        memory.push((n, first, last, own.len(), span));
    }

    println!(
        "soak: {} s, {} requests ({:.1}/s) through {REPLICAS} replicas, {complete} complete",
        elapsed.as_secs(),
        outcomes.len(),
        outcomes.len() as f64 / elapsed.as_secs_f64()
    );
    for d in &disturbances {
        println!(
            "  {:>7.1}–{:<7.1} s  {}",
            d.from.as_secs_f64(),
            d.to.as_secs_f64(),
            d.what
        );
    }
    for (cause, count) in &failures {
        println!("  not complete: {count} × {cause}");
    }
    println!(
        "  predictions checked on settled pods: {checked}, wrong: {}",
        wrong.len()
    );
    for (n, first, last, samples, span) in &memory {
        println!(
            "  replica {n} RSS median: first third {:.1} MiB, last third {:.1} MiB ({samples} samples over {span:.0} s)",
            *first as f64 / 1024.0,
            *last as f64 / 1024.0
        );
    }

    assert!(
        unexplained.is_empty(),
        "(a) {} requests failed on no pod that went down:\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
    assert!(
        twice.is_empty(),
        "(b) requests that reached more than one pod, or another pod than logged:\n{}",
        twice.join("\n")
    );
    assert!(checked > 0, "(c) no request was settled enough to check");
    assert!(
        wrong.is_empty(),
        "(c) {} of {checked} settled predictions were wrong:\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        agree,
        "(d) a replica's index disagrees with a pod's cache after the load:\n{index_view}"
    );
    for (n, first, last, samples, _) in memory {
        assert!(samples >= 30, "(e) replica {n}: {samples} RSS samples");
        let bound = (first as f64 * (1.0 + RSS_GROWTH)) as u64;
        assert!(
            last <= bound.max(first + RSS_SLACK_KIB),
            "(e) replica {n}: RSS grew from {first} KiB to {last} KiB"
        );
    }
}
