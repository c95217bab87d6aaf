//! The demo's processes: `kvgate sim` pods and `kvgate serve` replicas in connect mode,
//! started as children of this executable, killed on every exit path, with the gateways'
//! `Request handled` lines collected as they are written.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::DemoError;

/// How long the pods and the gateways may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A child process that is killed when dropped.
pub struct Managed {
    child: Child,
}

impl Drop for Managed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Managed {
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("it exited ({status})")),
            Ok(None) => None,
            Err(error) => Some(format!("cannot watch it: {error}")),
        }
    }
}

/// One simulated pod, as `kvgate sim` reported it.
#[derive(Clone, Debug)]
pub struct SimPod {
    pub http: SocketAddr,
    pub events: String,
    pub replay: String,
    /// The host part of its topic `kv@<host>@<model>`.
    pub topic_host: String,
}

/// The running `kvgate sim`.
pub struct SimFleet {
    pub pods: Vec<SimPod>,
    /// The control port's base URL (restarts).
    pub control: String,
}

/// One running `kvgate serve` replica.
pub struct Replica {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Replica {
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }
}

/// A gateway's `Request handled` line, the fields the demo reads.
#[derive(Clone, Debug, Default)]
pub struct Handled {
    pub replica: usize,
    pub line: String,
    pub pod: Option<String>,
    pub predicted_cached_tokens: Option<u64>,
    pub actual_cached_tokens: Option<u64>,
}

/// Every `Request handled` line seen so far, by request id.
pub struct LogBook {
    lines: mpsc::UnboundedReceiver<(usize, String)>,
    handled: HashMap<String, Handled>,
}

impl LogBook {
    fn drain(&mut self) {
        while let Ok((replica, line)) = self.lines.try_recv() {
            self.insert(replica, line);
        }
    }

    fn insert(&mut self, replica: usize, line: String) {
        let Some(id) = log_field(&line, "request_id").map(|id| id.trim_matches('"').to_string())
        else {
            return;
        };
        let number = |name: &str| log_field(&line, name).and_then(|v| v.parse::<u64>().ok());
        let handled = Handled {
            replica,
            pod: log_field(&line, "endpoint").map(|e| e.trim_matches('"').to_string()),
            predicted_cached_tokens: number("predicted_cached_tokens"),
            actual_cached_tokens: number("actual_cached_tokens"),
            line,
        };
        self.handled.insert(id, handled);
    }

    /// Waits until the lines of every id in `ids` arrived (or `timeout` passed) and
    /// returns what there is, in the order of `ids`.
    pub async fn wait_for(&mut self, ids: &[String], timeout: Duration) -> Vec<Option<Handled>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.drain();
            if ids.iter().all(|id| self.handled.contains_key(id)) {
                break;
            }
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((replica, line))) => self.insert(replica, line),
                Ok(None) | Err(_) => break,
            }
        }
        ids.iter().map(|id| self.handled.get(id).cloned()).collect()
    }
}

/// The value of `name=value` (text logs) or `"name":"value"` (JSON logs) in a log line.
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let text_key = format!(" {name}=");
    if let Some(start) = line.find(&text_key) {
        let rest = &line[start + text_key.len()..];
        return Some(rest.split_ascii_whitespace().next().unwrap_or_default());
    }
    let json_key = format!("\"{name}\":");
    let start = line.find(&json_key)? + json_key.len();
    let rest = line[start..].trim_start();
    match rest.strip_prefix('"') {
        Some(quoted) => Some(&quoted[..quoted.find('"')?]),
        None => Some(&rest[..rest.find([',', '}'])?]),
    }
}

/// Removes terminal colour sequences (ESC [ … letter) from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn create(path: &Path) -> Result<std::fs::File, DemoError> {
    std::fs::File::create(path).map_err(|source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

pub fn write_file(path: &Path, contents: &[u8]) -> Result<(), DemoError> {
    std::fs::write(path, contents).map_err(|source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Fails early, with the port named, when something already listens where a gateway will.
pub fn check_ports(addrs: &[SocketAddr]) -> Result<(), DemoError> {
    for &addr in addrs {
        TcpListener::bind(addr).map_err(|source| DemoError::PortTaken { addr, source })?;
    }
    Ok(())
}

/// Starts `kvgate sim` with every port picked by the system, and reads its ready line.
pub fn start_pods(
    exe: &Path,
    config: &Path,
    pod_params: &Path,
    pods: usize,
    time_scale: f64,
    log: &Path,
    children: &mut Vec<Managed>,
) -> Result<SimFleet, DemoError> {
    let mut child = Command::new(exe)
        .arg("sim")
        .arg("--config")
        .arg(config)
        .arg("--pod-params")
        .arg(pod_params)
        .args(["--pods", &pods.to_string(), "--host", "127.0.0.1"])
        .args(["--base-port", "0", "--events-bind-base-port", "0"])
        .args(["--replay-base-port", "0", "--control-port", "0"])
        .args(["--time-scale", &time_scale.to_string()])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(create(log)?)
        .spawn()
        .map_err(|source| DemoError::Spawn {
            what: "the simulated pods",
            source,
        })?;
    let stdout = child.stdout.take();
    children.push(Managed { child });
    let not_ready = |reason: String| DemoError::NotReady {
        what: "the simulated pods",
        seconds: START_TIMEOUT.as_secs(),
        reason,
        log: log.display().to_string(),
    };
    // The ready line comes once every pod listens; the sim exits (closing stdout) if it cannot.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stdout) = stdout {
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
    }
    let line = rx
        .recv_timeout(START_TIMEOUT)
        .map_err(|_| not_ready("no ready line".into()))?;
    let ready: Value = serde_json::from_str(&line)
        .map_err(|e| not_ready(format!("its ready line {line:?}: {e}")))?;
    let text = |pod: &Value, field: &str| {
        pod[field]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| not_ready(format!("its ready line has no {field}: {line}")))
    };
    let mut sim_pods = Vec::new();
    for pod in ready["ready"]["pods"].as_array().into_iter().flatten() {
        let topic = text(pod, "topic")?;
        sim_pods.push(SimPod {
            http: text(pod, "http")?
                .parse()
                .map_err(|e| not_ready(format!("pod address: {e}")))?,
            events: text(pod, "pubEndpoint")?,
            replay: text(pod, "replayEndpoint")?,
            topic_host: topic
                .strip_prefix("kv@")
                .and_then(|t| t.rsplit_once('@'))
                .map(|(host, _)| host.to_string())
                .ok_or_else(|| not_ready(format!("unexpected topic {topic}")))?,
        });
    }
    let control = ready["ready"]["control"]
        .as_str()
        .ok_or_else(|| not_ready(format!("its ready line names no control port: {line}")))?;
    Ok(SimFleet {
        pods: sim_pods,
        control: format!("http://{control}"),
    })
}

/// The config of replica `r`: the user's file with the demo's listeners, KV events in
/// connect mode to every simulated pod, and the traffic trace on.
pub struct ReplicaConfig<'a> {
    /// The user's config, as parsed YAML (relative paths already made absolute).
    pub base: &'a Value,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub pods: &'a [SimPod],
    pub trace: &'a Path,
    pub salt: &'a str,
}

impl ReplicaConfig<'_> {
    pub fn render(&self) -> Value {
        let mut config = self.base.clone();
        config["server"]["listen"] = json!(self.listen.to_string());
        config["server"]["admin"] = json!(self.admin.to_string());
        config["events"] = json!({"mode": "connect", "replay": true});
        config["logging"] = json!({"level": "info", "format": "text"});
        config["trace"] = json!({"path": self.trace, "salt": self.salt});
        let pods: Vec<Value> = self
            .pods
            .iter()
            .map(|p| {
                json!({
                    "http": p.http.to_string(),
                    "events": p.events,
                    "replay": p.replay,
                    "topicHost": p.topic_host,
                })
            })
            .collect();
        if let Some(model) = config["models"].get_mut(0) {
            model["discovery"] = json!({"static": {"pods": pods}});
        }
        config
    }
}

/// Starts one `kvgate serve` replica, forwards its `Request handled` lines to `lines`, and
/// returns it with the addresses it reported listening on (the ones the system picked for
/// any port 0).
pub fn start_replica(
    exe: &Path,
    replica: Replica,
    index: usize,
    lines: &mpsc::UnboundedSender<(usize, String)>,
    children: &mut Vec<Managed>,
) -> Result<Replica, DemoError> {
    let mut log = create(&replica.log)?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&replica.config)
        .arg("--upgrade-sock")
        .arg(replica.log.with_extension("upgrade.sock"))
        .arg("--pid-file")
        .arg(replica.log.with_extension("pid"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DemoError::Spawn {
            what: "a gateway replica",
            source,
        })?;
    // `{"listening": {"proxy", "admin", ...}}` on stdout once its sockets are bound.
    let (listening_tx, listening) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if value["listening"].is_object() {
                        let _ = listening_tx.send(value["listening"].clone());
                    }
                }
            }
        });
    }
    if let Some(stderr) = child.stderr.take() {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                let _ = writeln!(log, "{line}");
                if line.contains("Request handled") {
                    let _ = lines.send((index, line));
                }
            }
        });
    }
    let mut managed = Managed { child };
    let not_ready = |reason: String| DemoError::NotReady {
        what: "a gateway replica",
        seconds: START_TIMEOUT.as_secs(),
        reason,
        log: replica.log.display().to_string(),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    let bound = loop {
        match listening.recv_timeout(Duration::from_millis(100)) {
            Ok(bound) => break bound,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Some(reason) = managed.exited() {
                    return Err(not_ready(reason));
                }
            }
            Err(_) => {
                let reason = managed.exited();
                return Err(not_ready(
                    reason.unwrap_or_else(|| "it reported no listening addresses".into()),
                ));
            }
        }
    };
    let address = |name: &str| {
        bound[name]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| not_ready(format!("no {name} address in {bound}")))
    };
    let replica = Replica {
        listen: address("proxy")?,
        admin: address("admin")?,
        ..replica
    };
    children.push(managed);
    Ok(replica)
}

/// Waits until `url` answers 2xx, failing early when `child` exits.
pub async fn wait_http_ok(
    client: &reqwest::Client,
    url: &str,
    child: &mut Managed,
    what: &'static str,
    log: &Path,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let not_ready = |reason: String| DemoError::NotReady {
            what,
            seconds: START_TIMEOUT.as_secs(),
            reason,
            log: log.display().to_string(),
        };
        if let Some(reason) = child.exited() {
            return Err(not_ready(reason));
        }
        let last = match client.get(url).timeout(Duration::from_secs(2)).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => format!("{url} answered {}", response.status()),
            Err(error) => format!("{url}: {error}"),
        };
        if Instant::now() >= deadline {
            return Err(not_ready(last));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Blocks a replica has indexed from the pods' events (its `/debug/pods`).
pub async fn indexed_blocks(client: &reqwest::Client, admin: SocketAddr) -> u64 {
    let url = format!("http://{admin}/debug/pods");
    let Ok(response) = client.get(&url).send().await else {
        return 0;
    };
    let Ok(view) = response.json::<Value>().await else {
        return 0;
    };
    view["models"]
        .as_object()
        .into_iter()
        .flat_map(|models| models.values())
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|pod| pod["blocks_stored"].as_u64())
        .sum()
}

/// The log book the replicas' lines go to, and its sender.
pub fn log_book() -> (LogBook, mpsc::UnboundedSender<(usize, String)>) {
    let (tx, lines) = mpsc::unbounded_channel();
    (
        LogBook {
            lines,
            handled: HashMap::new(),
        },
        tx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_are_read_from_text_and_json_lines() {
        let text = "2025-01-01T00:00:00Z  INFO kvgate::proxy::log: Request handled request_id=demo-round-1 method=POST endpoint=127.0.0.1:8002 policy=\"default\" predicted_cached_tokens=128";
        assert_eq!(log_field(text, "request_id"), Some("demo-round-1"));
        assert_eq!(log_field(text, "endpoint"), Some("127.0.0.1:8002"));
        assert_eq!(log_field(text, "predicted_cached_tokens"), Some("128"));
        let json = r#"{"fields":{"message":"Request handled","request_id":"demo-round-2","endpoint":"127.0.0.1:8003","actual_cached_tokens":64}}"#;
        assert_eq!(log_field(json, "endpoint"), Some("127.0.0.1:8003"));
        assert_eq!(log_field(json, "actual_cached_tokens"), Some("64"));
        assert_eq!(log_field(json, "policy"), None);
    }

    #[test]
    fn colour_codes_are_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2025  INFO x"
        );
    }

    #[test]
    fn replica_configs_connect_to_every_pod_and_record_the_trace() {
        let base: Value = yaml_serde::from_str(
            "server: {listen: '127.0.0.1:8080'}\nmodels: [{name: m, discovery: {static: {pods: []}}}]\n",
        )
        .unwrap();
        let pods = [SimPod {
            http: "127.0.0.1:41001".parse().unwrap(),
            events: "tcp://127.0.0.1:41002".into(),
            replay: "tcp://127.0.0.1:41003".into(),
            topic_host: "127.0.0.1:41001".into(),
        }];
        let config = ReplicaConfig {
            base: &base,
            listen: "127.0.0.1:8081".parse().unwrap(),
            admin: "127.0.0.1:9091".parse().unwrap(),
            pods: &pods,
            trace: Path::new("/tmp/t.jsonl"),
            salt: "abc",
        }
        .render();
        assert_eq!(config["server"]["listen"], "127.0.0.1:8081");
        assert_eq!(config["events"]["mode"], "connect");
        assert_eq!(config["trace"]["salt"], "abc");
        let pod = &config["models"][0]["discovery"]["static"]["pods"][0];
        assert_eq!(pod["events"], "tcp://127.0.0.1:41002");
        assert_eq!(pod["topicHost"], "127.0.0.1:41001");
    }
}
