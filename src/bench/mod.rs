//! `kvgate bench`: compares routing policies on the evaluation workloads
//! (`docs/evaluation.md`), in virtual time (simulated pods and the real routing stack in
//! one process) or live (through a running gateway).
//!
//! Both modes share the workloads ([`workload`]), the policies ([`policy`]), the figures
//! ([`metrics`]) and the output ([`report`]): a markdown table on stdout, and JSON, the
//! same markdown and SVG plots in the output directory.

pub mod demo;
pub mod flow;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod report;
pub mod virtual_time;
pub mod workload;

pub use self::demo::DemoArgs;

use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError, ModelConfig};
use crate::hash::{BlockHasher, HashConfigError};
use crate::sim::PodParams;

use self::live::{LiveError, LiveSetup};
use self::metrics::RunData;
use self::policy::{PolicyError, PolicySpec};
use self::report::{BenchReport, ReportError, SegmentReport};
use self::virtual_time::{SimError, SimSetup};
use self::workload::{
    ChatShape, Ladder, LoraShape, MooncakeTrace, SharedPrefixShape, TraceReplay, Workload,
    WorkloadError,
};
use crate::trace::TraceRecord;

/// Simulated pods when neither --pods nor a recorded trace says.
const DEFAULT_PODS: usize = 8;

/// The shared data folder, beside the repository (see BRIEF: `../shared`).
const SHARED_TRACES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/traces");

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Shared system prompts (llm-d's precise-routing benchmark).
    W1,
    /// Low sharing: short shared prefixes, a fresh long question per request.
    Control,
    /// Mooncake FAST'25 synthetic trace.
    MooncakeSynthetic,
    /// Mooncake FAST'25 conversation trace.
    MooncakeConversation,
    /// W3: multi-turn chats over LooGLE documents with the real chat template.
    LoogleChat,
    /// LoRA adapters of Zipf popularity (virtual time only; with --max-loras, and a config
    /// with a `lora-blind` profile and `lora-affinity` in its default, as conf/bench/lora.yaml).
    Lora,
    /// Two tenants on W1 past the knee, with and without the model's `flowControl`
    /// (`--qps <interactive>,<batch burst>`, `--duration <seconds per period>`).
    Flow,
}

impl WorkloadKind {
    fn default_policies(self) -> &'static [&'static str] {
        match self {
            Self::W1 => policy::W1_POLICIES,
            Self::Lora => policy::LORA_POLICIES,
            _ => policy::SHORT_POLICIES,
        }
    }
}

/// `kvgate bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Workload to run.
    #[arg(long, value_enum, default_value = "w1")]
    pub workload: WorkloadKind,
    /// Policies to compare, comma-separated: round-robin, random, least-request,
    /// approximate, precise[-<ms>ms][-loss<p>%], oracle, or a profile of the config.
    /// Default: all of them for W1, a shorter list for the other workloads.
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Replay trace files instead of --workload, merged by timestamp: traces `kvgate serve`
    /// recorded (its `trace` config section) or Mooncake's, comma-separated. The fleet is
    /// sized like the recording one: as many pods and gateway replicas as the trace shows
    /// at once, unless --pods or --policies say otherwise.
    #[arg(long, value_delimiter = ',')]
    pub trace: Vec<PathBuf>,
    /// Simulated pods (default: a recorded trace's pods, else 8).
    #[arg(long)]
    pub pods: Option<usize>,
    /// Disaggregated policies (profiles with a `prefill:` section, as in
    /// conf/bench/pd.yaml): pods 0..N take prefill legs, the others decode legs
    /// (default: half the pods). Aggregated policies use every pod.
    #[arg(long)]
    pub prefill_pods: Option<usize>,
    /// QPS steps of the ladder (W1, control), comma-separated; default llm-d's 3 → 60
    /// for W1, 2 → 16 for the control.
    #[arg(long, value_delimiter = ',')]
    pub qps: Vec<f64>,
    /// Seconds per ladder step (default: llm-d's durations, or 30 s with --qps).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds of warm-up before the ladder, at --warmup-qps; 0 for none (default: 50
    /// for W1, none for the control). With --trace: the trace's first seconds, replayed
    /// but not measured.
    #[arg(long)]
    pub warmup: Option<f64>,
    #[arg(long, default_value_t = 15.0)]
    pub warmup_qps: f64,
    /// Shared-prefix shape: groups (W1 150, control 256).
    #[arg(long)]
    pub groups: Option<u32>,
    /// Shared-prefix shape: distinct questions per group (W1 5).
    #[arg(long)]
    pub prompts_per_group: Option<u32>,
    /// Shared-prefix shape: tokens of each group's prefix (W1 6000, control 1000).
    #[arg(long)]
    pub prefix_tokens: Option<u32>,
    /// Shared-prefix shape: tokens of each question (W1 1200, control 6200).
    #[arg(long)]
    pub question_tokens: Option<u32>,
    /// Output tokens per request (shared-prefix workloads: 1000).
    #[arg(long)]
    pub output_tokens: Option<u32>,
    /// Trace speed-ups, comma-separated: timestamps are divided by each (default: 1 for
    /// the Mooncake workloads, 1,2,4 with --trace).
    #[arg(long, value_delimiter = ',')]
    pub speedup: Vec<f64>,
    /// Use only the first N requests of a trace.
    #[arg(long)]
    pub limit: Option<usize>,
    /// LoRA workload: adapters.
    #[arg(long, default_value_t = 32)]
    pub adapters: u32,
    /// LoRA workload: Zipf exponent of adapter popularity.
    #[arg(long, default_value_t = 1.0)]
    pub adapter_zipf: f64,
    /// W3: chat sessions started per second.
    #[arg(long, default_value_t = 0.5)]
    pub sessions_per_s: f64,
    /// W3: seconds during which sessions start.
    #[arg(long, default_value_t = 300.0)]
    pub sessions_for: f64,
    /// W3: turns per session.
    #[arg(long, default_value_t = 4)]
    pub turns: u32,
    /// W3: user think time between an answer and the next turn, in seconds.
    #[arg(long, default_value_t = 45.0)]
    pub think: f64,
    /// The gateway config: profiles, the model's hash settings and KV size.
    #[arg(long, default_value = "conf/kvgate.yaml")]
    pub config: PathBuf,
    /// Model of the config to benchmark (default: the first).
    #[arg(long)]
    pub model: Option<String>,
    /// A YAML (or JSON) file of simulated pod parameter overrides (camelCase `PodParams`
    /// fields, as `kvgate sim --pod-params` reads them), to re-calibrate.
    #[arg(long)]
    pub pod_params: Option<PathBuf>,
    /// LoRA adapter slots per simulated pod (vLLM's `--max-loras`; default: the pod
    /// parameters', where 0 leaves adapter slots unmodelled).
    #[arg(long)]
    pub max_loras: Option<u32>,
    /// KV blocks per pod (default: the model's podKvBlocks).
    #[arg(long)]
    pub pod_kv_blocks: Option<u32>,
    /// Longest request a pod accepts (default: the pod parameters', or the whole KV pool
    /// for the Mooncake traces, whose prompts run past 100k tokens).
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Folder holding the traces (default: ../shared/data/traces beside the repository).
    #[arg(long)]
    pub traces: Option<PathBuf>,
    /// Output folder for JSON, markdown and SVG.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// TTFT p90 SLO in seconds that defines the knee.
    #[arg(long, default_value_t = 2.0)]
    pub slo_ttft_p90: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Runs simulated in parallel (default: the machine's cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// No progress on stderr (neither the step lines nor the progress bar).
    #[arg(long)]
    pub quiet: bool,
    /// Live mode: the running gateway's base URL (e.g. http://127.0.0.1:8080), or every
    /// replica's, comma-separated (each request goes to one). Requests go through it to
    /// its pods; each policy is selected with the profile header.
    #[arg(long, value_delimiter = ',')]
    pub live: Vec<String>,
    /// Live mode: the pods' HTTP addresses, comma-separated, for cache resets and request
    /// counts (default: the model's static pods in the config).
    #[arg(long, value_delimiter = ',')]
    pub pod_addrs: Vec<SocketAddr>,
    /// Live mode: wall seconds per workload second, as the pods run (`kvgate sim
    /// --time-scale`); reported times are in workload seconds.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Live mode: most requests in flight at once.
    #[arg(long, default_value_t = 512)]
    pub max_in_flight: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model {0:?} is not in the config")]
    UnknownModel(String),
    #[error("the model's hash settings: {0}")]
    Hash(#[from] HashConfigError),
    #[error("cannot read pod parameters {path}: {message}")]
    PodParams { path: PathBuf, message: String },
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{policy} on {segment}: {source}")]
    Sim {
        policy: String,
        segment: String,
        source: Box<SimError>,
    },
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error("starting the HTTP client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Usage(String),
}

/// The config, the model and the pieces every mode derives from them.
struct Context {
    config: Config,
    model: ModelConfig,
    hasher: BlockHasher,
    pod_params: PodParams,
}

fn load_context(args: &BenchArgs) -> Result<Context, BenchError> {
    let config = Config::load(&args.config)?;
    let model = match &args.model {
        Some(name) => config
            .model(name)
            .cloned()
            .ok_or_else(|| BenchError::UnknownModel(name.clone()))?,
        None => config
            .models
            .first()
            .cloned()
            .ok_or_else(|| BenchError::UnknownModel("(none)".into()))?,
    };
    let hasher = BlockHasher::new(&model.hash_settings())?;
    let as_u32 = |value: usize, what: &str| {
        u32::try_from(value).map_err(|_| BenchError::Usage(format!("{what} {value} is too large")))
    };
    let block_size = as_u32(model.block_size, "blockSize")?;
    let model_pod = PodParams {
        kv_blocks: as_u32(model.pod_kv_blocks, "podKvBlocks")?,
        block_size,
        ..PodParams::default()
    };
    // Overrides on top of the model's pod, the way `kvgate sim --pod-params` reads them.
    let mut pod_params = match &args.pod_params {
        Some(path) => {
            let bad = |message: String| BenchError::PodParams {
                path: path.clone(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let overrides: serde_json::Value =
                yaml_serde::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let mut merged = serde_json::to_value(&model_pod).map_err(|e| bad(e.to_string()))?;
            match (merged.as_object_mut(), overrides) {
                (Some(merged), serde_json::Value::Object(overrides)) => merged.extend(overrides),
                (_, serde_json::Value::Null) => {}
                _ => return Err(bad("must be a mapping of PodParams fields".into())),
            }
            serde_json::from_value::<PodParams>(merged).map_err(|e| bad(e.to_string()))?
        }
        None => model_pod,
    };
    if pod_params.block_size != block_size {
        return Err(BenchError::Usage(format!(
            "pod blockSize {} differs from the model's blockSize {block_size}: hashes would not match",
            pod_params.block_size
        )));
    }
    if let Some(blocks) = args.pod_kv_blocks {
        pod_params.kv_blocks = blocks;
    }
    if let Some(slots) = args.max_loras {
        pod_params.max_loras = slots;
    }
    let kv_tokens = u64::from(pod_params.kv_blocks) * u64::from(pod_params.block_size);
    let trace = !args.trace.is_empty()
        || matches!(
            args.workload,
            WorkloadKind::MooncakeSynthetic | WorkloadKind::MooncakeConversation
        );
    pod_params.max_model_len = match args.max_model_len {
        Some(len) => len,
        None if trace => u32::try_from(kv_tokens).unwrap_or(u32::MAX),
        None => pod_params
            .max_model_len
            .min(u32::try_from(kv_tokens).unwrap_or(u32::MAX)),
    };
    pod_params
        .validate()
        .map_err(|e| BenchError::Usage(format!("pod parameters: {e}")))?;
    Ok(Context {
        config,
        model,
        hasher,
        pod_params,
    })
}

fn ladder(args: &BenchArgs) -> Ladder {
    let default = if args.workload == WorkloadKind::Control {
        Ladder::control()
    } else {
        Ladder::llm_d()
    };
    let steps = if args.qps.is_empty() {
        match args.duration {
            Some(seconds) => default.steps.iter().map(|&(q, _)| (q, seconds)).collect(),
            None => default.steps,
        }
    } else {
        let seconds = args.duration.unwrap_or(30.0);
        args.qps.iter().map(|&q| (q, seconds)).collect()
    };
    let warmup = match args.warmup {
        Some(seconds) if seconds <= 0.0 => None,
        Some(seconds) => Some((args.warmup_qps, seconds)),
        None => default
            .warmup
            .map(|(_, seconds)| (args.warmup_qps, seconds)),
    };
    Ladder { warmup, steps }
}

fn shape(args: &BenchArgs, base: SharedPrefixShape) -> SharedPrefixShape {
    SharedPrefixShape {
        groups: args.groups.unwrap_or(base.groups),
        prompts_per_group: args.prompts_per_group.unwrap_or(base.prompts_per_group),
        prefix_tokens: args.prefix_tokens.unwrap_or(base.prefix_tokens),
        question_tokens: args.question_tokens.unwrap_or(base.question_tokens),
        output_tokens: args.output_tokens.unwrap_or(base.output_tokens),
        fresh_questions: base.fresh_questions,
    }
}

fn build_workload(args: &BenchArgs, ctx: &Context, live: bool) -> Result<Workload, BenchError> {
    let traces = args
        .traces
        .clone()
        .unwrap_or_else(|| PathBuf::from(SHARED_TRACES));
    let max_tokens = ctx.pod_params.max_model_len;
    Ok(match args.workload {
        WorkloadKind::W1 => workload::shared_prefix(
            "w1",
            &shape(args, SharedPrefixShape::w1()),
            &ladder(args),
            &ctx.hasher,
            args.seed,
            live,
        )?,
        WorkloadKind::Control => workload::shared_prefix(
            "control",
            &shape(args, SharedPrefixShape::control()),
            &ladder(args),
            &ctx.hasher,
            args.seed,
            live,
        )?,
        WorkloadKind::MooncakeSynthetic | WorkloadKind::MooncakeConversation => {
            let trace = if args.workload == WorkloadKind::MooncakeSynthetic {
                MooncakeTrace::Synthetic
            } else {
                MooncakeTrace::Conversation
            };
            let (workload, skipped) = workload::mooncake(
                &traces,
                trace,
                &speedups(args),
                max_tokens,
                args.limit,
                &ctx.hasher,
                live,
            )?;
            if skipped > 0 {
                tracing::warn!(
                    skipped,
                    max_tokens,
                    "trace requests longer than the pods accept were left out"
                );
            }
            workload
        }
        WorkloadKind::Lora => {
            if live {
                return Err(BenchError::Usage(
                    "the LoRA workload runs in virtual time only".into(),
                ));
            }
            let base = LoraShape::standard();
            let shape = LoraShape {
                adapters: args.adapters,
                zipf_s: args.adapter_zipf,
                prefix_tokens: args.prefix_tokens.unwrap_or(base.prefix_tokens),
                question_tokens: args.question_tokens.unwrap_or(base.question_tokens),
                output_tokens: args.output_tokens.unwrap_or(base.output_tokens),
            };
            workload::lora_adapters(&shape, &ladder(args), &ctx.hasher, args.seed)?
        }
        WorkloadKind::LoogleChat => {
            let tokenizer = crate::tokenize::ModelTokenizer::for_model(&ctx.model)
                .map_err(WorkloadError::from)?;
            let chat = ChatShape {
                sessions_per_s: args.sessions_per_s,
                duration_s: args.sessions_for,
                turns: args.turns,
                think_s: args.think,
                reply_tokens: args
                    .output_tokens
                    .unwrap_or(ChatShape::default().reply_tokens),
                ..ChatShape::default()
            };
            workload::loogle_chats(
                &traces,
                &chat,
                &ctx.model.name,
                &tokenizer,
                &ctx.hasher,
                args.seed,
                live,
            )?
        }
        WorkloadKind::Flow => {
            return Err(BenchError::Usage(
                "--workload flow compares flow control in virtual time only: run it without --live"
                    .into(),
            ))
        }
    })
}

fn speedups(args: &BenchArgs) -> Vec<f64> {
    match (args.speedup.is_empty(), args.trace.is_empty()) {
        (false, _) => args.speedup.clone(),
        (true, false) => vec![1.0, 2.0, 4.0],
        (true, true) => vec![1.0],
    }
}

/// Trace files to replay, and the fleet that recorded them.
struct TraceInput {
    records: Vec<TraceRecord>,
    pods: Option<usize>,
    replicas: Option<usize>,
}

fn read_traces(paths: &[PathBuf]) -> Result<TraceInput, BenchError> {
    let mut records = Vec::new();
    for path in paths {
        records.extend(workload::read_trace(path)?);
    }
    let (pods, replicas) = workload::trace_fleet(&records);
    Ok(TraceInput {
        records,
        pods,
        replicas,
    })
}

fn replay_trace(
    args: &BenchArgs,
    ctx: &Context,
    records: Vec<TraceRecord>,
) -> Result<Workload, BenchError> {
    let first = args.trace.first().map(PathBuf::as_path);
    let name = first
        .and_then(|p| p.file_stem())
        .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned());
    let source = args
        .trace
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    let replay = TraceReplay {
        speedups: speedups(args),
        max_tokens: ctx.pod_params.max_model_len,
        limit: args.limit,
        model: Some(ctx.model.name.clone()),
        warmup_s: args.warmup.unwrap_or(0.0),
    };
    let (workload, skips) = workload::trace_workload(
        &name,
        &source,
        records,
        &replay,
        &ctx.hasher,
        !args.live.is_empty(),
    )?;
    if skips.total() > 0 {
        tracing::warn!(?skips, "trace requests left out of the replay");
    }
    Ok(workload)
}

fn policies(
    args: &BenchArgs,
    ctx: &Context,
    replicas: usize,
) -> Result<Vec<PolicySpec>, BenchError> {
    let names: Vec<String> = if !args.policies.is_empty() {
        args.policies.clone()
    } else if args.trace.is_empty() {
        args.workload
            .default_policies()
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        // As many gateway replicas as recorded the trace (the oracle needs none).
        policy::SHORT_POLICIES
            .iter()
            .map(|&name| match replicas {
                n if n > 1 && name != "oracle" => format!("{name}-x{n}"),
                _ => name.to_string(),
            })
            .collect()
    };
    names
        .iter()
        .map(|name| policy::resolve(name.trim(), &ctx.config, &ctx.model).map_err(BenchError::from))
        .collect()
}

/// Runs the benchmark the options describe: builds the workload, simulates every
/// policy on it, and summarizes.
pub fn evaluate(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    if !(args.slo_ttft_p90.is_finite() && args.slo_ttft_p90 > 0.0) {
        return Err(BenchError::Usage("--slo-ttft-p90 must be > 0".into()));
    }
    let steps = Steps::new(args.quiet);
    steps.line(format_args!(
        "loading {} (model, tokenizer, profiles)",
        args.config.display()
    ));
    let ctx = load_context(args)?;
    let trace = if args.trace.is_empty() {
        None
    } else {
        Some(read_traces(&args.trace)?)
    };
    let pods = args
        .pods
        .or(trace.as_ref().and_then(|t| t.pods))
        .unwrap_or(DEFAULT_PODS);
    let replicas = trace.as_ref().and_then(|t| t.replicas).unwrap_or(1);
    let policies = policies(args, &ctx, replicas)?;
    steps.line(format_args!(
        "model {}, {} pods; building the workload (rendering, tokenizing, hashing prompts)",
        ctx.model.name, pods
    ));
    let workload = match trace {
        Some(trace) => replay_trace(args, &ctx, trace.records)?,
        None => build_workload(args, &ctx, !args.live.is_empty())?,
    };
    steps.line(format_args!(
        "workload {}: {} requests in {} segments; {} policies to run: {}",
        workload.name,
        workload.request_count(),
        workload.segments.len(),
        policies.len(),
        policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    match args.live.as_slice() {
        [_, ..] => {
            steps.line(format_args!(
                "replaying through the gateway at {}",
                args.live.join(", ")
            ));
            let setup = live_setup(args, &ctx)?;
            let profiles: Vec<&str> = ctx.config.profiles.keys().map(String::as_str).collect();
            for policy in &policies {
                live::check_live(policy, &profiles)?;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(BenchError::Runtime)?;
            let mut bar = ProgressBar::new(workload.request_count() * policies.len(), args.quiet);
            let segments = runtime.block_on(run_live(&setup, &workload, &policies, &mut bar))?;
            Ok(report_of(
                args, &ctx, pods, &workload, &policies, segments, "live",
            ))
        }
        [] => {
            steps.line(format_args!("simulating in virtual time"));
            let segments = run_virtual(args, &ctx, pods, &workload, &policies)?;
            let mut report = report_of(args, &ctx, pods, &workload, &policies, segments, "virtual");
            if !args.trace.is_empty() {
                report.verdict = Some(report::verdict(&report));
            }
            Ok(report)
        }
    }
}

fn live_setup(args: &BenchArgs, ctx: &Context) -> Result<LiveSetup, BenchError> {
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        return Err(BenchError::Usage("--time-scale must be > 0".into()));
    }
    let pods = if args.pod_addrs.is_empty() {
        match &ctx.model.discovery {
            crate::discovery::DiscoveryConfig::Static { pods } => {
                pods.iter().map(|p| p.http).collect()
            }
            crate::discovery::DiscoveryConfig::Kubernetes(_) => {
                return Err(BenchError::Usage(
                    "the model's pods come from Kubernetes: name them with --pod-addrs".into(),
                ))
            }
        }
    } else {
        args.pod_addrs.clone()
    };
    Ok(LiveSetup {
        gateways: args
            .live
            .iter()
            .map(|g| g.trim_end_matches('/').to_string())
            .collect(),
        pods,
        model: ctx.model.name.clone(),
        profile_header: ctx.config.server.profile_header.clone(),
        time_scale: args.time_scale,
        max_in_flight: args.max_in_flight,
        restart: None,
    })
}

/// Runs every policy on every segment through the gateway, one after the other.
pub async fn run_live(
    setup: &LiveSetup,
    workload: &Workload,
    policies: &[PolicySpec],
    bar: &mut ProgressBar,
) -> Result<Vec<Vec<RunData>>, LiveError> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(setup.max_in_flight.max(1))
        .build()
        .map_err(|e| LiveError::Http {
            url: setup.gateways.join(", "),
            message: e.to_string(),
        })?;
    let progress = AtomicUsize::new(0);
    let mut runs = Vec::with_capacity(workload.segments.len());
    for segment in &workload.segments {
        let mut segment_runs = Vec::with_capacity(policies.len());
        for policy in policies {
            let label = if workload.segments.len() > 1 {
                format!("{} {}", policy.name, segment.label)
            } else {
                policy.name.clone()
            };
            let run = live::run_policy(&client, setup, segment, policy, &progress);
            tokio::pin!(run);
            let data = loop {
                tokio::select! {
                    result = &mut run => break result?,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        bar.show(progress.load(Ordering::Relaxed), std::slice::from_ref(&label), false);
                    }
                }
            };
            segment_runs.push(data);
        }
        runs.push(segment_runs);
    }
    bar.show(progress.load(Ordering::Relaxed), &[], true);
    Ok(runs)
}

fn report_of(
    args: &BenchArgs,
    ctx: &Context,
    pods: usize,
    workload: &Workload,
    policies: &[PolicySpec],
    runs: Vec<Vec<RunData>>,
    mode: &str,
) -> BenchReport {
    let segments = workload
        .segments
        .iter()
        .zip(&runs)
        .map(|(segment, runs)| SegmentReport::new(segment, policies, runs, args.slo_ttft_p90))
        .collect();
    BenchReport {
        workload: workload.name.clone(),
        description: workload.description.clone(),
        mode: mode.into(),
        pods: if mode == "live" {
            runs.first()
                .and_then(|r| r.first())
                .map_or(pods, |r| r.pod_requests.len())
        } else {
            pods
        },
        model: ctx.model.name.clone(),
        pod_params: ctx.pod_params.clone(),
        slo_ttft_p90_s: args.slo_ttft_p90,
        seed: args.seed,
        segments,
        verdict: None,
    }
}

/// `kvgate bench`: evaluates, writes the report files and prints the markdown table.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    if args.workload == WorkloadKind::Flow && args.live.is_empty() {
        return flow::run(args).map(|_| ());
    }
    let report = evaluate(args)?;
    Steps::new(args.quiet).line(format_args!("writing the report to {}", args.out.display()));
    let written = report::write(&report, &args.out, &report.workload)?;
    println!("{}", written.markdown);
    for file in &written.files {
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}

const PENDING: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// Simulates every (segment, policy) pair, several at once, with a progress bar.
fn run_virtual(
    args: &BenchArgs,
    ctx: &Context,
    pods: usize,
    workload: &Workload,
    policies: &[PolicySpec],
) -> Result<Vec<Vec<RunData>>, BenchError> {
    let setup = SimSetup {
        prefill_pods: args.prefill_pods.unwrap_or(pods / 2),
        ..SimSetup::for_model(
            &ctx.config,
            &ctx.model.name,
            pods,
            ctx.pod_params.clone(),
            args.seed,
        )
    };
    let jobs: Vec<(usize, usize)> = (0..workload.segments.len())
        .flat_map(|s| (0..policies.len()).map(move |p| (s, p)))
        .collect();
    let total_requests = workload.request_count() * policies.len();
    let state: Vec<AtomicU8> = jobs.iter().map(|_| AtomicU8::new(PENDING)).collect();
    let results: Vec<Mutex<Option<Result<RunData, SimError>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let progress = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    let workers = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, jobs.len().max(1));
    let mut bar = ProgressBar::new(total_requests, args.quiet);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(segment, policy)) = jobs.get(k) else {
                    break;
                };
                state[k].store(RUNNING, Ordering::Relaxed);
                let outcome = virtual_time::simulate(
                    &workload.segments[segment],
                    &policies[policy],
                    &setup,
                    &progress,
                );
                if let Ok(mut slot) = results[k].lock() {
                    *slot = Some(outcome);
                }
                state[k].store(DONE, Ordering::Release);
            });
        }
        loop {
            let running: Vec<String> = jobs
                .iter()
                .zip(&state)
                .filter(|(_, s)| s.load(Ordering::Relaxed) == RUNNING)
                .map(|(&(segment, policy), _)| {
                    if workload.segments.len() > 1 {
                        format!(
                            "{} {}",
                            policies[policy].name, workload.segments[segment].label
                        )
                    } else {
                        policies[policy].name.clone()
                    }
                })
                .collect();
            let all_done = state.iter().all(|s| s.load(Ordering::Acquire) == DONE);
            bar.show(progress.load(Ordering::Relaxed), &running, all_done);
            if all_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut runs: Vec<Vec<RunData>> = workload.segments.iter().map(|_| Vec::new()).collect();
    for (&(segment, policy), slot) in jobs.iter().zip(results) {
        let outcome = slot
            .into_inner()
            .ok()
            .flatten()
            .ok_or_else(|| BenchError::Usage("a simulation thread panicked".into()))?;
        let data = outcome.map_err(|source| BenchError::Sim {
            policy: policies[policy].name.clone(),
            segment: workload.segments[segment].label.clone(),
            source: Box::new(source),
        })?;
        runs[segment].push(data);
    }
    Ok(runs)
}

/// One line on stderr per step of a long run, so a run that takes minutes says what it is
/// doing before the progress bar starts.
struct Steps {
    quiet: bool,
}

impl Steps {
    fn new(quiet: bool) -> Self {
        Self { quiet }
    }

    fn line(&self, what: std::fmt::Arguments<'_>) {
        if !self.quiet {
            eprintln!("kvgate bench: {what}");
        }
    }
}

/// A one-line progress bar on stderr (a line every few seconds when it is not a terminal).
pub struct ProgressBar {
    total: usize,
    started: Instant,
    terminal: bool,
    quiet: bool,
    last_line: Instant,
}

impl ProgressBar {
    pub fn new(total: usize, quiet: bool) -> Self {
        Self {
            total,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            quiet,
            last_line: Instant::now(),
        }
    }

    pub fn show(&mut self, done: usize, running: &[String], finished: bool) {
        if self.quiet {
            return;
        }
        let fraction = if self.total == 0 {
            1.0
        } else {
            (done as f64 / self.total as f64).min(1.0)
        };
        const WIDTH: usize = 30;
        let filled = (fraction * WIDTH as f64).round() as usize;
        let line = format!(
            "[{}{}] {:5.1}%  {done}/{} requests  {:.0} s  {}",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            fraction * 100.0,
            self.total,
            self.started.elapsed().as_secs_f64(),
            running.join(", "),
        );
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(stderr, "\r\x1b[2K{line}");
            if finished {
                let _ = writeln!(stderr);
            }
        } else if finished || self.last_line.elapsed() >= Duration::from_secs(10) {
            let _ = writeln!(stderr, "{line}");
            self.last_line = Instant::now();
        }
        let _ = stderr.flush();
    }
}
