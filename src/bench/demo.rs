//! `kvgate demo`: a local fleet in one command. Starts simulated pods (`kvgate sim`) and
//! the gateway (`kvgate serve`) as child processes of this executable, sends the seed's
//! two-round chat and shows the gateway's `Request handled` line for each round (both
//! rounds land on the pod that holds the conversation), then runs a short live
//! comparison of the kv-cache, prefix and round-robin profiles and prints the table.
//! The children are killed on every exit path, Ctrl-C included.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::live::{LiveError, LiveSetup};
use super::policy::{IndexFeed, PolicySpec};
use super::report::{self, BenchReport, ReportError, SegmentReport};
use super::workload::{self, Ladder, SharedPrefixShape, WorkloadError};
use super::ProgressBar;
use crate::config::{Config, ConfigError, EventsMode};
use crate::discovery::DiscoveryConfig;
use crate::hash::{BlockHasher, HashConfigError};

/// The question of the seed chat's second round.
const FOLLOW_UP: &str =
    "Thanks. If we file the increase request today, how long does approval usually take?";

/// How long the pods and the gateway may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// `kvgate demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The fleet's config: its static pods (consecutive ports on one host) are simulated.
    #[arg(long, default_value = "conf/kvgate.yaml")]
    pub config: PathBuf,
    /// The first round of the chat (an OpenAI chat request body).
    #[arg(long)]
    pub chat: Option<PathBuf>,
    /// Seconds of load per profile in the comparison.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Requests per second in the comparison.
    #[arg(long, default_value_t = 5.0)]
    pub qps: f64,
    /// Wall seconds per simulated second of the pods.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Output folder for the comparison's report and the children's logs.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the demo needs {0}")]
    Fleet(String),
    #[error("port {addr} is taken (another kvgate or demo running?): {source}")]
    PortTaken {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what} did not come up within {seconds} s: {reason} (log: {log})")]
    NotReady {
        what: &'static str,
        seconds: u64,
        reason: String,
        log: String,
    },
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chat round {round}: {message}")]
    Chat { round: u32, message: String },
    #[error(transparent)]
    Hash(#[from] HashConfigError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("interrupted")]
    Interrupted,
}

/// A child process that is killed when dropped.
struct Managed {
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

/// The local fleet the config describes.
struct Fleet {
    config_path: PathBuf,
    config: Config,
    pods: Vec<SocketAddr>,
    events_bind: String,
}

fn fleet(path: &Path) -> Result<Fleet, DemoError> {
    let config = Config::load(path)?;
    let model = config
        .models
        .first()
        .ok_or_else(|| DemoError::Fleet("a model in the config".into()))?;
    let DiscoveryConfig::Static { pods } = &model.discovery else {
        return Err(DemoError::Fleet(
            "static pods in the config (its model uses Kubernetes discovery)".into(),
        ));
    };
    let pods: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
    let Some(first) = pods.first() else {
        return Err(DemoError::Fleet("at least one static pod".into()));
    };
    for (i, pod) in pods.iter().enumerate() {
        let consecutive = usize::from(pod.port()) == usize::from(first.port()) + i;
        if pod.ip() != first.ip() || !consecutive {
            return Err(DemoError::Fleet(format!(
                "static pods on consecutive ports of one host ({pod} breaks the run from {first})"
            )));
        }
    }
    if config.events.mode != EventsMode::Bind {
        return Err(DemoError::Fleet(
            "events.mode bind (the simulated pods connect to kvgate's SUB)".into(),
        ));
    }
    Ok(Fleet {
        config_path: path.to_path_buf(),
        events_bind: config.events.bind.clone(),
        config,
        pods,
    })
}

/// Fails early, with the port named, when something already listens where the demo will.
fn check_ports(fleet: &Fleet) -> Result<(), DemoError> {
    let mut addrs = fleet.pods.clone();
    addrs.push(fleet.config.server.listen);
    addrs.push(fleet.config.server.admin);
    if let Some(addr) = fleet
        .events_bind
        .strip_prefix("tcp://")
        .and_then(|a| a.parse::<SocketAddr>().ok())
    {
        addrs.push(addr);
    }
    for addr in addrs {
        TcpListener::bind(addr).map_err(|source| DemoError::PortTaken { addr, source })?;
    }
    Ok(())
}

fn log_file(out: &Path, name: &str) -> Result<(PathBuf, std::fs::File), DemoError> {
    let path = out.join(name);
    let file = std::fs::File::create(&path).map_err(|source| DemoError::Write {
        path: path.clone(),
        source,
    })?;
    Ok((path, file))
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

/// The value of `name=value` (text logs) or `"name":"value"` (JSON logs) in a log line.
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let text_key = format!(" {name}=");
    if let Some(start) = line.find(&text_key) {
        let rest = &line[start + text_key.len()..];
        return Some(rest.split_ascii_whitespace().next().unwrap_or_default());
    }
    let json_key = format!("\"{name}\":\"");
    let start = line.find(&json_key)? + json_key.len();
    let rest = &line[start..];
    Some(&rest[..rest.find('"')?])
}

fn short(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    }
}

async fn wait_http_ok(
    client: &reqwest::Client,
    url: &str,
    child: &mut Managed,
    what: &'static str,
    log: &Path,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(reason) = child.exited() {
            return Err(DemoError::NotReady {
                what,
                seconds: START_TIMEOUT.as_secs(),
                reason,
                log: log.display().to_string(),
            });
        }
        let last = match client.get(url).timeout(Duration::from_secs(2)).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => format!("{url} answered {}", response.status()),
            Err(error) => format!("{url}: {error}"),
        };
        if Instant::now() >= deadline {
            return Err(DemoError::NotReady {
                what,
                seconds: START_TIMEOUT.as_secs(),
                reason: last,
                log: log.display().to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for the gateway's `Request handled` line of `request_id`.
async fn handled_line(
    lines: &mut mpsc::UnboundedReceiver<String>,
    request_id: &str,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .ok()??;
        if log_field(&line, "request_id").is_some_and(|id| id.trim_matches('"') == request_id) {
            return Some(line);
        }
    }
}

struct Round {
    answer: String,
    prompt_tokens: u64,
    cached_tokens: u64,
    line: Option<String>,
}

async fn chat_round(
    client: &reqwest::Client,
    gateway: &str,
    body: &Value,
    round: u32,
    lines: &mut mpsc::UnboundedReceiver<String>,
) -> Result<Round, DemoError> {
    let request_id = format!("demo-round-{round}");
    let fail = |message: String| DemoError::Chat { round, message };
    let response = client
        .post(format!("{gateway}/v1/chat/completions"))
        .header("x-request-id", &request_id)
        .json(body)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    let reply: Value = response.json().await.map_err(|e| fail(e.to_string()))?;
    if !status.is_success() {
        return Err(fail(format!("{status}: {reply}")));
    }
    let usage = &reply["usage"];
    Ok(Round {
        answer: reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        line: handled_line(lines, &request_id).await,
    })
}

fn say(text: impl AsRef<str>) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", text.as_ref());
    let _ = stdout.flush();
}

/// Runs the demo; children are gone when it returns.
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    if !(args.duration > 0.0 && args.qps > 0.0 && args.time_scale > 0.0) {
        return Err(DemoError::Fleet(
            "positive --duration, --qps and --time-scale".into(),
        ));
    }
    let fleet = fleet(&args.config)?;
    check_ports(&fleet)?;
    std::fs::create_dir_all(&args.out).map_err(|source| DemoError::Write {
        path: args.out.clone(),
        source,
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;
    let mut children = Vec::new();
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = demo(args, &fleet, &mut children) => result,
            _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
        }
    });
    drop(children);
    outcome
}

async fn demo(
    args: &DemoArgs,
    fleet: &Fleet,
    children: &mut Vec<Managed>,
) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(|source| DemoError::Spawn {
        what: "kvgate (cannot find this executable)",
        source,
    })?;
    let model = fleet
        .config
        .models
        .first()
        .ok_or_else(|| DemoError::Fleet("a model".into()))?;
    let first = fleet.pods[0];
    let gateway = format!("http://{}", fleet.config.server.listen);
    say(format!(
        "kvgate demo: {} simulated {} pods on {}..{}, gateway on {}",
        fleet.pods.len(),
        model.name,
        first,
        fleet.pods[fleet.pods.len() - 1].port(),
        fleet.config.server.listen
    ));

    let started = Instant::now();
    let (sim_log_path, sim_log) = log_file(&args.out, "demo-sim.log")?;
    let sim = Command::new(&exe)
        .arg("sim")
        .arg("--config")
        .arg(&fleet.config_path)
        .args(["--pods", &fleet.pods.len().to_string()])
        .args(["--host", &first.ip().to_string()])
        .args(["--base-port", &first.port().to_string()])
        .args(["--events-connect", &fleet.events_bind])
        .args(["--time-scale", &args.time_scale.to_string()])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(sim_log)
        .spawn()
        .map_err(|source| DemoError::Spawn {
            what: "the simulated pods",
            source,
        })?;
    children.push(Managed { child: sim });
    let client = reqwest::Client::new();
    for pod in &fleet.pods {
        let url = format!("http://{pod}/health");
        wait_http_ok(
            &client,
            &url,
            &mut children[0],
            "the simulated pods",
            &sim_log_path,
        )
        .await?;
    }
    say(format!(
        "  pods ready in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    let started = Instant::now();
    let (gateway_log_path, mut gateway_log) = log_file(&args.out, "demo-gateway.log")?;
    let mut serve = Command::new(&exe)
        .arg("serve")
        .arg("--config")
        .arg(&fleet.config_path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DemoError::Spawn {
            what: "the gateway",
            source,
        })?;
    let stderr = serve.stderr.take();
    children.push(Managed { child: serve });
    let (line_tx, mut lines) = mpsc::unbounded_channel();
    if let Some(stderr) = stderr {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                let _ = writeln!(gateway_log, "{line}");
                if line.contains("Request handled") {
                    let _ = line_tx.send(line);
                }
            }
        });
    }
    wait_http_ok(
        &client,
        &format!("{gateway}/v1/models"),
        &mut children[1],
        "the gateway",
        &gateway_log_path,
    )
    .await?;
    say(format!(
        "  gateway ready in {:.1} s\n",
        started.elapsed().as_secs_f64()
    ));

    let chat_path = args.chat.clone().unwrap_or_else(|| {
        fleet
            .config_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("examples/round1.json")
    });
    let read_error = |message: String| DemoError::Read {
        path: chat_path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&chat_path).map_err(|e| read_error(e.to_string()))?;
    let mut body: Value = serde_json::from_str(&text).map_err(|e| read_error(e.to_string()))?;
    say(format!(
        "Two-round chat ({}, then its answer and a follow-up question):",
        chat_path.display()
    ));
    let one = chat_round(&client, &gateway, &body, 1, &mut lines).await?;
    show_round(1, &one);
    let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else {
        return Err(read_error("no `messages` array".into()));
    };
    messages.push(json!({"role": "assistant", "content": one.answer}));
    messages.push(json!({"role": "user", "content": FOLLOW_UP}));
    let two = chat_round(&client, &gateway, &body, 2, &mut lines).await?;
    show_round(2, &two);
    let pod_of = |round: &Round| {
        round
            .line
            .as_deref()
            .and_then(|l| log_field(l, "endpoint"))
            .map(|e| e.trim_matches('"').to_string())
    };
    match (pod_of(&one), pod_of(&two)) {
        (Some(a), Some(b)) if a == b => say(format!(
            "  → both rounds on {a}: round 2 reused round 1's prefix there.\n"
        )),
        (Some(a), Some(b)) => say(format!(
            "  → round 1 on {a}, round 2 on {b}: different pods.\n"
        )),
        _ => say("  → the gateway log did not name the pods.\n"),
    }

    let hasher = BlockHasher::new(&model.hash_settings())?;
    let shape = SharedPrefixShape {
        groups: 16,
        prompts_per_group: 4,
        prefix_tokens: 6_000,
        question_tokens: 1_000,
        output_tokens: 64,
        fresh_questions: false,
    };
    let ladder = Ladder {
        warmup: None,
        steps: vec![(args.qps, args.duration)],
    };
    let workload = workload::shared_prefix("demo", &shape, &ladder, &hasher, args.seed, true)?;
    let policies: Vec<PolicySpec> = [
        ("kv-cache", model.profile.as_str()),
        ("prefix", "approximate"),
        ("round-robin", "round-robin"),
    ]
    .into_iter()
    .map(|(name, profile)| {
        fleet
            .config
            .profiles
            .get(profile)
            .map(|p| PolicySpec {
                name: name.to_string(),
                profile_name: profile.to_string(),
                profile: p.clone(),
                feed: IndexFeed::Events {
                    delay_ms: 0.0,
                    loss: 0.0,
                },
                replicas: 1,
                relayed: false,
            })
            .ok_or_else(|| DemoError::Fleet(format!("profile {profile:?} in the config")))
    })
    .collect::<Result<_, _>>()?;
    say(format!(
        "Live comparison: {}; each profile in turn from cold caches ({} requests each).",
        workload.description,
        workload.request_count()
    ));
    let setup = LiveSetup {
        gateway: gateway.clone(),
        pods: fleet.pods.clone(),
        model: model.name.clone(),
        profile_header: fleet.config.server.profile_header.clone(),
        time_scale: args.time_scale,
        max_in_flight: 256,
    };
    let mut bar = ProgressBar::new(workload.request_count() * policies.len(), false);
    let runs = super::run_live(&setup, &workload, &policies, &mut bar).await?;
    let segments = workload
        .segments
        .iter()
        .zip(&runs)
        .map(|(segment, runs)| SegmentReport::new(segment, &policies, runs, 2.0))
        .collect();
    let report = BenchReport {
        workload: workload.name.clone(),
        description: workload.description.clone(),
        mode: "live".into(),
        pods: fleet.pods.len(),
        model: model.name.clone(),
        pod_params: crate::sim::PodParams {
            kv_blocks: u32::try_from(model.pod_kv_blocks).unwrap_or(u32::MAX),
            block_size: u32::try_from(model.block_size).unwrap_or(u32::MAX),
            ..crate::sim::PodParams::default()
        },
        slo_ttft_p90_s: 2.0,
        seed: args.seed,
        segments,
    };
    let written = report::write(&report, &args.out, "demo")?;
    say(format!("\n{}", summary_table(&report)));
    say(format!(
        "Full report: {}; logs: {}, {}",
        written
            .files
            .first()
            .map_or_else(String::new, |p| p.display().to_string()),
        gateway_log_path.display(),
        sim_log_path.display()
    ));
    Ok(())
}

fn show_round(round: u32, result: &Round) {
    say(format!(
        "  round {round}: {} of {} prompt tokens cached; answer: {}",
        result.cached_tokens,
        result.prompt_tokens,
        short(&result.answer, 60)
    ));
    match &result.line {
        Some(line) => say(format!("    {line}")),
        None => say("    (no `Request handled` line seen in the gateway's log)"),
    }
}

/// The comparison's one-row-per-profile table.
fn summary_table(report: &BenchReport) -> String {
    let mut out = String::from(
        "| profile | hit rate | TTFT p50 (s) | TTFT p90 (s) | TPOT p50 (ms) | requests per pod | failed |\n|---|---:|---:|---:|---:|---|---:|\n",
    );
    for segment in &report.segments {
        for policy in &segment.policies {
            let s = &policy.summary;
            let f = &s.figures;
            let secs = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "| {} | {:.1} % | {} | {} | {} | {} | {} |",
                s.policy,
                f.hit_rate * 100.0,
                secs(f.ttft_p50_s),
                secs(f.ttft_p90_s),
                f.tpot_p50_ms.map_or("—".into(), |v| format!("{v:.1}")),
                s.pod_requests
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join("/"),
                s.failed,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_are_read_from_text_and_json_lines() {
        let text = "2025-01-01T00:00:00Z  INFO kvgate::proxy::log: Request handled request_id=demo-round-1 method=POST endpoint=127.0.0.1:8002 policy=\"default\"";
        assert_eq!(log_field(text, "request_id"), Some("demo-round-1"));
        assert_eq!(log_field(text, "endpoint"), Some("127.0.0.1:8002"));
        let json = r#"{"fields":{"message":"Request handled","request_id":"demo-round-2","endpoint":"127.0.0.1:8003"}}"#;
        assert_eq!(log_field(json, "endpoint"), Some("127.0.0.1:8003"));
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
    fn the_shipped_config_describes_a_demo_fleet() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/kvgate.yaml");
        let fleet = fleet(&path).expect("conf/kvgate.yaml is a local fleet");
        assert_eq!(fleet.pods.len(), 4);
        assert!(path
            .parent()
            .unwrap()
            .join("examples/round1.json")
            .is_file());
    }
}
