//! ACK's guide, unchanged, in front of kvgate (issue 12), with real processes:
//!
//! * the stand-in apiserver (tests/k8s/apiserver_standin.py, serving the CRDs shipped in
//!   deploy/crds) holds the guide's `InferencePool` (v1alpha2, and v1 in its own test) and
//!   `InferenceTrafficPolicy`; kvgate is configured from them alone, applies an edit, and
//!   refuses an invalid policy (reported as an Event, the metric and the log) while the previous
//!   one keeps serving;
//! * three `kvgate serve` replicas in bind mode relay the pods' events to each other; the pods are
//!   `kvgate sim` pods (the stand-in for vLLM) configured as the guide's: each *connects* its PUB to
//!   one address, names itself in the topic, has no replay endpoint. That address is a TCP
//!   forwarder standing in for kube-proxy's ClusterIP: it sends each new connection to the next
//!   live replica, so each pod's PUB lands on a different replica, and when one replica is
//!   killed its pod reconnects to another. The guide's round 2 (streamed, `include_usage`) lands on
//!   round 1's pod from every replica, before and after the kill, with `predicted_cached_tokens`
//!   equal to the pod's own `cached_tokens`, and every surviving replica's index equals the pods'
//!   caches.

// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use upstream::{free_port, http_request, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const LIMIT: Duration = Duration::from_secs(60);
const MODEL: &str = "Qwen3-32B";
const BLOCK: u64 = 64;

// ----- the stand-in apiserver

struct Standin {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Standin {
    fn start(dir: &Path) -> Self {
        let log = fs::File::create(dir.join("standin.log")).expect("log");
        let mut child = Command::new("python3")
            .arg(format!("{ROOT}/tests/k8s/apiserver_standin.py"))
            .args(["--port", "0", "--bookmark-interval", "0.5"])
            .args([
                "--crd",
                &format!("{ROOT}/deploy/crds/inferencepools.inference.networking.x-k8s.io.yaml"),
                "--crd",
                &format!("{ROOT}/deploy/crds/inferencetrafficpolicies.inferenceextension.alibabacloud.com.yaml"),
            ])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start the stand-in apiserver");
        let port = banner_port(child.stdout.take().expect("stdout"));
        let standin = Self {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        fs::write(
            standin.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: s\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\n\
                 users:\n- name: u\n  user: {{}}\ncontexts:\n- name: s\n  context: {{cluster: s, user: u, namespace: default}}\n\
                 current-context: s\n"
            ),
        )
        .expect("kubeconfig");
        standin
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn call(&self, method: &str, path: &str, content_type: &str, body: &Value) -> Value {
        let body = body.to_string();
        let (status, response) = http_request(
            self.port,
            method,
            path,
            &[("content-type", content_type)],
            body.as_bytes(),
        );
        let response: Value = serde_json::from_slice(&response).expect("JSON");
        assert!(status < 300, "{method} {path}: {status} {response}");
        response
    }

    fn create(&self, collection: &str, object: Value) -> Value {
        self.call("POST", collection, "application/json", &object)
    }

    fn patch(&self, path: &str, patch: Value) -> Value {
        self.call("PATCH", path, "application/merge-patch+json", &patch)
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = http_request(self.port, "GET", path, &[], b"");
        assert_eq!(status, 200, "GET {path}");
        serde_json::from_slice(&body).expect("JSON")
    }

    /// The Events posted on the policy, as (reason, note, resourceVersion of the policy).
    fn policy_events(&self) -> Vec<(String, String, String)> {
        self.get("/apis/events.k8s.io/v1/namespaces/default/events")["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|e| e["regarding"]["kind"] == "InferenceTrafficPolicy")
            .map(|e| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (
                    text(&e["reason"]),
                    text(&e["note"]),
                    text(&e["regarding"]["resourceVersion"]),
                )
            })
            .collect()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- stand-in log (tail) ---\n{}",
                tail(&self.dir.join("standin.log"))
            );
        }
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn banner_port(stdout: ChildStdout) -> u16 {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(LIMIT).expect("stand-in banner");
    line.trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("banner {line:?}"))
}

const POLICY: &str = "/apis/inferenceextension.alibabacloud.com/v1alpha1/namespaces/default/inferencetrafficpolicies";

/// The guide's pool and policy, and one Ready pod per address.
fn seed_cluster(standin: &Standin, pool_version: &str, port: u16, ips: &[&str]) {
    for (i, ip) in ips.iter().enumerate() {
        let pod = standin.create(
            "/api/v1/namespaces/default/pods",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("qwen3-{i}"), "labels": {"app": "qwen3"}},
                "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.10.1.1"}]}
            }),
        );
        let name = pod["metadata"]["name"].as_str().expect("name").to_string();
        standin.patch(
            &format!("/api/v1/namespaces/default/pods/{name}/status"),
            json!({"status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
    }
    match pool_version {
        "v1alpha2" => standin.create(
            "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/default/inferencepools",
            json!({
                "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
                "metadata": {"name": "qwen-inference-pool"},
                "spec": {"targetPortNumber": port, "selector": {"app": "qwen3"}}
            }),
        ),
        _ => standin.create(
            "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools",
            json!({
                "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                "metadata": {"name": "qwen-inference-pool"},
                "spec": {"targetPorts": [{"number": port}], "selector": {"matchLabels": {"app": "qwen3"}},
                         "endpointPickerRef": {"name": "kvgate", "port": {"number": 9002}}}
            }),
        ),
    };
    standin.create(
        POLICY,
        json!({
            "apiVersion": "inferenceextension.alibabacloud.com/v1alpha1",
            "kind": "InferenceTrafficPolicy",
            "metadata": {"name": "inference-policy"},
            "spec": {
                "poolRef": {"name": "qwen-inference-pool"},
                "profile": {"single": {"trafficPolicy": {"prefixCache": {
                    "mode": "tracking",
                    "trackingConfig": {"indexerConfig": {"tokenProcessorConfig": {
                        "blockSize": BLOCK, "hashSeed": 42, "model": "Qwen/Qwen3-32B"
                    }}}
                }}}}
            }
        }),
    );
}

// ----- kvgate replicas

struct Replica {
    child: Option<Child>,
    listen: u16,
    admin: u16,
    log: PathBuf,
}

struct Ports {
    listen: u16,
    admin: u16,
    bind: u16,
    relay: u16,
}

impl Ports {
    fn pick() -> Self {
        Self {
            listen: free_port(),
            admin: free_port(),
            bind: free_port(),
            relay: free_port(),
        }
    }
}

impl Replica {
    fn start(dir: &Path, n: usize, standin: &Standin, ports: &Ports, peers: &[u16]) -> Self {
        let secret = dir.join("relay-secret");
        fs::write(&secret, "a-shared-secret-of-the-replicas\n").expect("secret");
        let peers = peers
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let tokenizer = format!("{ROOT}/.tokenizers/qwen3");
        let config = dir.join(format!("kvgate-{n}.yaml"));
        fs::write(
            &config,
            format!(
                "server: {{listen: 127.0.0.1:{listen}, admin: 127.0.0.1:{admin}, healthCheckIntervalMs: 0, scrapeIntervalMs: 0, threads: 1}}
events: {{mode: bind, bind: \"tcp://127.0.0.1:{bind}\", replay: false, requireKnownPods: true}}
relay: {{listen: \"127.0.0.1:{relay}\", secretFile: {secret}, peers: {{static: [{peers}]}}}}
logging: {{level: info, format: json}}
profiles:
  default: {{filters: [{{name: healthy}}], scorers: [{{name: kv-cache}}, {{name: load}}]}}
  approximate: {{filters: [{{name: healthy}}], scorers: [{{name: prefix, weight: 2}}, {{name: load}}]}}
trafficPolicies:
  namespace: default
  kubeconfig: {kubeconfig}
  tokenizers: {{\"Qwen/Qwen3-32B\": {tokenizer}}}
  models:
    - {{name: {MODEL}, policy: inference-policy, hashAlgo: sha256_cbor_64bit, vllmRelease: \"0.10.1.1\"}}
",
                listen = ports.listen,
                admin = ports.admin,
                bind = ports.bind,
                relay = ports.relay,
                secret = secret.display(),
                kubeconfig = standin.kubeconfig().display(),
            ),
        )
        .expect("config");
        let log = dir.join(format!("kvgate-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--upgrade-sock")
            .arg(dir.join(format!("upgrade-{n}.sock")))
            .arg("--pid-file")
            .arg(dir.join(format!("kvgate-{n}.pid")))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start kvgate");
        let replica = Self {
            child: Some(child),
            listen: ports.listen,
            admin: ports.admin,
            log,
        };
        wait_for("replica ready", LIMIT, || {
            TcpStream::connect(("127.0.0.1", replica.admin)).ok()?;
            (http_request(replica.admin, "GET", "/readyz", &[], b"").0 == 200).then_some(())
        });
        replica
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill replica");
            child.wait().expect("reap replica");
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = http_request(self.admin, "GET", "/metrics", &[], b"");
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn log_lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("fields").cloned())
            .collect()
    }

    fn handled(&self, request_id: &str) -> Value {
        wait_for("the Request handled line", Duration::from_secs(10), || {
            self.log_lines()
                .into_iter()
                .find(|f| f["message"] == "Request handled" && f["request_id"] == request_id)
        })
    }

    /// Sends a chat the way the guide's curl does (streamed, with usage) and returns the
    /// replica's `Request handled` fields and the pod's usage.
    fn chat(&self, request_id: &str, body: &Value) -> (Value, Value) {
        let out = Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--no-buffer",
                "--max-time",
                "60",
            ])
            .arg(format!(
                "http://127.0.0.1:{}/v1/chat/completions",
                self.listen
            ))
            .args(["-H", "content-type: application/json"])
            .args(["-H", &format!("x-request-id: {request_id}")])
            .args(["-d", &body.to_string()])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let usage = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|chunk| chunk.get("usage").filter(|u| !u.is_null()).cloned())
            .unwrap_or_else(|| panic!("no usage chunk in {text}"));
        (self.handled(request_id), usage)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} (tail) ---\n{}", self.log.display(), tail(&self.log));
        }
    }
}

// ----- kube-proxy's stand-in: one ClusterIP, connections spread over live backends

struct ServiceStandin {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl ServiceStandin {
    fn start(backends: Vec<u16>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(Mutex::new(0usize));
        let (count, stopped) = (Arc::clone(&connections), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                // Round robin over the backends that accept, as kube-proxy picks per connection.
                let start = {
                    let mut next = next.lock().expect("lock");
                    let start = *next;
                    *next += 1;
                    start
                };
                let backend = (0..backends.len())
                    .map(|i| backends[(start + i) % backends.len()])
                    .find_map(|p| TcpStream::connect(("127.0.0.1", p)).ok());
                let Some(backend) = backend else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                pipe(client, backend);
            }
        });
        Self {
            port,
            connections,
            stop,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ServiceStandin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies both ways; when either side ends, both are closed (the pod then sees its peer gone).
fn pipe(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [
        (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
        (b, a),
    ] {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        });
    }
}

// ----- the guide's pods

struct Pod {
    child: Child,
    http: String,
}

impl Pod {
    fn start(dir: &Path, ip: &str, port: u16, events: u16) -> Self {
        let config = dir.join("sim.yaml");
        let tokenizer = format!("{ROOT}/.tokenizers/qwen3");
        fs::write(
            &config,
            format!(
                "models:\n  - name: {MODEL}\n    tokenizer: {tokenizer}/tokenizer.json\n    tokenizerConfig: {tokenizer}/tokenizer_config.json\n    \
                 blockSize: {BLOCK}\n    hashAlgo: sha256_cbor_64bit\n    hashSeed: \"42\"\n    vllmRelease: \"0.10.1.1\"\n    discovery: {{static: {{pods: []}}}}\n"
            ),
        )
        .expect("sim config");
        // --events-connect and --topic-host {host}: the guide's `endpoint` and `kv@${POD_IP}@Qwen3-32B`;
        // no --replay-base-port: the guide's pods have no replay endpoint.
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("sim")
            .arg("--config")
            .arg(&config)
            .args([
                "--pods",
                "1",
                "--host",
                ip,
                "--base-port",
                &port.to_string(),
            ])
            .args(["--events-connect", &format!("tcp://127.0.0.1:{events}")])
            .args(["--topic-host", "{host}", "--time-scale", "0.05"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kvgate sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let ready: Value = serde_json::from_str(&line).expect("ready line");
        let http = ready["ready"]["pods"][0]["http"]
            .as_str()
            .expect("http")
            .to_string();
        Self { child, http }
    }

    fn cached_blocks(&self) -> u64 {
        let port: u16 = self.http.rsplit(':').next().unwrap().parse().unwrap();
        let ip = self.http.rsplit_once(':').unwrap().0;
        let mut stream = TcpStream::connect((ip, port)).expect("pod");
        write!(
            stream,
            "GET /sim/state HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let body = response.split("\r\n\r\n").nth(1).expect("body");
        let state: Value = serde_json::from_str(body).expect("state");
        state["metrics"]["cachedBlocks"]
            .as_u64()
            .expect("cachedBlocks")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- the guide's two rounds

fn round1() -> Value {
    let hi = vec!["hi"; 110].join(" ");
    json!({
        "model": MODEL, "stream": true, "stream_options": {"include_usage": true},
        "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": format!(
            "This is a conversation with a text adventure engine. You narrate precisely, keep every \
             object's state, and answer in the style of the original Infocom games. {hi} \
             Now let's play zork."
        )}]
    })
}

fn round2(reply: &str, last: &str) -> Value {
    let mut body = round1();
    body["max_tokens"] = json!(3);
    let messages = body["messages"].as_array_mut().expect("messages");
    messages.push(json!({"role": "assistant", "content": reply}));
    messages.push(json!({"role": "user", "content": "West of House. You are standing in an open field west of a white house, with a boarded front door. There is a small mailbox here."}));
    messages.push(json!({"role": "assistant", "content": "Great!"}));
    messages.push(json!({"role": "user", "content": last}));
    body
}

fn predicted_equals_actual(line: &Value, usage: &Value) -> u64 {
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {usage}"));
    assert_eq!(
        line["predicted_cached_tokens"].as_u64(),
        Some(cached),
        "kvgate's prediction vs the pod's cached tokens: {line}"
    );
    cached
}

fn pod_ips() -> [&'static str; 3] {
    ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
}

#[test]
fn configured_from_the_policy_alone_with_edits_applied_and_bad_policies_refused() {
    for version in ["v1alpha2", "v1"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let standin = Standin::start(dir.path());
        seed_cluster(&standin, version, 8000, &pod_ips());
        let ports = Ports::pick();
        let replica = Replica::start(dir.path(), 0, &standin, &ports, &[ports.relay]);
        // The pool's pods are the model's, on the pool's port.
        let (_, pods) = http_request(replica.admin, "GET", "/debug/pods", &[], b"");
        let pods: Value = serde_json::from_slice(&pods).expect("JSON");
        let mut http: Vec<&str> = pods["models"][MODEL]
            .as_array()
            .expect("the policy's model")
            .iter()
            .filter_map(|p| p["http"].as_str())
            .collect();
        http.sort_unstable();
        assert_eq!(
            http,
            ["127.0.0.2:8000", "127.0.0.3:8000", "127.0.0.4:8000"],
            "{version}"
        );
        let applied = |rv: &str, reason: &str| {
            standin
                .policy_events()
                .iter()
                .any(|(r, _, v)| r == reason && v == rv)
        };
        let policy = standin.get(&format!("{POLICY}/inference-policy"));
        let rv = policy["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        wait_for("an Applied event", LIMIT, || {
            applied(&rv, "Applied").then_some(())
        });
        assert_eq!(replica.metric("kvgate_traffic_policy_applied"), 1.0);

        // An edit applies like a hot reload.
        let edited = standin.patch(
            &format!("{POLICY}/inference-policy"),
            json!({"spec": {"profile": {"single": {"trafficPolicy": {"prefixCache": {"trackingConfig":
                {"indexerConfig": {"tokenProcessorConfig": {"blockSize": 32}}}}}}}}}),
        );
        let rv = edited["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        wait_for("the edit applied", LIMIT, || {
            applied(&rv, "Applied").then_some(())
        });
        wait_for("the reload logged", LIMIT, || {
            replica
                .log_lines()
                .iter()
                .any(|f| {
                    f["message"] == "config reloaded"
                        && f["trigger"] == "InferenceTrafficPolicy change"
                })
                .then_some(())
        });

        // A policy kvgate cannot honour is refused and reported; the previous one serves on.
        let bad = standin.patch(
            &format!("{POLICY}/inference-policy"),
            json!({"spec": {"profile": {"single": {"trafficPolicy": {"prefixCache": {"mode": "telepathy"}}}}}}),
        );
        let rv = bad["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        wait_for("a Refused event", LIMIT, || {
            standin
                .policy_events()
                .into_iter()
                .find(|(r, _, v)| r == "Refused" && *v == rv)
        });
        let (_, note, _) = standin
            .policy_events()
            .into_iter()
            .find(|(r, _, v)| r == "Refused" && *v == rv)
            .expect("refused");
        assert!(
            note.contains("mode") && note.contains("telepathy"),
            "{note}"
        );
        wait_for("the metric", LIMIT, || {
            (replica.metric("kvgate_traffic_policy_applied") == 0.0).then_some(())
        });
        assert!(replica.log_lines().iter().any(|f| f["message"]
            == "InferenceTrafficPolicy refused; the previous configuration keeps serving"));
        let (_, pods) = http_request(replica.admin, "GET", "/debug/pods", &[], b"");
        let pods: Value = serde_json::from_slice(&pods).expect("JSON");
        assert_eq!(pods["models"][MODEL].as_array().map(Vec::len), Some(3));
    }
}

#[test]
fn three_bind_mode_replicas_relay_and_survive_a_replica_dying() {
    let dir = tempfile::tempdir().expect("tempdir");
    let standin = Standin::start(dir.path());
    let pod_port = free_port();
    seed_cluster(&standin, "v1alpha2", pod_port, &pod_ips());
    let ports: Vec<Ports> = (0..3).map(|_| Ports::pick()).collect();
    let relays: Vec<u16> = ports.iter().map(|p| p.relay).collect();
    let mut replicas: Vec<Replica> = ports
        .iter()
        .enumerate()
        .map(|(n, p)| Replica::start(dir.path(), n, &standin, p, &relays))
        .collect();
    wait_for("every replica follows its two peers", LIMIT, || {
        replicas
            .iter()
            .all(|r| r.metric("kvgate_relay_peer_up") == 2.0)
            .then_some(())
    });
    // The pods' one events address; pod i's PUB lands on replica i.
    let service = ServiceStandin::start(ports.iter().map(|p| p.bind).collect());
    let mut pods = Vec::new();
    for (i, ip) in pod_ips().iter().enumerate() {
        pods.push(Pod::start(dir.path(), ip, pod_port, service.port));
        wait_for("the pod's PUB connected", LIMIT, || {
            (service.connections() == i + 1).then_some(())
        });
    }

    let (first, usage) = replicas[0].chat("round-1", &round1());
    let pod = first["endpoint"].as_str().expect("endpoint").to_string();
    let prompt_blocks = usage["prompt_tokens"].as_u64().expect("prompt tokens") / BLOCK;
    assert!(prompt_blocks >= 2, "{usage}");
    wait_for("every replica indexes round 1", LIMIT, || {
        replicas
            .iter()
            .all(|r| r.metric("kvgate_index_entries") >= prompt_blocks as f64)
            .then_some(())
    });
    let reply = "You are standing in an open field.";
    for (n, replica) in replicas.iter().enumerate() {
        let (line, usage) = replica.chat(
            &format!("round-2-{n}"),
            &round2(reply, "Opening the mailbox reveals: A leaflet."),
        );
        assert_eq!(line["endpoint"], pod.as_str(), "replica {n}: {line}");
        assert!(predicted_equals_actual(&line, &usage) >= prompt_blocks * BLOCK);
    }

    // The replica the round's pod is connected to dies; the pod reconnects to another.
    let home = pod_ips()
        .iter()
        .position(|ip| pod.starts_with(&format!("{ip}:")))
        .expect("one of the pods");
    replicas[home].kill();
    wait_for("the pod reconnected", LIMIT, || {
        (service.connections() >= 4).then_some(())
    });
    let survivors: Vec<&Replica> = replicas
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != home)
        .map(|(_, r)| r)
        .collect();
    for (n, replica) in survivors.iter().enumerate() {
        let (line, usage) = replica.chat(
            &format!("round-3-{n}"),
            &round2(reply, &format!("Read the leaflet, take {n}.")),
        );
        assert_eq!(line["endpoint"], pod.as_str(), "survivor {n}: {line}");
        predicted_equals_actual(&line, &usage);
    }
    // Nothing lost: each survivor's index holds exactly what the pods cache.
    wait_for("survivors' indexes equal the pods' caches", LIMIT, || {
        let cached: u64 = pods.iter().map(Pod::cached_blocks).sum();
        survivors
            .iter()
            .all(|r| r.metric("kvgate_index_entries") == cached as f64)
            .then_some(())
    });
    replicas.clear();
}
