//! A hot reload applies on the next request or connection, and keeps what the running
//! process knows: `kvgate serve` in a subprocess, in front of two `kvgate sim` pods (their
//! KV events followed in connect mode) and a port that refuses connections (a dead pod).
//!
//! Each reloaded setting is checked by what it changes: the scorer weights by the next
//! request's totals, `maxAttempts` by whether a request that meets the dead pod first is
//! retried, the listener limits by the next connection (while connections accepted
//! before keep the limits they were accepted with), the log level by whether the next
//! request is logged. Across the reloads the block index keeps its entries (the next
//! request's predicted cached tokens equal what the pod reports), the pods keep their ids
//! and a stream held open stays counted on its pod until it ends.

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sim::{model_yaml, SimPods};
use upstream::{
    connect, debug_pods, http_request, metric, parse_head, scores, totals_weighted_by, wait_for,
    write_request, ClosedPort, Serve,
};

const LIMIT: Duration = Duration::from_secs(60);
const MODEL: &str = "qwen";

/// The settings the reloads turn.
#[derive(Clone)]
struct Settings {
    kv_weight: u32,
    max_attempts: u32,
    level: &'static str,
    max_header_bytes: usize,
    max_header_fields: usize,
    header_timeout_ms: u64,
    keep_alive_timeout_ms: u64,
    body_timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kv_weight: 2,
            max_attempts: 1,
            level: "info",
            max_header_bytes: 8192,
            max_header_fields: 40,
            header_timeout_ms: 60_000,
            keep_alive_timeout_ms: 60_000,
            body_timeout_ms: 60_000,
        }
    }
}

fn render(s: &Settings, pods: &str) -> String {
    format!(
        "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  maxAttempts: {attempts}
  connectTimeoutMs: 1000
  ejectAfterFailures: 1000
  healthCheckIntervalMs: 0
  scrapeIntervalMs: 0
  maxHeaderBytes: {header_bytes}
  maxHeaderFields: {header_fields}
  headerTimeoutMs: {header_timeout}
  keepAliveTimeoutMs: {keep_alive}
  bodyTimeoutMs: {body_timeout}
  threads: 2
events:
  mode: connect
  replay: true
logging:
  level: \"{level}\"
  format: json
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: kv-cache, weight: {kv}}}, {{name: load, weight: 1}}]
    picker: {{name: max-score}}
  load-only:
    filters: [{{name: healthy}}]
    scorers: [{{name: load, weight: 1}}]
    picker: {{name: max-score}}
",
        attempts = s.max_attempts,
        header_bytes = s.max_header_bytes,
        header_fields = s.max_header_fields,
        header_timeout = s.header_timeout_ms,
        keep_alive = s.keep_alive_timeout_ms,
        body_timeout = s.body_timeout_ms,
        level = s.level,
        kv = s.kv_weight,
    ) + &model_yaml(MODEL, pods)
}

/// `kvgate serve` on a config file it reloads.
struct Gateway {
    serve: Serve,
    dir: PathBuf,
    pods: String,
    listen: u16,
    admin: u16,
}

impl Gateway {
    fn start(dir: &Path, pods: String, settings: &Settings) -> Self {
        fs::write(dir.join("kvgate.yaml"), render(settings, &pods)).expect("write config");
        let (serve, listening) =
            Serve::start(&dir.join("kvgate.yaml"), &dir.join("kvgate.log"), &[]);
        let gateway = Self {
            serve,
            dir: dir.to_path_buf(),
            pods,
            listen: listening.proxy,
            admin: listening.admin,
        };
        wait_for("kvgate ready", LIMIT, || {
            (http_request(gateway.admin, "GET", "/readyz", &[], b"").0 == 200).then_some(())
        });
        gateway
    }

    fn handled(&self, request_id: &str) -> Option<Value> {
        self.serve
            .handled()
            .into_iter()
            .find(|f| f["request_id"] == request_id)
    }

    fn metric(&self, series: &str) -> f64 {
        metric(self.admin, series)
    }

    fn debug_pods(&self) -> Vec<Value> {
        debug_pods(self.admin, MODEL)
    }

    /// Rewrites the config (atomically, as editors do), sends SIGHUP, and waits until a
    /// reload has applied it.
    fn reload(&self, settings: &Settings) {
        let applied = self.metric("kvgate_config_reloads_total{result=\"ok\"}");
        let tmp = self.dir.join("kvgate.yaml.tmp");
        fs::write(&tmp, render(settings, &self.pods)).expect("write config");
        fs::rename(&tmp, self.dir.join("kvgate.yaml")).expect("rename config");
        self.serve.signal("HUP");
        wait_for("the reload to apply", LIMIT, || {
            (self.metric("kvgate_config_reloads_total{result=\"ok\"}") > applied).then_some(())
        });
        assert_eq!(
            self.metric("kvgate_config_reloads_total{result=\"failed\"}"),
            0.0,
            "a reload was refused"
        );
    }

    /// A chat request; its status.
    fn chat(&self, id: &str, body: &Value, headers: &[(&str, &str)]) -> u16 {
        let mut all = vec![("content-type", "application/json"), ("x-request-id", id)];
        all.extend_from_slice(headers);
        http_request(
            self.listen,
            "POST",
            "/v1/chat/completions",
            &all,
            body.to_string().as_bytes(),
        )
        .0
    }

    /// `GET /v1/models` (kvgate answers it itself) with extra header fields; its status.
    fn models(&self, headers: &[(String, String)]) -> u16 {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http_request(self.listen, "GET", "/v1/models", &headers, b"").0
    }
}

/// A chat over contract `contract`, a document of about 700 tokens, asking `question`.
fn document_chat(contract: usize, question: &str, max_tokens: u32) -> Value {
    let document: Vec<String> = (0..140)
        .map(|w| format!("clause{w} binds party {}", (w * 13) % 29))
        .collect();
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": format!("Contract {contract}: {}", document.join("; "))},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
    })
}

/// Whether kvgate still has `stream` open (no bytes and no end of file waiting).
fn still_open(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let open = matches!(stream.read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).expect("blocking");
    open
}

/// Blocks until kvgate closes `stream`; returns when.
fn closed_at(stream: &mut TcpStream) -> Instant {
    stream.set_read_timeout(Some(LIMIT)).expect("read timeout");
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Instant::now(),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Instant::now(),
            Err(e) => panic!("kvgate did not close the connection: {e}"),
        }
    }
}

/// A connection that sent half a request header.
fn stalled_header(port: u16) -> TcpStream {
    let mut stream = connect(port);
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-slow: ab")
        .expect("write");
    stream
}

/// A kept-alive connection that has had one answered request and is idle.
fn idle_keep_alive(port: u16) -> TcpStream {
    let mut stream = connect(port);
    write_request(&mut stream, "GET", "/v1/models", &[], b"", false);
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("read response");
        assert!(n > 0, "closed before the response");
        received.extend_from_slice(&buf[..n]);
        if let Some((status, head, body_at)) = parse_head(&received) {
            let length: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                .expect("content-length");
            if received.len() >= body_at + length {
                assert_eq!(status, 200);
                return stream;
            }
        }
    }
}

/// `count` header fields of `bytes` bytes in all.
fn header_fields(count: usize, bytes: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| (format!("x-f{i:02}"), "v".repeat(bytes / count)))
        .collect()
}

#[test]
fn each_reloaded_setting_applies_to_the_next_request_or_connection_and_state_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim_config = dir.path().join("sim.yaml");
    fs::write(&sim_config, model_yaml(MODEL, "[]")).expect("write sim config");
    let sim = SimPods::start(
        &sim_config,
        2,
        &["--events-bind-base-port", "0", "--replay-base-port", "0"],
    );
    let dead = ClosedPort::new();
    let mut pods = sim.connect_entries(MODEL);
    pods.push(format!("{{http: \"{}\"}}", dead.addr));
    let mut settings = Settings::default();
    let gateway = Gateway::start(dir.path(), format!("[{}]", pods.join(", ")), &settings);

    // The index: a document served once is cached on its pod, and kvgate knows it. With
    // maxAttempts 1 a cold prompt whose first pick is the dead pod fails unretried (pods
    // tie, and the prompt's first block breaks the tie): take the first contract that
    // lands on a live pod.
    let (contract, first) = (0..16)
        .find_map(|contract| {
            let id = format!("warm-1-{contract}");
            let status = gateway.chat(&id, &document_chat(contract, "Who binds?", 2), &[]);
            (status == 200).then(|| (contract, gateway.serve.wait_handled(&id)))
        })
        .expect("a contract whose first pick is a live pod");
    let prompt = first["prompt_tokens"].as_u64().expect("prompt tokens");
    wait_for("the first request's blocks in the index", LIMIT, || {
        (gateway.metric("kvgate_index_entries") >= (prompt / sim::BLOCK as u64) as f64)
            .then_some(())
    });
    assert_eq!(
        gateway.chat("warm-2", &document_chat(contract, "Who signs?", 2), &[]),
        200
    );
    let before = gateway.serve.wait_handled("warm-2");
    let holder = before["endpoint"].clone();
    assert!(
        before["predicted_cached_tokens"].as_u64() > Some(0),
        "{before}"
    );
    assert_eq!(
        before["predicted_cached_tokens"],
        before["actual_cached_tokens"]
    );
    let kv2 = [("kv-cache", 2.0), ("load", 1.0)];
    let kv3 = [("kv-cache", 3.0), ("load", 1.0)];
    assert!(totals_weighted_by(&before, &kv2), "{before}");
    assert!(!totals_weighted_by(&before, &kv3), "{before}");

    // Load: a long stream, open across every reload, counts on its pod.
    let mut held = connect(gateway.listen);
    let mut stream_body = document_chat(contract, "Recite every clause.", 20_000);
    stream_body["stream"] = json!(true);
    write_request(
        &mut held,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "held"),
        ],
        stream_body.to_string().as_bytes(),
        false,
    );
    let mut buf = [0u8; 4096];
    let n = held.read(&mut buf).expect("the stream starts");
    assert!(n > 0);
    let in_flight = |pods: &[Value]| -> Vec<(u64, String, u64)> {
        pods.iter()
            .map(|p| {
                (
                    p["id"].as_u64().expect("id"),
                    p["http"].as_str().expect("http").to_string(),
                    p["in_flight"].as_u64().expect("in_flight"),
                )
            })
            .collect()
    };
    let pods_before = in_flight(&gateway.debug_pods());
    assert_eq!(
        pods_before.iter().map(|(_, _, n)| n).sum::<u64>(),
        1,
        "{pods_before:?}"
    );

    // maxAttempts 1: find a cold prompt whose first pick is the dead pod (load alone
    // decides; the held stream's pod loses, and the tie between the other two is broken
    // by the prompt's first block), so it fails unretried.
    let load_only = [("x-kvgate-profile", "load-only")];
    let probe = |n: usize| {
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": format!(
                "Cold probe number {n} asks about the weather in a city far away from here."
            )}],
            "max_tokens": 1,
        })
    };
    let unlucky = (0..60)
        .find(|&n| gateway.chat(&format!("probe-{n}"), &probe(n), &load_only) != 200)
        .expect("no prompt met the dead pod first");
    let failed = gateway.serve.wait_handled(&format!("probe-{unlucky}"));
    assert_eq!(
        failed["endpoint"],
        dead.addr.to_string().as_str(),
        "{failed}"
    );
    assert_eq!(failed["attempts"], 1, "{failed}");

    // Listener limits before: 6,000 header bytes and 30 fields pass.
    assert_eq!(gateway.models(&header_fields(1, 6000)), 200);
    assert_eq!(gateway.models(&header_fields(30, 300)), 200);
    let mut stalled_before = stalled_header(gateway.listen);
    let mut idle_before = idle_keep_alive(gateway.listen);
    let entries_before = gateway.metric("kvgate_index_entries");

    settings.kv_weight = 3;
    settings.max_attempts = 2;
    settings.max_header_bytes = 4096;
    settings.max_header_fields = 20;
    settings.header_timeout_ms = 1000;
    settings.keep_alive_timeout_ms = 1000;
    settings.body_timeout_ms = 1000;
    gateway.reload(&settings);

    // The index, the pods and their load are as they were.
    assert!(gateway.metric("kvgate_index_entries") >= entries_before);
    assert_eq!(in_flight(&gateway.debug_pods()), pods_before);

    // Weights: the next request's totals are 3 × kv-cache + load, and the index still
    // sends it to the pod that holds its prefix, which confirms every predicted token.
    assert_eq!(
        gateway.chat("warm-3", &document_chat(contract, "Who pays?", 2), &[]),
        200
    );
    let after = gateway.serve.wait_handled("warm-3");
    assert!(totals_weighted_by(&after, &kv3), "{after}");
    assert!(!totals_weighted_by(&after, &kv2), "{after}");
    assert_eq!(after["endpoint"], holder, "{after}");
    assert!(
        after["predicted_cached_tokens"].as_u64() > Some(0),
        "{after}"
    );
    assert_eq!(
        after["predicted_cached_tokens"],
        after["actual_cached_tokens"]
    );
    assert!(
        scores(&after).iter().any(|pod| pod.pod == holder),
        "{after}"
    );

    // maxAttempts 2: the same prompt meets the dead pod first again and is retried.
    let id = format!("probe-{unlucky}-again");
    assert_eq!(gateway.chat(&id, &probe(unlucky), &load_only), 200);
    let retried = gateway.serve.wait_handled(&id);
    assert_eq!(retried["attempts"], 2, "{retried}");
    assert_ne!(retried["endpoint"], dead.addr.to_string().as_str());

    // Header limits: the same headers now get 431.
    assert_eq!(gateway.models(&header_fields(1, 6000)), 431);
    assert_eq!(gateway.models(&header_fields(30, 300)), 431);
    assert_eq!(gateway.models(&header_fields(10, 300)), 200);

    // Header and keep-alive timeouts: new connections are cut after 1 s, while those
    // accepted before the reload keep their 60 s.
    let started = Instant::now();
    let mut stalled_after = stalled_header(gateway.listen);
    let cut = closed_at(&mut stalled_after) - started;
    assert!(cut >= Duration::from_millis(950), "{cut:?}");
    assert!(
        still_open(&mut stalled_before),
        "an older connection got the new header timeout"
    );
    let mut idle_after = idle_keep_alive(gateway.listen);
    let idle_from = Instant::now();
    let cut = closed_at(&mut idle_after) - idle_from;
    assert!(cut >= Duration::from_millis(950), "{cut:?}");
    assert!(
        still_open(&mut idle_before),
        "an older connection got the new idle timeout"
    );

    // Body timeout: a body trickled past 1 s gets 408.
    let body = document_chat(contract, "slow", 1).to_string();
    let mut slow = connect(gateway.listen);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).expect("write head");
    slow.write_all(&body.as_bytes()[..10])
        .expect("write a little");
    let mut answer = Vec::new();
    slow.set_read_timeout(Some(LIMIT)).expect("timeout");
    while parse_head(&answer).is_none() {
        let n = slow.read(&mut buf).expect("read the answer");
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let (status, head, _) = parse_head(&answer).expect("head");
    assert_eq!(status, 408, "{head}");

    // Log level: at warn the next request leaves no `Request handled` line; back at
    // info the one after does.
    settings.level = "warn";
    gateway.reload(&settings);
    assert_eq!(
        gateway.chat("quiet", &document_chat(contract, "Who?", 1), &[]),
        200
    );
    settings.level = "info";
    gateway.reload(&settings);
    assert_eq!(
        gateway.chat("loud", &document_chat(contract, "Why?", 1), &[]),
        200
    );
    gateway.serve.wait_handled("loud");
    assert!(gateway.handled("quiet").is_none(), "logged at level warn");

    // The held stream ends when its client goes: the load it counted is released.
    drop(held);
    wait_for("the held stream's load to be released", LIMIT, || {
        in_flight(&gateway.debug_pods())
            .iter()
            .all(|(_, _, n)| *n == 0)
            .then_some(())
    });
}
