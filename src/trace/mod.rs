//! The traffic trace: what `kvgate serve` records when the config has a `trace` section, and
//! what `kvgate bench --trace` replays.
//!
//! One JSON line per routed request, with the Mooncake FAST'25 trace's fields first
//! (`timestamp` in ms, `input_length`, `output_length`, `hash_ids`) and kvgate's own after
//! them, so one reader takes both a public Mooncake trace and a recorded one:
//!
//! ```json
//! {"timestamp":1765136412345,"input_length":4800,"output_length":64,"hash_ids":[8141702925338813,…],
//!  "block_size":64,"model":"Qwen3-32B","replica":"5f0e2a91","pod":"10.0.3.7:8000","policy":"default",
//!  "predicted_cached_tokens":3968,"actual_cached_tokens":3968,"status":200}
//! ```
//!
//! A disaggregated request also names its prefill pod and that leg's cache accounting
//! (`prefill_pod`, `prefill_predicted_cached_tokens`, `prefill_actual_cached_tokens`); a
//! replay counts prefill pods in the fleet it sizes and otherwise replays the request as any.
//!
//! `hash_ids` is the prompt's chain of full-block hashes as vLLM computes them, each passed
//! through a keyed hash (SHA-256 over the trace's salt and the block hash, cut to 53 bits so
//! every JSON reader keeps it exact). Equal ids at the same position still mean an identical
//! prompt up to the end of that block, which is all a replay needs; without the salt, a
//! guessed prompt cannot be hashed and looked up. `block_size` says how many tokens an id
//! stands for (absent in Mooncake traces, whose ids are 512-token blocks).

pub mod recorder;

pub use recorder::{TraceEntry, TraceRecorder};

use serde::{Deserialize, Serialize};

/// Tokens one `hash_id` of a Mooncake trace stands for.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Arrival in ms: since the Unix epoch (recorded) or since the trace's start (Mooncake).
    pub timestamp: u64,
    pub input_length: u32,
    /// Output tokens the pod reported; 0 when the response carried no usage (a stream
    /// without `stream_options.include_usage`).
    pub output_length: u32,
    pub hash_ids: Vec<u64>,
    /// Tokens per `hash_id`; absent means Mooncake's 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// The served model (the base model of a LoRA adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The recording kvgate process, a random id drawn at its start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The pod that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The scheduling profile that chose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_cached_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens` of the response, when the pod reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_cached_tokens: Option<u64>,
    /// HTTP status the pod answered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// A disaggregated request's prefill pod (`pod` is then its decode pod, and the cached
    /// tokens above the decode leg's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_predicted_cached_tokens: Option<u64>,
    /// The prefill pod's `usage.prompt_tokens_details.cached_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_actual_cached_tokens: Option<u64>,
}

impl TraceRecord {
    /// Tokens each of `hash_ids` stands for.
    pub fn tokens_per_id(&self) -> u32 {
        self.block_size.unwrap_or(MOONCAKE_BLOCK_TOKENS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mooncake_lines_read_as_records() {
        let line = r#"{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]}"#;
        let record: TraceRecord = serde_json::from_str(line).unwrap();
        assert_eq!(record.timestamp, 27_482);
        assert_eq!(record.hash_ids, vec![46, 47, 48]);
        assert_eq!(record.tokens_per_id(), 512);
        assert_eq!(record.pod, None);
        let written = serde_json::to_string(&record).unwrap();
        assert_eq!(
            written,
            r#"{"timestamp":27482,"input_length":6955,"output_length":52,"hash_ids":[46,47,48]}"#
        );
    }
}
