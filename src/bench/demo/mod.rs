//! `kvgate demo`: the deployed shape on one machine, in one command.
//!
//! Simulated vLLM pods (`kvgate sim`) and two `kvgate serve` replicas in connect mode (each
//! subscribed to every pod's KV events, sharing nothing), started as children of this
//! executable and killed on every exit path, Ctrl-C included. The demo
//!
//! 1. sends a two-round chat, round 1 to one replica and round 2 to the other, as a
//!    `LoadBalancer` Service may, and fails unless round 2 reused round 1's prefix on the
//!    same pod;
//! 2. loads the fleet with each profile in turn (kv-cache, prefix, round-robin) from cold
//!    caches: shared-prefix traffic spread over both replicas, one pod restarted with an
//!    empty cache halfway through the measured part;
//! 3. prints the table (hit rate, TTFT, how often the replicas agreed on a prefix's pod,
//!    cached tokens predicted against reported), the line that says why the winner wins,
//!    and writes `demo.json` and `demo.svg`;
//! 4. replays the kv-cache run's trace, which the replicas recorded, in virtual time
//!    (what `kvgate bench --trace` does with a user's own traffic) and sets the replayed
//!    hit rates beside the live ones.
//!
//! The pods have less KV memory than the model's (`--pod-kv-blocks`), so that the
//! traffic's prefixes and questions fill most of the fleet's KV as in W1: a cache that
//! holds everything everywhere would make every policy look alike.

mod figures;
mod fleet;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use self::figures::{ProfileFigures, RestartMark, Routed, Routing};
use self::fleet::{Handled, LogBook, Managed, Replica, ReplicaConfig, SimFleet};
use super::live::{self, LiveError, LiveSetup, PodRestart};
use super::metrics::{Figures, RunData};
use super::policy::{self, IndexFeed, PolicySpec};
use super::report::{self, BenchReport, ReportError, SegmentReport};
use super::virtual_time::{self, SimError, SimRestart, SimSetup};
use super::workload::{self, Ladder, SharedPrefixShape, TraceReplay, WorkloadError};
use super::ProgressBar;
use crate::config::{Config, ConfigError, ModelConfig};
use crate::hash::{BlockHasher, HashConfigError};
use crate::sim::PodParams;

/// The question of the chat's second round.
const FOLLOW_UP: &str =
    "Thanks. If we file the increase request today, how long does approval usually take?";

/// How long a replica may take to index round 1's blocks from the pod's events.
const INDEX_WAIT: Duration = Duration::from_secs(10);
/// How long the gateways' lines for a run may trail its last response.
const LOG_WAIT: Duration = Duration::from_secs(15);
/// Wall milliseconds the restarted pod stays down.
const RESTART_DOWN_MS: u64 = 500;

/// The comparison's traffic: W1's shape scaled to a 4-pod demo (12 prefixes of 4,000
/// tokens, 4 questions of 800 tokens each, short answers).
fn demo_shape() -> SharedPrefixShape {
    SharedPrefixShape {
        groups: 12,
        prompts_per_group: 4,
        prefix_tokens: 4_000,
        question_tokens: 800,
        output_tokens: 64,
        fresh_questions: false,
    }
}

/// The profiles compared: (name in the table, profile, how it routes).
const COMPARED: [(&str, &str, Routing); 3] = [
    ("kv-cache", "", Routing::Events),
    ("prefix", "approximate", Routing::OwnHistory),
    ("round-robin", "round-robin", Routing::CacheBlind),
];

/// `kvgate demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The config the demo takes its model and profiles from; replica r listens on
    /// 127.0.0.1 at the config's listen and admin ports + r (port 0: each picks its own).
    #[arg(long, default_value = "conf/kvgate.yaml")]
    pub config: PathBuf,
    /// The first round of the chat (an OpenAI chat request body).
    #[arg(long)]
    pub chat: Option<PathBuf>,
    /// The profile the chat is routed with (default: the model's).
    #[arg(long)]
    pub chat_profile: Option<String>,
    /// Simulated pods.
    #[arg(long, default_value_t = 4)]
    pub pods: usize,
    /// Gateway replicas.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// KV blocks per simulated pod: the traffic's prefixes and questions fill 88 % of
    /// four such pods.
    #[arg(long, default_value_t = 384)]
    pub pod_kv_blocks: u32,
    /// Requests per second in the comparison.
    #[arg(long, default_value_t = 6.0)]
    pub qps: f64,
    /// Seconds of load per profile before the measured part (seats the prefixes).
    #[arg(long, default_value_t = 10.0)]
    pub warmup: f64,
    /// Measured seconds of load per profile; a pod restarts halfway through.
    #[arg(long, default_value_t = 40.0)]
    pub duration: f64,
    /// Wall seconds per simulated second of the pods (times are reported in simulated seconds).
    #[arg(long, default_value_t = 0.5)]
    pub time_scale: f64,
    /// Output folder: report, plot, traces, configs and logs.
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
    Setup(String),
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
    #[error("the chat's round 2 did not reuse round 1: {0}")]
    ChatSplit(String),
    #[error(transparent)]
    Hash(#[from] HashConfigError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error("replaying the trace: {0}")]
    Replay(#[from] SimError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("interrupted")]
    Interrupted,
}

fn say(text: impl AsRef<str>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", text.as_ref());
    let _ = stdout.flush();
}

/// What the demo starts from: the user's config and what it derives from it.
struct Plan {
    config: Config,
    model: ModelConfig,
    /// The user's file as YAML values, with the model's file paths made absolute.
    base: Value,
    /// (listen, admin) of each replica.
    ports: Vec<(SocketAddr, SocketAddr)>,
    profiles: Vec<(String, String, Routing)>,
    chat_profile: String,
}

fn plan(args: &DemoArgs) -> Result<Plan, DemoError> {
    let positive = [args.qps, args.duration, args.time_scale];
    if !positive.iter().all(|v| v.is_finite() && *v > 0.0)
        || !args.warmup.is_finite()
        || args.warmup < 0.0
    {
        return Err(DemoError::Setup(
            "positive --qps, --duration and --time-scale, and --warmup ≥ 0".into(),
        ));
    }
    if args.pods == 0 || args.replicas == 0 || args.pod_kv_blocks == 0 {
        return Err(DemoError::Setup(
            "at least one pod, one replica and one KV block".into(),
        ));
    }
    let config = Config::load(&args.config)?;
    let model = config
        .models
        .first()
        .cloned()
        .ok_or_else(|| DemoError::Setup("a model in the config".into()))?;
    let read_error = |message: String| DemoError::Read {
        path: args.config.clone(),
        message,
    };
    let text = std::fs::read_to_string(&args.config).map_err(|e| read_error(e.to_string()))?;
    let mut base: Value = yaml_serde::from_str(&text).map_err(|e| read_error(e.to_string()))?;
    // One model, with its files where the loaded config found them, and KV as the pods have.
    let absolute = |path: &Path| {
        std::path::absolute(path).map_err(|e| DemoError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    let mut first = base["models"].get(0).cloned().unwrap_or(Value::Null);
    first["tokenizer"] = json!(absolute(&model.tokenizer)?);
    if let Some(path) = &model.tokenizer_config {
        first["tokenizerConfig"] = json!(absolute(path)?);
    }
    if let Some(path) = &model.chat_template {
        first["chatTemplate"] = json!(absolute(path)?);
    }
    first["podKvBlocks"] = json!(args.pod_kv_blocks);
    base["models"] = json!([first]);
    let mut profiles = Vec::new();
    for (name, profile, routing) in COMPARED {
        let profile = if profile.is_empty() {
            model.profile.clone()
        } else {
            profile.to_string()
        };
        if !config.profiles.contains_key(&profile) {
            // The baselines are built in: add them to the replicas' configs.
            let spec = policy::resolve(&profile, &config, &model)
                .map_err(|e| DemoError::Setup(format!("profile {profile:?}: {e}")))?;
            base["profiles"][&profile] = profile_value(&profile, &spec)?;
        }
        profiles.push((name.to_string(), profile, routing));
    }
    let chat_profile = args
        .chat_profile
        .clone()
        .unwrap_or_else(|| model.profile.clone());
    if !config.profiles.contains_key(&chat_profile)
        && !profiles.iter().any(|(_, p, _)| *p == chat_profile)
    {
        return Err(DemoError::Setup(format!(
            "--chat-profile {chat_profile:?} to be a profile of the config"
        )));
    }
    let port = |addr: SocketAddr, r: usize| {
        // Port 0 stays 0: every replica binds one the system picks, and reports it.
        let step = if addr.port() == 0 { 0 } else { r };
        u16::try_from(usize::from(addr.port()) + step)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .map_err(|_| DemoError::Setup(format!("room for {} ports after {addr}", r + 1)))
    };
    let ports = (0..args.replicas)
        .map(|r| {
            Ok((
                port(config.server.listen, r)?,
                port(config.server.admin, r)?,
            ))
        })
        .collect::<Result<Vec<_>, DemoError>>()?;
    Ok(Plan {
        config,
        model,
        base,
        ports,
        profiles,
        chat_profile,
    })
}

/// A built-in profile as the config would write it.
fn profile_value(name: &str, spec: &PolicySpec) -> Result<Value, DemoError> {
    let plugin = |p: &crate::config::PluginConfig| json!({"name": p.name, "weight": p.weight, "params": p.params});
    let value = json!({
        "filters": spec.profile.filters.iter().map(plugin).collect::<Vec<_>>(),
        "scorers": spec.profile.scorers.iter().map(plugin).collect::<Vec<_>>(),
        "picker": plugin(&spec.profile.picker),
    });
    // `params: null` is what an absent field reads as.
    serde_json::from_value::<crate::config::ProfileConfig>(value.clone())
        .map_err(|e| DemoError::Setup(format!("profile {name:?}: {e}")))?;
    Ok(value)
}

/// Runs the demo; children are gone when it returns.
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    let plan = plan(args)?;
    let addrs: Vec<SocketAddr> = plan.ports.iter().flat_map(|&(l, a)| [l, a]).collect();
    fleet::check_ports(&addrs)?;
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
            result = demo(args, &plan, &mut children) => result,
            _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
        }
    });
    drop(children);
    outcome
}

/// What the demo wrote, for `demo.json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DemoReport<'a> {
    pods: usize,
    replicas: usize,
    pod_kv_blocks: u32,
    restarted_pod: usize,
    restart_at_s: f64,
    chat: &'a ChatOutcome,
    profiles: &'a [ProfileFigures],
    why: &'a str,
    replay: &'a [ReplayRow],
    live: &'a BenchReport,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChatOutcome {
    pod: String,
    round1_prompt_tokens: u64,
    round2_prompt_tokens: u64,
    round2_cached_tokens: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReplayRow {
    name: String,
    policy: String,
    live_hit_rate: f64,
    replayed_hit_rate: f64,
    /// How far apart the two are, in percentage points.
    gap_points: f64,
}

async fn demo(args: &DemoArgs, plan: &Plan, children: &mut Vec<Managed>) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(|source| DemoError::Spawn {
        what: "kvgate (cannot find this executable)",
        source,
    })?;
    let out = std::path::absolute(&args.out).map_err(|source| DemoError::Write {
        path: args.out.clone(),
        source,
    })?;
    say(format!(
        "kvgate demo: {} simulated {} pods ({} KV blocks each), {} gateway replicas in connect mode",
        args.pods, plan.model.name, args.pod_kv_blocks, args.replicas,
    ));

    let started = Instant::now();
    let sim_config = out.join("demo-sim.yaml");
    let mut sim_base = plan.base.clone();
    sim_base["models"][0]["discovery"] = json!({"static": {"pods": []}});
    if let Some(fields) = sim_base.as_object_mut() {
        fields.remove("trace");
    }
    fleet::write_file(
        &sim_config,
        &serde_json::to_vec_pretty(&sim_base).unwrap_or_default(),
    )?;
    let params = pod_params(args, &plan.model);
    let pod_params_path = out.join("demo-pod-params.yaml");
    let overrides = json!({"maxModelLen": params.max_model_len});
    fleet::write_file(&pod_params_path, overrides.to_string().as_bytes())?;
    let sim_log = out.join("demo-sim.log");
    let sim = fleet::start_pods(
        &exe,
        &sim_config,
        &pod_params_path,
        args.pods,
        args.time_scale,
        &sim_log,
        children,
    )?;
    say(format!(
        "  pods ready in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    let started = Instant::now();
    let (mut book, lines) = fleet::log_book();
    let salt = format!("{:016x}", rand::random::<u64>());
    let mut replicas = Vec::new();
    for (r, &(listen, admin)) in plan.ports.iter().enumerate() {
        let config = out.join(format!("demo-gateway-{r}.yaml"));
        let rendered = ReplicaConfig {
            base: &plan.base,
            listen,
            admin,
            pods: &sim.pods,
            trace: &out.join(format!("demo-trace-{r}.jsonl")),
            salt: &salt,
        }
        .render();
        fleet::write_file(
            &config,
            &serde_json::to_vec_pretty(&rendered).unwrap_or_default(),
        )?;
        for old in trace_files(&out, r) {
            let _ = std::fs::remove_file(old);
        }
        let replica = Replica {
            listen,
            admin,
            config,
            log: out.join(format!("demo-gateway-{r}.log")),
        };
        replicas.push(fleet::start_replica(&exe, replica, r, &lines, children)?);
    }
    let client = reqwest::Client::new();
    for (r, replica) in replicas.iter().enumerate() {
        let url = format!("http://{}/readyz", replica.admin);
        let child = &mut children[1 + r];
        fleet::wait_http_ok(&client, &url, child, "a gateway replica", &replica.log).await?;
    }
    say(format!(
        "  gateways ready in {:.1} s on {}\n",
        started.elapsed().as_secs_f64(),
        replicas
            .iter()
            .map(|r| format!("{} (admin {})", r.listen, r.admin))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let chat = chat(args, plan, &client, &replicas, &mut book).await?;
    let (rows, live_report, kv_run, restart) =
        compare(args, plan, &sim, &replicas, &mut book).await?;
    let restarted_pod = restart.pod;
    let why = figures::why_line(&rows, restarted_pod);
    say(format!("\n{}", figures::table(&rows)));
    say(&why);

    let replay = replay(args, plan, &out, &kv_run, &restart, &rows)?;
    let subtitle = format!(
        "{} pods × {} KV blocks, {} replicas, {} QPS of shared-prefix traffic, pod {} restarted at {} s",
        args.pods,
        args.pod_kv_blocks,
        args.replicas,
        args.qps,
        restarted_pod + 1,
        restart.at_s
    );
    let json_path = out.join("demo.json");
    let svg_path = out.join("demo.svg");
    let report = DemoReport {
        pods: args.pods,
        replicas: args.replicas,
        pod_kv_blocks: args.pod_kv_blocks,
        restarted_pod,
        restart_at_s: restart.at_s,
        chat: &chat,
        profiles: &rows,
        why: &why,
        replay: &replay,
        live: &live_report,
    };
    let text = serde_json::to_vec_pretty(&report).map_err(ReportError::Json)?;
    fleet::write_file(&json_path, &text)?;
    fleet::write_file(&svg_path, figures::plot(&rows, &subtitle).as_bytes())?;
    say(format!(
        "\nReport: {} and {}; configs, traces and logs beside them in {}",
        json_path.display(),
        svg_path.display(),
        out.display()
    ));
    Ok(())
}

/// The trace files replica `r` writes (the current one and rotated ones).
fn trace_files(out: &Path, r: usize) -> Vec<PathBuf> {
    let current = out.join(format!("demo-trace-{r}.jsonl"));
    let mut files = vec![current.clone()];
    files.extend((1..10).map(|n| PathBuf::from(format!("{}.{n}", current.display()))));
    files
}

struct Round {
    answer: String,
    prompt_tokens: u64,
    cached_tokens: u64,
    line: Option<Handled>,
}

async fn chat_round(
    client: &reqwest::Client,
    replica: &Replica,
    profile_header: (&str, &str),
    body: &Value,
    round: u32,
    book: &mut LogBook,
) -> Result<Round, DemoError> {
    let request_id = format!("demo-round-{round}");
    let fail = |message: String| DemoError::Chat { round, message };
    let response = client
        .post(format!("{}/v1/chat/completions", replica.url()))
        .header("x-request-id", &request_id)
        .header(profile_header.0, profile_header.1)
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
    let line = book
        .wait_for(std::slice::from_ref(&request_id), LOG_WAIT)
        .await
        .pop()
        .flatten();
    Ok(Round {
        answer: reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        line,
    })
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

fn show_round(round: u32, replica: usize, result: &Round) {
    say(format!(
        "  round {round} via replica {}: {} of {} prompt tokens cached; answer: {}",
        replica + 1,
        result.cached_tokens,
        result.prompt_tokens,
        short(&result.answer, 50)
    ));
    match &result.line {
        Some(handled) => say(format!("    {}", handled.line)),
        None => say("    (no `Request handled` line seen in the gateway's log)"),
    }
}

/// Round 1 to the first replica, round 2 to the next: round 2 must land on round 1's
/// pod and find round 1's prompt cached there.
async fn chat(
    args: &DemoArgs,
    plan: &Plan,
    client: &reqwest::Client,
    replicas: &[Replica],
    book: &mut LogBook,
) -> Result<ChatOutcome, DemoError> {
    let chat_path = args.chat.clone().unwrap_or_else(|| {
        args.config
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
    body["model"] = json!(plan.model.name);
    let header = (
        plan.config.server.profile_header.as_str(),
        plan.chat_profile.as_str(),
    );
    let second = 1 % replicas.len();
    say(format!(
        "Two-round chat ({}, profile {}): round 1 through replica 1, round 2 (its answer and a follow-up) through replica {}:",
        chat_path.display(),
        plan.chat_profile,
        second + 1
    ));
    let one = chat_round(client, &replicas[0], header, &body, 1, book).await?;
    show_round(1, 0, &one);
    // Round 2's replica learns where round 1 is cached from the pod's KV events alone.
    let block_size = plan.model.block_size as u64;
    let blocks = one.prompt_tokens / block_size.max(1);
    let waited = Instant::now();
    while fleet::indexed_blocks(client, replicas[second].admin).await < blocks
        && waited.elapsed() < INDEX_WAIT
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else {
        return Err(read_error("no `messages` array".into()));
    };
    messages.push(json!({"role": "assistant", "content": one.answer}));
    messages.push(json!({"role": "user", "content": FOLLOW_UP}));
    let two = chat_round(client, &replicas[second], header, &body, 2, book).await?;
    show_round(2, second, &two);
    let pod_of = |round: &Round| round.line.as_ref().and_then(|l| l.pod.clone());
    let (Some(first_pod), Some(second_pod)) = (pod_of(&one), pod_of(&two)) else {
        return Err(DemoError::ChatSplit(
            "the gateways' logs did not name the pods".into(),
        ));
    };
    // Round 1's prompt is the start of round 2's: all its full blocks are reusable.
    let reusable = blocks * block_size;
    if first_pod != second_pod || two.cached_tokens < reusable {
        return Err(DemoError::ChatSplit(format!(
            "round 1's {} prompt tokens are cached on {first_pod}, but round 2 went to {second_pod} and found {} of its {} tokens cached",
            one.prompt_tokens, two.cached_tokens, two.prompt_tokens
        )));
    }
    say(format!(
        "  → both rounds on {first_pod}: replica {} had never seen round 1, and found its prefix through the pod's KV events.\n",
        second + 1
    ));
    Ok(ChatOutcome {
        pod: first_pod,
        round1_prompt_tokens: one.prompt_tokens,
        round2_prompt_tokens: two.prompt_tokens,
        round2_cached_tokens: two.cached_tokens,
    })
}

/// The restart every profile's run goes through.
struct RestartPlan {
    pod: usize,
    at_s: f64,
}

/// The kv-cache run as the replay needs it: the Unix-epoch milliseconds its requests
/// arrived within, and when its pod restart was asked for.
struct KvRun {
    window: (u64, u64),
    restarted_unix_ms: Option<u64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Each profile in turn, from cold caches, through every replica.
async fn compare(
    args: &DemoArgs,
    plan: &Plan,
    sim: &SimFleet,
    replicas: &[Replica],
    book: &mut LogBook,
) -> Result<(Vec<ProfileFigures>, BenchReport, KvRun, RestartPlan), DemoError> {
    let hasher = BlockHasher::new(&plan.model.hash_settings())?;
    let ladder = Ladder {
        warmup: (args.warmup > 0.0).then_some((args.qps, args.warmup)),
        steps: vec![(args.qps, args.duration)],
    };
    let workload =
        workload::shared_prefix("demo", &demo_shape(), &ladder, &hasher, args.seed, true)?;
    let segment = &workload.segments[0];
    let restart = RestartPlan {
        pod: 1.min(args.pods - 1),
        at_s: args.warmup + args.duration / 2.0,
    };
    let pods: Vec<SocketAddr> = sim.pods.iter().map(|p| p.http).collect();
    let pod_names: Vec<String> = pods.iter().map(SocketAddr::to_string).collect();
    let setup = LiveSetup {
        gateways: replicas.iter().map(Replica::url).collect(),
        pods: pods.clone(),
        model: plan.model.name.clone(),
        profile_header: plan.config.server.profile_header.clone(),
        time_scale: args.time_scale,
        max_in_flight: 256,
        restart: Some(PodRestart {
            control: sim.control.clone(),
            pod: restart.pod,
            at_s: restart.at_s,
            down_ms: RESTART_DOWN_MS,
        }),
    };
    let first_after = segment
        .requests
        .partition_point(|r| r.arrival_ms < restart.at_s * 1e3);
    let mark = RestartMark {
        pod: &pod_names[restart.pod],
        first_after,
    };
    say(format!(
        "Comparison: {}; {} requests per profile spread over {} replicas, pod {} restarted at {} s, each profile from cold caches:",
        workload.description,
        segment.requests.len(),
        args.replicas,
        restart.pod + 1,
        restart.at_s
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(setup.max_in_flight)
        .build()
        .map_err(|e| LiveError::Http {
            url: setup.gateways.join(", "),
            message: e.to_string(),
        })?;
    let mut policies = Vec::new();
    let mut runs = Vec::new();
    let mut rows = Vec::new();
    let mut kv_run = KvRun {
        window: (0, 0),
        restarted_unix_ms: None,
    };
    for (k, (name, profile, routing)) in plan.profiles.iter().enumerate() {
        let spec = PolicySpec {
            name: name.clone(),
            profile_name: profile.clone(),
            profile: plan
                .config
                .profiles
                .get(profile)
                .cloned()
                .map_or_else(
                    || policy::resolve(profile, &plan.config, &plan.model).map(|s| s.profile),
                    Ok,
                )
                .map_err(|e| DemoError::Setup(format!("profile {profile:?}: {e}")))?,
            feed: IndexFeed::Events {
                delay_ms: 0.0,
                loss: 0.0,
            },
            replicas: 1,
            relayed: false,
        };
        say(format!(
            "  [{}/{}] {name} (profile {profile})",
            k + 1,
            plan.profiles.len()
        ));
        let progress = AtomicUsize::new(0);
        let mut bar = ProgressBar::new(segment.requests.len(), false);
        let window_start = unix_ms();
        let mut data: RunData = {
            let run = live::run_policy(&client, &setup, segment, &spec, &progress);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    result = &mut run => break result?,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        bar.show(progress.load(Ordering::Relaxed), std::slice::from_ref(name), false);
                    }
                }
            }
        };
        bar.show(progress.load(Ordering::Relaxed), &[], true);
        if k == 0 {
            kv_run = KvRun {
                window: (window_start, unix_ms()),
                restarted_unix_ms: data.restarted_unix_ms,
            };
        }
        let ids: Vec<String> = (0..segment.requests.len())
            .map(|i| live::request_id(profile, i))
            .collect();
        let handled = book.wait_for(&ids, LOG_WAIT).await;
        let routed = Routed {
            segment,
            handled: &handled,
            replicas: args.replicas,
            pods: &pod_names,
            restart: &mark,
        };
        // The pods' own counters restart with the pod: count from the gateways' lines.
        let row = routed.figures(name, profile, *routing, &Figures::default(), data.failed);
        data.pod_requests = row.pod_requests.clone();
        rows.push(row);
        runs.push(data);
        policies.push(spec);
    }
    let segment_report = SegmentReport::new(segment, &policies, &runs, 2.0);
    for (row, policy) in rows.iter_mut().zip(&segment_report.policies) {
        row.figures = policy.summary.figures.clone();
    }
    let report = BenchReport {
        workload: workload.name.clone(),
        description: workload.description.clone(),
        mode: "live".into(),
        pods: args.pods,
        model: plan.model.name.clone(),
        pod_params: pod_params(args, &plan.model),
        slo_ttft_p90_s: 2.0,
        seed: args.seed,
        segments: vec![segment_report],
        verdict: None,
    };
    report::write(&report, &args.out, "demo-live")?;
    Ok((rows, report, kv_run, restart))
}

/// The simulated pod: the model's, with the demo's KV pool, accepting any request the
/// pool can hold.
fn pod_params(args: &DemoArgs, model: &ModelConfig) -> PodParams {
    let block_size = u32::try_from(model.block_size).unwrap_or(u32::MAX);
    PodParams {
        kv_blocks: args.pod_kv_blocks,
        block_size,
        max_model_len: args.pod_kv_blocks.saturating_mul(block_size),
        ..PodParams::default()
    }
}

/// Replays the kv-cache run's trace, as both replicas recorded it, in virtual time with
/// every compared profile, and sets the replayed hit rates beside the live ones. The
/// replay goes through what the live run went through: each request to the replica that
/// recorded it, and the pod restart at the moment it was asked for.
fn replay(
    args: &DemoArgs,
    plan: &Plan,
    out: &Path,
    kv_run: &KvRun,
    restart: &RestartPlan,
    rows: &[ProfileFigures],
) -> Result<Vec<ReplayRow>, DemoError> {
    let mut records = Vec::new();
    for r in 0..args.replicas {
        for file in trace_files(out, r).into_iter().filter(|f| f.exists()) {
            records.extend(workload::read_trace(&file)?);
        }
    }
    let kv_profile = &plan.profiles[0].1;
    records.retain(|r| {
        r.policy.as_deref() == Some(kv_profile.as_str())
            && (kv_run.window.0..=kv_run.window.1).contains(&r.timestamp)
    });
    // The replay's clock starts at the first request, in simulated ms (wall ÷ time scale).
    let first = records.iter().map(|r| r.timestamp).min();
    let restarts = match (kv_run.restarted_unix_ms, first) {
        (Some(at), Some(first)) => vec![SimRestart {
            pod: restart.pod,
            at_ms: (at as f64 - first as f64) / args.time_scale,
            down_ms: RESTART_DOWN_MS as f64 / args.time_scale,
        }],
        _ => Vec::new(),
    };
    let recorded = out.join("demo-trace.jsonl");
    let mut text = Vec::new();
    for record in &records {
        serde_json::to_writer(&mut text, record).map_err(ReportError::Json)?;
        text.push(b'\n');
    }
    fleet::write_file(&recorded, &text)?;
    let hasher = BlockHasher::new(&plan.model.hash_settings())?;
    let params = pod_params(args, &plan.model);
    let replay = TraceReplay {
        speedups: vec![args.time_scale],
        max_tokens: params.max_model_len,
        limit: None,
        model: Some(plan.model.name.clone()),
        // The trace runs in wall time: its warm-up lasted warmup × time scale.
        warmup_s: args.warmup * args.time_scale,
    };
    let (workload, _) = workload::trace_workload(
        "demo-trace",
        &recorded.display().to_string(),
        records,
        &replay,
        &hasher,
        false,
    )?;
    let mut setup =
        SimSetup::for_model(&plan.config, &plan.model.name, args.pods, params, args.seed);
    // The gateways scraped the pods every interval of wall time.
    setup.scrape_interval_ms /= args.time_scale;
    setup.restarts = restarts;
    let mut replayed = Vec::new();
    for ((name, profile, _), row) in plan.profiles.iter().zip(rows) {
        let base = if *profile == plan.model.profile {
            "precise".to_string()
        } else {
            profile.clone()
        };
        let name_x = format!("{base}-x{}", args.replicas);
        let spec = policy::resolve(&name_x, &plan.config, &plan.model)
            .map_err(|e| DemoError::Setup(format!("policy {name_x}: {e}")))?;
        let data =
            virtual_time::simulate(&workload.segments[0], &spec, &setup, &AtomicUsize::new(0))?;
        let summary = SegmentReport::new(&workload.segments[0], &[spec], &[data], 2.0);
        let hit = summary.policies[0].summary.figures.hit_rate;
        replayed.push(ReplayRow {
            name: name.clone(),
            policy: name_x,
            live_hit_rate: row.figures.hit_rate,
            replayed_hit_rate: hit,
            gap_points: (hit - row.figures.hit_rate).abs() * 100.0,
        });
    }
    say(format!(
        "\nThe replicas recorded the traffic ({}); replayed in virtual time, as `kvgate bench --trace` does with your own:",
        recorded.display()
    ));
    for row in &replayed {
        say(format!(
            "  {:<12} hit rate {:.1} % replayed, {:.1} % live: {:.1} points apart",
            row.name,
            row.replayed_hit_rate * 100.0,
            row.live_hit_rate * 100.0,
            row.gap_points
        ));
    }
    say(format!(
        "  kvgate bench --trace {} --config {} --speedup {},{},{} --warmup {}",
        recorded.display(),
        out.join("demo-gateway-0.yaml").display(),
        args.time_scale,
        args.time_scale * 2.0,
        args.time_scale * 4.0,
        args.warmup * args.time_scale
    ));
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_plans_a_demo() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let args = DemoArgs {
            config: root.join("conf/kvgate.yaml"),
            chat: None,
            chat_profile: None,
            pods: 4,
            replicas: 2,
            pod_kv_blocks: 384,
            qps: 6.0,
            warmup: 10.0,
            duration: 40.0,
            time_scale: 0.5,
            out: PathBuf::from("bench-out"),
            seed: 1,
        };
        let planned = plan(&args).expect("conf/kvgate.yaml plans a demo");
        assert_eq!(planned.ports.len(), 2);
        assert_eq!(planned.ports[1].0.port(), planned.ports[0].0.port() + 1);
        let names: Vec<&str> = planned
            .profiles
            .iter()
            .map(|(_, p, _)| p.as_str())
            .collect();
        assert_eq!(names, ["default", "approximate", "round-robin"]);
        assert_eq!(planned.base["models"][0]["podKvBlocks"], 384);
        assert!(Path::new(planned.base["models"][0]["tokenizer"].as_str().unwrap()).is_absolute());
        assert!(root.join("conf/examples/round1.json").is_file());
        let bad = DemoArgs {
            chat_profile: Some("nope".into()),
            ..args
        };
        assert!(matches!(plan(&bad), Err(DemoError::Setup(_))));
    }
}
