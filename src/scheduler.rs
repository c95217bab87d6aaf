//! Runs one scheduling profile: filters → weighted scorers → picker. Plugins
//! live in `plugins/`; this module only composes them and records why a pod won.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::ProfileConfig;
use crate::discovery::Leg;
use crate::plugins::{
    self, Candidate, Filter, Picker, PluginContext, PluginError, RequestOutcome, SchedulingRequest,
    Scorer,
};
use crate::pods::PodSet;

/// A built profile.
pub struct Pipeline {
    name: String,
    /// The leg whose pods this pipeline ranks (a disaggregated profile's two pipelines);
    /// `None`: every pod of the model.
    leg: Option<Leg>,
    filters: Vec<Arc<dyn Filter>>,
    scorers: Vec<(Arc<dyn Scorer>, f64)>,
    picker: Arc<dyn Picker>,
    prefill: Option<PrefillStage>,
}

/// The prefill leg of a disaggregated profile.
pub struct PrefillStage {
    pub pipeline: Box<Pipeline>,
    /// Below this many uncached prompt tokens on the decode pod, it serves the request alone.
    pub min_uncached_tokens: usize,
}

/// The outcome of one scheduling pass.
pub struct Decision {
    pub profile: String,
    /// Candidates best first: the first is tried, the rest are fallbacks for retries.
    pub ranked: Vec<Candidate>,
    /// Per ranked candidate: each scorer's score (in profile order) and the weighted total.
    pub scores: Vec<(Vec<f64>, f64)>,
    pub scorer_names: Vec<&'static str>,
}

impl Decision {
    /// Compact `pod=total(scorer:score,…)` text for the `Request handled` log line.
    pub fn scores_summary(&self) -> String {
        let mut out = String::new();
        for (cand, (parts, total)) in self.ranked.iter().zip(&self.scores) {
            if !out.is_empty() {
                out.push(' ');
            }
            let _ = write!(out, "{}={total:.3}(", cand.pod.addr());
            for (i, (name, score)) in self.scorer_names.iter().zip(parts).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{name}:{score:.3}");
            }
            out.push(')');
        }
        out
    }
}

impl Pipeline {
    pub fn build(
        name: &str,
        cfg: &ProfileConfig,
        ctx: &PluginContext,
    ) -> Result<Self, PluginError> {
        let mut pipeline = Self::build_stage(name, cfg, ctx)?;
        if let Some(prefill) = &cfg.prefill {
            let mut stage = Self::build_stage(name, &prefill.pipeline(), ctx)?;
            stage.leg = Some(Leg::Prefill);
            pipeline.leg = Some(Leg::Decode);
            pipeline.prefill = Some(PrefillStage {
                pipeline: Box::new(stage),
                min_uncached_tokens: prefill.min_uncached_tokens,
            });
        }
        Ok(pipeline)
    }

    fn build_stage(
        name: &str,
        cfg: &ProfileConfig,
        ctx: &PluginContext,
    ) -> Result<Self, PluginError> {
        let filters = cfg
            .filters
            .iter()
            .map(|f| plugins::build_filter(&f.name, f.params.as_ref(), ctx))
            .collect::<Result<_, _>>()?;
        let scorers = cfg
            .scorers
            .iter()
            .map(|s| {
                Ok((
                    plugins::build_scorer(&s.name, s.params.as_ref(), ctx)?,
                    s.weight,
                ))
            })
            .collect::<Result<_, PluginError>>()?;
        let picker = plugins::build_picker(&cfg.picker.name, cfg.picker.params.as_ref(), ctx)?;
        Ok(Self {
            name: name.to_string(),
            leg: None,
            filters,
            scorers,
            picker,
            prefill: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The prefill leg, when the profile is disaggregated.
    pub fn prefill(&self) -> Option<&PrefillStage> {
        self.prefill.as_ref()
    }

    /// Whether `schedule` can be asked without changing later decisions.
    pub fn ranking_is_pure(&self) -> bool {
        !self.picker.pick_moves_state()
    }

    /// Ranks the pods for a request. An empty ranking means no pod can take it.
    pub fn schedule(&self, req: &SchedulingRequest<'_>, pods: &PodSet) -> Decision {
        let mut candidates: Vec<Candidate> = pods
            .pods
            .iter()
            .filter(|pod| self.leg.is_none_or(|leg| pod.endpoint.role.serves(leg)))
            .cloned()
            .map(Candidate::new)
            .collect();
        for filter in &self.filters {
            filter.filter(req, &mut candidates);
        }
        let n = candidates.len();
        let mut per_scorer = vec![0.0; n * self.scorers.len()];
        let mut totals = vec![0.0; n];
        let mut scratch = vec![0.0; n];
        for (s, (scorer, weight)) in self.scorers.iter().enumerate() {
            scratch.iter_mut().for_each(|x| *x = 0.0);
            scorer.score(req, &mut candidates, &mut scratch);
            for (i, score) in scratch.iter().enumerate() {
                let score = if score.is_finite() {
                    score.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                per_scorer[i * self.scorers.len() + s] = score;
                totals[i] += weight * score;
            }
        }
        let mut order = Vec::with_capacity(n);
        self.picker.pick(req, &candidates, &totals, &mut order);
        order.retain(|&i| i < n);
        let k = self.scorers.len();
        let scores = order
            .iter()
            .map(|&i| (per_scorer[i * k..(i + 1) * k].to_vec(), totals[i]))
            .collect();
        let ranked = order.iter().map(|&i| candidates[i].clone()).collect();
        Decision {
            profile: self.name.clone(),
            ranked,
            scores,
            scorer_names: self.scorers.iter().map(|(s, _)| s.name()).collect(),
        }
    }

    /// Every plugin of the profile hears that the request was sent to `chosen`.
    pub fn routed(&self, req: &SchedulingRequest<'_>, chosen: &Candidate) {
        for filter in &self.filters {
            filter.routed(req, chosen);
        }
        for (scorer, _) in &self.scorers {
            scorer.routed(req, chosen);
        }
        self.picker.routed(req, chosen);
    }

    /// Every plugin of the profile hears how the request ended.
    pub fn completed(&self, outcome: &RequestOutcome) {
        for filter in &self.filters {
            filter.completed(outcome);
        }
        for (scorer, _) in &self.scorers {
            scorer.completed(outcome);
        }
        self.picker.completed(outcome);
    }
}

/// A model's profiles, built from the config.
pub struct ModelScheduler {
    profiles: BTreeMap<String, Pipeline>,
    default: String,
}

impl ModelScheduler {
    pub fn build(
        profiles: &BTreeMap<String, ProfileConfig>,
        default: &str,
        ctx: &PluginContext,
    ) -> Result<Self, PluginError> {
        let mut built = BTreeMap::new();
        for (name, cfg) in profiles {
            built.insert(name.clone(), Pipeline::build(name, cfg, ctx)?);
        }
        Ok(Self {
            profiles: built,
            default: default.to_string(),
        })
    }

    /// The profile a request asked for, or the model's default. `None` when the
    /// requested profile does not exist (the caller answers 400).
    pub fn profile(&self, requested: Option<&str>) -> Option<&Pipeline> {
        self.profiles.get(requested.unwrap_or(&self.default))
    }

    pub fn profile_names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }
}
