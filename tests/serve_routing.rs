//! Routing claims end to end, through `kvgate serve` as a process: requests from a real
//! HTTP client, `kvgate sim` pods (the stand-in for vLLM: they tokenize, cache blocks,
//! report `usage.prompt_tokens_details.cached_tokens` and publish KV events over ZeroMQ).
//!
//! Checked from the `Request handled` line (what kvgate predicted, where it sent the
//! request) against what the pods report: LoRA adapters and `cache_salt` hash as the
//! pods hash them; a pod whose hashes disagree is flagged and routed on load alone;
//! `x-session-id` keeps a session on its pod; an unknown `x-kvgate-profile` gets an
//! OpenAI-style error and reaches no pod; a prompt of about a megabyte is tokenized in
//! full; a data-parallel pod (a fake pod publishing the batches the test gives each of
//! its ranks over ZeroMQ) is credited with its best rank's prefix.

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use kvgate::hash::{BlockHasher, ExtraKeys, HashAlgo, HashSettings};
use kvgate::tokenize::{parse_request, Endpoint, ModelTokenizer};
use serde_json::{json, Value};
use sim::{model_yaml_with, ModelSettings, SimPods, BLOCK};
use upstream::{
    connect, debug_pods, http_request, metric, scores, wait_for, write_request, FakePod, Serve,
    TOKENIZER_DIR,
};

const MODEL: &str = "qwen";
const LIMIT: Duration = Duration::from_secs(60);
const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared");

/// `kvgate serve` in front of some pods, with its config in a temp dir.
struct Gateway {
    serve: Serve,
    listen: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// `events` and `profiles` are YAML blocks (indented under their keys); `model` a
    /// `models:` list.
    fn start(events: &str, profiles: &str, model: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("kvgate.yaml");
        let yaml = format!(
            "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  maxBodyBytes: 8388608
  healthCheckIntervalMs: 0
  scrapeIntervalMs: 0
  threads: 2
events:
{events}logging:
  level: info
  format: json
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: kv-cache, weight: 2}}, {{name: load, weight: 1}}]
    picker: {{name: max-score}}
{profiles}{model}"
        );
        fs::write(&config, yaml).expect("write config");
        let (serve, listening) = Serve::start(&config, &dir.path().join("kvgate.log"), &[]);
        let gateway = Self {
            serve,
            listen: listening.proxy,
            admin: listening.admin,
            _dir: dir,
        };
        wait_for("kvgate ready", LIMIT, || {
            (http_request(gateway.admin, "GET", "/readyz", &[], b"").0 == 200).then_some(())
        });
        gateway
    }

    /// Sends a chat request; its status, response body and `Request handled` line.
    fn chat(&self, id: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value, Value) {
        let mut all = vec![("content-type", "application/json"), ("x-request-id", id)];
        all.extend_from_slice(headers);
        let (status, response) = http_request(
            self.listen,
            "POST",
            "/v1/chat/completions",
            &all,
            body.to_string().as_bytes(),
        );
        let response = serde_json::from_slice(&response).unwrap_or(Value::Null);
        (status, response, self.serve.wait_handled(id))
    }

    /// Sends a chat request that must succeed; its `Request handled` line, checked
    /// against the pod's own count of cached tokens, and the pod's count of prompt tokens.
    fn routed(&self, id: &str, body: &Value) -> (Value, u64) {
        let (status, response, line) = self.chat(id, body, &[]);
        assert_eq!(status, 200, "{response}");
        let usage = &response["usage"];
        assert_eq!(
            line["actual_cached_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
            "{line}"
        );
        (
            line,
            usage["prompt_tokens"].as_u64().expect("prompt tokens"),
        )
    }

    fn debug_pods(&self) -> Vec<Value> {
        debug_pods(self.admin, MODEL)
    }

    /// Waits until the index holds at least `entries` (block, pod) entries.
    fn wait_indexed(&self, entries: u64) {
        wait_for("the pods' events in the index", LIMIT, || {
            (metric(self.admin, "kvgate_index_entries") >= entries as f64).then_some(())
        });
    }
}

/// A `Request handled` line of a request that found blocks cached, exactly as many as
/// kvgate predicted.
fn assert_cached_as_predicted(line: &Value) {
    assert!(line["actual_cached_tokens"].as_u64() > Some(0), "{line}");
    assert_eq!(
        line["predicted_cached_tokens"], line["actual_cached_tokens"],
        "{line}"
    );
}

/// Connect-mode events, replay on; the given extra lines (indented) appended.
fn connect_events(extra: &str) -> String {
    format!("  mode: connect\n  replay: true\n{extra}")
}

fn sim_pods(dir: &Path, name: &str, pods: usize, settings: &ModelSettings<'_>) -> SimPods {
    let config = dir.join(format!("{name}.yaml"));
    fs::write(&config, model_yaml_with(MODEL, "[]", settings)).expect("write sim config");
    SimPods::start(
        &config,
        pods,
        &["--events-bind-base-port", "0", "--replay-base-port", "0"],
    )
}

/// A chat over a document of about 800 tokens, asking `question`.
fn document_chat(document: usize, question: &str) -> Value {
    let text: Vec<String> = (0..160)
        .map(|w| {
            format!(
                "item{document}x{w} weighs {} grams",
                (w * 7 + document) % 53
            )
        })
        .collect();
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": text.join("; ")},
            {"role": "user", "content": question},
        ],
        "max_tokens": 2,
    })
}

/// A stream left open on the gateway (its first bytes read), to load the pod it went to.
fn hold_stream(port: u16, headers: &[(&str, &str)], body: &Value) -> TcpStream {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["max_tokens"] = json!(20_000);
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let mut stream = connect(port);
    write_request(
        &mut stream,
        "POST",
        "/v1/chat/completions",
        &all,
        body.to_string().as_bytes(),
        false,
    );
    let mut buf = [0u8; 1024];
    assert!(stream.read(&mut buf).expect("the stream starts") > 0);
    stream
}

#[test]
fn lora_adapters_and_cache_salt_are_hashed_as_the_pods_hash_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    // LoRA and cache_salt in KV events need vLLM 0.11.1 or later.
    let adapters =
        "    loraAdapters:\n      - {name: sql-lora, intId: 1, path: /adapters/sql-lora}\n";
    let settings = ModelSettings {
        release: "0.33.0",
        extra: adapters,
        ..ModelSettings::default()
    };
    let sim = sim_pods(dir.path(), "sim", 2, &settings);
    let pods = format!("[{}]", sim.connect_entries(MODEL).join(", "));
    let gateway = Gateway::start(
        &connect_events(""),
        "",
        &model_yaml_with(MODEL, &pods, &settings),
    );

    let with = |question: &str, model: &str, salt: Option<&str>| {
        let mut body = document_chat(1, question);
        body["model"] = json!(model);
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        body
    };
    // The adapter, with a salt: cold, then its prefix cached where it went.
    let (first, _) = gateway.routed("lora-1", &with("First?", "sql-lora", Some("tenant-a")));
    assert_eq!(first["target_model"], MODEL);
    assert_eq!(first["actual_cached_tokens"], 0, "{first}");
    let prompt = first["prompt_tokens"].as_u64().expect("prompt tokens");
    gateway.wait_indexed(prompt / BLOCK as u64);
    let (second, _) = gateway.routed("lora-2", &with("Second?", "sql-lora", Some("tenant-a")));
    assert_eq!(second["endpoint"], first["endpoint"], "{second}");
    assert_cached_as_predicted(&second);

    // The same text under another salt, or as the base model, shares no block with it:
    // kvgate predicts nothing cached, and the pod confirms.
    for (id, body) in [
        ("salt-b", with("Third?", "sql-lora", Some("tenant-b"))),
        ("base", with("Fourth?", MODEL, None)),
    ] {
        let (line, _) = gateway.routed(id, &body);
        assert_eq!(line["predicted_cached_tokens"], 0, "{line}");
        assert_eq!(line["actual_cached_tokens"], 0, "{line}");
    }
}

#[test]
fn a_pod_whose_hashes_disagree_is_flagged_and_routed_on_load_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = sim_pods(dir.path(), "good", 1, &ModelSettings::default());
    // A pod started with another PYTHONHASHSEED than the config names.
    let wrong_seed = ModelSettings {
        seed: "7",
        ..ModelSettings::default()
    };
    let bad = sim_pods(dir.path(), "bad", 1, &wrong_seed);
    let entries = [good.connect_entries(MODEL), bad.connect_entries(MODEL)].concat();
    let pods = format!("[{}]", entries.join(", "));
    let mut gateway = Gateway::start(
        &connect_events("  paritySample: 1.0\n"),
        "",
        &model_yaml_with(MODEL, &pods, &ModelSettings::default()),
    );
    let bad_pod = bad.field(0, "http").to_string();
    let good_pod = good.field(0, "http").to_string();

    // Each pod serves a document directly. The bad pod's events carry hashes kvgate does
    // not compute, and kvgate says so.
    let direct = |pod: &str, body: &Value| {
        let port = pod.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
        let (status, _) = http_request(
            port.expect("port"),
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(status, 200);
    };
    // kvgate stops trusting a pod once most of at least four sampled batches disagree.
    direct(&good_pod, &document_chat(3, "Warm?"));
    for document in [2, 4, 5, 6, 7] {
        direct(&bad_pod, &document_chat(document, "Warm?"));
    }
    let flagged = wait_for("the bad pod to be flagged", LIMIT, || {
        let pods = gateway.debug_pods();
        let bad = pods.iter().find(|p| p["http"] == bad_pod.as_str())?.clone();
        (bad["parity"] == "disagree").then_some(bad)
    });
    assert_eq!(flagged["events"], "untrusted", "{flagged}");
    let (_, text) = http_request(gateway.admin, "GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&text);
    let parity = |pod: &str| {
        text.lines()
            .find(|l| l.starts_with("kvgate_hash_parity{") && l.contains(&format!("\"{pod}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(parity(&bad_pod).as_deref(), Some("0"), "{text}");
    let logged = gateway
        .serve
        .wait_log("KV event hash parity FAILED: this pod's block hashes differ from kvgate's; routing it on load only until the config is fixed and reloaded, or the pod restarts", LIMIT);
    assert_eq!(logged["pod"], bad.topic_host(0, MODEL), "{logged}");

    // The good pod busy with a stream over its own document: the bad pod's document goes
    // to the bad pod, on load. It holds the document, but kvgate credits it with nothing.
    wait_for("the good pod's blocks in the index", LIMIT, || {
        let pods = gateway.debug_pods();
        pods.iter()
            .any(|p| p["http"] == good_pod.as_str() && p["blocks_stored"].as_u64() > Some(0))
            .then_some(())
    });
    let held = hold_stream(
        gateway.listen,
        &[("x-request-id", "held")],
        &document_chat(3, "Go on."),
    );
    wait_for("the held stream on the good pod", LIMIT, || {
        let pods = gateway.debug_pods();
        pods.iter()
            .any(|p| p["http"] == good_pod.as_str() && p["in_flight"] == 1)
            .then_some(())
    });
    let (line, _) = gateway.routed("to-bad", &document_chat(2, "Again?"));
    assert_eq!(line["endpoint"], bad_pod.as_str(), "{line}");
    assert_eq!(line["predicted_cached_tokens"], 0, "{line}");
    assert!(line["actual_cached_tokens"].as_u64() > Some(0), "{line}");
    for pod in scores(&line) {
        let kv = pod.parts.iter().find(|(name, _)| name == "kv-cache");
        assert_eq!(kv.map(|(_, s)| *s), Some(0.0), "{line}");
    }
    drop(held);

    // The good pod's own events are trusted: its document is predicted as it reports.
    wait_for("the good pod to be idle", LIMIT, || {
        gateway
            .debug_pods()
            .iter()
            .all(|p| p["in_flight"] == 0)
            .then_some(())
    });
    let (cached, _) = gateway.routed("good-3", &document_chat(3, "And?"));
    assert_eq!(cached["endpoint"], good_pod.as_str(), "{cached}");
    assert_cached_as_predicted(&cached);
}

#[test]
fn an_unknown_profile_is_refused_with_an_openai_error_and_reaches_no_pod() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim_pods(dir.path(), "sim", 1, &ModelSettings::default());
    let pods = format!("[{}]", sim.connect_entries(MODEL).join(", "));
    let gateway = Gateway::start(
        &connect_events(""),
        "",
        &model_yaml_with(MODEL, &pods, &ModelSettings::default()),
    );
    let (status, body, line) = gateway.chat(
        "unknown-profile",
        &document_chat(1, "Which item is lightest?"),
        &[("x-kvgate-profile", "fastest")],
    );
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_object().expect("an OpenAI error object");
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["code"], "unknown_profile", "{body}");
    assert!(error.contains_key("param"), "{body}");
    let message = error["message"].as_str().expect("message");
    for named in ["\"fastest\"", "x-kvgate-profile", "default"] {
        assert!(
            message.contains(named),
            "the message names {named}: {message}"
        );
    }
    assert_eq!(line["status"], 400, "{line}");
    // No pod was asked: the pod's own count of requests is still zero, and a known profile
    // still gets through.
    let pod_port = sim
        .field(0, "http")
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("pod port");
    assert_eq!(pod_requests(pod_port), 0.0);
    let (status, _, _) = gateway.chat(
        "known-profile",
        &document_chat(1, "Which item is lightest?"),
        &[("x-kvgate-profile", "default")],
    );
    assert_eq!(status, 200);
    assert_eq!(pod_requests(pod_port), 1.0);
}

/// `vllm:request_success_total` of a pod, summed over its label sets.
fn pod_requests(port: u16) -> f64 {
    let (_, text) = http_request(port, "GET", "/metrics", &[], b"");
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with("vllm:request_success_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn x_session_id_keeps_a_session_on_its_pod_against_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim_pods(dir.path(), "sim", 2, &ModelSettings::default());
    let pods = format!("[{}]", sim.connect_entries(MODEL).join(", "));
    let sessions = "  sessions:
    filters: [{name: healthy}]
    scorers: [{name: session, weight: 4}, {name: load, weight: 1}]
    picker: {name: max-score}
";
    let gateway = Gateway::start(
        &connect_events(""),
        sessions,
        &model_yaml_with(MODEL, &pods, &ModelSettings::default()),
    );
    let profile = ("x-kvgate-profile", "sessions");
    let turn = |n: usize| document_chat(10 + n, &format!("Turn {n}?"));
    let (status, _, first) = gateway.chat("s-0", &turn(0), &[profile, ("x-session-id", "s")]);
    assert_eq!(status, 200);
    let home = first["endpoint"].clone();

    // A long stream within the session loads the session's pod; the session stays on it,
    // while requests without a session go to the idle pod.
    let held = hold_stream(
        gateway.listen,
        &[profile, ("x-session-id", "s"), ("x-request-id", "held")],
        &turn(9),
    );
    let busy = wait_for("the held stream on a pod", LIMIT, || {
        gateway
            .debug_pods()
            .into_iter()
            .find(|p| p["in_flight"] == 1)
    });
    assert_eq!(busy["http"], home, "{busy}");
    for n in 1..4 {
        let (status, _, line) = gateway.chat(
            &format!("s-{n}"),
            &turn(n),
            &[profile, ("x-session-id", "s")],
        );
        assert_eq!(status, 200);
        assert_eq!(
            line["endpoint"], home,
            "turn {n} left its session's pod: {line}"
        );
        let (status, _, other) = gateway.chat(&format!("free-{n}"), &turn(n), &[profile]);
        assert_eq!(status, 200);
        assert_ne!(other["endpoint"], home, "no session: load decides: {other}");
    }
    drop(held);
}

/// LooGLE documents (real prose, long- and short-dependency sets), in turn and again until
/// the text is at least `chars` long: each pass numbered, so no two passes are the same text.
fn loogle_text(chars: usize) -> String {
    let mut documents = Vec::new();
    for set in ["longdep", "shortdep"] {
        let path = format!("{SHARED}/data/traces/loogle_{set}_qa.jsonl");
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        for line in BufReader::new(file).lines() {
            let row: Value = serde_json::from_str(&line.expect("trace line")).expect("JSON line");
            if let Some(input) = row["input"].as_str() {
                documents.push(input.to_string());
            }
        }
    }
    assert!(!documents.is_empty(), "LooGLE documents");
    let mut text = String::new();
    let mut pass = 0;
    while text.len() < chars {
        pass += 1;
        for document in &documents {
            if text.len() >= chars {
                break;
            }
            text.push_str(&format!("Reading {pass}.\n{document}\n"));
        }
    }
    text
}

#[test]
fn a_megabyte_prompt_is_tokenized_in_full_and_its_prefix_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for a quarter of a million tokens per request and per pod.
    let params = dir.path().join("pod.yaml");
    fs::write(&params, "maxModelLen: 400000\n").expect("pod params");
    let settings = ModelSettings {
        extra: "    podKvBlocks: 40000\n",
        ..ModelSettings::default()
    };
    let config = dir.path().join("sim.yaml");
    fs::write(&config, model_yaml_with(MODEL, "[]", &settings)).expect("write sim config");
    let sim = SimPods::start(
        &config,
        2,
        &[
            "--events-bind-base-port",
            "0",
            "--replay-base-port",
            "0",
            "--time-scale",
            "0.001",
            "--pod-params",
            params.to_str().expect("path"),
        ],
    );
    let pods = format!("[{}]", sim.connect_entries(MODEL).join(", "));
    let gateway = Gateway::start(
        &connect_events(""),
        "",
        &model_yaml_with(MODEL, &pods, &settings),
    );

    let text = loogle_text(1 << 20);
    let body = |question: &str| {
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": &text},
                {"role": "user", "content": question},
            ],
            "max_tokens": 1,
        })
    };
    let first = body("Summarise the document.");
    assert!(first.to_string().len() >= 1 << 20);
    let (line, pod_tokens) = gateway.routed("big-1", &first);
    // kvgate counted every token the pod counted (the pod tokenizes on its own).
    assert_eq!(line["prompt_tokens"].as_u64(), Some(pod_tokens), "{line}");
    assert!(pod_tokens > 200_000, "{pod_tokens} tokens");
    gateway.wait_indexed(pod_tokens / BLOCK as u64);
    let (second, _) = gateway.routed("big-2", &body("Name its main character."));
    assert_eq!(second["endpoint"], line["endpoint"], "{second}");
    assert!(
        second["predicted_cached_tokens"].as_u64() > Some(pod_tokens * 9 / 10),
        "{second}"
    );
    assert_eq!(
        second["predicted_cached_tokens"],
        second["actual_cached_tokens"]
    );
}

#[test]
fn a_data_parallel_pod_is_credited_with_its_best_ranks_prefix() {
    // Fake pods: each binds a PUB per rank on consecutive ports, as vLLM's ranks do, and
    // publishes the batches this test gives it.
    let pod = |host: &str| {
        FakePod::start_with(&[
            "--model",
            MODEL,
            "--zmq-bind-ranks",
            "2",
            "--topic-host",
            host,
        ])
    };
    let (a, b) = (pod("pod-a"), pod("pod-b"));
    let entry = |pod: &FakePod, host: &str| {
        format!(
            "{{http: \"{}\", events: \"{}\", topicHost: {host}}}",
            pod.addr(),
            pod.events.as_deref().expect("bound events")
        )
    };
    let pods = format!("[{}, {}]", entry(&a, "pod-a"), entry(&b, "pod-b"));
    let gateway = Gateway::start(
        "  mode: connect\n  replay: false\n  dataParallelSize: 2\n",
        "",
        &model_yaml_with(MODEL, &pods, &ModelSettings::default()),
    );

    // The prompt's tokens and block hashes, as vLLM would publish them.
    let body = document_chat(20, "Which item is heaviest?");
    let dir = Path::new(TOKENIZER_DIR);
    let tokenizer = ModelTokenizer::load(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
        None,
    )
    .expect("tokenizer");
    let request =
        parse_request(Endpoint::ChatCompletions, body.to_string().as_bytes()).expect("request");
    let tokens = tokenizer.tokens(&request).expect("tokens");
    let hasher = BlockHasher::new(&HashSettings {
        algo: HashAlgo::Sha256Cbor,
        block_size: BLOCK,
        seed: Some("0".into()),
        release: "0.11.0".parse().expect("release"),
    })
    .expect("hasher");
    let mut hashes = Vec::new();
    hasher.hash_prompt(&tokens, &ExtraKeys::default(), &mut hashes);
    assert!(hashes.len() >= 8, "{} blocks", hashes.len());
    let stored = |blocks: usize| {
        json!([[
            "BlockStored",
            hashes[..blocks].iter().map(|h| h.key).collect::<Vec<_>>(),
            null,
            &tokens[..blocks * BLOCK],
            BLOCK,
            null,
            "GPU"
        ]])
    };
    // Pod A's rank 0 holds a quarter of the prompt, pod B's rank 1 all of it; each pod's
    // other rank publishes an empty batch, so that every rank's stream has been heard.
    let full = hashes.len();
    a.publish(0, stored(full / 4));
    a.publish(1, json!([]));
    b.publish(0, json!([]));
    b.publish(1, stored(full));
    wait_for("both pods' batches in the index", LIMIT, || {
        let pods = gateway.debug_pods();
        let stored_by = |addr: String| {
            pods.iter()
                .find(|p| p["http"] == addr.as_str())
                .and_then(|p| p["blocks_stored"].as_u64())
        };
        (stored_by(a.addr()) >= Some((full / 4) as u64) && stored_by(b.addr()) >= Some(full as u64))
            .then_some(())
    });

    let (status, _, line) = gateway.chat("dp-1", &body, &[]);
    assert_eq!(status, 200);
    assert_eq!(line["endpoint"], b.addr().as_str(), "{line}");
    assert_eq!(
        line["predicted_cached_tokens"].as_u64(),
        Some((full * BLOCK) as u64),
        "{line}"
    );
    // Pod A is credited with its rank 0's quarter.
    let a_score = scores(&line)
        .into_iter()
        .find(|pod| pod.pod == a.addr())
        .and_then(|pod| pod.parts.into_iter().find(|(name, _)| name == "kv-cache"))
        .map(|(_, score)| score)
        .expect("pod A's kv-cache score");
    assert!(a_score > 0.0 && a_score < 0.5, "{line}");
}
