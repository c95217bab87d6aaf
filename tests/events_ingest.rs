//! KV event ingestion end to end, against real ZeroMQ publishers in another
//! process (tests/pubsim/pubsim.py: pyzmq, vLLM's exact frames and replay
//! ROUTER semantics). Every test ends by comparing the block index with the
//! cache the publisher says it holds.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kvgate::config::Config;
use kvgate::discovery::PodEndpoint;
use kvgate::events::{KvEventService, ParityVerdict, PodEventCounts};
use kvgate::index::{BlockIndex, IndexConfig, PrefixMatch, ScopeId};
use kvgate::pods::{EventTrust, Pod, PodId, PodRegistry};
use kvgate::scope::scope_id;
use serde_json::Value;
use tokio::sync::watch;

const PUBSIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pubsim/pubsim.py");
const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/vectors/vllm_kv_events.json"
);
const MODEL: &str = "Qwen3-32B";
const WAIT: Duration = Duration::from_secs(30);

/// A pubsim process; killed (SIGKILL) when dropped.
struct PubSim {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
}

impl PubSim {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(PUBSIM)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pubsim (python3 with pyzmq and msgpack)");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str(&line) {
                    Ok(value) => {
                        if tx.send(value).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("pubsim: {line}"),
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// The next line whose `event` is `event`.
    fn expect(&mut self, event: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(value) if value["event"] == event => return value,
                Ok(_) => {}
                Err(_) => panic!("pubsim sent no {event:?} line"),
            }
        }
    }

    /// Lets a `--wait-stdin` publisher start.
    fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("write to pubsim");
        stdin.flush().expect("flush pubsim stdin");
    }

    /// kill -9.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PubSim {
    fn drop(&mut self) {
        self.kill();
    }
}

fn model_yaml(name: &str, release: &str, algo: &str) -> String {
    format!(
        "  - name: {name}\n    tokenizer: t.json\n    blockSize: 16\n    hashAlgo: {algo}\n    hashSeed: \"42\"\n    \
         vllmRelease: \"{release}\"\n    loraAdapters: [{{name: sql-lora, intId: 1, path: /adapters/sql-lora}}]\n    \
         discovery: {{static: {{pods: []}}}}\n"
    )
}

fn config(events: &str, models: &str) -> Config {
    Config::parse(&format!("events:\n{events}\nmodels:\n{models}")).expect("test config")
}

/// A running service with its index and registry.
struct Gate {
    service: Arc<KvEventService>,
    index: Arc<BlockIndex>,
    registry: Arc<PodRegistry>,
    stop: watch::Sender<bool>,
    bound: Option<String>,
}

impl Gate {
    async fn start(config: &Config, dp: u32) -> Self {
        let mut config = config.clone();
        config.events.data_parallel_size = dp;
        let config = &config;
        let models: Vec<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
        let registry = Arc::new(PodRegistry::new(models));
        let index = Arc::new(BlockIndex::new(IndexConfig {
            budget_bytes: 64 << 20,
            shards: 16,
        }));
        let service = Arc::new(
            KvEventService::new(
                config,
                Arc::clone(&registry),
                Arc::clone(&index),
                Arc::default(),
            )
            .expect("service"),
        );
        let (stop, shutdown) = watch::channel(false);
        let runner = Arc::clone(&service);
        tokio::spawn(async move { runner.run(shutdown).await.expect("service runs") });
        let bound = tokio::time::timeout(WAIT, service.ready())
            .await
            .expect("service ready");
        Self {
            service,
            index,
            registry,
            stop,
            bound,
        }
    }

    fn pod(&self, model: &str, topic_host: &str) -> Arc<Pod> {
        self.registry
            .pods(model)
            .and_then(|set| {
                set.pods
                    .iter()
                    .find(|p| p.endpoint.topic_host == topic_host)
                    .cloned()
            })
            .expect("pod is registered")
    }

    fn counts(&self, pod: PodId) -> PodEventCounts {
        self.service.stats().of(pod).expect("pod has counters")
    }

    /// How many of `keys` `target` holds in `scope`.
    fn held(&self, scope: ScopeId, target: PodId, keys: &[u64]) -> usize {
        let mut found = PrefixMatch::new();
        keys.iter()
            .filter(|&&key| {
                self.index.lookup(scope, &[key], &mut found);
                found.get(target).any_blocks == 1
            })
            .count()
    }

    /// The index holds exactly `keys` for `target` (all in `scope`).
    fn holds_exactly(&self, scope: ScopeId, target: PodId, keys: &[u64]) -> Result<(), String> {
        let held = self.held(scope, target, keys);
        let total = self.index.pod_block_count(target);
        if held == keys.len() && total == keys.len() {
            Ok(())
        } else {
            Err(format!(
                "target {target}: {held} of {} expected blocks indexed, {total} indexed in all",
                keys.len()
            ))
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn endpoint(
    topic_host: &str,
    http_port: u16,
    events: Option<&str>,
    replay: Option<&str>,
) -> PodEndpoint {
    PodEndpoint {
        key: format!("{topic_host}/{http_port}"),
        name: format!("pod-{topic_host}"),
        http: SocketAddr::from(([127, 0, 0, 1], http_port)),
        events: events.map(str::to_string),
        replay: replay.map(str::to_string),
        topic_host: topic_host.into(),
        role: Default::default(),
    }
}

/// Polls `check` until it passes; panics with its last complaint.
async fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// A port `p` with `p .. p + count` free, for a bind endpoint with data-parallel ranks.
fn free_ports(count: u16) -> u16 {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = first.local_addr().expect("addr").port();
        if base.checked_add(count).is_none() {
            continue;
        }
        let rest: Vec<_> = (1..count)
            .map(|r| TcpListener::bind(("127.0.0.1", base + r)))
            .collect();
        if rest.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no {count} consecutive free ports");
}

fn keys(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .expect("key list")
        .iter()
        .map(|k| k.as_u64().expect("u64 key"))
        .collect()
}

fn final_blocks(done: &Value, rank: usize) -> Vec<u64> {
    keys(&done["ranks"][rank]["blocks"])
}

/// Every release's exact frames, one pod per format, kvgate connecting to each
/// (connect topology); batch 1 is lost live and must come back by replay, in
/// both reply forms. One model per format so hashes are checked per release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_release_exact_frames_with_replay_connect_mode() {
    let vectors: Value =
        serde_json::from_str(&std::fs::read_to_string(VECTORS).expect("vectors")).expect("json");
    let formats = vectors["formats"].as_array().expect("formats");
    let model_of = |i: usize| format!("m{i}");
    let mut models = String::new();
    for (i, format) in formats.iter().enumerate() {
        let release = format["versions"][0].as_str().expect("version");
        let algo = format["hash_algo"].as_str().expect("algo");
        models.push_str(&model_yaml(&model_of(i), release, algo));
    }
    let cfg = config(
        "  mode: connect\n  replay: true\n  replayTimeoutMs: 3000\n  paritySample: 1.0\n",
        &models,
    );
    let gate = Gate::start(&cfg, 1).await;
    let mut sim = PubSim::spawn(&[
        "vectors",
        "--replay",
        "auto",
        "--drop-seqs",
        "1",
        "--wait-stdin",
        "--linger",
        "60",
    ]);
    let ready = sim.expect("ready");
    let publishers = ready["publishers"].as_array().expect("publishers").clone();
    assert_eq!(publishers.len(), formats.len());
    for (i, publisher) in publishers.iter().enumerate() {
        gate.registry.apply_snapshot(
            &model_of(i),
            &[endpoint(
                &format!("10.0.1.{i}"),
                9000 + i as u16,
                publisher["events"].as_str(),
                publisher["replay"].as_str(),
            )],
        );
    }
    sim.go();
    sim.expect("done");
    for (i, publisher) in publishers.iter().enumerate() {
        let model = model_of(i);
        let pod = gate.pod(&model, &format!("10.0.1.{i}"));
        let base = keys(&publisher["expected"]["base"]);
        let lora = keys(&publisher["expected"]["lora"]);
        let versions = &publisher["versions"];
        eventually(&format!("format {i} {versions}"), || {
            let (base_scope, lora_scope) =
                (scope_id(&model, None), scope_id(&model, Some("sql-lora")));
            if gate.held(base_scope, pod.id, &base) != base.len() {
                return Err("base-model blocks missing".into());
            }
            if gate.held(lora_scope, pod.id, &lora) != lora.len() {
                return Err("LoRA blocks missing".into());
            }
            let total = gate.index.pod_block_count(pod.id);
            if total != base.len() + lora.len() {
                return Err(format!("{total} blocks indexed"));
            }
            // A batch's counters move after its blocks are indexed: wait for all three.
            let checked = gate.counts(pod.id).parity_checked;
            if checked < 3 {
                return Err(format!("{checked} batches parity-checked"));
            }
            match pod.trust() {
                EventTrust::Synced => Ok(()),
                other => Err(format!("trust {other:?}")),
            }
        })
        .await;
        let counts = gate.counts(pod.id);
        assert!(
            counts.gaps >= 1 && counts.replays_ok >= 1,
            "format {i}: {counts:?}"
        );
        assert_eq!(counts.all_cleared, 1, "format {i}");
        // Root and continuation runs agree; the salted LoRA run is reproducible
        // only where the release publishes its extra keys (0.17+).
        let publishes_salt = kvgate::vllm::VllmRelease::new(0, 17, 0)
            <= versions[0]
                .as_str()
                .expect("version")
                .parse()
                .expect("release");
        assert_eq!(counts.parity_checked, 3, "format {i}: {counts:?}");
        assert_eq!(
            counts.parity_mismatched,
            u64::from(!publishes_salt),
            "format {i}: {counts:?}"
        );
        assert_eq!(counts.parity, ParityVerdict::Agree, "format {i}");
    }
}

/// The seed's topology: every pod connects to one SUB that kvgate binds, named
/// by its topic. Clean, 1% loss (and the last batch), 10% loss (with
/// reordering, duplicates, and a ROUTER that loses replies like vLLM's before
/// 0.33), a data-parallel pod whose ranks connect to port + rank, and a pod
/// with the wrong PYTHONHASHSEED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_publishers_into_one_bound_sub() {
    let port = free_ports(2);
    let cfg = config(
        &format!("  mode: bind\n  bind: tcp://127.0.0.1:{port}\n  replay: true\n"),
        &model_yaml(MODEL, "0.11.0", "sha256_cbor"),
    );
    let gate = Gate::start(&cfg, 2).await;
    let bound = gate.bound.clone().expect("bound endpoint");
    let common = [
        "stream",
        "--connect",
        &bound,
        "--replay",
        "auto",
        "--batches",
        "1500",
        "--wait-stdin",
    ];
    let pods: [(&str, &[&str]); 5] = [
        ("10.0.0.1", &["--release", "0.11.0"]),
        (
            "10.0.0.2",
            // Its last batch is lost too: only an idle probe of the ROUTER reveals it.
            &[
                "--release",
                "0.26.0",
                "--drop",
                "0.01",
                "--drop-seqs",
                "1499",
                "--seed",
                "2",
            ],
        ),
        (
            "10.0.0.3",
            &[
                "--release",
                "0.11.0",
                "--drop",
                "0.1",
                "--reorder",
                "0.05",
                "--duplicate",
                "0.05",
                "--replay-lossy",
                "2",
                "--seed",
                "3",
            ],
        ),
        (
            "10.0.0.4",
            &[
                "--release",
                "0.26.0",
                "--dp-size",
                "2",
                "--drop",
                "0.01",
                "--seed",
                "4",
            ],
        ),
        (
            "10.0.0.5",
            &[
                "--release",
                "0.11.0",
                "--hash-seed",
                "0",
                "--batches",
                "50",
                "--seed",
                "5",
            ],
        ),
    ];
    let mut sims = Vec::new();
    let mut endpoints = Vec::new();
    for (i, (host, extra)) in pods.iter().enumerate() {
        let topic = format!("kv@{host}@{MODEL}");
        let mut args: Vec<&str> = common.to_vec();
        args.extend_from_slice(&["--topic", &topic]);
        args.extend_from_slice(extra);
        let mut sim = PubSim::spawn(&args);
        let ready = sim.expect("ready");
        endpoints.push(endpoint(
            host,
            8001 + i as u16,
            None,
            ready["replay"].as_str(),
        ));
        sims.push(sim);
    }
    gate.registry.apply_snapshot(MODEL, &endpoints);
    let mut done = Vec::new();
    for sim in &mut sims {
        sim.go();
    }
    for sim in &mut sims {
        done.push(sim.expect("done"));
    }
    let scope = scope_id(MODEL, None);
    for (i, (host, _)) in pods.iter().enumerate().take(4) {
        let pod = gate.pod(MODEL, host);
        let targets: Vec<PodId> = gate
            .service
            .targets()
            .of(pod.id)
            .map_or_else(|| vec![pod.id], |t| t.to_vec());
        eventually(&format!("pod {host}"), || {
            let ranks = done[i]["ranks"].as_array().expect("ranks").len();
            if targets.len() != ranks {
                return Err(format!("{} index targets for {ranks} ranks", targets.len()));
            }
            for (rank, &target) in targets.iter().enumerate() {
                gate.holds_exactly(scope, target, &final_blocks(&done[i], rank))?;
            }
            match pod.trust() {
                EventTrust::Synced => Ok(()),
                other => Err(format!("trust {other:?}")),
            }
        })
        .await;
    }
    let lossy = gate.counts(gate.pod(MODEL, "10.0.0.3").id);
    assert!(lossy.gaps > 0 && lossy.replays_ok > 0, "{lossy:?}");
    assert!(lossy.duplicates > 0, "{lossy:?}");
    // Its ROUTER lost replies of the first replay, which was asked again.
    assert!(lossy.replays_failed > 0, "{lossy:?}");
    eprintln!("10% loss, reordered, duplicated: {lossy:?}");
    assert_eq!(lossy.unrecoverable, 0, "{lossy:?}");
    assert_eq!(lossy.parity, ParityVerdict::Agree);
    let clean = gate.counts(gate.pod(MODEL, "10.0.0.1").id);
    assert_eq!(
        (clean.gaps, clean.duplicates, clean.malformed),
        (0, 0, 0),
        "{clean:?}"
    );

    let wrong_seed = gate.pod(MODEL, "10.0.0.5");
    eventually("wrong seed is caught", || match wrong_seed.trust() {
        EventTrust::Untrusted => Ok(()),
        other => Err(format!("trust {other:?}")),
    })
    .await;
    let counts = gate.counts(wrong_seed.id);
    assert_eq!(counts.parity, ParityVerdict::Disagree);
    let why = gate
        .service
        .stats()
        .last_mismatch(wrong_seed.id)
        .expect("mismatch recorded");
    assert!(why.contains("hashSeed"), "{why}");
}

/// kill -9 mid-stream, then a new process on the same topic and replay port
/// that sends at once (its first batches are lost to the slow joiner): the
/// old incarnation's blocks go, the new one's history comes back by replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_publisher_bind_mode() {
    let cfg = config(
        "  mode: bind\n  bind: tcp://127.0.0.1:0\n  replay: true\n",
        &model_yaml(MODEL, "0.26.0", "sha256_cbor"),
    );
    let gate = Gate::start(&cfg, 1).await;
    let bound = gate.bound.clone().expect("bound endpoint");
    let replay = format!("tcp://127.0.0.1:{}", free_ports(1));
    let host = "10.0.0.9";
    let topic = format!("kv@{host}@{MODEL}");
    gate.registry
        .apply_snapshot(MODEL, &[endpoint(host, 8001, None, Some(&replay))]);
    let pod = gate.pod(MODEL, host);

    let mut first = PubSim::spawn(&[
        "stream",
        "--connect",
        &bound,
        "--replay",
        &replay,
        "--topic",
        &topic,
        "--release",
        "0.26.0",
        "--batches",
        "100000",
        "--rate",
        "2000",
        "--seed",
        "11",
    ]);
    first.expect("ready");
    eventually("first incarnation streams", || {
        let counts = gate.counts(pod.id);
        if counts.batches >= 300 && pod.trust() == EventTrust::Synced {
            Ok(())
        } else {
            Err(format!("{counts:?}"))
        }
    })
    .await;
    first.kill();
    let before = gate.index.pod_block_count(pod.id);
    assert!(before > 0);

    let mut second = PubSim::spawn(&[
        "stream",
        "--connect",
        &bound,
        "--replay",
        &replay,
        "--topic",
        &topic,
        "--release",
        "0.26.0",
        "--batches",
        "400",
        "--seed",
        "12",
        "--no-wait",
    ]);
    let done = second.expect("done");
    let blocks = final_blocks(&done, 0);
    eventually("restarted pod's cache", || {
        gate.holds_exactly(scope_id(MODEL, None), pod.id, &blocks)?;
        match pod.trust() {
            EventTrust::Synced => Ok(()),
            other => Err(format!("trust {other:?}")),
        }
    })
    .await;
    let counts = gate.counts(pod.id);
    assert_eq!(counts.restarts, 1, "{counts:?}");
}

/// Connect topology: kvgate follows discovery, connects to both ranks of a
/// data-parallel pod, reconnects after the pod is killed and restarted on the
/// same ports, and retires the pod's entries when discovery drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_mode_follows_pods_ranks_restarts_and_removal() {
    let cfg = config(
        "  mode: connect\n  replay: true\n",
        &model_yaml(MODEL, "0.26.0", "sha256_cbor"),
    );
    let gate = Gate::start(&cfg, 2).await;
    let base = free_ports(4);
    let events = format!("tcp://127.0.0.1:{base}");
    let replay = format!("tcp://127.0.0.1:{}", base + 2);
    let run = |seed: &str, batches: &str| {
        PubSim::spawn(&[
            "stream",
            "--bind",
            &events,
            "--replay",
            &replay,
            "--dp-size",
            "2",
            "--release",
            "0.26.0",
            "--drop",
            "0.01",
            "--batches",
            batches,
            "--seed",
            seed,
        ])
    };
    let mut sim = run("21", "800");
    sim.expect("ready");
    gate.registry.apply_snapshot(
        MODEL,
        &[endpoint("10.0.0.7", 8001, Some(&events), Some(&replay))],
    );
    let pod = gate.pod(MODEL, "10.0.0.7");
    eventually("the service follows the registry", || {
        gate.service
            .targets()
            .of(pod.id)
            .map(|_| ())
            .ok_or_else(|| "no targets yet".into())
    })
    .await;
    let targets = gate
        .service
        .targets()
        .of(pod.id)
        .expect("a target per rank");
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0], pod.id);
    let scope = scope_id(MODEL, None);
    let check = |done: &Value| -> Result<(), String> {
        for (rank, &target) in targets.iter().enumerate() {
            gate.holds_exactly(scope, target, &final_blocks(done, rank))?;
        }
        match pod.trust() {
            EventTrust::Synced => Ok(()),
            other => Err(format!("trust {other:?}")),
        }
    };
    let done = sim.expect("done");
    eventually("both ranks indexed", || check(&done)).await;

    sim.kill();
    let mut sim = run("22", "300");
    let done = sim.expect("done");
    eventually("restarted ranks indexed", || check(&done)).await;
    assert_eq!(gate.counts(pod.id).restarts, 2);

    gate.registry.apply_snapshot(MODEL, &[]);
    eventually("removed pod retired", || {
        let left: usize = targets.iter().map(|&t| gate.index.pod_block_count(t)).sum();
        if left == 0 && gate.service.stats().of(pod.id).is_none() {
            Ok(())
        } else {
            Err(format!("{left} blocks left"))
        }
    })
    .await;
    // Late stores for a retired id are refused by the index.
    gate.index.store(
        pod.id,
        scope,
        kvgate::index::Tier::Gpu,
        &final_blocks(&done, 0),
    );
    assert_eq!(gate.index.pod_block_count(pod.id), 0);
}

/// Without replay every gap clears the pod and rebuilds from live events: the
/// index then holds only blocks the pod really has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replay_gaps_clear_and_the_index_stays_sound() {
    let cfg = config(
        "  mode: bind\n  bind: tcp://127.0.0.1:0\n  replay: false\n",
        &model_yaml(MODEL, "0.11.0", "sha256_cbor"),
    );
    let gate = Gate::start(&cfg, 1).await;
    let bound = gate.bound.clone().expect("bound endpoint");
    let host = "10.0.0.8";
    gate.registry
        .apply_snapshot(MODEL, &[endpoint(host, 8001, None, None)]);
    let pod = gate.pod(MODEL, host);
    let topic = format!("kv@{host}@{MODEL}");
    let mut sim = PubSim::spawn(&[
        "stream",
        "--connect",
        &bound,
        "--topic",
        &topic,
        "--drop",
        "0.02",
        "--reorder",
        "0.02",
        "--batches",
        "1500",
        "--clean-tail",
        "20",
        "--capacity",
        "128",
    ]);
    let done = sim.expect("done");
    let blocks = final_blocks(&done, 0);
    let scope = scope_id(MODEL, None);
    eventually("sound and synced again", || {
        let held = gate.held(scope, pod.id, &blocks);
        let total = gate.index.pod_block_count(pod.id);
        // Ingestion runs on while this looks, so the two counts may come
        // from either side of a gap's clear: only a settled match counts.
        if total != held {
            return Err(format!(
                "{total} blocks indexed for the pod, {held} of them held"
            ));
        }
        let counts = gate.counts(pod.id);
        if counts.batches < 1400 || pod.trust() != EventTrust::Synced {
            return Err(format!("{counts:?}, trust {:?}", pod.trust()));
        }
        Ok(())
    })
    .await;
    let counts = gate.counts(pod.id);
    assert!(
        counts.unrecoverable > 0 && counts.replays_ok == 0,
        "{counts:?}"
    );
}

/// `requireKnownPods: false`: events from a pod discovery has not listed yet
/// are tracked, and become the pod's once it is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_seen_before_discovery_is_adopted() {
    let cfg = config(
        "  mode: bind\n  bind: tcp://127.0.0.1:0\n  replay: true\n  requireKnownPods: false\n",
        &model_yaml(MODEL, "0.11.0", "sha256_cbor"),
    );
    let gate = Gate::start(&cfg, 1).await;
    let bound = gate.bound.clone().expect("bound endpoint");
    let host = "10.0.0.6";
    let topic = format!("kv@{host}@{MODEL}");
    let mut sim = PubSim::spawn(&[
        "stream",
        "--connect",
        &bound,
        "--topic",
        &topic,
        "--batches",
        "300",
    ]);
    let done = sim.expect("done");
    let blocks = final_blocks(&done, 0);
    let scope = scope_id(MODEL, None);
    eventually("tracked before discovery", || {
        let tracked: HashMap<_, _> = gate.service.stats().pods().into_iter().collect();
        match tracked.values().next() {
            Some(counts) if counts.batches == 300 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    gate.registry
        .apply_snapshot(MODEL, &[endpoint(host, 8001, None, None)]);
    let pod = gate.pod(MODEL, host);
    eventually("adopted", || {
        let targets = gate.service.targets().of(pod.id).ok_or("no targets")?;
        gate.holds_exactly(scope, targets[0], &blocks)?;
        let mut found = PrefixMatch::new();
        gate.index.lookup(scope, &blocks[..1], &mut found);
        if gate
            .service
            .targets()
            .best_prefix(&found, pod.id)
            .any_blocks
            != 1
        {
            return Err("best_prefix does not see the adopted blocks".into());
        }
        match pod.trust() {
            EventTrust::Synced => Ok(()),
            other => Err(format!("trust {other:?}")),
        }
    })
    .await;
    assert_eq!(gate.counts(pod.id).batches, 300);
}
