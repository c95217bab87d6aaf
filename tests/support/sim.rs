//! `kvgate sim` pods for integration tests: one child process serving N simulated vLLM
//! pods, described by the JSON ready line it prints once every pod listens.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// Block size of [`model_yaml`]'s model: small, so short prompts fill blocks.
pub const BLOCK: usize = 16;

const TOKENIZER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.tokenizers/qwen3");

/// One `models:` entry with the given static pods, read by the sim pods and by the
/// gateways in front of them alike (same tokenizer, block size and hash settings).
pub fn model_yaml(name: &str, pods: &str) -> String {
    model_yaml_with(name, pods, &ModelSettings::default())
}

/// What a test may change of [`model_yaml`]'s model.
pub struct ModelSettings<'a> {
    pub release: &'a str,
    /// The pods' PYTHONHASHSEED.
    pub seed: &'a str,
    /// More fields of the entry, each line indented by four spaces.
    pub extra: &'a str,
}

impl Default for ModelSettings<'_> {
    fn default() -> Self {
        Self {
            release: "0.11.0",
            seed: "0",
            extra: "",
        }
    }
}

pub fn model_yaml_with(name: &str, pods: &str, settings: &ModelSettings<'_>) -> String {
    format!(
        "models:
  - name: {name}
    tokenizer: {TOKENIZER_DIR}/tokenizer.json
    tokenizerConfig: {TOKENIZER_DIR}/tokenizer_config.json
    blockSize: {BLOCK}
    hashAlgo: sha256_cbor
    hashSeed: \"{seed}\"
    vllmRelease: \"{release}\"
    discovery: {{static: {{pods: {pods}}}}}
{extra}",
        seed = settings.seed,
        release = settings.release,
        extra = settings.extra,
    )
}

/// `kvgate sim` arguments for pods that bind their KV-event PUB and replay ROUTER on ports
/// the OS picks (kvgate connects to them, as in Kubernetes), at a tenth of real time.
pub const PUBLISHING: [&str; 6] = [
    "--events-bind-base-port",
    "0",
    "--replay-base-port",
    "0",
    "--time-scale",
    "0.1",
];

/// A distinct document of about 1,500 tokens (`n` picks which), for prompts with a long
/// shared prefix.
pub fn document(n: usize) -> String {
    (0..300)
        .map(|w| {
            format!(
                "fact{n}x{w} is filed under drawer {}.",
                (n * 31 + w * 7) % 97
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A running `kvgate sim`; killed on drop.
pub struct SimPods {
    child: Child,
    /// Each pod's status from the ready line (`http`, `topic`, `pubEndpoint`, `replayEndpoint`).
    pub pods: Vec<Value>,
    /// The control port's address, when `--control-port` was given.
    pub control: Option<String>,
}

impl SimPods {
    /// Starts `kvgate sim --config <config> --pods <pods> --base-port 0 <extra>` and waits
    /// for its ready line.
    pub fn start(config: &Path, pods: usize, extra: &[&str]) -> Self {
        Self::spawn(config, pods, extra, "warn", Stdio::inherit())
    }

    /// As [`SimPods::start`], with its log (filtered by `filter`, `RUST_LOG` syntax) in
    /// the file `log`.
    pub fn start_logging(
        config: &Path,
        pods: usize,
        extra: &[&str],
        filter: &str,
        log: &Path,
    ) -> Self {
        let file = std::fs::File::create(log).expect("sim log file");
        Self::spawn(config, pods, extra, filter, Stdio::from(file))
    }

    fn spawn(config: &Path, pods: usize, extra: &[&str], filter: &str, stderr: Stdio) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("sim")
            .arg("--config")
            .arg(config)
            .args(["--pods", &pods.to_string(), "--base-port", "0"])
            .args(extra)
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start kvgate sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the sim's ready line");
        let ready: Value = serde_json::from_str(&line).expect("ready line is JSON");
        let pods = ready["ready"]["pods"].as_array().cloned().expect("pods");
        let control = ready["ready"]["control"].as_str().map(str::to_string);
        Self {
            child,
            pods,
            control,
        }
    }

    /// `pods` pods of `model` (config written into `dir`) that publish as [`PUBLISHING`]
    /// says.
    pub fn start_publishing(dir: &Path, model: &str, pods: usize) -> Self {
        let config = dir.join("sim.yaml");
        std::fs::write(&config, model_yaml(model, "[]")).expect("write sim config");
        Self::start(&config, pods, &PUBLISHING)
    }

    /// A string field of pod `i`'s status.
    pub fn field(&self, i: usize, name: &str) -> &str {
        self.pods[i][name]
            .as_str()
            .unwrap_or_else(|| panic!("pod {i} has no {name}"))
    }

    /// A `kvgate serve` config in front of these pods (started with [`PUBLISHING`]): KV
    /// events in connect mode with replay, JSON logs, health checks every
    /// `health_check_interval_ms` (0: off).
    pub fn gateway_config(
        &self,
        model: &str,
        listen: u16,
        admin: u16,
        health_check_interval_ms: u64,
    ) -> String {
        let pods = format!("[{}]", self.connect_entries(model).join(", "));
        format!(
            "server:
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:{admin}
  healthCheckIntervalMs: {health_check_interval_ms}
  scrapeIntervalMs: 0
  threads: 1
events:
  mode: connect
  replay: true
logging:
  level: info
  format: json
"
        ) + &model_yaml(model, &pods)
    }

    /// Every pod as a static pod entry whose events kvgate follows in connect mode
    /// (the pods bind their PUB and replay sockets).
    pub fn connect_entries(&self, model: &str) -> Vec<String> {
        (0..self.pods.len())
            .map(|i| {
                format!(
                    "{{http: \"{}\", events: \"{}\", replay: \"{}\", topicHost: \"{}\"}}",
                    self.field(i, "http"),
                    self.field(i, "pubEndpoint"),
                    self.field(i, "replayEndpoint"),
                    self.topic_host(i, model),
                )
            })
            .collect()
    }

    /// The host part of pod `i`'s topic `kv@<host>@<model>`.
    pub fn topic_host(&self, i: usize, model: &str) -> &str {
        let topic = self.field(i, "topic");
        topic
            .strip_prefix("kv@")
            .and_then(|t| t.strip_suffix(&format!("@{model}")))
            .unwrap_or_else(|| panic!("unexpected topic {topic}"))
    }
}

impl Drop for SimPods {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
