//! Canary splits: one `model` name clients send, spread over LoRA adapters (or the base
//! model) by weight (`models[].adapterSplits`). The chosen name replaces `model` in the
//! body the pod receives, so the pod runs the adapter the split picked; everything else in
//! the body is forwarded byte for byte.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::AdapterWeight;

/// A split's targets with their cumulative shares, built once per config.
#[derive(Debug)]
pub struct AdapterSplit {
    targets: Vec<String>,
    /// Running sums of the weights, normalized so the last is 1.
    cumulative: Vec<f64>,
}

impl AdapterSplit {
    /// From validated targets (weights finite, ≥ 0, not all 0).
    pub fn new(targets: &[AdapterWeight]) -> Self {
        let total: f64 = targets.iter().map(|t| t.weight).sum();
        let mut sum = 0.0;
        let cumulative = targets
            .iter()
            .map(|t| {
                sum += t.weight;
                sum / total
            })
            .collect();
        Self {
            targets: targets.iter().map(|t| t.adapter.clone()).collect(),
            cumulative,
        }
    }

    /// The target a uniform draw in [0, 1) lands on. A target of weight 0 is never chosen.
    pub fn choose(&self, draw: f64) -> &str {
        let at = self
            .cumulative
            .iter()
            .position(|&upto| draw < upto)
            .unwrap_or(self.targets.len() - 1);
        &self.targets[at]
    }
}

/// The top-level `model` value of a JSON body, where it lies in the body.
#[derive(Deserialize)]
struct ModelField<'a> {
    #[serde(borrow)]
    model: &'a RawValue,
}

/// `body` with its top-level `model` replaced by `model`; `None` when the body is not a
/// JSON object with one `model` field.
pub fn replace_model(body: &[u8], model: &str) -> Option<Bytes> {
    // A struct also deserializes from an array: only an object has a `model` field.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let field: ModelField<'_> = serde_json::from_slice(body).ok()?;
    let raw = field.model.get();
    // The raw value borrows from `body`: its offset is where the old value starts.
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start + raw.len();
    let value = serde_json::to_string(model).ok()?;
    let mut out = Vec::with_capacity(body.len() - raw.len() + value.len());
    out.extend_from_slice(body.get(..start)?);
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(body.get(end..)?);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(weights: &[(&str, f64)]) -> AdapterSplit {
        let targets: Vec<AdapterWeight> = weights
            .iter()
            .map(|(adapter, weight)| AdapterWeight {
                adapter: adapter.to_string(),
                weight: *weight,
            })
            .collect();
        AdapterSplit::new(&targets)
    }

    #[test]
    fn draws_land_in_proportion_to_the_weights() {
        let canary = split(&[("v1", 90.0), ("off", 0.0), ("v2", 10.0)]);
        assert_eq!(canary.choose(0.0), "v1");
        assert_eq!(canary.choose(0.899), "v1");
        assert_eq!(canary.choose(0.9), "v2");
        assert_eq!(canary.choose(0.999_999), "v2");
        let picks = (0..1000)
            .map(|i| canary.choose(f64::from(i) / 1000.0))
            .filter(|&t| t == "v2")
            .count();
        assert_eq!(picks, 100);
    }

    #[test]
    fn only_the_model_value_changes() {
        let body = br#"{"messages":[{"role":"user","content":"\"model\": \"x\""}], "model" : "sql" ,"n":1}"#;
        let out = replace_model(body, "sql-v2\"").expect("an object with a model");
        assert_eq!(
            &out[..],
            &br#"{"messages":[{"role":"user","content":"\"model\": \"x\""}], "model" : "sql-v2\"" ,"n":1}"#[..]
        );
        assert_eq!(replace_model(b" [\"a\"]", "b"), None);
        assert_eq!(replace_model(br#"{"model":"a","model":"b"}"#, "c"), None);
    }
}
