//! The prefill leg of a disaggregated request, as vLLM's reference P/D proxy runs it.
//!
//! The decode pod is already chosen (the profile's own pipeline, among `decode` and
//! `both` pods). When it has most of the prompt cached (fewer uncached tokens than the
//! profile's `prefill.minUncachedTokens`) it serves the request alone. Otherwise the
//! prefill pipeline picks a prefill pod, which gets the client's body turned into a
//! one-token, non-streamed completion asking it to keep the KV for a remote decoder
//! (`kv_transfer_params.do_remote_decode`); its answer's `kv_transfer_params` (where
//! the KV is) goes into the decode leg, which is the client's body otherwise unchanged
//! and is forwarded and streamed like any request. Both legs carry the request id.
//!
//! A prefill leg that fails in any way (no prefill pod, not delivered, an error status,
//! a timeout, an answer without `kv_transfer_params`) costs only time: the decode pod
//! then computes the prompt itself. The prefill pod never produces output the client
//! sees, so this does not break the rule that a generation is never sent twice.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pingora::proxy::Session;
use serde_json::{json, Map, Value};

use super::body::BodyHold;
use super::forward::{Exchange, ForwardError, ForwardSettings, Target};
use super::log::{PrefillLeg, RequestCtx};
use super::KvGateProxy;
use crate::metrics::RequestRecord;
use crate::plugins::{RequestOutcome, SchedulingRequest};
use crate::pods::PodSet;
use crate::scheduler::PrefillStage;

/// Largest prefill answer read: a one-token completion is well under a kilobyte, plus
/// `kv_transfer_params` (a list of block ids: a few bytes per 16 prompt tokens).
const MAX_PREFILL_RESPONSE: usize = 4 << 20;
/// What the decode leg's body is charged beyond the client's: the transfer params (their
/// block ids grow with the prompt; this covers a few hundred thousand tokens).
const MAX_TRANSFER_PARAMS: usize = 64 << 10;

/// How a disaggregated request is served, for the log line and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisaggPath {
    /// The prefill pod computed the prompt; the decode pod pulled its KV.
    TwoLegs,
    /// The decode pod had enough of the prompt cached to serve it alone.
    DecodeAlone,
    /// The prefill leg failed; the decode pod computed the prompt itself.
    PrefillFailed,
}

impl DisaggPath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TwoLegs => "two_legs",
            Self::DecodeAlone => "decode_alone",
            Self::PrefillFailed => "prefill_failed",
        }
    }
}

/// Why a body could not be turned into a leg's body.
#[derive(Debug, thiserror::Error)]
pub enum LegBodyError {
    #[error("the request body is not a JSON object")]
    NotAnObject,
    #[error("the prefill pod's answer has no `kv_transfer_params` object")]
    NoTransferParams,
}

fn object(body: &[u8]) -> Result<Map<String, Value>, LegBodyError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(LegBodyError::NotAnObject),
    }
}

fn to_bytes(map: Map<String, Value>) -> Bytes {
    Bytes::from(serde_json::to_vec(&Value::Object(map)).unwrap_or_default())
}

/// The prefill leg's body: the client's, made a one-token non-streamed completion whose
/// KV the pod keeps for a remote decoder (vLLM's `toy_proxy_server.py`).
pub fn prefill_body(client: &[u8]) -> Result<Bytes, LegBodyError> {
    let mut map = object(client)?;
    map.insert("stream".into(), Value::Bool(false));
    map.insert("max_tokens".into(), json!(1));
    if map.contains_key("max_completion_tokens") {
        map.insert("max_completion_tokens".into(), json!(1));
    }
    for key in ["stream_options", "min_tokens", "min_completion_tokens"] {
        map.remove(key);
    }
    map.insert(
        "kv_transfer_params".into(),
        json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    Ok(to_bytes(map))
}

/// The decode leg's body: the client's, plus the `kv_transfer_params` object of the
/// prefill pod's answer, unchanged.
pub fn decode_body(client: &[u8], prefill_answer: &[u8]) -> Result<Bytes, LegBodyError> {
    let params = match object(prefill_answer)
        .map_err(|_| LegBodyError::NoTransferParams)?
        .remove("kv_transfer_params")
    {
        Some(params @ Value::Object(_)) => params,
        _ => return Err(LegBodyError::NoTransferParams),
    };
    let mut map = object(client)?;
    map.insert("kv_transfer_params".into(), params);
    Ok(to_bytes(map))
}

/// What the prefill leg leaves for the decode leg.
pub(super) enum PrefillOutcome {
    /// Send the decode pod this body (the client's, or with the transferred KV's params).
    Decode(Bytes),
    /// The client left while the prefill leg ran.
    ClientGone,
}

/// The parts of the request the prefill leg needs.
pub(super) struct PrefillInput<'a> {
    pub stage: &'a PrefillStage,
    pub request: &'a SchedulingRequest<'a>,
    pub pods: &'a PodSet,
    /// Uncached prompt tokens on the chosen decode pod.
    pub decode_uncached: usize,
    pub exchange: &'a Exchange<'a>,
    pub settings: &'a ForwardSettings,
    /// The client body's charge to the body budget: the two legs' bodies are charged too.
    pub hold: &'a mut BodyHold,
}

impl KvGateProxy {
    /// Runs the prefill leg when the decode pod needs one; says what the decode pod gets.
    pub(super) async fn prefill_leg(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        input: PrefillInput<'_>,
    ) -> PrefillOutcome {
        let client_body = input.exchange.body;
        if input.decode_uncached < input.stage.min_uncached_tokens {
            ctx.disaggregation = Some(DisaggPath::DecodeAlone);
            return PrefillOutcome::Decode(client_body.clone());
        }
        let pipeline = &input.stage.pipeline;
        let decision = pipeline.schedule(input.request, input.pods);
        let mut leg = PrefillLeg {
            scores: decision.scores_summary(),
            ..PrefillLeg::default()
        };
        let fallback = |ctx: &mut RequestCtx, mut leg: PrefillLeg, error: String| {
            tracing::warn!(request_id = %ctx.request_id, %error, "prefill leg failed; the decode pod computes the prompt itself");
            leg.error = Some(error);
            ctx.prefill = Some(leg);
            ctx.disaggregation = Some(DisaggPath::PrefillFailed);
            PrefillOutcome::Decode(client_body.clone())
        };
        // The legs' bodies are copies of the client's (the decode leg's grows by the transfer
        // params): charged up front, so that the budget bounds what all requests hold.
        if let Err(error) = input.hold.grow(2 * client_body.len() + MAX_TRANSFER_PARAMS) {
            return fallback(ctx, leg, error.to_string());
        }
        let body = match prefill_body(client_body) {
            Ok(body) => body,
            Err(error) => return fallback(ctx, leg, error.to_string()),
        };
        let mut header = input.exchange.header.clone();
        if let Err(error) = header.insert_header(http::header::CONTENT_LENGTH, body.len()) {
            return fallback(ctx, leg, error.to_string());
        }
        let targets: Vec<Target> = decision
            .ranked
            .iter()
            .map(|c| Target {
                pod: Arc::clone(&c.pod),
                uncached_tokens: c.uncached_tokens(input.request) as u64,
            })
            .collect();
        let exchange = Exchange {
            header: &header,
            body: &body,
            request_id: input.exchange.request_id,
        };
        let gateway = &self.gateway;
        let now_ms = || gateway.now().as_millis() as u64;
        let sent_at = Instant::now();
        let (report, answer) = self
            .forwarder
            .fetch(
                session,
                &exchange,
                &targets,
                input.settings,
                &now_ms,
                &mut |i| {
                    if let Some(chosen) = decision.ranked.get(i) {
                        pipeline.routed(input.request, chosen);
                    }
                },
                MAX_PREFILL_RESPONSE,
            )
            .await;
        leg.status = report.status;
        leg.actual_cached_tokens = report.usage.and_then(|u| u.cached_tokens);
        leg.duration = Some(sent_at.elapsed());
        let status_ok = report.status.is_some_and(|s| (200..300).contains(&s));
        if let Some(candidate) = report.target.and_then(|i| decision.ranked.get(i)) {
            let prompt_tokens = input.request.prompt_tokens;
            let predicted =
                (candidate.cached_blocks as usize * input.request.block_size).min(prompt_tokens);
            leg.endpoint = Some(candidate.pod.addr());
            leg.predicted_cached_tokens = Some(predicted);
            pipeline.completed(&RequestOutcome {
                pod: Arc::clone(&candidate.pod),
                prompt_tokens,
                queued_uncached_tokens: report.queued_uncached_tokens,
                predicted_cached_tokens: predicted,
                actual_cached_tokens: leg.actual_cached_tokens.map(|n| n as usize),
                time_to_first_token: report.time_to_first_byte,
                success: report.error.is_none() && status_ok,
            });
            if report.error.is_none() && report.status.is_some() {
                crate::metrics::global().prefill_leg_finished(&RequestRecord {
                    model: input.request.model,
                    pod: leg.endpoint,
                    policy: pipeline.name(),
                    status: report.status.unwrap_or(0),
                    ttft: None,
                    total: sent_at.elapsed(),
                    prompt_tokens,
                    predicted_cached: predicted,
                    actual_cached: leg.actual_cached_tokens.map(|n| n as usize),
                });
            }
        }
        match report.error {
            Some(ForwardError::ClientGone) => {
                leg.error = Some(ForwardError::ClientGone.to_string());
                ctx.prefill = Some(leg);
                ctx.disaggregation = Some(DisaggPath::TwoLegs);
                return PrefillOutcome::ClientGone;
            }
            Some(error) => return fallback(ctx, leg, error.to_string()),
            None if !status_ok => {
                let error = format!("prefill pod answered {}", report.status.unwrap_or_default());
                return fallback(ctx, leg, error);
            }
            None => {}
        }
        match decode_body(client_body, &answer) {
            Ok(body) => {
                ctx.prefill = Some(leg);
                ctx.disaggregation = Some(DisaggPath::TwoLegs);
                PrefillOutcome::Decode(body)
            }
            Err(error) => fallback(ctx, leg, error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_body_is_a_one_token_unstreamed_completion_asking_for_remote_decode() {
        let client = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,
            "stream_options":{"include_usage":true},"max_tokens":64,"max_completion_tokens":64,
            "min_tokens":3,"min_completion_tokens":3,"temperature":0.5}"#;
        let body: Value = serde_json::from_slice(&prefill_body(client).unwrap()).unwrap();
        assert_eq!(body["stream"], false);
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(body["max_completion_tokens"], 1);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["messages"][0]["content"], "hi");
        for removed in ["stream_options", "min_tokens", "min_completion_tokens"] {
            assert!(body.get(removed).is_none(), "{removed}");
        }
        assert_eq!(
            body["kv_transfer_params"],
            json!({"do_remote_decode": true, "do_remote_prefill": false,
                   "remote_engine_id": null, "remote_block_ids": null,
                   "remote_host": null, "remote_port": null})
        );
        let plain: Value =
            serde_json::from_slice(&prefill_body(br#"{"model":"m","prompt":"x"}"#).unwrap())
                .unwrap();
        assert!(plain.get("max_completion_tokens").is_none());
    }

    #[test]
    fn the_decode_body_is_the_clients_plus_the_prefill_pods_transfer_params() {
        let client = br#"{"model":"m","prompt":"x","stream":true,"max_tokens":9}"#;
        let answer = br#"{"id":"c","choices":[],"kv_transfer_params":{"do_remote_prefill":true,
            "remote_engine_id":"e1","remote_block_ids":[1,2],"remote_host":"10.0.0.2","remote_port":5600}}"#;
        let body: Value = serde_json::from_slice(&decode_body(client, answer).unwrap()).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 9);
        assert_eq!(
            body["kv_transfer_params"]["remote_block_ids"],
            json!([1, 2])
        );
        assert_eq!(body["kv_transfer_params"]["remote_engine_id"], "e1");
        for bad in [&br#"{"kv_transfer_params":null}"#[..], b"not json", b"[]"] {
            assert!(matches!(
                decode_body(client, bad),
                Err(LegBodyError::NoTransferParams)
            ));
        }
        assert!(matches!(
            prefill_body(b"[1]"),
            Err(LegBodyError::NotAnObject)
        ));
    }
}
