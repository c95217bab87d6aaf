//! Test harness: kvgate and fake vLLM pods (`fake_vllm.py`) as real processes on
//! 127.0.0.1, plus the small HTTP helpers the scenarios need. Every wait is bounded.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const HERE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/upstream");
pub const TOKENIZER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.tokenizers/qwen3");

/// A port free a moment ago. Racy (another process may take it before the child binds
/// it): only for a pod that must start after kvgate at an address its config names;
/// everything else binds port 0 and reports the port it got.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// An address that refuses connections, as a crashed pod's does: a socket bound to it
/// that never listens, so that no other process can take the port while the test runs.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> Self {
        Self::bind(false)
    }

    /// A closed port that a pod started later with SO_REUSEPORT (`fake_vllm.py
    /// --reuse-port`) can listen on: until then connections are refused, and no process
    /// without SO_REUSEPORT can take it.
    pub fn shared() -> Self {
        Self::bind(true)
    }

    fn bind(reuse_port: bool) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseport(reuse_port).expect("SO_REUSEPORT");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind a port");
        let addr = socket.local_addr().expect("bound address");
        Self {
            _socket: socket,
            addr,
        }
    }
}

/// Where a `kvgate serve` listens: the `{"listening": ...}` line it prints on stdout
/// once its proxy, admin and KV-event sockets are open. Test configs ask for port 0
/// throughout, so no port is chosen by the test and released for kvgate to take.
pub struct Listening {
    pub proxy: u16,
    pub admin: u16,
    /// The bound KV-event SUB (`events.mode: bind`).
    pub events: Option<String>,
}

impl Listening {
    /// Waits up to `limit` for the line among `lines` (see [`stdout_lines`]); panics with
    /// `log()` if `child` exits first.
    pub fn wait(
        lines: &mpsc::Receiver<String>,
        child: &mut Child,
        limit: Duration,
        log: impl Fn() -> String,
    ) -> Self {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("kvgate exited ({status}) before listening:\n{}", log());
            }
            let line = match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    assert!(
                        Instant::now() < deadline,
                        "kvgate did not listen within {limit:?}:\n{}",
                        log()
                    );
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("kvgate closed its stdout before listening:\n{}", log())
                }
            };
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let listening = &value["listening"];
            let port = |name: &str| {
                listening[name]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .map(|a| a.port())
                    .unwrap_or_else(|| panic!("no {name} address in {line}"))
            };
            if listening.is_object() {
                return Self {
                    proxy: port("proxy"),
                    admin: port("admin"),
                    events: listening["events"].as_str().map(str::to_string),
                };
            }
        }
    }
}

/// `child`'s stdout (piped), line by line, read on a thread of its own so that the
/// child never blocks on a full pipe.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(25));
    }
}

/// One fake vLLM pod in its own Python process.
pub struct FakePod {
    child: Child,
    pub port: u16,
    /// Rank 0's KV-event endpoint (`--zmq-bind-ranks`).
    pub events: Option<String>,
}

impl FakePod {
    pub fn start() -> Self {
        Self::start_with(&["--model", "qwen"])
    }

    pub fn start_with(args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(format!("{HERE}/fake_vllm.py"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 fake_vllm.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("fake pod did not start within 20 s");
        let mut banner = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("unexpected fake pod banner {line:?}"))
            .split(' ');
        let port = banner
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected fake pod banner {line:?}"));
        let events = banner.next().map(str::to_string);
        Self {
            child,
            port,
            events,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Everything the pod received so far.
    pub fn requests(&self) -> Vec<Value> {
        let (status, body) = http_request(self.port, "GET", "/_test/requests", &[], b"");
        assert_eq!(status, 200);
        serde_json::from_slice(&body).expect("requests JSON")
    }

    /// Publishes one KV-event batch of `events` on data-parallel rank `rank`.
    pub fn publish(&self, rank: u32, events: Value) {
        let body = serde_json::json!({"events": events, "rank": rank}).to_string();
        let (status, reply) =
            http_request(self.port, "POST", "/_test/publish", &[], body.as_bytes());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    }

    pub fn set_healthy(&self, ok: bool) {
        let body = format!("{{\"ok\":{ok}}}");
        let (status, _) = http_request(self.port, "POST", "/_test/health", &[], body.as_bytes());
        assert_eq!(status, 200);
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Knobs of the generated kvgate config.
pub struct GatewayConfig {
    pub max_body_bytes: usize,
    pub max_attempts: usize,
    pub eject_after_failures: u32,
    pub health_check_interval_ms: u64,
    pub scrape_interval_ms: u64,
    /// (model name, pod addresses).
    pub models: Vec<(String, Vec<String>)>,
    /// (base model, LoRA adapter name).
    pub lora_adapters: Vec<(String, String)>,
    /// Listener limits; `None` leaves kvgate's default.
    pub max_header_bytes: Option<usize>,
    pub max_header_fields: Option<usize>,
    pub max_connections: Option<usize>,
    pub header_timeout_ms: Option<u64>,
    pub keep_alive_timeout_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    /// `server.tls`: (certificate file, key file); the listener then speaks HTTPS only.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub max_buffered_body_bytes: Option<usize>,
    /// A `profiles:` section (its body, indented two spaces); kvgate's defaults when `None`.
    pub profiles: Option<String>,
    /// Every model's `flowControl:` (a YAML flow mapping); off when `None`.
    pub flow_control: Option<String>,
    /// (pod address, `prefill` | `decode` | `both`): the static pods' roles; unlisted: `both`.
    pub pod_roles: Vec<(String, String)>,
    /// `server.responseTimeoutMs`.
    pub response_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_attempts: 3,
            eject_after_failures: 3,
            health_check_interval_ms: 0,
            scrape_interval_ms: 0,
            models: Vec::new(),
            lora_adapters: Vec::new(),
            max_header_bytes: None,
            max_header_fields: None,
            max_connections: None,
            header_timeout_ms: None,
            keep_alive_timeout_ms: None,
            body_timeout_ms: None,
            tls: None,
            max_buffered_body_bytes: None,
            profiles: None,
            flow_control: None,
            pod_roles: Vec::new(),
            response_timeout_ms: 30_000,
        }
    }
}

impl GatewayConfig {
    pub fn with_model(mut self, name: &str, pods: &[String]) -> Self {
        self.models.push((name.to_string(), pods.to_vec()));
        self
    }

    /// Gives the static pod at `addr` a prefill/decode role.
    pub fn with_role(mut self, addr: &str, role: &str) -> Self {
        self.pod_roles.push((addr.to_string(), role.to_string()));
        self
    }

    pub fn with_lora(mut self, model: &str, adapter: &str) -> Self {
        self.lora_adapters
            .push((model.to_string(), adapter.to_string()));
        self
    }

    fn listener_limits(&self) -> String {
        [
            ("maxHeaderBytes", self.max_header_bytes.map(|v| v as u64)),
            ("maxHeaderFields", self.max_header_fields.map(|v| v as u64)),
            ("maxConnections", self.max_connections.map(|v| v as u64)),
            ("headerTimeoutMs", self.header_timeout_ms),
            ("keepAliveTimeoutMs", self.keep_alive_timeout_ms),
            ("bodyTimeoutMs", self.body_timeout_ms),
            (
                "maxBufferedBodyBytes",
                self.max_buffered_body_bytes.map(|v| v as u64),
            ),
        ]
        .iter()
        .filter_map(|(key, value)| value.map(|v| format!("  {key}: {v}\n")))
        .chain(self.tls.iter().map(|(cert, key)| {
            format!(
                "  tls: {{certFile: \"{}\", keyFile: \"{}\"}}\n",
                cert.display(),
                key.display()
            )
        }))
        .collect()
    }

    fn render(&self) -> String {
        let mut out = format!(
            "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  maxBodyBytes: {}
  maxAttempts: {}
  connectTimeoutMs: 1000
  responseTimeoutMs: {}
  ejectAfterFailures: {}
  ejectMs: 60000
  healthCheckIntervalMs: {}
  scrapeIntervalMs: {}
  profileHeader: x-kvgate-profile
  threads: 2
{}events:
  mode: off
logging:
  level: info
  format: json
  logBodies: false
models:
",
            self.max_body_bytes,
            self.max_attempts,
            self.response_timeout_ms,
            self.eject_after_failures,
            self.health_check_interval_ms,
            self.scrape_interval_ms,
            self.listener_limits(),
        );
        for (name, pods) in &self.models {
            let pods = pods
                .iter()
                .map(
                    |p| match self.pod_roles.iter().find(|(addr, _)| addr == p) {
                        Some((_, role)) => format!("{{http: \"{p}\", role: {role}}}"),
                        None => format!("{{http: \"{p}\"}}"),
                    },
                )
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "  - name: {name}
    tokenizer: {TOKENIZER_DIR}/tokenizer.json
    tokenizerConfig: {TOKENIZER_DIR}/tokenizer_config.json
    blockSize: 16
    hashAlgo: sha256_cbor
    hashSeed: \"0\"
    vllmRelease: \"0.11.0\"
    discovery:
      static:
        pods: [{pods}]
"
            ));
            if let Some(flow) = &self.flow_control {
                out.push_str(&format!("    flowControl: {flow}\n"));
            }
            for (_, adapter) in self.lora_adapters.iter().filter(|(m, _)| m == name) {
                out.push_str(&format!(
                    "    loraAdapters:\n      - {{name: {adapter}, intId: 1, path: /adapters/{adapter}}}\n"
                ));
            }
        }
        if let Some(profiles) = &self.profiles {
            out.push_str("profiles:\n");
            out.push_str(profiles);
        }
        out
    }
}

/// One `kvgate serve` process on a config file, its log (stderr) in a file; killed on
/// drop, its log printed if the test is failing.
pub struct Serve {
    child: Child,
    stdout: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Serve {
    /// Starts `kvgate serve --config <config> <extra>` and returns at once.
    pub fn spawn(config: &Path, log: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log).expect("log file"))
            .spawn()
            .expect("start kvgate serve");
        let stdout = stdout_lines(&mut child);
        Self {
            child,
            stdout,
            log: log.to_path_buf(),
        }
    }

    /// Starts it ready to hand its sockets and state over on the upgrade socket `sock`
    /// (draining for `grace_secs` after SIGQUIT), or with `upgrade` to take them over
    /// from the process running there.
    pub fn spawn_upgradable(
        config: &Path,
        log: &Path,
        sock: &Path,
        grace_secs: u32,
        upgrade: bool,
    ) -> Self {
        let grace = grace_secs.to_string();
        let mut extra = vec![
            "--upgrade-sock",
            sock.to_str().expect("path"),
            "--grace-period-secs",
            &grace,
        ];
        if upgrade {
            extra.push("--upgrade");
        }
        Self::spawn(config, log, &extra)
    }

    /// Starts it and waits until it listens.
    pub fn start(config: &Path, log: &Path, extra: &[&str]) -> (Self, Listening) {
        let mut serve = Self::spawn(config, log, extra);
        let listening = serve.listening(Duration::from_secs(60));
        (serve, listening)
    }

    /// Waits for its `listening` line.
    pub fn listening(&mut self, limit: Duration) -> Listening {
        let log = self.log.clone();
        Listening::wait(&self.stdout, &mut self.child, limit, || {
            fs::read_to_string(&log).unwrap_or_default()
        })
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `fields` of every line of its JSON log.
    pub fn log_fields(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("fields").cloned())
            .collect()
    }

    /// The `fields` of every `Request handled` line so far.
    pub fn handled(&self) -> Vec<Value> {
        self.log_fields()
            .into_iter()
            .filter(|f| f["message"] == "Request handled")
            .collect()
    }

    /// Waits for the `Request handled` line of `request_id`.
    pub fn wait_handled(&self, request_id: &str) -> Value {
        wait_for(
            &format!("the log line of request {request_id}"),
            Duration::from_secs(30),
            || {
                self.handled()
                    .into_iter()
                    .find(|f| f["request_id"] == request_id)
            },
        )
    }

    /// Waits for a log line with this message; panics if the process exits first.
    pub fn wait_log(&mut self, message: &str, limit: Duration) -> Value {
        wait_for(&format!("log line {message:?}"), limit, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kvgate exited ({status}):\n{}", self.log());
            }
            self.log_fields()
                .into_iter()
                .find(|f| f["message"] == message)
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`HUP`, `QUIT`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) {
        wait_for("kvgate to exit", limit, || {
            self.child.try_wait().ok().flatten()
        });
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

/// A sample of an admin listener's `/metrics` (0 when the series does not exist yet).
pub fn metric(admin: u16, series: &str) -> f64 {
    let (_, text) = http_request(admin, "GET", "/metrics", &[], b"");
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A model's pods as an admin listener's `/debug/pods` shows them.
pub fn debug_pods(admin: u16, model: &str) -> Vec<Value> {
    let (_, body) = http_request(admin, "GET", "/debug/pods", &[], b"");
    let pods: Value = serde_json::from_slice(&body).expect("debug pods JSON");
    pods["models"][model]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// kvgate in a subprocess on a [`GatewayConfig`].
pub struct Kvgate {
    serve: Serve,
    pub port: u16,
    admin_port: u16,
    dir: tempfile::TempDir,
    scheme: &'static str,
}

impl Kvgate {
    pub fn start(config: &GatewayConfig) -> Self {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Self::launch(scheme, |_, _| config.render())
    }

    /// Starts kvgate, listening on plain HTTP, with the config `render(listen port,
    /// admin port)` returns, called with port 0 for both.
    pub fn start_yaml(render: impl FnOnce(u16, u16) -> String) -> Self {
        Self::launch("http", render)
    }

    fn launch(scheme: &'static str, render: impl FnOnce(u16, u16) -> String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("kvgate.yaml");
        // Port 0 for both listeners: kvgate binds what the OS picks and reports it.
        fs::write(&config_path, render(0, 0)).expect("write config");
        let (serve, listening) = Serve::start(&config_path, &dir.path().join("kvgate.log"), &[]);
        Self {
            serve,
            port: listening.proxy,
            admin_port: listening.admin,
            dir,
            scheme,
        }
    }

    /// Rewrites the config file (ports stay: the listeners are not reloaded) and sends
    /// SIGHUP.
    pub fn reload(&self, config: &GatewayConfig) {
        let path = self.dir.path().join("kvgate.yaml");
        fs::write(path, config.render()).expect("write config");
        self.hang_up();
    }

    /// Sends SIGHUP.
    pub fn hang_up(&self) {
        self.serve.signal("HUP");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// The process id, to read its memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.serve.pid()
    }

    /// The admin listener (`/metrics`, `/readyz`, `/debug/pods`).
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    /// One sample of kvgate's `/metrics` (0 when the series does not exist yet).
    pub fn metric(&self, series: &str) -> f64 {
        let out = curl(&[&format!("http://{}/metrics", self.admin_addr())]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn log(&self) -> String {
        self.serve.log()
    }

    /// The `fields` of every `Request handled` line so far.
    pub fn handled(&self) -> Vec<Value> {
        self.serve.handled()
    }

    /// Waits for the `Request handled` line of `request_id`.
    pub fn wait_handled(&self, request_id: &str) -> Value {
        self.serve.wait_handled(request_id)
    }
}

/// Runs curl with a 30 s cap.
pub fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .args(args)
        .output()
        .expect("run curl")
}

/// `curl -i ARGS`: (status, lower-cased response head, body).
pub fn curl_head(args: &[&str]) -> (u16, String, Vec<u8>) {
    let mut all = vec!["-i"];
    all.extend_from_slice(args);
    let out = curl(&all);
    let (status, head, body_at) =
        parse_head(&out.stdout).unwrap_or_else(|| panic!("no response head: {out:?}"));
    (
        status,
        head.to_ascii_lowercase(),
        out.stdout[body_at..].to_vec(),
    )
}

/// Runs the openai SDK driver (`openai_client.py`).
pub fn openai_sdk(base_url: &str, model: &str, mode: &str) -> Value {
    let out = Command::new("timeout")
        .args([
            "60",
            "python3",
            &format!("{HERE}/openai_client.py"),
            base_url,
            model,
            mode,
        ])
        .output()
        .expect("run python3 openai_client.py");
    assert!(
        out.status.success(),
        "openai_client.py {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("openai_client.py output is JSON")
}

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`): (status, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = connect(port);
    write_request(&mut stream, method, path, headers, body, true);
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let (status, _, body_at) = parse_head(&response).expect("response head");
    let body = response[body_at..].to_vec();
    let chunked = String::from_utf8_lossy(&response[..body_at])
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(&body) } else { body })
}

pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
}

/// Blocks until kvgate closes `stream` (end of file or reset) and returns when that was;
/// any bytes kvgate sent first are returned too.
pub fn wait_closed(stream: &mut TcpStream) -> (Instant, Vec<u8>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (Instant::now(), got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (Instant::now(), got)
            }
            Err(e) => panic!("kvgate did not close the connection: {e}"),
        }
    }
}

pub fn write_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
}

/// (status, header text, offset of the body) once the head is complete.
pub fn parse_head(buf: &[u8]) -> Option<(u16, String, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head, end))
}

pub fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&body[..line_end]).to_string();
        let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
            break;
        };
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        let Some(chunk) = body.get(start..start + size) else {
            out.extend_from_slice(&body[start.min(body.len())..]);
            break;
        };
        out.extend_from_slice(chunk);
        body = body.get(start + size + 2..).unwrap_or_default();
    }
    out
}

/// A chat request body.
pub fn chat_body(model: &str, content: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { Value::Null },
    })
    .to_string()
}

pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, data).expect("write file");
    path
}

/// One pod's part of a `Request handled` line's `scores`: `addr=total(scorer:score,...)`.
pub struct PodScores {
    pub pod: String,
    pub total: f64,
    pub parts: Vec<(String, f64)>,
}

/// The `scores` of a `Request handled` line's fields, best pod first.
pub fn scores(line: &Value) -> Vec<PodScores> {
    let text = line["scores"].as_str().unwrap_or_default();
    text.split_whitespace()
        .map(|entry| {
            let parse = |v: &str| v.parse::<f64>().unwrap_or_else(|_| panic!("{text}"));
            let (pod, rest) = entry.split_once('=').unwrap_or_else(|| panic!("{text}"));
            let (total, parts) = rest.split_once('(').unwrap_or_else(|| panic!("{text}"));
            let parts = parts
                .trim_end_matches(')')
                .split(',')
                .map(|p| {
                    let (name, score) = p.split_once(':').unwrap_or_else(|| panic!("{text}"));
                    (name.to_string(), parse(score))
                })
                .collect();
            PodScores {
                pod: pod.to_string(),
                total: parse(total),
                parts,
            }
        })
        .collect()
}

/// Whether every pod's total on `line` is its scorers' scores times `weights`, up to
/// the rounding of the printed figures (three decimals each).
pub fn totals_weighted_by(line: &Value, weights: &[(&str, f64)]) -> bool {
    scores(line).iter().all(|pod| {
        let weighted: f64 = pod
            .parts
            .iter()
            .map(|(name, score)| {
                let weight = weights
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or_else(|| panic!("no weight given for {name}"), |(_, w)| *w);
                weight * score
            })
            .sum();
        let rounding = 5e-4 * (1.0 + weights.iter().map(|(_, w)| w).sum::<f64>());
        (pod.total - weighted).abs() <= rounding + 1e-9
    })
}
