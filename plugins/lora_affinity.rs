//! `lora-affinity` (scorer): for a request naming a LoRA adapter, prefers pods where the
//! adapter is active, then pods with a free adapter slot.
//!
//! vLLM holds at most `--max-loras` adapters on the GPU. A request for an adapter a pod
//! runs already starts at once; on a pod with a free slot the adapter is swapped in first
//! (a load from CPU memory or disk); on a pod whose slots all serve other adapters' requests
//! it waits until one drains. The pod's state comes from its scraped
//! `vllm:lora_requests_info` ([`crate::pods::ScrapedLora`]):
//!
//! * `activeScore` (1) where a running or waiting request uses the adapter;
//! * `freeSlotScore` (0.5) where fewer distinct adapters are in use than `max_lora`;
//! * 0 elsewhere, and on pods whose state is unknown (not scraped yet, LoRA off, or the pod
//!   restarted since).
//!
//! Requests for the base model score 1 everywhere: the plugin leaves them to the others.
//! Weighed beside `kv-cache` and `load`, it keeps an adapter's traffic where the adapter
//! and its cached prefixes (keyed by adapter) already are.

use std::sync::Arc;

use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, SchedulingRequest, Scorer,
};
use crate::pods::ScrapedLora;

pub const NAME: &str = "lora-affinity";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    active_score: f64,
    free_slot_score: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            active_score: 1.0,
            free_slot_score: 0.5,
        }
    }
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    let valid = |s: f64| (0.0..=1.0).contains(&s);
    if !valid(p.active_score) || !valid(p.free_slot_score) {
        return Err(PluginError::params(NAME, "scores must be between 0 and 1"));
    }
    if p.free_slot_score > p.active_score {
        return Err(PluginError::params(
            NAME,
            "freeSlotScore must not exceed activeScore (a swap-in never beats a loaded adapter)",
        ));
    }
    Ok(Arc::new(LoraAffinity {
        active_score: p.active_score,
        free_slot_score: p.free_slot_score,
    }))
}

pub struct LoraAffinity {
    active_score: f64,
    free_slot_score: f64,
}

impl LoraAffinity {
    fn score_pod(&self, adapter: &str, lora: Option<&ScrapedLora>) -> f64 {
        match lora {
            Some(lora) if lora.is_active(adapter) => self.active_score,
            Some(lora) if lora.has_free_slot() => self.free_slot_score,
            _ => 0.0,
        }
    }
}

impl Plugin for LoraAffinity {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Scorer for LoraAffinity {
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &mut [Candidate], scores: &mut [f64]) {
        let Some(adapter) = req.adapter else {
            scores.iter_mut().for_each(|s| *s = 1.0);
            return;
        };
        for (candidate, score) in candidates.iter().zip(scores.iter_mut()) {
            *score = candidate
                .pod
                .with_scraped_lora(|lora| self.score_pod(adapter, lora));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{candidates, context, params, request, scores};

    fn state(running: &[&str], waiting: &[&str], max_lora: u32) -> ScrapedLora {
        let names = |list: &[&str]| list.iter().map(|a| a.to_string()).collect();
        ScrapedLora {
            running: names(running),
            waiting: names(waiting),
            max_lora,
        }
    }

    #[test]
    fn active_beats_free_slot_beats_full_or_unknown() {
        let plugin = build(None, &context()).expect("defaults are valid");
        let mut cands = candidates(5);
        let scrape = |i: usize, lora: ScrapedLora| {
            let pod = &cands[i].pod;
            pod.set_scraped_lora(pod.cache_epoch(), lora);
        };
        scrape(0, state(&["sql"], &[], 2));
        scrape(1, state(&["chat"], &["sql"], 2));
        scrape(2, state(&["chat"], &[], 2));
        scrape(3, state(&["chat", "code"], &["x"], 2));
        let mut req = request(&[1]);
        req.adapter = Some("sql");
        assert_eq!(
            scores(plugin.as_ref(), &req, &mut cands),
            vec![1.0, 1.0, 0.5, 0.0, 0.0]
        );
        req.adapter = None;
        assert_eq!(
            scores(plugin.as_ref(), &req, &mut cands),
            vec![1.0; 5],
            "base-model requests are left to the other scorers"
        );
    }

    #[test]
    fn params_are_strict() {
        let plugin = build(Some(&params("{freeSlotScore: 0.2}")), &context()).expect("valid");
        let mut cands = candidates(1);
        let pod = &cands[0].pod;
        pod.set_scraped_lora(pod.cache_epoch(), state(&[], &[], 1));
        let mut req = request(&[1]);
        req.adapter = Some("sql");
        assert_eq!(scores(plugin.as_ref(), &req, &mut cands), vec![0.2]);
        for bad in [
            "{activeScore: 2}",
            "{freeSlotScore: -0.1}",
            "{activeScore: 0.3, freeSlotScore: 0.5}",
            "{slotScore: 1}",
        ] {
            assert!(matches!(
                build(Some(&params(bad)), &context()),
                Err(PluginError::Params { .. })
            ));
        }
    }
}
