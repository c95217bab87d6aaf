//! `healthy` (filter): keeps the pods that pass their active health checks and are
//! not passively ejected.
//!
//! Unlike load filters, it may leave no candidate at all: an unhealthy or ejected
//! pod cannot serve the request degraded, so when every pod is down the request
//! must fail fast (503) rather than be sent somewhere known to be broken.

use std::sync::Arc;

use serde::Deserialize;

use super::{
    parse_params, Candidate, Filter, Plugin, PluginContext, PluginError, SchedulingRequest,
};

pub const NAME: &str = "healthy";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Params {}

pub struct Healthy;

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Filter>, PluginError> {
    let Params {} = parse_params(NAME, params)?;
    Ok(Arc::new(Healthy))
}

impl Plugin for Healthy {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Filter for Healthy {
    fn filter(&self, req: &SchedulingRequest<'_>, candidates: &mut Vec<Candidate>) {
        let now_ms = u64::try_from(req.now.as_millis()).unwrap_or(u64::MAX);
        candidates.retain(|c| c.pod.is_healthy(now_ms));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::plugins::testing::{candidates, request};

    #[test]
    fn drops_failed_and_ejected_pods_and_may_leave_none() {
        let cands = candidates(3);
        cands[0].pod.set_health_check(false);
        cands[1]
            .pod
            .record_failure(1_000, 1, Duration::from_millis(500));
        let plugin = Healthy;
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
    fn rejects_unknown_params() {
        let params: yaml_serde::Value = yaml_serde::from_str("{threshold: 1}").unwrap();
        assert!(matches!(
            build(Some(&params), &crate::plugins::testing::context()),
            Err(PluginError::Params { .. })
        ));
    }
}
