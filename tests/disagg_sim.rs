//! Prefill/decode disaggregation through `kvgate serve` in front of `kvgate sim` pods that
//! take roles and speak vLLM's NixlConnector protocol: the prefill pods answer the prefill
//! leg with `kv_transfer_params`, the decode pod pulls the KV instead of computing it, and
//! every pod publishes KV events over ZeroMQ (the decode pod for the blocks it pulled). The
//! traffic trace records each request's prefill pod.

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::time::Duration;

use serde_json::{json, Value};
use sim::{model_yaml, SimPods};
use upstream::{http_request, metric, openai_sdk, wait_for, Serve};

const MODEL: &str = "qwen";
const LIMIT: Duration = Duration::from_secs(60);

/// `kvgate sim` pods of one role, publishing on ports the OS picks, at a tenth of real
/// time, generating four tokens where a request sets no `max_tokens`.
fn role_pods(dir: &std::path::Path, role: &str, pods: usize) -> SimPods {
    let config = dir.join(format!("{role}.yaml"));
    fs::write(&config, model_yaml(MODEL, "[]")).expect("write sim config");
    SimPods::start(
        &config,
        pods,
        &[
            &["--role", role][..],
            &sim::PUBLISHING,
            &["--default-max-tokens", "4"],
        ]
        .concat(),
    )
}

/// Static pod entries of `sim`'s pods with their role.
fn entries(sim: &SimPods, role: &str) -> Vec<String> {
    sim.connect_entries(MODEL)
        .into_iter()
        .map(|entry| format!("{}, role: {role}}}", entry.trim_end_matches('}')))
        .collect()
}

/// A chat over a document of about 1,500 tokens (`n` picks which), asking `question`.
fn document_chat(n: usize, question: &str) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("{}\n\n{question}", sim::document(n))}],
        "max_tokens": 3,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

#[test]
fn sim_pods_with_roles_serve_a_pd_profile_and_the_prefill_pod_is_chosen_by_its_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefill = role_pods(dir.path(), "prefill", 2);
    let decode = role_pods(dir.path(), "decode", 1);
    let pods: Vec<String> = entries(&prefill, "prefill")
        .into_iter()
        .chain(entries(&decode, "decode"))
        .collect();
    let config = dir.path().join("kvgate.yaml");
    let yaml = format!(
        "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  healthCheckIntervalMs: 0
  scrapeIntervalMs: 0
  threads: 2
events:
  mode: connect
  replay: true
logging:
  level: info
  format: json
trace: {{path: trace.jsonl}}
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: kv-cache, weight: 2}}, {{name: load, weight: 1}}]
    picker: {{name: max-score}}
    prefill: {{minUncachedTokens: 0}}
{}",
        model_yaml(MODEL, &format!("[{}]", pods.join(", ")))
    );
    fs::write(&config, yaml).expect("write config");
    let (serve, listening) = Serve::start(&config, &dir.path().join("kvgate.log"), &[]);
    wait_for("kvgate ready", LIMIT, || {
        (http_request(listening.admin, "GET", "/readyz", &[], b"").0 == 200).then_some(())
    });
    let prefill_http: Vec<&str> = (0..2).map(|i| prefill.field(i, "http")).collect();
    let decode_http = decode.field(0, "http");

    // The openai SDK streams through both legs.
    let out = openai_sdk(
        &format!("http://127.0.0.1:{}/v1", listening.proxy),
        MODEL,
        "stream",
    );
    assert_eq!(out["usage"]["completion_tokens"], 4, "{out}");
    assert!(
        out["content"].as_str().is_some_and(|c| !c.is_empty()),
        "{out}"
    );
    let line = wait_for("the SDK request's log line", LIMIT, || {
        serve.handled().into_iter().next()
    });
    assert_eq!(line["disaggregation"], "two_legs", "{line}");
    assert_eq!(line["endpoint"], decode_http);
    assert!(prefill_http.contains(&line["prefill_endpoint"].as_str().unwrap_or("")));

    // A long prompt, cold everywhere: the prefill pod computes it all, the decode pod
    // pulls it (it reports the pulled prompt, all but the recomputed last token, as cached).
    let chat = |id: &str, body: &Value| {
        let (status, response) = http_request(
            listening.proxy,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json"), ("x-request-id", id)],
            body.to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&response));
        serve.wait_handled(id)
    };
    let first = chat("doc-1", &document_chat(1, "Which drawer holds fact1x3?"));
    assert_eq!(first["disaggregation"], "two_legs", "{first}");
    assert_eq!(first["prefill_actual_cached_tokens"], 0, "{first}");
    let prompt_tokens = first["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert_eq!(first["actual_cached_tokens"], prompt_tokens - 1, "{first}");
    let warm_prefill = first["prefill_endpoint"]
        .as_str()
        .expect("prefill pod")
        .to_owned();

    // Both the prefill pod and the decode pod (for the blocks it pulled) publish them.
    let full_blocks = prompt_tokens / sim::BLOCK as u64;
    wait_for("both pods' blocks in the index", LIMIT, || {
        (metric(listening.admin, "kvgate_index_entries") >= (2 * full_blocks) as f64).then_some(())
    });

    // The same document, another question: the prefill leg goes to the pod holding the
    // document, which reuses exactly what kvgate predicted; the decode pod is credited
    // with the blocks it pulled last time.
    let second = chat("doc-2", &document_chat(1, "Which drawer holds fact1x4?"));
    assert_eq!(second["disaggregation"], "two_legs", "{second}");
    assert_eq!(
        second["prefill_endpoint"],
        warm_prefill.as_str(),
        "{second}"
    );
    let predicted = second["prefill_predicted_cached_tokens"].as_u64();
    assert!(predicted > Some(1_000), "{second}");
    assert_eq!(
        predicted,
        second["prefill_actual_cached_tokens"].as_u64(),
        "{second}"
    );
    assert!(
        second["predicted_cached_tokens"].as_u64() > Some(1_000),
        "{second}"
    );

    // The traffic trace names the prefill pod of each request, with its leg's accounting.
    let trace = dir.path().join("trace.jsonl");
    let lines = wait_for("the three requests in the trace", LIMIT, || {
        let lines: Vec<Value> = fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (lines.len() == 3).then_some(lines)
    });
    for line in &lines {
        assert_eq!(line["pod"], decode_http, "{line}");
        assert!(prefill_http.contains(&line["prefill_pod"].as_str().unwrap_or("")));
    }
    let warm = lines
        .iter()
        .find(|l| l["prefill_actual_cached_tokens"].as_u64() > Some(1_000))
        .expect("the second document request");
    assert_eq!(warm["prefill_pod"], warm_prefill.as_str(), "{warm}");
    assert_eq!(
        warm["prefill_predicted_cached_tokens"],
        warm["prefill_actual_cached_tokens"]
    );
    assert_eq!(warm["input_length"], second["prompt_tokens"], "{warm}");
}

#[test]
fn a_pod_refuses_the_leg_its_role_does_not_take_with_an_openai_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefill = role_pods(dir.path(), "prefill", 1);
    let decode = role_pods(dir.path(), "decode", 1);
    let port = |sim: &SimPods| {
        sim.field(0, "http")
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("port")
    };
    let leg = |transfer: Value| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "kv_transfer_params": transfer})
        .to_string()
    };
    let prefill_leg = leg(json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null}));
    let decode_leg = leg(json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_engine_id": "e", "remote_block_ids": [], "remote_host": "127.0.0.1", "remote_port": 1}));
    let headers = [("content-type", "application/json")];
    let post = |port: u16, body: &str| {
        let (status, body) = http_request(
            port,
            "POST",
            "/v1/chat/completions",
            &headers,
            body.as_bytes(),
        );
        (
            status,
            serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    for (pod, body, leg) in [
        (&decode, &prefill_leg, "prefill"),
        (&prefill, &decode_leg, "decode"),
    ] {
        let (status, error) = post(port(pod), body);
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], "kv_transfer_params", "{error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("no {leg} legs"))),
            "{error}"
        );
    }
    // A decode leg without where to pull from is refused as vLLM's connector would fail it.
    let (status, error) = post(port(&decode), &leg(json!({"do_remote_prefill": true})));
    assert_eq!(
        (status, error["error"]["param"].clone()),
        (400, json!("kv_transfer_params"))
    );
    // The prefill pod's answer says where its KV is.
    let (status, answer) = post(port(&prefill), &prefill_leg);
    assert_eq!(status, 200, "{answer}");
    let transfer = &answer["kv_transfer_params"];
    assert_eq!(transfer["do_remote_prefill"], true, "{answer}");
    assert_eq!(transfer["remote_port"], port(&prefill));
    assert!(transfer["remote_engine_id"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert!(transfer["remote_block_ids"].is_array(), "{answer}");
}
