//! `kvgate sim` as a separate process, driven by real clients: the openai Python SDK and
//! curl over HTTP, a pyzmq SUB and DEALER (tests/sim/kv_events.py) for the KV events. The
//! events are checked against the wire layouts vLLM's own publisher produced
//! (../shared/vectors/vllm_kv_events.json) and against kvgate's block hashes of the prompt.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvgate::hash::{BlockHash, BlockHasher, ExtraKeys, HashAlgo, HashSettings};
use kvgate::tokenize::{parse_request, Endpoint, ModelTokenizer};
use kvgate::vllm::VllmRelease;
use serde_json::{json, Value};

const KV_EVENTS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sim/kv_events.py");
const OPENAI_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sim/openai_client.py");
const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/vectors/vllm_kv_events.json"
);
const TOKENIZER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.tokenizers/qwen3");
const MODEL: &str = "Qwen3-32B";
const BLOCK_SIZE: usize = 16;
const WAIT: Duration = Duration::from_secs(60);

/// A model setting the simulated pods run with.
#[derive(Clone, Copy)]
struct Setup {
    release: &'static str,
    algo: &'static str,
}

const V0_11_0: Setup = Setup {
    release: "0.11.0",
    algo: "sha256_cbor",
};

fn write_config(dir: &Path, setup: Setup) -> PathBuf {
    let path = dir.join("kvgate.yaml");
    let yaml = format!(
        r#"models:
  - name: {MODEL}
    tokenizer: {TOKENIZER_DIR}/tokenizer.json
    tokenizerConfig: {TOKENIZER_DIR}/tokenizer_config.json
    blockSize: {BLOCK_SIZE}
    hashAlgo: {algo}
    hashSeed: "42"
    vllmRelease: "{release}"
    podKvBlocks: 4096
    loraAdapters:
      - {{name: sql-lora, intId: 1, path: /adapters/sql-lora}}
    discovery:
      static:
        pods: []
"#,
        algo = setup.algo,
        release = setup.release,
    );
    std::fs::write(&path, yaml).expect("write config");
    path
}

fn hasher(setup: Setup) -> BlockHasher {
    let algo = match setup.algo {
        "sha256_cbor" => HashAlgo::Sha256Cbor,
        "sha256_cbor_64bit" => HashAlgo::Sha256Cbor64bit,
        other => panic!("no test setup for {other}"),
    };
    BlockHasher::new(&HashSettings {
        algo,
        block_size: BLOCK_SIZE,
        seed: Some("42".into()),
        release: setup.release.parse::<VllmRelease>().expect("release"),
    })
    .expect("hasher")
}

fn tokenizer() -> ModelTokenizer {
    let dir = Path::new(TOKENIZER_DIR);
    ModelTokenizer::load(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
        None,
    )
    .expect("tokenizer")
}

fn tokens_of(tokenizer: &ModelTokenizer, endpoint: Endpoint, body: &Value) -> Vec<u32> {
    let request = parse_request(endpoint, body.to_string().as_bytes()).expect("request");
    tokenizer.tokens(&request).expect("tokens")
}

/// Lines of a child's stdout, parsed as JSON, on a channel.
fn json_lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let Ok(value) = serde_json::from_str(&line) else {
                continue;
            };
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    rx
}

/// A `kvgate sim` process.
struct Sim {
    child: Child,
    ready: Value,
    _dir: tempfile::TempDir,
}

impl Sim {
    fn start(setup: Setup, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(dir.path(), setup);
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("sim")
            .arg("--config")
            .arg(&config)
            .args(["--base-port", "0", "--control-port", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kvgate sim");
        let lines = json_lines(child.stdout.take().expect("stdout"));
        let ready = lines
            .recv_timeout(WAIT)
            .expect("kvgate sim did not report ready");
        Self {
            child,
            ready: ready["ready"].clone(),
            _dir: dir,
        }
    }

    fn pod(&self, index: usize) -> &Value {
        &self.ready["pods"][index]
    }

    fn url(&self, index: usize, path: &str) -> String {
        format!("http://{}{path}", self.pod(index)["http"].as_str().unwrap())
    }

    fn control(&self, path: &str) -> String {
        format!("http://{}{path}", self.ready["control"].as_str().unwrap())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` a URL; returns the status (0 when the connection failed) and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-s", "-m", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let (status, text) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        url,
    ]);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn post(url: &str) -> u16 {
    curl(&["-X", "POST", url]).0
}

fn get_json(url: &str) -> Value {
    let (status, text) = curl(&[url]);
    assert_eq!(status, 200, "GET {url}: {text}");
    serde_json::from_str(&text).expect("JSON body")
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn openai(sim: &Sim, pod: usize, scenario: &str, args: &[&str]) -> Value {
    let output = Command::new("python3")
        .arg(OPENAI_PY)
        .arg(sim.url(pod, "/v1"))
        .arg(MODEL)
        .arg(scenario)
        .args(args)
        .output()
        .expect("run openai client");
    assert!(
        output.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("client output")
}

/// A pyzmq SUB bound on 127.0.0.1 that the pods connect to.
struct Subscriber {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    port: u16,
}

impl Subscriber {
    /// Binds; the pods connect to [`Subscriber::endpoint`].
    fn start() -> Self {
        let (child, lines) = Self::spawn(None);
        let first = lines.recv_timeout(WAIT).expect("subscriber port");
        let port = first["port"].as_u64().expect("port") as u16;
        Self::new(child, lines, port)
    }

    /// Connects to a pod's bound PUB.
    fn connect(endpoint: &str) -> Self {
        let (child, lines) = Self::spawn(Some(endpoint));
        Self::new(child, lines, 0)
    }

    fn spawn(endpoint: Option<&str>) -> (Child, mpsc::Receiver<Value>) {
        let mut child = Command::new("python3")
            .arg(KV_EVENTS_PY)
            .arg("subscribe")
            .args(endpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start subscriber");
        let lines = json_lines(child.stdout.take().expect("stdout"));
        (child, lines)
    }

    fn new(mut child: Child, lines: mpsc::Receiver<Value>, port: u16) -> Self {
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            port,
        }
    }

    fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Waits for a publisher's handshake, then for its subscription to reach it.
    fn wait_connected(&self) {
        loop {
            let line = self
                .lines
                .recv_timeout(WAIT)
                .expect("no publisher connected");
            if line["connected"] == true {
                break;
            }
        }
        thread::sleep(Duration::from_millis(300));
    }

    fn next(&self, timeout: Duration) -> Option<Value> {
        loop {
            let line = self.lines.recv_timeout(timeout).ok()?;
            if line.get("seq").is_some() {
                return Some(line);
            }
        }
    }

    fn expect_next(&self) -> Value {
        self.next(WAIT).expect("no KV-event batch arrived")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replay(endpoint: &str, start: u64) -> Vec<Vec<String>> {
    let output = Command::new("python3")
        .args([KV_EVENTS_PY, "replay", endpoint, &start.to_string()])
        .output()
        .expect("run replay");
    let value: Value = serde_json::from_slice(&output.stdout).expect("replay output");
    serde_json::from_value(value["replies"].clone()).expect("replies")
}

fn vector_shapes(release: &str, int_hashes: bool) -> Value {
    let output = Command::new("python3")
        .args([
            KV_EVENTS_PY,
            "vector-shapes",
            VECTORS,
            release,
            if int_hashes { "1" } else { "0" },
        ])
        .output()
        .expect("run vector-shapes");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("vector shapes")
}

/// The event's tag: `[tag, ...]` (array form) or `{"type": tag, ...}` (map form).
fn tag(event: &Value) -> &str {
    event
        .get(0)
        .or_else(|| event.get("type"))
        .and_then(Value::as_str)
        .expect("event tag")
}

/// A field of a BlockStored event by name, in either form (array indices of 0.10–0.23).
fn stored_field<'a>(event: &'a Value, name: &str) -> &'a Value {
    if event.is_object() {
        return &event[name];
    }
    let index = match name {
        "block_hashes" => 1,
        "parent_block_hash" => 2,
        "token_ids" => 3,
        "block_size" => 4,
        "lora_id" => 5,
        "medium" => 6,
        other => panic!("no array index for {other}"),
    };
    &event[index]
}

/// The wire form of a hash: a u64 (int mode) or `{"bin_hex": ...}` (raw digests).
fn wire_hash(hash: &BlockHash, int_hashes: bool) -> Value {
    if int_hashes {
        json!(hash.key)
    } else {
        json!({ "bin_hex": hex::encode(hash.digest.as_bytes()) })
    }
}

/// The vectors' capture for a release: what vLLM's own publisher sent.
fn vector_format(release: &str, int_hashes: bool) -> Value {
    let text = std::fs::read_to_string(VECTORS).expect("read vectors");
    let vectors: Value = serde_json::from_str(&text).expect("vectors JSON");
    let flag = if int_hashes { "1" } else { "0" };
    vectors["formats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|format| {
            format["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] == flag
                && format["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v == release)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no vectors for {release}"))
}

fn vector_tokens() -> Vec<u32> {
    let text = std::fs::read_to_string(VECTORS).expect("read vectors");
    let vectors: Value = serde_json::from_str(&text).expect("vectors JSON");
    serde_json::from_value(vectors["scenario"]["token_ids_first_64"].clone()).unwrap()
}

/// Sends a completion and returns the response body.
fn complete(sim: &Sim, body: Value) -> Value {
    let (status, response) = post_json(&sim.url(0, "/v1/completions"), &body);
    assert_eq!(status, 200, "{response}");
    response
}

fn check_release(setup: Setup, int_hashes: bool) {
    let subscriber = Subscriber::start();
    let endpoint = subscriber.endpoint();
    let int_flag = if int_hashes { "true" } else { "false" };
    let sim = Sim::start(
        setup,
        &[
            "--events-connect",
            &endpoint,
            "--replay-base-port",
            "0",
            "--int-hashes",
            int_flag,
        ],
    );
    subscriber.wait_connected();
    let release = setup.release;
    let expected = vector_shapes(release, int_hashes);
    let vectors = vector_format(release, int_hashes);
    let vector_event = |frame: usize| vectors["pub_frames"][frame]["decoded"][1][0].clone();
    let topic = format!("kv@{}@{MODEL}", sim.pod(0)["http"].as_str().unwrap());
    let mut batches = Vec::new();

    // The vectors' scenario, replayed through the HTTP API: the events must be
    // exactly those vLLM's own block pool and publisher produced.
    let tokens = vector_tokens();
    complete(
        &sim,
        json!({"model": MODEL, "prompt": &tokens[..32], "max_tokens": 1}),
    );
    let batch = subscriber.expect_next();
    assert_eq!(batch["topic"], topic);
    assert_eq!(batch["seq"], 0);
    assert_eq!(batch["decoded"][2], 0, "data_parallel_rank");
    assert_eq!(batch["batch_shape"], json!(["float", "events", "int"]));
    assert_eq!(
        batch["decoded"][1][0],
        vector_event(0),
        "{release}: first run of blocks"
    );
    assert_eq!(
        batch["shapes"][0], expected["pub"][0][0],
        "{release}: field order"
    );
    batches.push(batch);

    let response = complete(
        &sim,
        json!({"model": MODEL, "prompt": &tokens[..], "max_tokens": 1}),
    );
    assert_eq!(
        response["usage"]["prompt_tokens_details"]["cached_tokens"],
        32
    );
    let batch = subscriber.expect_next();
    assert_eq!(batch["seq"], 1);
    assert_eq!(
        batch["decoded"][1][0],
        vector_event(1),
        "{release}: run with a parent"
    );
    assert_eq!(
        batch["shapes"][0], expected["pub"][1][0],
        "{release}: field order"
    );
    batches.push(batch);

    let lora = json!({
        "model": "sql-lora",
        "prompt": &tokens[..32],
        "max_tokens": 1,
        "cache_salt": "tenant-a-salt",
    });
    if release.parse::<VllmRelease>().unwrap() >= VllmRelease::new(0, 11, 1) {
        complete(&sim, lora);
        let batch = subscriber.expect_next();
        assert_eq!(
            batch["decoded"][1][0],
            vector_event(2),
            "{release}: LoRA and cache_salt"
        );
        assert_eq!(
            batch["shapes"][0], expected["pub"][2][0],
            "{release}: field order"
        );
        batches.push(batch);
    } else {
        // These releases fail such requests in their block pool.
        let (status, _) = post_json(&sim.url(0, "/v1/completions"), &lora);
        assert_eq!(status, 500);
    }

    // A chat prompt through the real tokenizer and chat template: the events carry
    // kvgate's own block hashes of those tokens.
    let tokenizer = tokenizer();
    let hasher = hasher(setup);
    let chat = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Explain, step by step and with an example, how a KV-cache-aware router picks one pod out of a fleet for a long prompt that many users share, and why the pod's cache matters."}],
        "max_tokens": 3,
    });
    let (status, response) = post_json(&sim.url(0, "/v1/chat/completions"), &chat);
    assert_eq!(status, 200, "{response}");
    let chat_tokens = tokens_of(&tokenizer, Endpoint::ChatCompletions, &chat);
    assert_eq!(response["usage"]["prompt_tokens"], chat_tokens.len());
    let full_blocks = chat_tokens.len() / BLOCK_SIZE;
    assert!(full_blocks >= 2, "the prompt should span 2+ blocks");
    let mut hashes = Vec::new();
    hasher.hash_prompt(&chat_tokens, &ExtraKeys::default(), &mut hashes);
    let batch = subscriber.expect_next();
    let event = &batch["decoded"][1][0];
    assert_eq!(tag(event), "BlockStored");
    assert_eq!(
        batch["shapes"][0], expected["pub"][0][0],
        "{release}: field order"
    );
    let block_hashes: Vec<Value> = hashes.iter().map(|h| wire_hash(h, int_hashes)).collect();
    assert_eq!(stored_field(event, "block_hashes"), &json!(block_hashes));
    assert_eq!(stored_field(event, "parent_block_hash"), &Value::Null);
    assert_eq!(
        stored_field(event, "token_ids"),
        &json!(&chat_tokens[..full_blocks * BLOCK_SIZE])
    );
    assert_eq!(stored_field(event, "block_size"), BLOCK_SIZE);
    batches.push(batch);

    // The same tokens and one block more, as token ids: a run with a parent.
    let mut extended = chat_tokens[..full_blocks * BLOCK_SIZE].to_vec();
    extended.extend((0..BLOCK_SIZE as u32 + 3).map(|i| 1_000 + i));
    let response = complete(
        &sim,
        json!({"model": MODEL, "prompt": extended, "max_tokens": 2}),
    );
    assert_eq!(
        response["usage"]["prompt_tokens_details"]["cached_tokens"],
        full_blocks * BLOCK_SIZE
    );
    let mut extended_hashes = Vec::new();
    hasher.hash_prompt(&extended, &ExtraKeys::default(), &mut extended_hashes);
    let batch = subscriber.expect_next();
    let event = &batch["decoded"][1][0];
    assert_eq!(
        batch["shapes"][0], expected["pub"][1][0],
        "{release}: field order"
    );
    assert_eq!(
        stored_field(event, "parent_block_hash"),
        &wire_hash(&hashes[full_blocks - 1], int_hashes)
    );
    assert_eq!(
        stored_field(event, "block_hashes"),
        &json!([wire_hash(&extended_hashes[full_blocks], int_hashes)])
    );
    batches.push(batch);
    for (seq, batch) in batches.iter().enumerate() {
        assert_eq!(batch["seq"], seq, "sequence numbers count batches from 0");
    }

    // Replay from 1: every later batch byte for byte, in the release's frame form.
    let replay_endpoint = sim.pod(0)["replayEndpoint"].as_str().unwrap();
    let replies = replay(replay_endpoint, 1);
    let vector_replies: Vec<Vec<String>> =
        serde_json::from_value(expected["replay"].clone()).unwrap();
    assert_eq!(
        replies.len(),
        batches.len(),
        "batches 1.. and the end marker"
    );
    let layout =
        |reply: &Vec<String>| -> Vec<bool> { reply.iter().map(String::is_empty).collect() };
    for (reply, batch) in replies.iter().zip(&batches[1..]) {
        assert_eq!(layout(reply), layout(&vector_replies[0]), "{reply:?}");
        let seq = format!("{:016x}", batch["seq"].as_u64().unwrap());
        assert_eq!(reply[reply.len() - 2], seq);
        assert_eq!(
            reply.last().unwrap(),
            batch["payload_hex"].as_str().unwrap()
        );
        if reply.len() == 4 {
            assert_eq!(reply[1], hex::encode(&topic));
        }
    }
    assert_eq!(replies.last(), vector_replies.last(), "end marker");
}

#[test]
fn kv_events_of_vllm_0_10_1_1_sha256_cbor_64bit() {
    check_release(
        Setup {
            release: "0.10.1.1",
            algo: "sha256_cbor_64bit",
        },
        true,
    );
}

#[test]
fn kv_events_of_vllm_0_11_0() {
    check_release(V0_11_0, true);
}

#[test]
fn kv_events_of_vllm_0_33_0_with_int_and_raw_hashes() {
    let setup = Setup {
        release: "0.33.0",
        algo: "sha256_cbor",
    };
    check_release(setup, true);
    check_release(setup, false);
}

#[test]
fn openai_sdk_and_curl_see_vllm_responses_with_cached_tokens() {
    let sim = Sim::start(V0_11_0, &[]);
    let shapes = openai(&sim, 0, "shapes", &[]);

    let chat = &shapes["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert!(chat["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["finish_reason"], "length");
    assert_eq!(chat["content"].as_str().unwrap().split(' ').count(), 5);
    assert_eq!(chat["usage"]["completion_tokens"], 5);
    assert!(chat["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(chat["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    let stream = &shapes["chat_stream"];
    assert_eq!(stream["objects"], json!(["chat.completion.chunk"]));
    assert_eq!(stream["roles"], json!(["assistant"]));
    assert_eq!(stream["ids"].as_array().unwrap().len(), 1);
    let contents: Vec<&str> = stream["contents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(contents.len(), 6, "one chunk per token");
    let finish: Vec<&Value> = stream["finish_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    assert_eq!(stream["usage"].as_array().unwrap().len(), 1);
    assert_eq!(stream["usage"][0]["completion_tokens"], 6);

    let completion = &shapes["completion"];
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["finish_reason"], "length");
    assert_eq!(completion["usage"]["completion_tokens"], 4);
    let stream = &shapes["completion_stream"];
    assert_eq!(stream["texts"].as_array().unwrap().len(), 3);
    assert_eq!(stream["usage"][0]["completion_tokens"], 3);
    assert_eq!(
        stream["usage"][0]["prompt_tokens"],
        completion["usage"]["prompt_tokens"]
    );

    // A long shared prefix: the second request hits its full blocks.
    let shared = "You are a meticulous assistant for a logistics company. ".repeat(12);
    let first = format!("{shared}Where is parcel 1?");
    let second = format!("{shared}Summarise the delivery routes for tomorrow.");
    let usages = openai(&sim, 0, "completions", &[&first, &second]);
    let tokenizer = tokenizer();
    let tokens = |prompt: &str| {
        tokens_of(
            &tokenizer,
            Endpoint::Completions,
            &json!({"model": MODEL, "prompt": prompt}),
        )
    };
    let (a, b) = (tokens(&first), tokens(&second));
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let expected = (common / BLOCK_SIZE).min((b.len() - 1) / BLOCK_SIZE) * BLOCK_SIZE;
    assert!(expected >= 100, "the prefix should span several blocks");
    assert_eq!(usages["usages"][0]["prompt_tokens"], a.len());
    assert_eq!(
        usages["usages"][0]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(usages["usages"][1]["prompt_tokens"], b.len());
    assert_eq!(
        usages["usages"][1]["prompt_tokens_details"]["cached_tokens"],
        expected
    );

    // curl: the raw SSE framing, models, health, errors.
    let body =
        json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2, "stream": true}).to_string();
    let (status, sse) = curl(&[
        "-N",
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        &sim.url(0, "/v1/completions"),
    ]);
    assert_eq!(status, 200);
    let events: Vec<&str> = sse.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{sse}");
    assert!(events.iter().all(|e| e.starts_with("data: ")));
    assert_eq!(events[2], "data: [DONE]");
    let models = get_json(&sim.url(0, "/v1/models"));
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(curl(&[&sim.url(0, "/health")]).0, 200);
    let (status, error) = post_json(
        &sim.url(0, "/v1/completions"),
        &json!({"model": "other", "prompt": "x"}),
    );
    assert_eq!(status, 404);
    assert_eq!(error["error"]["type"], "NotFoundError");
    let (status, error) = post_json(
        &sim.url(0, "/v1/completions"),
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 50_000}),
    );
    assert_eq!(status, 400, "{error}");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with('{'))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}

#[test]
fn metrics_reset_restart_and_kill_behave_like_vllm() {
    let subscriber = Subscriber::start();
    let sim = Sim::start(
        V0_11_0,
        &["--events-connect", &subscriber.endpoint(), "--pods", "2"],
    );
    subscriber.wait_connected();
    subscriber.wait_connected();
    let prompt: Vec<u32> = (0..40).map(|i| 500 + i).collect();
    let request = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2});
    let (status, _) = post_json(&sim.url(0, "/v1/completions"), &request);
    assert_eq!(status, 200);
    assert_eq!(subscriber.expect_next()["seq"], 0);

    let (_, text) = curl(&[&sim.url(0, "/metrics")]);
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_count",
    ] {
        metric(&text, name);
    }
    assert_eq!(metric(&text, "vllm:prefix_cache_queries_total"), 40.0);
    assert!(text.contains("block_size=\"16\""), "{text}");
    assert!(text.contains("num_gpu_blocks=\"4096\""), "{text}");
    assert!(text.contains("model_name=\"Qwen3-32B\""), "{text}");

    // Reset: one AllBlocksCleared batch, then the prompt no longer hits.
    assert_eq!(post(&sim.url(0, "/reset_prefix_cache")), 200);
    let cleared = subscriber.expect_next();
    assert_eq!(cleared["seq"], 1);
    assert_eq!(cleared["decoded"][1], json!([["AllBlocksCleared"]]));
    let (_, response) = post_json(&sim.url(0, "/v1/completions"), &request);
    assert_eq!(
        response["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(subscriber.expect_next()["seq"], 2);
    let (_, response) = post_json(&sim.url(0, "/v1/completions"), &request);
    assert_eq!(
        response["usage"]["prompt_tokens_details"]["cached_tokens"],
        32
    );

    // Restart over the pod's own port: a new process, sequence numbers from 0, empty cache.
    assert_eq!(post(&sim.url(0, "/sim/restart")), 202);
    wait_until("pod 0 to come back", || {
        get_json(&sim.control("/sim/pods"))[0]["incarnation"] == 2
    });
    subscriber.wait_connected();
    let (_, response) = post_json(&sim.url(0, "/v1/completions"), &request);
    assert_eq!(
        response["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    let after_restart = subscriber.expect_next();
    assert_eq!(after_restart["seq"], 0);
    assert_eq!(after_restart["topic"], subscriber_topic(&sim, 0));

    // Pod 1 was untouched: its sequence continues from its own 0.
    let (_, _) = post_json(&sim.url(1, "/v1/completions"), &request);
    let other = subscriber.expect_next();
    assert_eq!(
        (other["topic"].clone(), other["seq"].clone()),
        (subscriber_topic(&sim, 1), json!(0))
    );

    // Kill: connection refused until revived through the control port.
    assert_eq!(post(&sim.url(1, "/sim/kill")), 202);
    wait_until("pod 1 to go down", || {
        curl(&[&sim.url(1, "/health")]).0 == 0
    });
    // Down until revived: the control API says so, and the revive below is what brings
    // it back.
    assert_eq!(get_json(&sim.control("/sim/pods"))[1]["state"], "down");
    assert_eq!(post(&sim.control("/sim/pods/1/revive")), 202);
    wait_until("pod 1 to come back", || {
        curl(&[&sim.url(1, "/health")]).0 == 200
    });

    // Kill for a while over the pod's own port: it comes back by itself.
    assert_eq!(post(&sim.url(0, "/sim/kill?downMs=300")), 202);
    wait_until("pod 0 to go down", || {
        curl(&[&sim.url(0, "/health")]).0 == 0
    });
    wait_until("pod 0 to come back", || {
        curl(&[&sim.url(0, "/health")]).0 == 200
    });
    assert_eq!(get_json(&sim.control("/sim/pods"))[0]["incarnation"], 3);
}

fn subscriber_topic(sim: &Sim, pod: usize) -> Value {
    json!(format!(
        "kv@{}@{MODEL}",
        sim.pod(pod)["http"].as_str().unwrap()
    ))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn dropped_events_leave_a_gap_that_replay_fills_and_delayed_events_arrive_late() {
    let subscriber = Subscriber::start();
    let sim = Sim::start(
        V0_11_0,
        &[
            "--events-connect",
            &subscriber.endpoint(),
            "--replay-base-port",
            "0",
        ],
    );
    subscriber.wait_connected();
    let request = |first: u32| {
        let prompt: Vec<u32> = (first..first + 20).collect();
        let (status, _) = post_json(
            &sim.url(0, "/v1/completions"),
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
        );
        assert_eq!(status, 200);
    };
    let (status, faults) = post_json(
        &sim.url(0, "/sim/faults"),
        &json!({"dropEventsProbability": 1.0}),
    );
    assert_eq!(status, 200);
    assert_eq!(faults["dropEventsProbability"], 1.0);
    request(100);
    assert!(subscriber.next(Duration::from_millis(500)).is_none());
    post_json(
        &sim.url(0, "/sim/faults"),
        &json!({"dropEventsProbability": 0.0}),
    );
    request(200);
    assert_eq!(subscriber.expect_next()["seq"], 1, "seq 0 was dropped");
    let replies = replay(sim.pod(0)["replayEndpoint"].as_str().unwrap(), 0);
    let seqs: Vec<&str> = replies.iter().map(|reply| reply[1].as_str()).collect();
    assert_eq!(
        seqs,
        ["0000000000000000", "0000000000000001", "ffffffffffffffff"]
    );

    post_json(&sim.url(0, "/sim/faults"), &json!({"delayEventsMs": 600}));
    request(300);
    let answered = unix_now();
    let delayed = subscriber.expect_next();
    assert_eq!(delayed["seq"], 2);
    let late = delayed["received_at"].as_f64().unwrap() - answered;
    assert!(late > 0.3, "the batch came {late:.3} s after the response");
}

#[test]
fn streams_are_paced_by_the_step_model_and_disconnects_abort() {
    // 40 ms steps: far apart enough that a busy machine does not blur them.
    let dir = tempfile::tempdir().unwrap();
    let params = dir.path().join("pod.yaml");
    std::fs::write(&params, "stepBaseMs: 40\nrequestOverheadMs: 10\n").unwrap();
    let sim = Sim::start(V0_11_0, &["--pod-params", params.to_str().unwrap()]);
    let paced = openai(&sim, 0, "paced", &["24"]);
    let times: Vec<f64> = serde_json::from_value(paced["chunk_times"].clone()).unwrap();
    assert_eq!(times.len(), 24);
    // 23 decode steps of at least 40 ms each.
    let spread = times[23] - times[0];
    assert!(spread > 0.8, "tokens arrived within {spread:.3} s");
    let gaps = times.windows(2).filter(|w| w[1] - w[0] > 0.01).count();
    assert!(gaps > 12, "tokens arrived in bursts: {times:?}");

    let result = openai(&sim, 0, "disconnect", &[]);
    assert_eq!(result["received"], 3);
    wait_until("the aborted request to leave the engine", || {
        let (_, text) = curl(&[&sim.url(0, "/metrics")]);
        metric(&text, "vllm:num_requests_running") == 0.0
    });

    // Paused, the engine takes no step: a request waits until resumed.
    assert_eq!(post(&sim.url(0, "/sim/pause")), 200);
    let url = sim.url(0, "/v1/completions");
    let pending = thread::spawn(move || {
        let started = Instant::now();
        let (status, _) = post_json(
            &url,
            &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1}),
        );
        (status, started.elapsed())
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(post(&sim.url(0, "/sim/resume")), 200);
    let (status, took) = pending.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        took >= Duration::from_millis(450),
        "answered after {took:?}"
    );
}

#[test]
fn bound_publishers_serve_connecting_subscribers_and_replay() {
    let sim = Sim::start(
        V0_11_0,
        &["--events-bind-base-port", "0", "--replay-base-port", "0"],
    );
    let pub_endpoint = sim.pod(0)["pubEndpoint"].as_str().unwrap();
    let subscriber = Subscriber::connect(pub_endpoint);
    subscriber.wait_connected();
    let prompt: Vec<u32> = (0..33).collect();
    let (status, _) = post_json(
        &sim.url(0, "/v1/completions"),
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
    );
    assert_eq!(status, 200);
    let batch = subscriber.expect_next();
    assert_eq!(batch["seq"], 0);
    assert_eq!(batch["topic"], subscriber_topic(&sim, 0));
    let replies = replay(sim.pod(0)["replayEndpoint"].as_str().unwrap(), 0);
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0][2], batch["payload_hex"].as_str().unwrap());
}
