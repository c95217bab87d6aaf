//! `kvgate sim`: N simulated vLLM pods on one host.
//!
//! The model's tokenizer, block hash settings and vLLM release come from a
//! kvgate config, so the pods hash and publish exactly what kvgate expects
//! from real pods of that release. Pod `i` serves HTTP on `base-port + i` and
//! publishes KV events under the topic `kv@<topic-host>@<model>`, where the
//! topic host defaults to `<host>:<http port>` so that pods sharing a host
//! stay apart on one bound SUB.
//!
//! Once every pod is up, one JSON line goes to stdout:
//! `{"ready": {"pods": [<pod status>...], "control": "<addr>"|null}}`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{ArgAction, Args};
use hashbrown::HashMap;
use serde_json::json;

use super::engine::{ParamsError, PodParams, SchedulingPolicy};
use super::pod::{self, PodControl, PodLaunch, PodStartError, WireForm};
use super::publisher::{PubEndpoint, PublisherConfig};
use super::server::{self, SimModel};
use crate::config::{Config, ConfigError, ModelConfig};
use crate::discovery::PodRole;
use crate::events::EventEncoder;
use crate::hash::{BlockHasher, HashConfigError, LoraKey};
use crate::tokenize::{ModelTokenizer, TokenizerLoadError};
use crate::vllm::VllmRelease;

/// vLLM reads `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` from this release on;
/// earlier ones always publish the chain's int.
const RAW_HASHES_SINCE: VllmRelease = VllmRelease::new(0, 10, 2);

/// Simulated vLLM pods (OpenAI API, vLLM metrics, KV events) for tests and benchmarks.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// kvgate config that defines the model (tokenizer, block size, hash, vLLM release).
    #[arg(long)]
    pub config: PathBuf,
    /// The model to serve; the config's first model by default.
    #[arg(long)]
    pub model: Option<String>,
    /// Number of pods.
    #[arg(long, default_value_t = 1)]
    pub pods: usize,
    /// Address every pod listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// HTTP port of pod 0; pod i uses base+i. 0 lets the OS pick every port.
    #[arg(long, default_value_t = 8001)]
    pub base_port: u16,
    /// Each pod's PUB connects to this SUB (e.g. kvgate's `events.bind`).
    #[arg(long, conflicts_with = "events_bind_base_port")]
    pub events_connect: Option<String>,
    /// Each pod's PUB binds base+i on --host instead (0: the OS picks).
    #[arg(long)]
    pub events_bind_base_port: Option<u16>,
    /// Each pod's replay ROUTER binds base+i on --host (0: the OS picks); no replay without it.
    #[arg(long)]
    pub replay_base_port: Option<u16>,
    /// Batches each pod keeps for replay (vLLM's `buffer_steps`).
    #[arg(long, default_value_t = 10_000)]
    pub buffer_steps: usize,
    /// Wall seconds per simulated second: 0.1 runs ten times faster than the modelled pod.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// YAML file of PodParams overrides (camelCase keys, e.g. `kvBlocks`, `stepBaseMs`).
    #[arg(long)]
    pub pod_params: Option<PathBuf>,
    /// LoRA adapter slots per pod (vLLM's `--max-loras`): adapters beyond them wait, and one
    /// not loaded is swapped in first. Overrides `maxLoras` of --pod-params; 0: not modelled.
    #[arg(long)]
    pub max_loras: Option<u32>,
    /// Milliseconds (simulated) to swap in an adapter. Overrides `loraLoadMs` of --pod-params.
    #[arg(long)]
    pub lora_load_ms: Option<f64>,
    /// vLLM's `--scheduling-policy`: `priority` serves the waiting queue by the requests'
    /// `priority` field (lower first) and preempts the least important running request.
    /// Overrides `schedulingPolicy` of --pod-params.
    #[arg(long, value_enum)]
    pub scheduling_policy: Option<SchedulingPolicy>,
    /// Publish 64-bit int hashes (vLLM's default) or raw digests (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub int_hashes: bool,
    /// Host part of each pod's topic; `{host}`, `{port}` (its HTTP port) and `{index}` are replaced.
    #[arg(long, default_value = "{host}:{port}")]
    pub topic_host: String,
    /// max_tokens of chat requests that set none (the simulator has no EOS).
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Which legs of disaggregated requests the pods take: prefill, decode or both
    /// (both also serve plain requests, as every role does).
    #[arg(long, default_value = "both", value_parser = parse_role)]
    pub role: PodRole,
    /// Gigabits per second a decode pod pulls KV at. Overrides `kvTransferGbps` of --pod-params.
    #[arg(long)]
    pub kv_transfer_gbps: Option<f64>,
    /// Serve the control API (`/sim/pods/...`, reaches pods that are down) on this port.
    #[arg(long)]
    pub control_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Args(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model {0:?} is not in the config")]
    UnknownModel(String),
    #[error("model {model}: {source}")]
    Tokenizer {
        model: String,
        source: TokenizerLoadError,
    },
    #[error("model {model}: {source}")]
    Hash {
        model: String,
        source: HashConfigError,
    },
    #[error("pod parameters {path}: {message}")]
    PodParamsFile { path: PathBuf, message: String },
    #[error("pod parameters: {0}")]
    PodParams(#[from] ParamsError),
    #[error(transparent)]
    Pod(#[from] PodStartError),
    #[error("control port {addr}: {source}")]
    Control {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs the pods until SIGINT or SIGTERM.
pub fn run(args: &SimArgs) -> Result<(), SimError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if args.pods == 0 {
        return Err(SimError::Args("--pods must be at least 1".into()));
    }
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        return Err(SimError::Args("--time-scale must be a number > 0".into()));
    }
    let config = Config::load(&args.config)?;
    let model_config = match &args.model {
        Some(name) => config
            .model(name)
            .ok_or_else(|| SimError::UnknownModel(name.clone()))?,
        None => config
            .models
            .first()
            .ok_or_else(|| SimError::Args("the config has no models".into()))?,
    };
    let params = pod_params(args, model_config)?;
    let model = Arc::new(sim_model(args, model_config, &params)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(SimError::Runtime)?;
    runtime.block_on(serve(args, params, model))
}

fn pod_params(args: &SimArgs, model: &ModelConfig) -> Result<PodParams, SimError> {
    let as_u32 = |value: usize, what: &str| {
        u32::try_from(value).map_err(|_| SimError::Args(format!("{what} {value} is too large")))
    };
    let base = PodParams {
        kv_blocks: as_u32(model.pod_kv_blocks, "podKvBlocks")?,
        block_size: as_u32(model.block_size, "blockSize")?,
        ..PodParams::default()
    };
    let block_size = base.block_size;
    let mut params: PodParams = match &args.pod_params {
        None => base,
        Some(path) => {
            let file_error = |message: String| SimError::PodParamsFile {
                path: path.clone(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
            let overrides: serde_json::Value =
                yaml_serde::from_str(&text).map_err(|e| file_error(e.to_string()))?;
            let mut merged = serde_json::to_value(&base).map_err(|e| file_error(e.to_string()))?;
            match (merged.as_object_mut(), overrides) {
                (Some(merged), serde_json::Value::Object(overrides)) => merged.extend(overrides),
                (_, serde_json::Value::Null) => {}
                _ => return Err(file_error("must be a mapping of PodParams fields".into())),
            }
            serde_json::from_value(merged).map_err(|e| file_error(e.to_string()))?
        }
    };
    if let Some(max_loras) = args.max_loras {
        params.max_loras = max_loras;
    }
    if let Some(lora_load_ms) = args.lora_load_ms {
        params.lora_load_ms = lora_load_ms;
    }
    if let Some(gbps) = args.kv_transfer_gbps {
        params.kv_transfer_gbps = gbps;
    }
    if let Some(policy) = args.scheduling_policy {
        params.scheduling_policy = policy;
    }
    if params.block_size != block_size {
        return Err(SimError::Args(format!(
            "pod blockSize {} differs from the model's blockSize {block_size}: hashes would not match",
            params.block_size
        )));
    }
    params.validate()?;
    Ok(params)
}

fn sim_model(
    args: &SimArgs,
    config: &ModelConfig,
    params: &PodParams,
) -> Result<SimModel, SimError> {
    let tokenizer = ModelTokenizer::for_model(config).map_err(|source| SimError::Tokenizer {
        model: config.name.clone(),
        source,
    })?;
    let hasher = BlockHasher::new(&config.hash_settings()).map_err(|source| SimError::Hash {
        model: config.name.clone(),
        source,
    })?;
    let release = config.vllm_release;
    let int_hashes = args.int_hashes || release < RAW_HASHES_SINCE;
    if int_hashes != args.int_hashes {
        tracing::warn!(%release, "this release always publishes int hashes; --int-hashes false ignored");
    }
    let adapters: HashMap<String, LoraKey> = config
        .lora_adapters
        .iter()
        .map(|adapter| {
            (
                adapter.name.clone(),
                LoraKey {
                    name: adapter.name.clone(),
                    int_id: adapter.int_id,
                    path: adapter.path.clone(),
                },
            )
        })
        .collect();
    Ok(SimModel {
        name: config.name.clone(),
        tokenizer,
        hasher,
        adapters,
        wire: WireForm {
            encoder: EventEncoder::new(release),
            int_hashes,
        },
        release,
        max_model_len: params.max_model_len,
        default_max_tokens: args.default_max_tokens.max(1),
        role: args.role,
    })
}

fn parse_role(value: &str) -> Result<PodRole, String> {
    PodRole::from_label(value).ok_or_else(|| format!("{value:?} is not prefill, decode or both"))
}

fn port_of(base: u16, index: usize) -> Result<u16, SimError> {
    if base == 0 {
        return Ok(0);
    }
    u16::try_from(usize::from(base) + index)
        .map_err(|_| SimError::Args(format!("port {base} + {index} is beyond 65535")))
}

fn tcp_endpoint(host: IpAddr, port: u16) -> String {
    format!("tcp://{}", SocketAddr::new(host, port))
}

async fn serve(args: &SimArgs, params: PodParams, model: Arc<SimModel>) -> Result<(), SimError> {
    // Bind every HTTP port first: a taken port fails before anything runs,
    // and topics can name the real ports.
    let mut listeners = Vec::with_capacity(args.pods);
    for index in 0..args.pods {
        let addr = SocketAddr::new(args.host, port_of(args.base_port, index)?);
        listeners.push(pod::bind_http(index, addr)?);
    }
    let mut pods: Vec<PodControl> = Vec::with_capacity(args.pods);
    for (index, listener) in listeners.into_iter().enumerate() {
        let http = listener
            .local_addr()
            .map_err(|source| PodStartError::BindHttp {
                index,
                addr: SocketAddr::new(args.host, 0),
                source,
            })?;
        let topic_host = args
            .topic_host
            .replace("{host}", &args.host.to_string())
            .replace("{port}", &http.port().to_string())
            .replace("{index}", &index.to_string());
        let topic = format!("kv@{topic_host}@{}", model.name);
        let endpoint = match (&args.events_connect, args.events_bind_base_port) {
            (Some(endpoint), _) => Some(PubEndpoint::Connect(endpoint.clone())),
            (None, Some(base)) => Some(PubEndpoint::Bind(tcp_endpoint(
                args.host,
                port_of(base, index)?,
            ))),
            (None, None) => None,
        };
        let replay_bind = match args.replay_base_port {
            Some(base) => Some(tcp_endpoint(args.host, port_of(base, index)?)),
            None => None,
        };
        if replay_bind.is_some() && endpoint.is_none() {
            return Err(SimError::Args(
                "--replay-base-port needs --events-connect or --events-bind-base-port".into(),
            ));
        }
        let events = endpoint.map(|endpoint| PublisherConfig {
            endpoint,
            replay_bind,
            topic: topic.clone(),
            buffer_steps: args.buffer_steps,
            encoder: model.wire.encoder,
        });
        let launch = PodLaunch {
            index,
            http,
            topic,
            events,
            params: params.clone(),
            time_scale: args.time_scale,
        };
        pods.push(pod::launch(launch, listener, Arc::clone(&model)).await?);
    }
    let pods = Arc::new(pods);
    let control = match args.control_port {
        Some(port) => {
            let addr = SocketAddr::new(args.host, port);
            let control_error = |source| SimError::Control { addr, source };
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(control_error)?;
            let bound = listener.local_addr().map_err(control_error)?;
            let app = server::control_router(Arc::clone(&pods));
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, app).await {
                    tracing::error!(%error, "control server failed");
                }
            });
            Some(bound)
        }
        None => None,
    };
    let views: Vec<_> = pods.iter().map(|pod| pod.status().view()).collect();
    println!(
        "{}",
        json!({ "ready": { "pods": views, "control": control } })
    );
    tracing::info!(
        pods = pods.len(),
        model = %model.name,
        release = %model.release,
        time_scale = args.time_scale,
        "simulated pods are up"
    );
    wait_for_shutdown().await;
    for pod in pods.iter() {
        pod.shutdown().await;
    }
    Ok(())
}

async fn wait_for_shutdown() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; stopping on SIGINT only");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
