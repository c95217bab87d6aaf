//! The routing policies a benchmark compares, resolved to real scheduling profiles.
//!
//! Profiles come from the gateway's own config where it defines them (`default` or the
//! model's profile for precise routing, `approximate`, `round-robin`), so the benchmark
//! measures what `kvgate serve` would run; the load-only baselines have built-in profiles.
//! A policy name may carry the event conditions of precise routing:
//! `precise-50ms`, `precise-loss1%`, `precise-500ms-loss10%`. Any policy may end in
//! `-x<N>`: N gateway replicas, each with its own index and routing state, fed the same
//! events and each handling a random share of the requests (`precise-x4`, `approximate-x2`).
//! `-r<N>` is the same in bind mode with the replica relay (`crate::relay`): each pod's events
//! reach one replica (its home, as kube-proxy lands its PUB connection), which relays them to
//! the others [`RELAY_LAG_MS`] later; a batch lost before its home is lost for every replica.

use crate::config::{Config, ModelConfig, ProfileConfig};

/// How the block index of a run is fed.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum IndexFeed {
    /// The policy never reads the index: nothing is fed.
    None,
    /// The pods' KV events, each step's batch delivered `delay_ms` after the step ends;
    /// a batch is lost with probability `loss` (undetected: no replay repairs it).
    Events { delay_ms: f64, loss: f64 },
    /// The pods' true caches with no lag: every change is applied the moment the pod's
    /// engine makes it, so the index always equals what the pods hold.
    Oracle,
}

/// One policy of a comparison.
#[derive(Clone, Debug)]
pub struct PolicySpec {
    /// Name in reports and on the command line.
    pub name: String,
    /// The gateway profile that runs it (`x-kvgate-profile` in a live run).
    pub profile_name: String,
    pub profile: ProfileConfig,
    pub feed: IndexFeed,
    /// Gateway replicas sharing the requests, with no state shared between them.
    pub replicas: usize,
    /// The replicas run in bind mode and relay each pod's events from its home replica.
    pub relayed: bool,
}

/// The relay's lag in `-r<N>` runs: the target's p99 bound on loopback (README, "Replicas in
/// bind mode"), so the comparison is conservative.
pub const RELAY_LAG_MS: f64 = 5.0;

/// Most replicas a policy may ask for.
pub const MAX_REPLICAS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown policy {name:?}: use round-robin, random, least-request, approximate, precise[-<ms>ms][-loss<p>%], oracle, or a profile of the config ({profiles}), each optionally with -x<replicas>")]
    Unknown { name: String, profiles: String },
    #[error("policy {name:?}: {message}")]
    Variant { name: String, message: String },
    #[error("built-in profile {name:?} does not parse: {message}")]
    BuiltIn { name: String, message: String },
}

/// W1's comparison: load-only baselines, approximate, precise under event delay and loss, oracle.
pub const W1_POLICIES: &[&str] = &[
    "round-robin",
    "random",
    "least-request",
    "approximate",
    "precise",
    "precise-50ms",
    "precise-500ms",
    "precise-loss1%",
    "precise-loss10%",
    "oracle",
];

/// The LoRA workload's comparison: kv-cache and load without the `lora-affinity` scorer (the
/// config's `lora-blind` profile), and precise routing with it (conf/bench/lora.yaml's
/// default profile).
pub const LORA_POLICIES: &[&str] = &["lora-blind", "precise"];

/// The shorter comparison used for the control and the traces.
pub const SHORT_POLICIES: &[&str] = &[
    "round-robin",
    "least-request",
    "approximate",
    "precise",
    "oracle",
];

const BUILT_IN: &[(&str, &str)] = &[
    (
        "round-robin",
        "{filters: [{name: healthy}], picker: {name: round-robin}}",
    ),
    (
        "random",
        "{filters: [{name: healthy}], picker: {name: random}}",
    ),
    (
        "least-request",
        "{filters: [{name: healthy}], scorers: [{name: least-request}], picker: {name: max-score}}",
    ),
    (
        "approximate",
        "{filters: [{name: healthy}], scorers: [{name: prefix, weight: 2}, {name: load, weight: 1}], picker: {name: max-score}}",
    ),
];

fn built_in(name: &str) -> Result<Option<ProfileConfig>, PolicyError> {
    let Some((_, yaml)) = BUILT_IN.iter().find(|(n, _)| *n == name) else {
        return Ok(None);
    };
    yaml_serde::from_str(yaml)
        .map(Some)
        .map_err(|e| PolicyError::BuiltIn {
            name: name.to_string(),
            message: e.to_string(),
        })
}

fn uses_index(profile: &ProfileConfig) -> bool {
    profile.scorers.iter().any(|s| s.name == "kv-cache")
}

/// Parses the `-50ms` / `-loss1%` suffixes of a precise policy.
fn event_conditions(name: &str, suffix: &str) -> Result<(f64, f64), PolicyError> {
    let bad = |message: String| PolicyError::Variant {
        name: name.to_string(),
        message,
    };
    let mut delay_ms = 0.0;
    let mut loss = 0.0;
    for part in suffix.split('-').filter(|p| !p.is_empty()) {
        if let Some(ms) = part.strip_suffix("ms") {
            delay_ms = ms
                .parse::<f64>()
                .ok()
                .filter(|d| d.is_finite() && *d >= 0.0)
                .ok_or_else(|| bad(format!("bad delay {part:?} (e.g. 50ms)")))?;
        } else if let Some(percent) = part.strip_prefix("loss").and_then(|p| p.strip_suffix('%')) {
            loss = percent
                .parse::<f64>()
                .ok()
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or_else(|| bad(format!("bad loss {part:?} (e.g. loss1%)")))?
                / 100.0;
        } else {
            return Err(bad(format!(
                "unknown condition {part:?} (use <ms>ms or loss<p>%)"
            )));
        }
    }
    Ok((delay_ms, loss))
}

/// Splits a trailing `-x<N>` (connect mode) or `-r<N>` (relayed bind mode) replica count off
/// a policy name.
fn replicas(name: &str) -> Result<(&str, usize, bool), PolicyError> {
    let split = name
        .rsplit_once("-x")
        .map(|(b, c)| (b, c, false))
        .into_iter()
        .chain(name.rsplit_once("-r").map(|(b, c)| (b, c, true)))
        .filter(|(_, c, _)| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        .max_by_key(|(b, _, _)| b.len());
    let Some((base, count, relayed)) = split else {
        return Ok((name, 1, false));
    };
    match count.parse::<usize>() {
        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok((base, n, relayed)),
        _ => Err(PolicyError::Variant {
            name: name.to_string(),
            message: format!("replicas must be 1..={MAX_REPLICAS}"),
        }),
    }
}

/// Resolves a policy name against the config and the benchmarked model.
pub fn resolve(
    name: &str,
    config: &Config,
    model: &ModelConfig,
) -> Result<PolicySpec, PolicyError> {
    let (base, replicas, relayed) = replicas(name)?;
    let mut spec = resolve_single(base, config, model)?;
    spec.name = name.to_string();
    spec.replicas = replicas;
    spec.relayed = relayed;
    Ok(spec)
}

fn resolve_single(
    name: &str,
    config: &Config,
    model: &ModelConfig,
) -> Result<PolicySpec, PolicyError> {
    let configured = |profile: &str| config.profiles.get(profile).cloned();
    let precise = || {
        configured(&model.profile).ok_or_else(|| PolicyError::Variant {
            name: name.to_string(),
            message: format!(
                "the model's profile {:?} is not in the config",
                model.profile
            ),
        })
    };
    let spec = |profile_name: &str, profile: ProfileConfig, feed: IndexFeed| PolicySpec {
        name: name.to_string(),
        profile_name: profile_name.to_string(),
        profile,
        feed,
        replicas: 1,
        relayed: false,
    };
    if name == "oracle" {
        return Ok(spec(&model.profile, precise()?, IndexFeed::Oracle));
    }
    if let Some(suffix) = name.strip_prefix("precise") {
        if suffix.is_empty() || suffix.starts_with('-') {
            let (delay_ms, loss) = event_conditions(name, suffix)?;
            return Ok(spec(
                &model.profile,
                precise()?,
                IndexFeed::Events { delay_ms, loss },
            ));
        }
    }
    let profile = match configured(name) {
        Some(profile) => profile,
        None => match built_in(name)? {
            Some(profile) => profile,
            None => {
                return Err(PolicyError::Unknown {
                    name: name.to_string(),
                    profiles: config
                        .profiles
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        },
    };
    let feed = if uses_index(&profile) {
        IndexFeed::Events {
            delay_ms: 0.0,
            loss: 0.0,
        }
    } else {
        IndexFeed::None
    };
    Ok(spec(name, profile, feed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/kvgate.yaml");
        Config::load(&path).expect("shipped config loads")
    }

    #[test]
    fn names_resolve_to_profiles_and_feeds() {
        let config = config();
        let model = &config.models[0];
        for name in W1_POLICIES {
            resolve(name, &config, model).expect("every default policy resolves");
        }
        let delayed = resolve("precise-500ms-loss10%", &config, model).unwrap();
        assert_eq!(
            delayed.feed,
            IndexFeed::Events {
                delay_ms: 500.0,
                loss: 0.1
            }
        );
        assert_eq!(delayed.profile_name, "default");
        assert_eq!(
            resolve("approximate", &config, model).unwrap().feed,
            IndexFeed::None
        );
        assert_eq!(
            resolve("oracle", &config, model).unwrap().feed,
            IndexFeed::Oracle
        );
        assert!(resolve("precise-fast", &config, model).is_err());
        assert!(resolve("precise-loss200%", &config, model).is_err());
        assert!(resolve("nope", &config, model).is_err());
        let replicated = resolve("precise-50ms-x4", &config, model).unwrap();
        assert_eq!(replicated.replicas, 4);
        assert_eq!(replicated.name, "precise-50ms-x4");
        assert_eq!(
            replicated.feed,
            IndexFeed::Events {
                delay_ms: 50.0,
                loss: 0.0
            }
        );
        assert_eq!(
            resolve("approximate-x2", &config, model).unwrap().replicas,
            2
        );
        assert_eq!(resolve("precise", &config, model).unwrap().replicas, 1);
        assert!(resolve("precise-x0", &config, model).is_err());
        let relayed = resolve("precise-r4", &config, model).unwrap();
        assert_eq!((relayed.replicas, relayed.relayed), (4, true));
        assert!(!replicated.relayed);
        assert!(resolve("precise-r0", &config, model).is_err());
        assert!(resolve("precise-x65", &config, model).is_err());
    }
}
