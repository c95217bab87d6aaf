//! Prefill/decode disaggregation end to end: kvgate in a subprocess in front of fake
//! vLLM pods (`fake_vllm.py`, speaking vLLM's NixlConnector request protocol) with
//! static roles, driven by the openai SDK, curl and raw HTTP. Each leg's body is checked
//! where it arrived: at the pod.

// Shared with the other end-to-end tests; each uses part of it.
#[allow(dead_code)]
mod upstream;

use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use upstream::{
    chat_body, curl, http_request, openai_sdk, wait_for, ClosedPort, FakePod, GatewayConfig, Kvgate,
};

/// The default profile made disaggregated: the prefill leg runs when at least
/// `min_uncached` prompt tokens are not cached on the decode pod.
fn pd_profile(min_uncached: usize) -> String {
    format!(
        "  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: kv-cache}}, {{name: load}}]
    prefill: {{minUncachedTokens: {min_uncached}}}
"
    )
}

/// kvgate over `prefill` pods and `decode` pods with their roles.
fn pd_gateway(prefill: &[String], decode: &[String], min_uncached: usize) -> Kvgate {
    let pods: Vec<String> = prefill.iter().chain(decode).cloned().collect();
    let mut config = GatewayConfig {
        profiles: Some(pd_profile(min_uncached)),
        ..GatewayConfig::default()
    }
    .with_model("qwen", &pods);
    for pod in prefill {
        config = config.with_role(pod, "prefill");
    }
    for pod in decode {
        config = config.with_role(pod, "decode");
    }
    Kvgate::start(&config)
}

/// POSTs a chat body with the request id and extra headers; the status.
fn post(gateway: &Kvgate, id: &str, body: &str, extra: &[(&str, &str)]) -> u16 {
    let mut headers = vec![("content-type", "application/json"), ("x-request-id", id)];
    headers.extend_from_slice(extra);
    let (status, _) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.as_bytes(),
    );
    status
}

fn completions(pod: &FakePod) -> Vec<Value> {
    pod.requests()
        .into_iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .collect()
}

fn sha256(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

#[test]
fn openai_sdk_streams_through_a_pd_profile_and_each_leg_reaches_its_pod_as_vllm_expects() {
    let prefill = FakePod::start();
    let decode = FakePod::start();
    let gateway = pd_gateway(&[prefill.addr()], &[decode.addr()], 0);

    let out = openai_sdk(&gateway.url("/v1"), "qwen", "stream");
    assert_eq!(out["content"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(out["usage"]["completion_tokens"], 4);

    let p = completions(&prefill);
    let d = completions(&decode);
    assert_eq!((p.len(), d.len()), (1, 1), "{p:?} {d:?}");
    let (p, d) = (&p[0], &d[0]);
    // The prefill leg: one token, not streamed, asking the pod to keep the KV.
    let pj = &p["json"];
    assert_eq!(pj["stream"], false);
    assert_eq!(pj["max_tokens"], 1);
    assert!(pj.get("stream_options").is_none(), "{pj}");
    assert_eq!(
        pj["kv_transfer_params"],
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null})
    );
    // The decode leg: the client's request, plus the prefill pod's transfer params.
    let dj = &d["json"];
    assert_eq!(dj["stream"], true);
    assert_eq!(dj["stream_options"]["include_usage"], true);
    assert!(dj.get("max_tokens").is_none(), "{dj}");
    assert_eq!(dj["messages"], pj["messages"]);
    assert_eq!(dj["kv_transfer_params"]["do_remote_prefill"], true);
    assert_eq!(
        dj["kv_transfer_params"]["remote_engine_id"],
        format!("fake-engine-{}", prefill.port)
    );
    assert_eq!(dj["kv_transfer_params"]["remote_port"], prefill.port);
    let id = p["headers"]["x-request-id"].as_str().expect("request id");
    assert_eq!(d["headers"]["x-request-id"], id);
    assert_eq!(
        d["headers"]["content-length"],
        d["body_len"].to_string().as_str()
    );

    // One log line names both pods, with each leg's cache accounting.
    let line = gateway.wait_handled(id);
    assert_eq!(line["status"], 200);
    assert_eq!(line["disaggregation"], "two_legs");
    assert_eq!(line["endpoint"], decode.addr().as_str());
    assert_eq!(line["prefill_endpoint"], prefill.addr().as_str());
    assert_eq!(line["prefill_status"], 200);
    assert_eq!(line["prefill_predicted_cached_tokens"], 0);
    assert_eq!(line["prefill_actual_cached_tokens"], 16);
    assert_eq!(line["actual_cached_tokens"], 16);
    assert!(line["prefill_ms"].as_f64().is_some(), "{line}");
    assert_eq!(
        gateway.metric("kvgate_disaggregated_requests_total{model=\"qwen\",path=\"two_legs\"}"),
        1.0
    );
    assert_eq!(
        gateway.metric("kvgate_prefill_leg_duration_seconds_count{model=\"qwen\"}"),
        1.0
    );
}

#[test]
fn a_decode_pod_with_most_of_the_prompt_cached_serves_it_alone() {
    let prefill = FakePod::start();
    let decode = FakePod::start();
    let gateway = pd_gateway(&[prefill.addr()], &[decode.addr()], 100_000);
    let body = chat_body("qwen", "a short prompt", true);
    assert_eq!(post(&gateway, "alone-1", &body, &[]), 200);
    let line = gateway.wait_handled("alone-1");
    assert_eq!(line["disaggregation"], "decode_alone");
    assert!(line.get("prefill_endpoint").is_none(), "{line}");
    assert!(completions(&prefill).is_empty());
    let d = completions(&decode);
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0]["body_sha256"],
        sha256(&body).as_str(),
        "sent unchanged"
    );
}

#[test]
fn a_failed_prefill_leg_falls_back_to_the_decode_pod_computing_the_prompt() {
    let prefill = FakePod::start();
    let decode = FakePod::start();
    let dead = ClosedPort::new();
    let gateway = pd_gateway(&[prefill.addr()], &[decode.addr()], 0);
    let body = chat_body("qwen", "prefill fails", false);

    // The prefill pod answers an error.
    assert_eq!(
        post(
            &gateway,
            "pf-500",
            &body,
            &[("x-fake-prefill-status", "500")]
        ),
        200
    );
    let line = gateway.wait_handled("pf-500");
    assert_eq!(line["disaggregation"], "prefill_failed");
    assert_eq!(line["prefill_status"], 500);
    assert_eq!(line["prefill_endpoint"], prefill.addr().as_str());
    assert_eq!(line["endpoint"], decode.addr().as_str());
    let d = completions(&decode);
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0]["body_sha256"],
        sha256(&body).as_str(),
        "the client's body"
    );

    // The prefill pod times out (kvgate's response timeout, as for any request).
    let slow_prefill = FakePod::start();
    let decode2 = FakePod::start();
    let config = GatewayConfig {
        profiles: Some(pd_profile(0)),
        response_timeout_ms: 500,
        ..GatewayConfig::default()
    }
    .with_model("qwen", &[slow_prefill.addr(), decode2.addr()])
    .with_role(&slow_prefill.addr(), "prefill")
    .with_role(&decode2.addr(), "decode");
    let timing_out = Kvgate::start(&config);
    assert_eq!(
        post(
            &timing_out,
            "pf-slow",
            &body,
            &[("x-fake-prefill-delay-ms", "3000")]
        ),
        200
    );
    let line = timing_out.wait_handled("pf-slow");
    assert_eq!(line["disaggregation"], "prefill_failed");
    assert!(
        line["prefill_error"]
            .as_str()
            .is_some_and(|e| e.contains("no response within")),
        "{line}"
    );
    assert_eq!(completions(&decode2).len(), 1);

    // The only prefill pod is gone: nothing to send the prefill leg to.
    let gone = pd_gateway(&[dead.addr.to_string()], &[decode.addr()], 0);
    assert_eq!(post(&gone, "pf-gone", &body, &[]), 200);
    let line = gone.wait_handled("pf-gone");
    assert_eq!(line["disaggregation"], "prefill_failed");
    assert_eq!(line["endpoint"], decode.addr().as_str());
    assert_eq!(completions(&decode).len(), 2);
    assert_eq!(
        gone.metric("kvgate_disaggregated_requests_total{model=\"qwen\",path=\"prefill_failed\"}"),
        1.0
    );
}

#[test]
fn a_decode_leg_is_retried_on_another_decode_pod_only_when_provably_undelivered() {
    let prefill = FakePod::start();
    let alive = FakePod::start();
    let dead = ClosedPort::new();
    let gateway = pd_gateway(&[prefill.addr()], &[dead.addr.to_string(), alive.addr()], 0);
    let body = chat_body("qwen", "decode retry", false);
    // Equal decode pods tie and the tie-break depends on the request: within a few
    // requests the dead one comes first and the decode leg moves to the live one.
    let mut sent = 0;
    loop {
        assert!(sent < 40, "the dead decode pod never came first");
        sent += 1;
        let id = format!("dr-{sent}");
        assert_eq!(post(&gateway, &id, &body, &[]), 200);
        let line = gateway.wait_handled(&id);
        assert_eq!(line["endpoint"], alive.addr().as_str());
        assert_eq!(line["disaggregation"], "two_legs");
        if line["attempts"] == 2 {
            break;
        }
    }
    let d = completions(&alive);
    assert_eq!(d.len(), sent);
    assert!(d
        .iter()
        .all(|r| r["json"]["kv_transfer_params"]["do_remote_prefill"] == true));
    // The prefill-only pod got prefill legs only, never a decode leg.
    let p = completions(&prefill);
    assert_eq!(p.len(), sent);
    assert!(p
        .iter()
        .all(|r| r["json"]["kv_transfer_params"]["do_remote_decode"] == true));

    // A decode pod that received the request and failed is not replaced by the other
    // live one: 502 (the prefill leg failed the same way, and fell back to it).
    let (d1, d2) = (FakePod::start(), FakePod::start());
    let gateway = pd_gateway(&[prefill.addr()], &[d1.addr(), d2.addr()], 0);
    let status = post(&gateway, "dr-hangup", &body, &[("x-fake-hangup", "1")]);
    assert_eq!(status, 502);
    let line = gateway.wait_handled("dr-hangup");
    assert_eq!(line["attempts"], 1, "{line}");
    assert_eq!(line["disaggregation"], "prefill_failed");
    assert_eq!(completions(&d1).len() + completions(&d2).len(), 1);
}

#[test]
fn a_client_that_leaves_during_the_prefill_leg_cancels_the_request() {
    let prefill = FakePod::start();
    let decode = FakePod::start();
    let gateway = pd_gateway(&[prefill.addr()], &[decode.addr()], 0);
    let out = curl(&[
        "-s",
        "--max-time",
        "1",
        "-H",
        "content-type: application/json",
        "-H",
        "x-request-id: leave-1",
        "-H",
        "x-fake-prefill-delay-ms: 4000",
        "--data",
        &chat_body("qwen", "leaving early", true),
        &gateway.url("/v1/chat/completions"),
    ]);
    assert!(!out.status.success(), "curl gave up: {out:?}");
    let line = gateway.wait_handled("leave-1");
    assert_eq!(line["error"], "the client went away");
    assert_eq!(line["prefill_endpoint"], prefill.addr().as_str());
    // The decode leg never started, and the prefill pod saw its connection close.
    wait_for("the prefill pod to finish", Duration::from_secs(10), || {
        completions(&prefill)
            .first()
            .is_some_and(|r| r["completed"] == true || r["client_closed"] == true)
            .then_some(())
    });
    assert!(completions(&decode).is_empty());
}

#[test]
fn the_legs_bodies_count_against_the_body_budget_and_a_full_budget_serves_decode_alone() {
    let prefill = FakePod::start();
    let decode = FakePod::start();
    // Room for the client's body, not for the two legs' copies of it as well.
    let config = GatewayConfig {
        profiles: Some(pd_profile(0)),
        max_body_bytes: 32 << 10,
        max_buffered_body_bytes: Some(32 << 10),
        ..GatewayConfig::default()
    }
    .with_model("qwen", &[prefill.addr(), decode.addr()])
    .with_role(&prefill.addr(), "prefill")
    .with_role(&decode.addr(), "decode");
    let gateway = Kvgate::start(&config);
    let body = chat_body("qwen", &"many words ".repeat(1_000), false);
    assert_eq!(post(&gateway, "budget-1", &body, &[]), 200);
    let line = gateway.wait_handled("budget-1");
    assert_eq!(line["disaggregation"], "prefill_failed");
    assert!(
        line["prefill_error"]
            .as_str()
            .is_some_and(|e| e.contains("maxBufferedBodyBytes")),
        "{line}"
    );
    assert!(completions(&prefill).is_empty());
    let d = completions(&decode);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["body_sha256"], sha256(&body).as_str());
}
