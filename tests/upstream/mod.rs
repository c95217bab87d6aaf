//! Test harness: kvgate and fake vLLM pods (`fake_vllm.py`) as real processes on
//! 127.0.0.1, plus the small HTTP helpers the scenarios need. Every wait is bounded.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const HERE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/upstream");
pub const TOKENIZER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.tokenizers/qwen3");

/// A port that was free a moment ago (and refuses connections until someone binds it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
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
        let port = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected fake pod banner {line:?}"));
        Self { child, port }
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
        }
    }
}

impl GatewayConfig {
    pub fn with_model(mut self, name: &str, pods: &[String]) -> Self {
        self.models.push((name.to_string(), pods.to_vec()));
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

    fn render(&self, listen: u16, admin: u16) -> String {
        let mut out = format!(
            "server:
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:{admin}
  maxBodyBytes: {}
  maxAttempts: {}
  connectTimeoutMs: 1000
  responseTimeoutMs: 30000
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
            self.eject_after_failures,
            self.health_check_interval_ms,
            self.scrape_interval_ms,
            self.listener_limits(),
        );
        for (name, pods) in &self.models {
            let pods = pods
                .iter()
                .map(|p| format!("{{http: \"{p}\"}}"))
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

/// kvgate in a subprocess, its log captured to a file.
pub struct Kvgate {
    child: Child,
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
        Self::launch(scheme, |port, admin_port| config.render(port, admin_port))
    }

    /// Starts kvgate, listening on plain HTTP, with the config `render(listen port,
    /// admin port)` returns.
    pub fn start_yaml(render: impl FnOnce(u16, u16) -> String) -> Self {
        Self::launch("http", render)
    }

    fn launch(scheme: &'static str, render: impl FnOnce(u16, u16) -> String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let admin_port = free_port();
        let config_path = dir.path().join("kvgate.yaml");
        fs::write(&config_path, render(port, admin_port)).expect("write config");
        let log = fs::File::create(dir.path().join("kvgate.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kvgate");
        let mut gateway = Self {
            child,
            port,
            admin_port,
            dir,
            scheme,
        };
        wait_for("kvgate to listen", Duration::from_secs(60), || {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("kvgate exited early ({status}): {}", gateway.log());
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        gateway
    }

    /// Rewrites the config file (same ports) and sends SIGHUP.
    pub fn reload(&self, config: &GatewayConfig) {
        let path = self.dir.path().join("kvgate.yaml");
        fs::write(path, config.render(self.port, self.admin_port)).expect("write config");
        self.hang_up();
    }

    /// Sends SIGHUP.
    pub fn hang_up(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// The process id, to read its memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
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
        fs::read_to_string(self.dir.path().join("kvgate.log")).unwrap_or_default()
    }

    /// The `fields` of every `Request handled` line so far.
    pub fn handled(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("fields").cloned())
            .filter(|f| f["message"] == "Request handled")
            .collect()
    }

    /// Waits for the `Request handled` line of `request_id`.
    pub fn wait_handled(&self, request_id: &str) -> Value {
        wait_for(
            &format!("the log line of request {request_id}"),
            Duration::from_secs(10),
            || {
                self.handled()
                    .into_iter()
                    .find(|f| f["request_id"] == request_id)
            },
        )
    }
}

impl Drop for Kvgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- kvgate log ---\n{}", self.log());
        }
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
