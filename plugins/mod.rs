//! Routing policies. Every policy is a small module behind one trait, [`Plugin`],
//! registered by name and placed in a profile as a filter, a weighted scorer or
//! the picker (`conf/kvgate.yaml` → `profiles`).
//!
//! A scheduling pass is: filters drop candidates → each scorer writes a score in
//! [0, 1] per candidate → totals are the weighted sum → the picker ranks the
//! candidates (the first is tried first, the rest are retry fallbacks). After the
//! request is sent, every plugin of the profile hears `routed`, and `completed`
//! when the response ends, so policies that learn (approximate prefix memory,
//! session affinity, prefill rate) see the outcome.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::index::{BlockIndex, IndexTargets};
use crate::pods::Pod;

mod healthy;
mod kv_cache;
mod least_request;
mod load;
mod max_score;
mod prefix;
mod random;
mod round_robin;
mod session;
#[cfg(test)]
mod testing;
mod ttft;

/// What a plugin sees of the request. Built once per request; borrowed by every plugin.
pub struct SchedulingRequest<'a> {
    pub request_id: &'a str,
    /// Served model name (after LoRA adapter resolution: the base model).
    pub model: &'a str,
    /// Index scope of the request (model + LoRA adapter).
    pub scope: u32,
    /// The request's chained prefix block hashes as the index keys them, block 0 first.
    pub block_keys: &'a [u64],
    pub block_size: usize,
    pub prompt_tokens: usize,
    /// Value of the session-affinity header, if the request carried one.
    pub session: Option<&'a str>,
    /// Monotonic time of the decision, on the clock the pod registry's health and
    /// ejection state use (`Pod::is_healthy` takes it in ms); virtual in `kvgate bench`.
    pub now: Duration,
}

/// One pod under consideration.
#[derive(Clone)]
pub struct Candidate {
    pub pod: Arc<Pod>,
    /// Best estimate so far of how many leading blocks of the request this pod has cached.
    /// Cache-aware scorers raise it; load-aware scorers that come after them read it.
    pub cached_blocks: u32,
}

impl Candidate {
    pub fn new(pod: Arc<Pod>) -> Self {
        Self {
            pod,
            cached_blocks: 0,
        }
    }

    /// Prompt tokens this pod would have to prefill for the request.
    pub fn uncached_tokens(&self, req: &SchedulingRequest<'_>) -> usize {
        req.prompt_tokens
            .saturating_sub(self.cached_blocks as usize * req.block_size)
    }
}

/// How a routed request ended, for plugins that learn from outcomes.
#[derive(Clone, Debug)]
pub struct RequestOutcome {
    /// The pod that served it: learners keep per-pod state on the pod itself (e.g. its prefill rate).
    pub pod: Arc<Pod>,
    pub prompt_tokens: usize,
    /// Uncached prompt tokens the router already had in flight on the pod when this request
    /// was sent (`Pod::uncached_tokens_in_flight` read just before `Pod::begin_request`):
    /// the prefill work queued ahead of it, which its time to first token includes.
    pub queued_uncached_tokens: u64,
    /// Tokens the router expected the pod to have cached.
    pub predicted_cached_tokens: usize,
    /// `usage.prompt_tokens_details.cached_tokens` from the response, when the pod reported it.
    pub actual_cached_tokens: Option<usize>,
    /// Time from sending the request to its first response byte (streaming) or to its end.
    pub time_to_first_token: Option<Duration>,
    pub success: bool,
}

/// The roles a plugin can take in a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub filter: bool,
    pub scorer: bool,
    pub picker: bool,
}

impl Roles {
    pub const FILTER: Self = Self {
        filter: true,
        scorer: false,
        picker: false,
    };
    pub const SCORER: Self = Self {
        filter: false,
        scorer: true,
        picker: false,
    };
    pub const PICKER: Self = Self {
        filter: false,
        scorer: false,
        picker: true,
    };
}

/// A routing policy. Implement the methods of the roles it declares.
pub trait Plugin: Send + Sync {
    fn name(&self) -> &'static str;
    fn roles(&self) -> Roles;

    /// Removes candidates this policy rules out. Filters must never remove the last
    /// candidate when that would fail a request another pod could still serve
    /// degraded (e.g. all pods overloaded): they keep the input then. Only a filter
    /// that removes pods unable to serve at all (`healthy`) may leave none: the
    /// request then fails fast (503).
    fn filter(&self, _req: &SchedulingRequest<'_>, _candidates: &mut Vec<Candidate>) {}

    /// Writes one score in [0, 1] per candidate into `scores` (same order, same length).
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        _candidates: &mut [Candidate],
        _scores: &mut [f64],
    ) {
    }

    /// Orders candidate indices best first into `order`, given the weighted totals.
    fn pick(
        &self,
        _req: &SchedulingRequest<'_>,
        _candidates: &[Candidate],
        _totals: &[f64],
        _order: &mut Vec<usize>,
    ) {
    }

    /// Whether `pick` moves the plugin's own state (a rotation, a random draw), so that
    /// ranking a request without routing it is not free of consequences.
    fn pick_moves_state(&self) -> bool {
        false
    }

    /// The request was sent to `pod`.
    fn routed(&self, _req: &SchedulingRequest<'_>, _pod: &Candidate) {}

    /// The request finished (or failed).
    fn completed(&self, _outcome: &RequestOutcome) {}
}

/// What plugin factories may use.
#[derive(Clone)]
pub struct PluginContext {
    pub index: Arc<BlockIndex>,
    /// Which index ids hold each pod's blocks (one per data-parallel rank).
    pub targets: Arc<IndexTargets>,
    pub block_size: usize,
    /// KV-cache capacity of one pod in blocks.
    pub pod_kv_blocks: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("unknown plugin {name:?} (registered: {known})")]
    Unknown { name: String, known: String },
    #[error("plugin {name:?} cannot be used as a {role} (it is a {roles})")]
    WrongRole {
        name: String,
        role: &'static str,
        roles: RolesDisplay,
    },
    #[error("plugin {name:?}: bad params: {message}")]
    Params { name: String, message: String },
}

impl PluginError {
    /// A plugin refused its parameters for the reason given.
    pub fn params(name: &str, message: &str) -> Self {
        Self::Params {
            name: name.to_string(),
            message: message.to_string(),
        }
    }
}

#[derive(Debug)]
pub struct RolesDisplay(pub Roles);

impl fmt::Display for RolesDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.0.filter {
            parts.push("filter");
        }
        if self.0.scorer {
            parts.push("scorer");
        }
        if self.0.picker {
            parts.push("picker");
        }
        f.write_str(&parts.join("/"))
    }
}

type Factory =
    fn(Option<&yaml_serde::Value>, &PluginContext) -> Result<Arc<dyn Plugin>, PluginError>;

/// Every registered plugin, by the name used in YAML.
const REGISTRY: &[(&str, Factory)] = &[
    (healthy::NAME, healthy::build),
    (kv_cache::NAME, kv_cache::build),
    (prefix::NAME, prefix::build),
    (load::NAME, load::build),
    (ttft::NAME, ttft::build),
    (least_request::NAME, least_request::build),
    (session::NAME, session::build),
    (round_robin::NAME, round_robin::build),
    (random::NAME, random::build),
    (max_score::NAME, max_score::build),
];

/// Builds a plugin by name with its params.
pub fn build(
    name: &str,
    params: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Plugin>, PluginError> {
    match REGISTRY.iter().find(|(n, _)| *n == name) {
        Some((_, factory)) => factory(params, ctx),
        None => Err(PluginError::Unknown {
            name: name.to_string(),
            known: REGISTRY
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Parses a plugin's params strictly (unknown keys are errors); absent params give the defaults.
pub fn parse_params<T: serde::de::DeserializeOwned + Default>(
    name: &str,
    params: Option<&yaml_serde::Value>,
) -> Result<T, PluginError> {
    match params {
        None => Ok(T::default()),
        Some(value) => yaml_serde::from_value(value.clone())
            .map_err(|e| PluginError::params(name, &e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_plugin_builds_with_defaults() {
        let ctx = testing::context();
        for (name, _) in REGISTRY {
            let plugin = build(name, None, &ctx).expect("defaults are valid");
            assert_eq!(plugin.name(), *name);
            let roles = plugin.roles();
            assert!(roles.filter || roles.scorer || roles.picker);
        }
        assert!(matches!(
            build("nope", None, &ctx),
            Err(PluginError::Unknown { .. })
        ));
    }
}
