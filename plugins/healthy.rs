//! `healthy` (filter): keeps the pods that pass their active health checks and are
//! not passively ejected.
//!
//! Health checks can be wrong all at once: a fleet whose `/health` is merely slow under
//! load fails every probe while serving fine. So, like Envoy's panic threshold, when
//! fewer than `panicThresholdPercent` of the candidates are healthy the active checks
//! are ignored and the scorers pick among the pods that are not passively ejected (the
//! evidence of requests that really failed), or among all of them when every one is
//! ejected. A pod that is really down refuses the connection and the request moves on
//! to the next. With the threshold at 0 the filter may leave no candidate at all, and
//! the request fails fast (503).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Deserialize;

use super::{
    parse_params, Candidate, Filter, Plugin, PluginContext, PluginError, SchedulingRequest,
};

pub const NAME: &str = "healthy";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    /// Below this share of healthy candidates (percent), health is ignored (0: never).
    panic_threshold_percent: f64,
}

impl Default for Params {
    fn default() -> Self {
        // Envoy's default: losing half the fleet at once is likelier a check gone wrong
        // (or a cascade the survivors would not carry) than half the pods failing.
        Self {
            panic_threshold_percent: 50.0,
        }
    }
}

pub struct Healthy {
    panic_threshold_percent: f64,
    /// Models whose requests are routed in panic, to log only the changes (one profile
    /// serves many models).
    panicking: Mutex<Vec<String>>,
    /// Whether `panicking` has any model: spares the lock while every model is healthy.
    any_panicking: AtomicBool,
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Filter>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    if !(0.0..=100.0).contains(&p.panic_threshold_percent) {
        return Err(PluginError::params(
            NAME,
            "panicThresholdPercent must be between 0 and 100",
        ));
    }
    Ok(Arc::new(Healthy {
        panic_threshold_percent: p.panic_threshold_percent,
        panicking: Mutex::new(Vec::new()),
        any_panicking: AtomicBool::new(false),
    }))
}

impl Plugin for Healthy {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Filter for Healthy {
    fn filter(&self, req: &SchedulingRequest<'_>, candidates: &mut Vec<Candidate>) {
        let now_ms = u64::try_from(req.now.as_millis()).unwrap_or(u64::MAX);
        let healthy = candidates
            .iter()
            .filter(|c| c.pod.is_healthy(now_ms))
            .count();
        let panic =
            (healthy as f64) * 100.0 < self.panic_threshold_percent * candidates.len() as f64;
        if panic || self.any_panicking.load(Ordering::Relaxed) {
            self.log_change(req.model, panic, healthy, candidates.len());
        }
        if !panic {
            candidates.retain(|c| c.pod.is_healthy(now_ms));
        } else if candidates.iter().any(|c| !c.pod.is_ejected(now_ms)) {
            candidates.retain(|c| !c.pod.is_ejected(now_ms));
        }
    }
}

impl Healthy {
    /// Logs when `model` enters or leaves panic routing.
    fn log_change(&self, model: &str, panic: bool, healthy: usize, pods: usize) {
        let mut panicking = self.panicking.lock();
        let known = panicking.iter().position(|m| m == model);
        match (panic, known) {
            (true, None) => {
                panicking.push(model.to_string());
                tracing::warn!(
                    model,
                    healthy,
                    pods,
                    threshold_percent = self.panic_threshold_percent,
                    "too few pods pass their health checks: routing to all of them"
                );
            }
            (false, Some(at)) => {
                panicking.swap_remove(at);
                tracing::info!(
                    model,
                    healthy,
                    pods,
                    "enough pods pass their health checks again: routing to those only"
                );
            }
            _ => {}
        }
        self.any_panicking
            .store(!panicking.is_empty(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::plugins::testing::{candidates, context, params, request};

    fn healthy(yaml: &str) -> Arc<dyn Filter> {
        build(Some(&params(yaml)), &context()).expect("valid params")
    }

    #[test]
    fn drops_failed_and_ejected_pods_and_may_leave_none() {
        let cands = candidates(3);
        cands[0].pod.set_health_check(false);
        cands[1]
            .pod
            .record_failure(1_000, 1, Duration::from_millis(500));
        let plugin = healthy("{panicThresholdPercent: 0}");
        let blocks = [1u64];
        let mut req = request(&blocks);
        req.now = Duration::from_millis(1_200);
        let mut kept = cands.clone();
        plugin.filter(&req, &mut kept);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].pod.id, cands[2].pod.id);

        // The ejection ends at 1,500 ms.
        req.now = Duration::from_millis(1_500);
        let mut kept = cands.clone();
        plugin.filter(&req, &mut kept);
        assert_eq!(kept.len(), 2);

        cands[2].pod.set_health_check(false);
        cands[1].pod.set_health_check(false);
        let mut kept = cands.clone();
        plugin.filter(&req, &mut kept);
        assert!(kept.is_empty(), "no healthy pod: the request must fail");
    }

    #[test]
    fn below_the_panic_threshold_every_pod_is_kept() {
        let cands = candidates(4);
        let plugin = build(None, &context()).expect("defaults");
        let blocks = [1u64];
        let req = request(&blocks);
        let kept = |plugin: &dyn Filter| {
            let mut kept = cands.clone();
            plugin.filter(&req, &mut kept);
            kept.len()
        };
        // Two of four healthy is at Envoy's default 50 %: the failing two are dropped.
        cands[0].pod.set_health_check(false);
        cands[1].pod.set_health_check(false);
        assert_eq!(kept(plugin.as_ref()), 2);
        // One of four is below it: health is ignored, the scorers decide.
        cands[2].pod.set_health_check(false);
        assert_eq!(kept(plugin.as_ref()), 4);
        cands[3].pod.set_health_check(false);
        assert_eq!(kept(plugin.as_ref()), 4);
        assert_eq!(kept(healthy("{panicThresholdPercent: 0}").as_ref()), 0);
        assert_eq!(kept(healthy("{panicThresholdPercent: 100}").as_ref()), 4);
        // Requests that really failed keep weighing: ejected pods stay out while others
        // are left, and come back only when every pod is ejected.
        cands[0].pod.record_failure(0, 1, Duration::from_secs(60));
        assert_eq!(kept(plugin.as_ref()), 3);
        for cand in &cands[1..] {
            cand.pod.record_failure(0, 1, Duration::from_secs(60));
        }
        assert_eq!(kept(plugin.as_ref()), 4);
        // A pod answering a request is healthy again at once.
        let fresh = candidates(2);
        fresh[0].pod.set_health_check(false);
        fresh[1].pod.set_health_check(false);
        fresh[1].pod.record_success();
        let mut kept = fresh.clone();
        healthy("{panicThresholdPercent: 10}").filter(&req, &mut kept);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].pod.id, fresh[1].pod.id);
    }

    #[test]
    fn panic_is_tracked_per_model() {
        let plugin = Healthy {
            panic_threshold_percent: 50.0,
            panicking: Mutex::default(),
            any_panicking: AtomicBool::new(false),
        };
        let failing = candidates(2);
        for cand in &failing {
            cand.pod.set_health_check(false);
        }
        let passing = candidates(2);
        let blocks = [1u64];
        let mut degraded = request(&blocks);
        degraded.model = "degraded";
        let mut fine = request(&blocks);
        fine.model = "fine";
        // Requests of a healthy model in between do not end the other model's panic.
        for _ in 0..2 {
            plugin.filter(&degraded, &mut failing.clone());
            plugin.filter(&fine, &mut passing.clone());
            assert_eq!(*plugin.panicking.lock(), ["degraded"]);
        }
        for cand in &failing {
            cand.pod.set_health_check(true);
        }
        plugin.filter(&degraded, &mut failing.clone());
        assert!(plugin.panicking.lock().is_empty());
        assert!(!plugin.any_panicking.load(Ordering::Relaxed));
    }

    #[test]
    fn rejects_unknown_params() {
        for bad in [
            "{threshold: 1}",
            "{panicThresholdPercent: 101}",
            "{panicThresholdPercent: -1}",
        ] {
            assert!(matches!(
                build(Some(&params(bad)), &context()),
                Err(PluginError::Params { .. })
            ));
        }
    }
}
