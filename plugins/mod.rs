//! Routing policies. Every policy is a small module registered by name and placed
//! in a profile (`conf/kvgate.yaml` → `profiles`) in the one role it implements:
//! [`Filter`], [`Scorer`] (weighted) or [`Picker`]. All three extend [`Plugin`]:
//! a name and the lifecycle hooks.
//!
//! A scheduling pass is: filters drop candidates → each scorer writes a score in
//! [0, 1] per candidate → totals are the weighted sum → the picker ranks the
//! candidates (the first is tried first, the rest are retry fallbacks). After the
//! request is sent, every plugin of the profile hears `routed`, and `completed`
//! when the response ends, so policies that learn (approximate prefix memory,
//! session affinity, prefill rate) see the outcome.
//!
//! # Adding a plugin
//!
//! 1. Write one module here, `plugins/<name>.rs`, with
//!    * `pub const NAME: &str = "<yaml-name>";`
//!    * a `Params` struct (`#[serde(deny_unknown_fields)]`, `Default`) read with
//!      [`parse_params`], and validated in `build`;
//!    * `pub fn build(params, ctx) -> Result<Arc<dyn Scorer>, PluginError>` (or
//!      `dyn Filter` / `dyn Picker`);
//!    * `impl Plugin` (its name; `routed` / `completed` only if it learns) and the
//!      impl of its role trait;
//!    * unit tests over the fixtures in `testing`.
//! 2. Add `mod <name>;` and one line to `REGISTRY`:
//!    `(<name>::NAME, Factory::Scorer(<name>::build))`. The variant must match what
//!    `build` returns, so a plugin cannot be registered in a role it does not
//!    implement; a profile that puts it in another role is a config error.
//!
//! A new kind of stage (its own trait beside `Filter`, `Scorer` and `Picker`) adds a
//! variant to [`Role`] and to `Factory`, and a `build_<role>` function.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::index::{BlockIndex, IndexTargets};
use crate::pods::Pod;

mod healthy;
mod kv_cache;
mod kv_headroom;
mod least_request;
mod load;
mod lora_affinity;
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
    /// The LoRA adapter the request runs with, by name; `None` for the base model.
    pub adapter: Option<&'a str>,
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

/// What every plugin is, whatever its role: a name (in logs, scores and errors) and
/// the lifecycle hooks through which policies that learn see what happened.
pub trait Plugin: Send + Sync {
    fn name(&self) -> &'static str;

    /// The request was sent to `pod`.
    fn routed(&self, _req: &SchedulingRequest<'_>, _pod: &Candidate) {}

    /// The request finished (or failed).
    fn completed(&self, _outcome: &RequestOutcome) {}
}

/// A filter: rules candidates out before scoring.
pub trait Filter: Plugin {
    /// Removes candidates this policy rules out. Filters must never remove the last
    /// candidate when that would fail a request another pod could still serve
    /// degraded (e.g. all pods overloaded): they keep the input then. Only a filter
    /// that removes pods unable to serve at all (`healthy`, when its panic threshold
    /// is 0) may leave none: the request then fails fast (503).
    fn filter(&self, req: &SchedulingRequest<'_>, candidates: &mut Vec<Candidate>);
}

/// A scorer: rates every candidate; the profile weighs and sums the scores.
pub trait Scorer: Plugin {
    /// Writes one score in [0, 1] per candidate into `scores` (same order, same length).
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &mut [Candidate], scores: &mut [f64]);
}

/// A picker: turns the weighted totals into a ranking.
pub trait Picker: Plugin {
    /// Orders candidate indices best first into `order`, given the weighted totals.
    fn pick(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[Candidate],
        totals: &[f64],
        order: &mut Vec<usize>,
    );

    /// Whether `pick` moves the plugin's own state (a rotation, a random draw), so that
    /// ranking a request without routing it is not free of consequences.
    fn pick_moves_state(&self) -> bool {
        false
    }
}

/// The place a plugin takes in a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Filter,
    Scorer,
    Picker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Filter => "filter",
            Self::Scorer => "scorer",
            Self::Picker => "picker",
        })
    }
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
    #[error("plugin {name:?} cannot be used as a {wanted} (it is a {actual})")]
    WrongRole {
        name: String,
        wanted: Role,
        actual: Role,
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

/// A plugin's constructor: its params from YAML (absent: the defaults) → the plugin.
type Build<P> = fn(Option<&yaml_serde::Value>, &PluginContext) -> Result<Arc<P>, PluginError>;

/// How a registered plugin is built; the variant is its role, so a factory returning
/// the wrong kind of plugin does not compile.
#[derive(Clone, Copy)]
enum Factory {
    Filter(Build<dyn Filter>),
    Scorer(Build<dyn Scorer>),
    Picker(Build<dyn Picker>),
}

impl Factory {
    fn role(self) -> Role {
        match self {
            Self::Filter(_) => Role::Filter,
            Self::Scorer(_) => Role::Scorer,
            Self::Picker(_) => Role::Picker,
        }
    }
}

/// Every registered plugin, by the name used in YAML.
const REGISTRY: &[(&str, Factory)] = &[
    (healthy::NAME, Factory::Filter(healthy::build)),
    (kv_cache::NAME, Factory::Scorer(kv_cache::build)),
    (kv_headroom::NAME, Factory::Scorer(kv_headroom::build)),
    (prefix::NAME, Factory::Scorer(prefix::build)),
    (load::NAME, Factory::Scorer(load::build)),
    (lora_affinity::NAME, Factory::Scorer(lora_affinity::build)),
    (ttft::NAME, Factory::Scorer(ttft::build)),
    (least_request::NAME, Factory::Scorer(least_request::build)),
    (session::NAME, Factory::Scorer(session::build)),
    (round_robin::NAME, Factory::Picker(round_robin::build)),
    (random::NAME, Factory::Picker(random::build)),
    (max_score::NAME, Factory::Picker(max_score::build)),
];

fn factory(name: &str) -> Result<Factory, PluginError> {
    match REGISTRY.iter().find(|(n, _)| *n == name) {
        Some((_, factory)) => Ok(*factory),
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

fn wrong_role(name: &str, wanted: Role, factory: Factory) -> PluginError {
    PluginError::WrongRole {
        name: name.to_string(),
        wanted,
        actual: factory.role(),
    }
}

/// Builds the filter registered as `name` with its params.
pub fn build_filter(
    name: &str,
    params: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Filter>, PluginError> {
    match factory(name)? {
        Factory::Filter(build) => build(params, ctx),
        other => Err(wrong_role(name, Role::Filter, other)),
    }
}

/// Builds the scorer registered as `name` with its params.
pub fn build_scorer(
    name: &str,
    params: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    match factory(name)? {
        Factory::Scorer(build) => build(params, ctx),
        other => Err(wrong_role(name, Role::Scorer, other)),
    }
}

/// Builds the picker registered as `name` with its params.
pub fn build_picker(
    name: &str,
    params: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Picker>, PluginError> {
    match factory(name)? {
        Factory::Picker(build) => build(params, ctx),
        other => Err(wrong_role(name, Role::Picker, other)),
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
    fn every_registered_plugin_builds_with_defaults_in_its_role_only() {
        let ctx = testing::context();
        for (name, factory) in REGISTRY {
            let built = match factory {
                Factory::Filter(build) => build(None, &ctx).map(|p| p.name()),
                Factory::Scorer(build) => build(None, &ctx).map(|p| p.name()),
                Factory::Picker(build) => build(None, &ctx).map(|p| p.name()),
            };
            assert_eq!(built.expect("defaults are valid"), *name);
            let roles = [
                build_filter(name, None, &ctx).is_ok(),
                build_scorer(name, None, &ctx).is_ok(),
                build_picker(name, None, &ctx).is_ok(),
            ];
            assert_eq!(roles.iter().filter(|&&ok| ok).count(), 1, "{name}");
        }
        assert!(matches!(
            build_scorer("nope", None, &ctx),
            Err(PluginError::Unknown { .. })
        ));
    }

    #[test]
    fn a_plugin_in_the_wrong_role_names_both_roles() {
        let ctx = testing::context();
        let err = build_filter("load", None, &ctx)
            .err()
            .expect("load is no filter");
        assert_eq!(
            err.to_string(),
            "plugin \"load\" cannot be used as a filter (it is a scorer)"
        );
    }
}
