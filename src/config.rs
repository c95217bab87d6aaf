//! kvgate's configuration: plain typed structs read from YAML (`conf/kvgate.yaml`)
//! and validated once at load. Everything that can be wrong in a file is caught
//! here, with a message that names the field, so a bad hot reload is refused
//! before it can touch the running config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cluster::TrafficPoliciesConfig;
use crate::discovery::DiscoveryConfig;
use crate::hash::{HashAlgo, HashSettings};
use crate::relay::RelayConfig;
use crate::vllm::VllmRelease;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub index: IndexSettings,
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Recording of a privacy-safe trace of the traffic; off when absent.
    #[serde(default)]
    pub trace: Option<TraceConfig>,
    /// Named scheduling profiles; every model names one, and a request may pick
    /// another with the `x-kvgate-profile` header.
    #[serde(default = "default_profiles")]
    pub profiles: BTreeMap<String, ProfileConfig>,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Models configured by InferenceTrafficPolicies in the cluster (`crate::cluster`).
    #[serde(default)]
    pub traffic_policies: Option<TrafficPoliciesConfig>,
    /// Bind mode with several replicas: relay pods' events between them (`crate::relay`).
    #[serde(default)]
    pub relay: Option<RelayConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public OpenAI-compatible listener.
    pub listen: SocketAddr,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`, `/debug/*`. Kept apart
    /// from the public port so it can stay cluster-internal.
    pub admin: SocketAddr,
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Request-body bytes held in memory across all connections; a body that would
    /// exceed it is refused with 503 and `Retry-After`.
    pub max_buffered_body_bytes: usize,
    /// Largest request header (request line and fields, as received) accepted (431 above it).
    pub max_header_bytes: usize,
    /// Most header fields a request may carry (431 above it).
    pub max_header_fields: usize,
    /// Concurrent client connections on `listen`; connections beyond it get 503 and are closed.
    pub max_connections: usize,
    /// Time a client has to send a whole request header, from accepting its connection or
    /// from the first byte of a request on a kept-alive one.
    pub header_timeout_ms: u64,
    /// How long a kept-alive connection may sit idle between requests (0 = no keep-alive).
    pub keep_alive_timeout_ms: u64,
    /// Time a client has to send a whole request body once its header is in.
    pub body_timeout_ms: u64,
    /// Pods tried per request when connecting fails (the body is replayed).
    pub max_attempts: usize,
    pub connect_timeout_ms: u64,
    /// Time allowed for the upstream's response header (covers prefill of long prompts).
    pub response_timeout_ms: u64,
    /// Consecutive failures that eject a pod, and for how long.
    pub eject_after_failures: u32,
    pub eject_ms: u64,
    /// Active health checks of every pod's `/health`.
    pub health_check_interval_ms: u64,
    /// vLLM `/metrics` scrape period for the load scorer (0 = off).
    pub scrape_interval_ms: u64,
    /// Header that selects a configured profile per request.
    pub profile_header: String,
    /// Pingora worker threads.
    pub threads: usize,
    /// TLS on the public listener; absent, it speaks plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// The public listener's certificate chain and private key, PEM files (a mounted Secret's
/// `tls.crt` and `tls.key`); read at start and again whenever either file changes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// The server certificate first, then its intermediates.
    pub cert_file: PathBuf,
    /// PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key of the first certificate.
    pub key_file: PathBuf,
}

/// Pingora 0.9.1 reads a request header into a buffer it refuses to grow past this
/// (1 MiB − 1) and answers a bare 400 beyond it, before kvgate sees the request.
pub const PINGORA_MAX_HEADER_BYTES: usize = 1_048_575;
/// Pingora 0.9.1 parses a request header into a fixed array of this many fields and
/// answers a bare 400 when there are more.
pub const PINGORA_MAX_HEADER_FIELDS: usize = 256;
/// Pingora 0.9.1 also closes a new connection whose first header stalls this long
/// between two reads, whatever kvgate's own header timeout says.
pub const PINGORA_FIRST_HEADER_READ_TIMEOUT_MS: u64 = 60_000;
/// Smaller than a request line with a `Host` field and a short path: nothing would pass.
const MIN_HEADER_BYTES: usize = 1_024;

impl ServerConfig {
    /// The listener limits take effect below Pingora's own hard limits, which answer with
    /// a bare 400 (or a silent close) instead of kvgate's 431/JSON; a value above one
    /// would not be the effective limit, so it is refused.
    fn validate_listener_limits(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !(MIN_HEADER_BYTES..=PINGORA_MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return invalid(format!(
                "server.maxHeaderBytes must be between {MIN_HEADER_BYTES} and \
                 {PINGORA_MAX_HEADER_BYTES} (Pingora rejects larger headers itself), got {}",
                self.max_header_bytes
            ));
        }
        if !(1..=PINGORA_MAX_HEADER_FIELDS).contains(&self.max_header_fields) {
            return invalid(format!(
                "server.maxHeaderFields must be between 1 and {PINGORA_MAX_HEADER_FIELDS} \
                 (Pingora rejects more fields itself), got {}",
                self.max_header_fields
            ));
        }
        if self.max_connections == 0 {
            return invalid("server.maxConnections must be ≥ 1".into());
        }
        if !(1..=PINGORA_FIRST_HEADER_READ_TIMEOUT_MS).contains(&self.header_timeout_ms) {
            return invalid(format!(
                "server.headerTimeoutMs must be between 1 and \
                 {PINGORA_FIRST_HEADER_READ_TIMEOUT_MS} (Pingora closes a connection whose first \
                 header stalls that long), got {}",
                self.header_timeout_ms
            ));
        }
        if self.body_timeout_ms == 0 {
            return invalid("server.bodyTimeoutMs must be ≥ 1".into());
        }
        if self.max_buffered_body_bytes < self.max_body_bytes {
            return invalid(format!(
                "server.maxBufferedBodyBytes ({}) must be at least server.maxBodyBytes ({}): \
                 a body of the largest accepted size could never be read",
                self.max_buffered_body_bytes, self.max_body_bytes
            ));
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("literal address"),
            admin: "127.0.0.1:9090".parse().expect("literal address"),
            max_body_bytes: 32 << 20,
            // Sixteen bodies of the largest size at once, or thousands of long chats;
            // an eighth of the 4 GiB deploy/ gives a replica, next to its 1 GiB index.
            max_buffered_body_bytes: 512 << 20,
            // An OpenAI SDK request carries a dozen fields in under 2 KiB; 64 KiB leaves room
            // for the long bearer tokens and tracing headers that gateways in front add, while
            // bounding what an idle connection can make kvgate buffer (Envoy ships 60 KiB).
            max_header_bytes: 64 << 10,
            // Same reasoning, and Envoy's default: real clients send 10 to 30.
            max_header_fields: 100,
            // A streamed generation holds its connection for its whole length, so concurrency
            // is connections; 4096 is ample for a fleet's clients and keeps the proxied pairs
            // (two descriptors each) far below a container's usual descriptor limit.
            max_connections: 4_096,
            // A real client writes its header at once; 30 s still tolerates a congested link,
            // while a slowloris client is cut after at most this long per request.
            header_timeout_ms: 30_000,
            // Longer than the clients' own pool idle expiry (httpx, used by the OpenAI SDK: 5 s;
            // aiohttp: 15 s), so the client closes idle connections first and never writes a
            // request into one kvgate is closing.
            keep_alive_timeout_ms: 60_000,
            // The largest body (32 MiB) in 60 s needs 4.5 Mbit/s; an OpenAI SDK sends its
            // body with the header, so only a stalled or hostile client waits this long.
            body_timeout_ms: 60_000,
            max_attempts: 3,
            connect_timeout_ms: 1_000,
            response_timeout_ms: 600_000,
            eject_after_failures: 3,
            eject_ms: 10_000,
            health_check_interval_ms: 2_000,
            scrape_interval_ms: 1_000,
            profile_header: "x-kvgate-profile".into(),
            threads: 2,
            tls: None,
        }
    }
}

/// How vLLM's KV events reach kvgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsMode {
    /// kvgate binds one SUB; every pod connects to it with topic `kv@<pod-ip>@<model>`.
    Bind,
    /// kvgate connects a SUB (and a replay DEALER) to each discovered pod's publisher.
    Connect,
    /// No events: precise routing is unavailable and the kv-cache scorer scores nothing.
    Off,
}

/// Most data-parallel ranks per pod: each costs a socket pair per pod.
pub const MAX_DATA_PARALLEL_SIZE: u32 = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EventsConfig {
    pub mode: EventsMode,
    /// Bind mode: the SUB endpoint.
    pub bind: String,
    /// SUB subscription prefix (vLLM's default topic is empty: pods must set one).
    pub topic_prefix: String,
    /// Ask a pod's replay ROUTER for missed batches after a sequence gap.
    pub replay: bool,
    pub replay_timeout_ms: u64,
    /// Bind mode: drop events whose topic names a pod that discovery does not know.
    pub require_known_pods: bool,
    /// Fraction of BlockStored runs re-hashed to check that kvgate's hash settings match the pods'.
    pub parity_sample: f64,
    /// vLLM `--data-parallel-size` of the pods: each rank publishes on its own sockets,
    /// rank r on the events and replay ports + r (connect mode) or to the bind port + r.
    pub data_parallel_size: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            mode: EventsMode::Bind,
            bind: "tcp://0.0.0.0:5557".into(),
            topic_prefix: "kv@".into(),
            replay: true,
            replay_timeout_ms: 2_000,
            require_known_pods: true,
            parity_sample: 0.05,
            data_parallel_size: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IndexSettings {
    /// Memory budget of the block index; least-recently-stored entries are evicted beyond it.
    pub budget_bytes: usize,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            budget_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `tracing` env-filter syntax, e.g. `info` or `kvgate=debug,pingora=warn`.
    pub level: String,
    pub format: LogFormat,
    /// Log rendered prompts and bodies (off by default: they may hold secrets).
    pub log_bodies: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            log_bodies: false,
        }
    }
}

/// The traffic trace (`kvgate bench --trace` replays it): one JSON line per routed request
/// with its arrival, lengths, keyed block-hash chain, pod and cached tokens; no text, no
/// token ids. Written off the request path; hot-reloadable.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceConfig {
    /// The file written; it rotates to `<path>.1` … `<path>.<maxFiles>`.
    pub path: PathBuf,
    /// Size at which the file rotates.
    #[serde(default = "default_trace_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept besides the current one.
    #[serde(default = "default_trace_max_files")]
    pub max_files: u32,
    /// Key of the block-hash chain's hashing. Replicas given the same salt write traces
    /// that join; absent, each process draws its own. Keep it secret: with it, a guessed
    /// prompt can be hashed and looked up in the trace.
    #[serde(default)]
    pub salt: Option<String>,
}

fn default_trace_max_bytes() -> u64 {
    256 << 20
}

fn default_trace_max_files() -> u32 {
    4
}

/// Smallest rotation size: room for one long prompt's line.
pub const MIN_TRACE_BYTES: u64 = 1 << 16;

impl TraceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.path.as_os_str().is_empty() {
            return invalid("trace.path must name a file".into());
        }
        if self.max_bytes < MIN_TRACE_BYTES {
            return invalid(format!(
                "trace.maxBytes must be at least {MIN_TRACE_BYTES}, got {}",
                self.max_bytes
            ));
        }
        if self.salt.as_deref().is_some_and(str::is_empty) {
            return invalid("trace.salt must not be empty (leave it out to draw one)".into());
        }
        Ok(())
    }
}

/// One scheduling profile: filters, then weighted scorers, then a picker.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileConfig {
    #[serde(default)]
    pub filters: Vec<PluginConfig>,
    #[serde(default)]
    pub scorers: Vec<PluginConfig>,
    #[serde(default = "default_picker")]
    pub picker: PluginConfig,
    /// Makes the profile disaggregated: the pipeline above picks the decode pod (among
    /// `decode` and `both` pods), this one the prefill pod (among `prefill` and `both`).
    #[serde(default)]
    pub prefill: Option<PrefillConfig>,
}

/// The prefill leg of a disaggregated profile: its own pipeline, and when to skip it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefillConfig {
    #[serde(default = "default_prefill_filters")]
    pub filters: Vec<PluginConfig>,
    #[serde(default = "default_prefill_scorers")]
    pub scorers: Vec<PluginConfig>,
    #[serde(default = "default_picker")]
    pub picker: PluginConfig,
    /// The decode pod serves the request alone (no prefill leg) when fewer of the
    /// prompt's tokens than this are uncached on it.
    #[serde(default = "default_prefill_threshold")]
    pub min_uncached_tokens: usize,
}

impl PrefillConfig {
    /// The prefill pipeline as a plain (aggregated) profile, for the scheduler to build.
    pub fn pipeline(&self) -> ProfileConfig {
        ProfileConfig {
            filters: self.filters.clone(),
            scorers: self.scorers.clone(),
            picker: self.picker.clone(),
            prefill: None,
        }
    }
}

fn default_prefill_filters() -> Vec<PluginConfig> {
    vec![plugin("healthy", 1.0)]
}

fn default_prefill_scorers() -> Vec<PluginConfig> {
    vec![plugin("kv-cache", 1.0), plugin("load", 1.0)]
}

fn default_prefill_threshold() -> usize {
    256
}

fn plugin(name: &str, weight: f64) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        weight,
        params: None,
    }
}

/// A plugin by registered name, its weight (scorers), and its own parameters,
/// which the plugin parses strictly when the profile is built.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub params: Option<yaml_serde::Value>,
}

/// A split's targets are the model's adapters (or the model), each once, with weights
/// that are finite, ≥ 0 and not all 0.
fn validate_split(model: &ModelConfig, targets: &[AdapterWeight]) -> Result<(), String> {
    if targets.is_empty() {
        return Err("has no adapters".into());
    }
    let mut seen = std::collections::HashSet::new();
    for target in targets {
        let known = target.adapter == model.name
            || model.lora_adapters.iter().any(|a| a.name == target.adapter);
        if !known {
            return Err(format!(
                "{:?} is neither a LoRA adapter of the model nor the model",
                target.adapter
            ));
        }
        if !seen.insert(target.adapter.as_str()) {
            return Err(format!("{:?} is listed twice", target.adapter));
        }
        if !target.weight.is_finite() || target.weight < 0.0 {
            return Err(format!(
                "weight of {:?} must be a finite number ≥ 0",
                target.adapter
            ));
        }
    }
    if targets.iter().all(|t| t.weight == 0.0) {
        return Err("every weight is 0".into());
    }
    Ok(())
}

impl LoraAdapterConfig {
    /// The adapter as it enters vLLM's block hashes.
    pub fn hash_key(&self) -> crate::hash::LoraKey {
        crate::hash::LoraKey {
            name: self.name.clone(),
            int_id: self.int_id,
            path: self.path.clone(),
        }
    }
}

fn one() -> f64 {
    1.0
}

fn default_picker() -> PluginConfig {
    PluginConfig {
        name: "max-score".into(),
        weight: 1.0,
        params: None,
    }
}

fn default_profiles() -> BTreeMap<String, ProfileConfig> {
    let mut profiles = BTreeMap::new();
    profiles.insert(
        "default".to_string(),
        ProfileConfig {
            filters: vec![plugin("healthy", 1.0)],
            scorers: vec![plugin("kv-cache", 1.0), plugin("load", 1.0)],
            picker: default_picker(),
            prefill: None,
        },
    );
    profiles
}

/// A LoRA adapter served by the pods of a model; requests name it in `model`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraAdapterConfig {
    pub name: String,
    /// vLLM's integer id for the adapter (only hashed by 0.10.x).
    #[serde(default)]
    pub int_id: i64,
    /// The path the adapter was registered with on the pods (hashed from 0.31).
    #[serde(default)]
    pub path: String,
}

/// One target of a canary split and its share of the requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdapterWeight {
    /// A LoRA adapter of the model, or the model's own name.
    pub adapter: String,
    /// Relative share (any finite number ≥ 0; the shares of one split need not sum to 100).
    pub weight: f64,
}

/// One served model: how its pods tokenize and hash, and where they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// The `model` name clients send (vLLM's `--served-model-name`).
    pub name: String,
    /// `tokenizer.json` of the model.
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json` (holds the chat template and special tokens).
    #[serde(default)]
    pub tokenizer_config: Option<PathBuf>,
    /// A chat template file that overrides the one in `tokenizerConfig` (vLLM's `--chat-template`).
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// Template variables every request gets under its own `chat_template_kwargs`
    /// (vLLM's `--default-chat-template-kwargs`).
    #[serde(default)]
    pub default_chat_template_kwargs: Option<crate::tokenize::JsonObject>,
    /// How the template expects message `content` (vLLM's `--chat-template-content-format`).
    #[serde(default)]
    pub chat_template_content_format: ChatTemplateContentFormat,
    /// Bytes the model's token cache (text seen before → its token ids) may hold.
    #[serde(default = "default_token_cache_bytes")]
    pub token_cache_bytes: usize,
    /// vLLM's `--block-size`.
    pub block_size: usize,
    /// vLLM's `--prefix-caching-hash-algo`.
    pub hash_algo: HashAlgo,
    /// The pods' `PYTHONHASHSEED`, as written (a string); absent = unset.
    #[serde(default)]
    pub hash_seed: Option<String>,
    /// The vLLM release the pods run: it fixes the hash era and the event wire format.
    pub vllm_release: VllmRelease,
    /// KV-cache capacity of one pod in blocks (vLLM's `num_gpu_blocks`), used by
    /// the approximate prefix plugin to size its per-pod memory.
    #[serde(default = "default_pod_kv_blocks")]
    pub pod_kv_blocks: usize,
    #[serde(default)]
    pub lora_adapters: Vec<LoraAdapterConfig>,
    /// Canary splits: a `model` name clients send → the adapters (or the base model) its
    /// requests go to, by weight. The chosen name replaces `model` in the forwarded body.
    #[serde(default)]
    pub adapter_splits: BTreeMap<String, Vec<AdapterWeight>>,
    #[serde(default = "default_profile_name")]
    pub profile: String,
    pub discovery: DiscoveryConfig,
    /// Queueing in kvgate while the model's pods are saturated (`crate::flow`); off when absent.
    #[serde(default)]
    pub flow_control: Option<crate::flow::FlowConfig>,
}

/// vLLM's `--chat-template-content-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplateContentFormat {
    /// Detected from the template, as vLLM does by default.
    #[default]
    Auto,
    /// `content` is one string.
    String,
    /// `content` is a list of `{"type": "text", "text": ...}` parts.
    Openai,
}

pub(crate) fn default_token_cache_bytes() -> usize {
    crate::tokenize::DEFAULT_PIECE_CACHE_BYTES
}

pub(crate) fn default_pod_kv_blocks() -> usize {
    4_802
}

fn default_profile_name() -> String {
    "default".into()
}

impl ModelConfig {
    pub fn hash_settings(&self) -> HashSettings {
        HashSettings {
            algo: self.hash_algo,
            block_size: self.block_size,
            seed: self.hash_seed.clone(),
            release: self.vllm_release,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
    #[error("config: model {model:?}: {message}")]
    Model { model: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        // Relative file paths in the config are relative to the config file.
        if let Some(base) = path.parent() {
            config.resolve_paths(base);
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML without validating; `load` is the normal entry point.
    pub fn parse(text: &str) -> Result<Self, String> {
        yaml_serde::from_str(text).map_err(|e| e.to_string())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(policies) = self.traffic_policies.as_mut() {
            policies.resolve_paths(base);
        }
        if let Some(relay) = self.relay.as_mut() {
            relay.resolve_paths(base);
        }
        if let Some(trace) = self.trace.as_mut() {
            fix(&mut trace.path);
        }
        for model in &mut self.models {
            fix(&mut model.tokenizer);
            if let Some(p) = model.tokenizer_config.as_mut() {
                fix(p);
            }
            if let Some(p) = model.chat_template.as_mut() {
                fix(p);
            }
        }
        if let Some(tls) = self.server.tls.as_mut() {
            fix(&mut tls.cert_file);
            fix(&mut tls.key_file);
        }
    }

    /// Checks everything that does not need I/O. Building the runtime (tokenizers,
    /// plugins) checks the rest and reports through the same error type.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.models.is_empty() && self.traffic_policies.is_none() {
            return invalid(
                "`models` is empty: configure at least one model (or `trafficPolicies`)".into(),
            );
        }
        if let Some(policies) = &self.traffic_policies {
            policies.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(relay) = &self.relay {
            if self.events.mode != EventsMode::Bind {
                return invalid(
                    "relay needs events.mode: bind (in connect mode every replica reaches every pod itself)"
                        .into(),
                );
            }
            relay.validate().map_err(ConfigError::Invalid)?;
            if relay.listen == self.server.listen || relay.listen == self.server.admin {
                return invalid(
                    "relay.listen must differ from server.listen and server.admin".into(),
                );
            }
        }
        if self.server.max_body_bytes == 0 {
            return invalid("server.maxBodyBytes must be > 0".into());
        }
        self.server.validate_listener_limits()?;
        if self.server.max_attempts == 0 {
            return invalid("server.maxAttempts must be ≥ 1".into());
        }
        // Port 0 (the OS picks) gives each its own port.
        if self.server.listen == self.server.admin && self.server.listen.port() != 0 {
            return invalid(format!(
                "server.listen and server.admin are both {}: the admin port must be separate",
                self.server.listen
            ));
        }
        if let Some(trace) = &self.trace {
            trace.validate()?;
        }
        if !(0.0..=1.0).contains(&self.events.parity_sample) {
            return invalid("events.paritySample must be between 0 and 1".into());
        }
        if !(1..=MAX_DATA_PARALLEL_SIZE).contains(&self.events.data_parallel_size) {
            return invalid(format!(
                "events.dataParallelSize must be between 1 and {MAX_DATA_PARALLEL_SIZE}"
            ));
        }
        if !self.profiles.contains_key("default")
            && self.models.iter().any(|m| m.profile == "default")
        {
            return invalid(
                "a model uses profile `default`, which `profiles` does not define".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for model in &self.models {
            let err = |message: String| ConfigError::Model {
                model: model.name.clone(),
                message,
            };
            if model.name.is_empty() {
                return invalid("a model has an empty `name`".into());
            }
            if !names.insert(model.name.as_str()) {
                return Err(err("defined twice".into()));
            }
            for adapter in &model.lora_adapters {
                if !names.insert(adapter.name.as_str()) {
                    return Err(err(format!(
                        "LoRA adapter name {:?} is already a model or adapter name",
                        adapter.name
                    )));
                }
            }
            for (split, targets) in &model.adapter_splits {
                if !names.insert(split.as_str()) {
                    return Err(err(format!(
                        "adapter split {split:?} is already a model, adapter or split name"
                    )));
                }
                validate_split(model, targets)
                    .map_err(|message| err(format!("adapter split {split:?}: {message}")))?;
            }
            if !self.profiles.contains_key(&model.profile) {
                return Err(err(format!(
                    "profile {:?} is not defined in `profiles` (defined: {})",
                    model.profile,
                    self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            if model.pod_kv_blocks == 0 {
                return Err(err("podKvBlocks must be > 0".into()));
            }
            if let Some(kwargs) = &model.default_chat_template_kwargs {
                crate::tokenize::default_template_kwargs(kwargs).map_err(|e| err(e.to_string()))?;
            }
            crate::hash::BlockHasher::new(&model.hash_settings())
                .map_err(|e| err(e.to_string()))?;
            if let Some(flow) = &model.flow_control {
                flow.validate().map_err(err)?;
            }
        }
        for (name, profile) in &self.profiles {
            let prefill_scorers = profile.prefill.iter().flat_map(|p| &p.scorers);
            if profile
                .scorers
                .iter()
                .chain(prefill_scorers)
                .any(|s| !s.weight.is_finite() || s.weight < 0.0)
            {
                return invalid(format!(
                    "profile {name:?}: scorer weights must be finite and ≥ 0"
                ));
            }
        }
        Ok(())
    }

    /// A `model` name clients send, resolved through the adapter splits: the split's
    /// targets, or `None` when it names no split.
    pub fn adapter_split(&self, name: &str) -> Option<&[AdapterWeight]> {
        self.models
            .iter()
            .find_map(|m| m.adapter_splits.get(name))
            .map(Vec::as_slice)
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The model a client's `model` field names: a served model, or a LoRA adapter
    /// together with its base model.
    pub fn served_model(&self, name: &str) -> Option<(&ModelConfig, Option<&LoraAdapterConfig>)> {
        self.models.iter().find_map(|m| {
            if m.name == name {
                Some((m, None))
            } else {
                m.lora_adapters
                    .iter()
                    .find(|a| a.name == name)
                    .map(|a| (m, Some(a)))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::JsonValue;

    fn shipped(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    #[test]
    fn shipped_configs_load() {
        let config = Config::load(&shipped("conf/kvgate.yaml")).expect("conf/kvgate.yaml is valid");
        assert_eq!(config.models[0].block_size, 64);
        assert_eq!(config.models[0].hash_seed.as_deref(), Some("42"));
        let deploy =
            Config::load(&shipped("deploy/kvgate/kvgate.yaml")).expect("deploy config is valid");
        assert_eq!(deploy.models[0].name, "Qwen3-32B");
    }

    fn with_model(extra: &str) -> String {
        format!(
            "models:\n  - name: m\n    tokenizer: t.json\n    blockSize: 64\n    discovery: {{static: {{pods: []}}}}\n{extra}"
        )
    }

    #[test]
    fn a_disaggregated_profile_is_validated_with_its_prefill_pipeline() {
        let parse = |profile: &str| {
            let hash =
                "    hashAlgo: sha256_cbor\n    hashSeed: \"0\"\n    vllmRelease: \"0.11.0\"\n";
            Config::parse(&with_model(&format!(
                "{hash}profiles:\n  default: {profile}\n"
            )))
            .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string()))
        };
        let config = parse("{prefill: {}}").expect("defaults");
        let prefill = config.profiles["default"].prefill.as_ref().unwrap();
        let names = |p: &[PluginConfig]| p.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&prefill.filters), ["healthy"]);
        assert_eq!(names(&prefill.scorers), ["kv-cache", "load"]);
        assert_eq!(prefill.picker.name, "max-score");
        assert_eq!(prefill.min_uncached_tokens, 256);
        let err = parse("{prefill: {minUncached: 3}}").unwrap_err();
        assert!(err.contains("unknown field `minUncached`"), "{err}");
        let err = parse("{prefill: {scorers: [{name: load, weight: -1}]}}").unwrap_err();
        assert!(err.contains("weights must be finite"), "{err}");
        let err = Config::parse(
            "models:\n  - name: m\n    tokenizer: t.json\n    discovery: {static: {pods: [\
             {http: \"127.0.0.1:1\", role: prefil}]}}\n",
        )
        .map(|_| ())
        .unwrap_err();
        assert!(err.contains("prefil"), "{err}");
    }

    #[test]
    fn seed_setting_is_expressible_as_written() {
        let text = with_model("    hashAlgo: sha256_cbor_64bit\n    hashSeed: \"42\"\n    vllmRelease: \"0.10.1.1\"\n");
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.models[0].hash_algo, HashAlgo::Sha256Cbor64bit);
    }

    #[test]
    fn template_flags_are_validated_at_load() {
        let hash = "    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n";
        let flags = "    defaultChatTemplateKwargs: {enable_thinking: false, style: {n: 3}}\n    chatTemplateContentFormat: openai\n    tokenCacheBytes: 1048576\n";
        let config = Config::parse(&with_model(&format!("{hash}{flags}"))).unwrap();
        config.validate().unwrap();
        let model = &config.models[0];
        assert_eq!(
            model.chat_template_content_format,
            ChatTemplateContentFormat::Openai
        );
        assert_eq!(model.token_cache_bytes, 1 << 20);
        // Key order as written, as Python's `json.loads` keeps it for vLLM's flag.
        let kwargs = model.default_chat_template_kwargs.as_ref().unwrap();
        let keys: Vec<&str> = kwargs.iter().map(|(key, _)| key).collect();
        assert_eq!(keys, ["enable_thinking", "style"]);
        assert_eq!(
            kwargs.get("style"),
            Some(&JsonValue::Object(
                [("n".to_owned(), JsonValue::Int(3))].into_iter().collect()
            ))
        );
        let defaults = Config::parse(&with_model(hash)).unwrap();
        assert_eq!(
            defaults.models[0].chat_template_content_format,
            ChatTemplateContentFormat::Auto
        );
        // vLLM refuses `tokenize` in a request's kwargs; kvgate refuses it as a default.
        let refused = Config::parse(&with_model(&format!(
            "{hash}    defaultChatTemplateKwargs: {{tokenize: true}}\n"
        )))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("model \"m\"") && refused.contains("tokenize"),
            "{refused}"
        );
        let unknown_format = Config::parse(&with_model(&format!(
            "{hash}    chatTemplateContentFormat: markdown\n"
        )))
        .unwrap_err();
        assert!(unknown_format.contains("markdown"), "{unknown_format}");
    }

    #[test]
    fn adapter_splits_name_the_models_adapters_with_usable_weights() {
        let hash = "    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n";
        let adapters = "    loraAdapters: [{name: sql-v1}, {name: sql-v2}]\n";
        let check = |splits: &str| {
            Config::parse(&with_model(&format!(
                "{hash}{adapters}    adapterSplits:\n{splits}"
            )))
            .unwrap()
            .validate()
            .map_err(|e| e.to_string())
        };
        check("      sql: [{adapter: sql-v1, weight: 90}, {adapter: sql-v2, weight: 10}]\n")
            .expect("a canary split");
        check("      sql: [{adapter: m, weight: 1}, {adapter: sql-v2, weight: 0}]\n")
            .expect("the base model is a target too");
        for (bad, says) in [
            ("      sql: []\n", "has no adapters"),
            (
                "      sql: [{adapter: nope, weight: 1}]\n",
                "\"nope\" is neither",
            ),
            (
                "      sql: [{adapter: sql-v1, weight: 1}, {adapter: sql-v1, weight: 2}]\n",
                "listed twice",
            ),
            (
                "      sql: [{adapter: sql-v1, weight: -1}]\n",
                "finite number",
            ),
            (
                "      sql: [{adapter: sql-v1, weight: .nan}]\n",
                "finite number",
            ),
            (
                "      sql: [{adapter: sql-v1, weight: 0}]\n",
                "every weight is 0",
            ),
            (
                "      sql-v2: [{adapter: sql-v1, weight: 1}]\n",
                "already a model",
            ),
        ] {
            let err = check(bad).expect_err(bad);
            assert!(
                err.contains(says) && err.contains("model \"m\""),
                "{bad}: {err}"
            );
        }
        let typo = Config::parse(&with_model(&format!(
            "{hash}{adapters}    adapterSplits: {{sql: [{{adapter: sql-v1, weigth: 1}}]}}\n"
        )))
        .unwrap_err();
        assert!(typo.contains("weigth"), "{typo}");
    }

    #[test]
    fn removed_algorithm_is_rejected_with_the_replacement() {
        let text = with_model(
            "    hashAlgo: sha256_cbor_64bit\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n",
        );
        let err = Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("sha256_cbor"), "{err}");
        assert!(err.contains("model \"m\""), "{err}");
    }

    fn with_server(server: &str) -> Result<Config, String> {
        let model = with_model(
            "    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n",
        );
        let config = Config::parse(&format!("server:\n{server}{model}"))?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn listener_limits_default_to_production_values() {
        let server = with_server("  threads: 2\n")
            .expect("defaults are valid")
            .server;
        assert_eq!(server.max_header_bytes, 65_536);
        assert_eq!(server.max_header_fields, 100);
        assert_eq!(server.max_connections, 4_096);
        assert_eq!(server.header_timeout_ms, 30_000);
        assert_eq!(server.keep_alive_timeout_ms, 60_000);
        let set = with_server(
            "  maxHeaderBytes: 1048575\n  maxHeaderFields: 256\n  maxConnections: 1\n  headerTimeoutMs: 60000\n  keepAliveTimeoutMs: 0\n",
        )
        .expect("Pingora's own limits and keep-alive off are valid")
        .server;
        assert_eq!(
            (set.max_header_bytes, set.max_header_fields),
            (PINGORA_MAX_HEADER_BYTES, PINGORA_MAX_HEADER_FIELDS)
        );
        assert_eq!(set.keep_alive_timeout_ms, 0);
    }

    #[test]
    fn listener_limits_beyond_pingoras_are_refused() {
        for (server, field, bound) in [
            (
                "  maxHeaderBytes: 1048576\n",
                "server.maxHeaderBytes",
                "1048575",
            ),
            ("  maxHeaderBytes: 512\n", "server.maxHeaderBytes", "1024"),
            ("  maxHeaderFields: 257\n", "server.maxHeaderFields", "256"),
            ("  maxHeaderFields: 0\n", "server.maxHeaderFields", "1"),
            ("  maxConnections: 0\n", "server.maxConnections", "1"),
            (
                "  headerTimeoutMs: 60001\n",
                "server.headerTimeoutMs",
                "60000",
            ),
            ("  headerTimeoutMs: 0\n", "server.headerTimeoutMs", "1"),
            ("  bodyTimeoutMs: 0\n", "server.bodyTimeoutMs", "1"),
        ] {
            let err = with_server(server).expect_err(server);
            assert!(
                err.contains(field) && err.contains(bound),
                "{server}: {err}"
            );
        }
        let err = with_server("  maxHeaderBytes: 2097152\n").expect_err("above the cap");
        assert!(err.contains("Pingora"), "{err}");
        let err = with_server("  maxHeaderCount: 10\n").expect_err("typo");
        assert!(err.contains("maxHeaderCount"), "{err}");
    }

    #[test]
    fn data_parallel_size_is_bounded() {
        let model = with_model(
            "    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n",
        );
        let parse = |events: &str| {
            let config = Config::parse(&format!("events:\n{events}{model}"))?;
            config.validate().map_err(|e| e.to_string())?;
            Ok::<_, String>(config.events.data_parallel_size)
        };
        assert_eq!(parse("  mode: connect\n"), Ok(1));
        assert_eq!(parse("  dataParallelSize: 4\n"), Ok(4));
        for bad in ["  dataParallelSize: 0\n", "  dataParallelSize: 65\n"] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("events.dataParallelSize"), "{err}");
        }
    }

    #[test]
    fn the_trace_is_off_by_default_and_checked_when_on() {
        let model = with_model(
            "    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n",
        );
        assert_eq!(Config::parse(&model).unwrap().trace, None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvgate.yaml");
        std::fs::write(&file, format!("trace: {{path: traces/t.jsonl}}\n{model}")).unwrap();
        let trace = Config::load(&file).unwrap().trace.expect("trace on");
        assert_eq!(trace.path, dir.path().join("traces/t.jsonl"));
        assert_eq!((trace.max_bytes, trace.max_files), (256 << 20, 4));
        assert_eq!(trace.salt, None);
        for (bad, field) in [
            ("trace: {path: t.jsonl, maxBytes: 100}\n", "trace.maxBytes"),
            ("trace: {path: t.jsonl, salt: \"\"}\n", "trace.salt"),
            ("trace: {path: t.jsonl, maxFile: 2}\n", "maxFile"),
        ] {
            let err = Config::parse(&format!("{bad}{model}"))
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
                .expect_err(bad);
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn typos_are_rejected() {
        let text = with_model("    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n    blocksize: 16\n");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("blocksize"), "{err}");
        let text = with_model("    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    vllmRelease: \"0.11.0\"\n    profile: fast\n");
        let err = Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("fast"), "{err}");
    }
}
