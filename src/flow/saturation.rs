//! Whether a model's pods can take another request now.

use crate::pods::Pod;

use super::config::SaturationThresholds;

/// The role of a saturation detector: judges one pod from what kvgate sees of it (the
/// scraped vLLM load and its own accounting).
pub trait SaturationDetector: Send + Sync {
    fn pod_saturated(&self, pod: &Pod) -> bool;
}

impl SaturationDetector for SaturationThresholds {
    fn pod_saturated(&self, pod: &Pod) -> bool {
        let scraped = pod.scraped();
        self.waiting_requests.is_some_and(|w| scraped.waiting >= w)
            || self.kv_cache_usage.is_some_and(|u| scraped.kv_usage >= u)
            || self
                .in_flight_requests
                .is_some_and(|n| pod.in_flight() >= n)
            || self
                .uncached_tokens
                .is_some_and(|t| pod.uncached_tokens_in_flight() >= t)
    }
}

/// Whether one more request fits: some healthy pod is below saturation beyond the
/// `reserved` requests already dispatched to the pods and not yet placed on one. With no
/// healthy pod at all nothing is held back: the scheduler answers that case.
pub fn has_room(
    detector: &dyn SaturationDetector,
    pods: &[std::sync::Arc<Pod>],
    reserved: usize,
    now_ms: u64,
) -> bool {
    let mut healthy = 0;
    let mut free = 0;
    for pod in pods.iter().filter(|p| p.is_healthy(now_ms)) {
        healthy += 1;
        if !detector.pod_saturated(pod) {
            free += 1;
        }
    }
    healthy == 0 || free > reserved
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pods::ScrapedLoad;

    fn pod(id: u32) -> Arc<Pod> {
        Arc::new(Pod::new(id, crate::pods::tests::endpoint(9000 + id as u16)))
    }

    #[test]
    fn any_threshold_saturates_a_pod_and_reservations_take_free_pods() {
        let thresholds = SaturationThresholds {
            waiting_requests: Some(2.0),
            kv_cache_usage: Some(0.9),
            in_flight_requests: Some(1),
            uncached_tokens: None,
        };
        let (a, b) = (pod(1), pod(2));
        let pods = [Arc::clone(&a), Arc::clone(&b)];
        assert!(has_room(&thresholds, &pods, 1, 0));
        assert!(!has_room(&thresholds, &pods, 2, 0));

        let _busy = a.begin_request(0);
        assert!(thresholds.pod_saturated(&a));
        assert!(has_room(&thresholds, &pods, 0, 0));
        b.set_scraped(ScrapedLoad {
            kv_usage: 0.95,
            ..ScrapedLoad::default()
        });
        assert!(!has_room(&thresholds, &pods, 0, 0));
        b.set_scraped(ScrapedLoad {
            waiting: 1.0,
            ..ScrapedLoad::default()
        });
        assert!(has_room(&thresholds, &pods, 0, 0));

        assert!(
            has_room(&thresholds, &[], 5, 0),
            "no pod: nothing held back"
        );
    }

    #[test]
    fn uncached_tokens_in_flight_saturate_until_prefilled() {
        let thresholds = SaturationThresholds {
            waiting_requests: None,
            kv_cache_usage: None,
            in_flight_requests: None,
            uncached_tokens: Some(4_096),
        };
        let pod = pod(1);
        let mut long = pod.begin_request(5_000);
        assert!(thresholds.pod_saturated(&pod));
        long.prefill_finished();
        assert!(!thresholds.pod_saturated(&pod));
    }
}
