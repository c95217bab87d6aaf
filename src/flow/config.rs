//! A model's `flowControl` section: when its pods count as saturated, how long and how
//! much may wait, and how a request's priority and tenant are read from its headers.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// GIE v1: a request names its `InferenceObjective` in this header.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// GIE flow control: the header naming a request's tenant (flow), unless configured otherwise.
pub const DEFAULT_FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";

/// A request's priority: higher is served first. Written in YAML as an integer (GIE's
/// `InferenceObjective.priority`) or as one of ACK's criticality names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub i32);

impl Priority {
    /// ACK's `Critical`.
    pub const CRITICAL: Self = Self(1);
    /// ACK's `Standard`, and GIE's default priority.
    pub const STANDARD: Self = Self(0);
    /// ACK's `Sheddable` (GIE sheds negative priorities when saturated).
    pub const SHEDDABLE: Self = Self(-1);

    /// The same priority as vLLM's request `priority` field, where lower is served first:
    /// the negation (Critical 1 → −1, Standard 0 → 0, the value of a request that sets
    /// none, Sheddable −1 → 1).
    pub fn to_vllm(self) -> i32 {
        self.0.saturating_neg()
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "Critical" => Some(Self::CRITICAL),
            "Standard" => Some(Self::STANDARD),
            "Sheddable" => Some(Self::SHEDDABLE),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PriorityVisitor;
        impl Visitor<'_> for PriorityVisitor {
            type Value = Priority;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer priority or one of Critical, Standard, Sheddable")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Priority, E> {
                i32::try_from(v)
                    .map(Priority)
                    .map_err(|_| E::custom(format!("priority {v} is out of range")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Priority, E> {
                i32::try_from(v)
                    .map(Priority)
                    .map_err(|_| E::custom(format!("priority {v} is out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Priority, E> {
                Priority::from_name(v).ok_or_else(|| {
                    E::custom(format!(
                        "unknown criticality {v:?} (expected Critical, Standard, Sheddable or an integer)"
                    ))
                })
            }
        }
        deserializer.deserialize_any(PriorityVisitor)
    }
}

/// When a pod counts as saturated: when any configured threshold is reached.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SaturationThresholds {
    /// vLLM's scraped `num_requests_waiting` (GIE's queue threshold defaults to 5).
    pub waiting_requests: Option<f64>,
    /// vLLM's scraped KV-cache usage, 0..1 (GIE's default is 0.8).
    pub kv_cache_usage: Option<f64>,
    /// Requests this kvgate has in flight on the pod.
    pub in_flight_requests: Option<u32>,
    /// Uncached prompt tokens this kvgate has sent the pod and not seen prefilled.
    pub uncached_tokens: Option<u64>,
}

impl Default for SaturationThresholds {
    fn default() -> Self {
        Self {
            waiting_requests: Some(5.0),
            kv_cache_usage: Some(0.8),
            in_flight_requests: None,
            uncached_tokens: None,
        }
    }
}

/// A request header whose values set the priority (e.g. `x-priority: batch`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorityHeader {
    pub name: String,
    pub values: BTreeMap<String, Priority>,
}

/// A model's flow control.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FlowConfig {
    pub saturation: SaturationThresholds,
    /// Requests that may wait for this model; one more is refused with 429.
    pub max_queued_requests: usize,
    /// Body bytes the waiting requests may hold; a body that would exceed it gets 429.
    pub max_queued_bytes: usize,
    /// How long a request may wait before it is answered 503.
    pub queue_timeout_ms: u64,
    /// `Retry-After` of a 429 or 503 from the queue.
    pub retry_after_secs: u32,
    /// Priority of a request that names no objective and no configured header value.
    pub default_priority: Priority,
    /// Requests below this priority are refused (429) rather than queued while saturated.
    pub shed_below: Priority,
    /// `InferenceObjective` names (header `x-gateway-inference-objective`) and their priority.
    pub objectives: BTreeMap<String, Priority>,
    pub priority_header: Option<PriorityHeader>,
    /// The header naming a request's tenant; tenants share a priority band fairly.
    pub fairness_header: String,
    /// Adds the request's priority to the body the pod receives, as vLLM's `priority`
    /// ([`Priority::to_vllm`]), unless the client set one. For pods started with
    /// `--scheduling-policy priority` only: vLLM refuses a non-zero priority otherwise.
    pub forward_priority: bool,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            saturation: SaturationThresholds::default(),
            max_queued_requests: 1_024,
            max_queued_bytes: 64 << 20,
            queue_timeout_ms: 30_000,
            retry_after_secs: 1,
            default_priority: Priority::STANDARD,
            shed_below: Priority::STANDARD,
            objectives: BTreeMap::new(),
            priority_header: None,
            fairness_header: DEFAULT_FAIRNESS_HEADER.into(),
            forward_priority: false,
        }
    }
}

impl FlowConfig {
    /// Checks what serde cannot; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.saturation;
        if s.waiting_requests.is_none()
            && s.kv_cache_usage.is_none()
            && s.in_flight_requests.is_none()
            && s.uncached_tokens.is_none()
        {
            return Err("flowControl.saturation sets no threshold".into());
        }
        if let Some(w) = s.waiting_requests {
            if !w.is_finite() || w < 0.0 {
                return Err("flowControl.saturation.waitingRequests must be finite and ≥ 0".into());
            }
        }
        if let Some(u) = s.kv_cache_usage {
            if !(0.0..=1.0).contains(&u) {
                return Err("flowControl.saturation.kvCacheUsage must be between 0 and 1".into());
            }
        }
        if s.in_flight_requests == Some(0) {
            return Err("flowControl.saturation.inFlightRequests must be ≥ 1".into());
        }
        if self.max_queued_requests == 0 {
            return Err("flowControl.maxQueuedRequests must be ≥ 1".into());
        }
        if self.max_queued_bytes == 0 {
            return Err("flowControl.maxQueuedBytes must be ≥ 1".into());
        }
        if self.queue_timeout_ms == 0 {
            return Err("flowControl.queueTimeoutMs must be ≥ 1".into());
        }
        if http::HeaderName::from_bytes(self.fairness_header.as_bytes()).is_err() {
            return Err(format!(
                "flowControl.fairnessHeader {:?} is not a header name",
                self.fairness_header
            ));
        }
        if let Some(header) = &self.priority_header {
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                return Err(format!(
                    "flowControl.priorityHeader.name {:?} is not a header name",
                    header.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FlowConfig, String> {
        yaml_serde::from_str::<FlowConfig>(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn priorities_are_integers_or_criticality_names() {
        let config = parse(
            "{objectives: {chat: Critical, eval: -5}, defaultPriority: Sheddable, \
             priorityHeader: {name: x-class, values: {batch: 7}}}",
        )
        .expect("valid");
        assert_eq!(config.objectives["chat"], Priority::CRITICAL);
        assert_eq!(config.objectives["eval"], Priority(-5));
        assert_eq!(config.default_priority, Priority::SHEDDABLE);
        assert_eq!(
            config.priority_header.expect("header").values["batch"],
            Priority(7)
        );
        assert_eq!(config.fairness_header, DEFAULT_FAIRNESS_HEADER);
        config_ok(&parse("{}").expect("defaults"));

        let unknown = parse("{defaultPriority: Urgent}").unwrap_err();
        assert!(
            unknown.contains("unknown criticality \"Urgent\""),
            "{unknown}"
        );
        assert!(
            parse("{maxQueuedRequest: 3}").is_err(),
            "unknown keys are errors"
        );
        assert!(parse("{defaultPriority: 3000000000}").is_err());
    }

    #[test]
    fn priorities_map_onto_vllms_lower_first_values() {
        assert!(!parse("{}").expect("defaults").forward_priority);
        assert!(
            parse("{forwardPriority: true}")
                .expect("valid")
                .forward_priority
        );
        assert_eq!(Priority::CRITICAL.to_vllm(), -1);
        assert_eq!(Priority::STANDARD.to_vllm(), 0);
        assert_eq!(Priority::SHEDDABLE.to_vllm(), 1);
        assert_eq!(Priority(-5).to_vllm(), 5);
        assert_eq!(Priority(i32::MIN).to_vllm(), i32::MAX);
    }

    fn config_ok(config: &FlowConfig) {
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_field() {
        for (yaml, field) in [
            (
                "{saturation: {waitingRequests: null, kvCacheUsage: null}}",
                "sets no threshold",
            ),
            ("{saturation: {kvCacheUsage: 1.5}}", "kvCacheUsage"),
            ("{saturation: {waitingRequests: -1}}", "waitingRequests"),
            ("{saturation: {inFlightRequests: 0}}", "inFlightRequests"),
            ("{maxQueuedRequests: 0}", "maxQueuedRequests"),
            ("{maxQueuedBytes: 0}", "maxQueuedBytes"),
            ("{queueTimeoutMs: 0}", "queueTimeoutMs"),
            ("{fairnessHeader: \"bad header\"}", "fairnessHeader"),
            (
                "{priorityHeader: {name: \"\", values: {}}}",
                "priorityHeader.name",
            ),
        ] {
            let error = parse(yaml).expect(yaml).validate().unwrap_err();
            assert!(error.contains(field), "{yaml}: {error}");
        }
    }
}
