//! `kvgate serve` end to end: real clients (curl, the openai SDK, raw sockets) against
//! kvgate in a subprocess, in front of fake vLLM pods in Python processes.

// Shared with the other end-to-end tests; each uses part of it.
#[allow(dead_code)]
mod upstream;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use upstream::{
    chat_body, connect, curl, http_request, openai_sdk, parse_head, wait_for, write_file,
    write_request, ClosedPort, FakePod, GatewayConfig, Kvgate,
};

fn one_pod_gateway() -> (FakePod, Kvgate) {
    let pod = FakePod::start();
    let gateway = Kvgate::start(&GatewayConfig::default().with_model("qwen", &[pod.addr()]));
    (pod, gateway)
}

fn error_of(body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).expect("error body is JSON");
    v["error"].clone()
}

/// A chat body of about `size` bytes: a short prompt, padded in `user` (which kvgate
/// neither tokenizes nor touches) so large bodies stay cheap to route.
fn padded_chat_body(size: usize) -> Vec<u8> {
    let head = chat_body("qwen", "hello there", false);
    let pad = "p".repeat(size.saturating_sub(head.len() + 12));
    let mut v: Value = serde_json::from_str(&head).expect("json");
    v["user"] = Value::String(pad);
    serde_json::to_vec(&v).expect("json")
}

#[test]
fn large_body_is_forwarded_byte_identical_with_request_id() {
    let (pod, gateway) = one_pod_gateway();
    let dir = tempfile::tempdir().expect("tempdir");
    let body = padded_chat_body(5 << 20);
    let file = write_file(dir.path(), "body.json", &body);
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "content-type: application/json",
        "-H",
        "x-request-id: big-body-1",
        "--data-binary",
        &format!("@{}", file.display()),
        &gateway.url("/v1/chat/completions"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let received = pod.requests();
    let last = received.last().expect("pod got the request");
    assert_eq!(last["body_len"], body.len());
    assert_eq!(last["body_sha256"], hex::encode(Sha256::digest(&body)));
    assert_eq!(last["headers"]["x-request-id"], "big-body-1");
    assert_eq!(last["headers"]["content-length"], body.len().to_string());
    assert!(last["headers"].get("transfer-encoding").is_none());

    // Without an id, kvgate makes one and the pod and the client both see it.
    let out = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "content-type: application/json",
        "--data",
        &chat_body("qwen", "hi", false),
        &gateway.url("/v1/chat/completions"),
    ]);
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .map(|s| s.trim().to_string())
        .expect("response carries x-request-id");
    assert_eq!(
        pod.requests().last().expect("request")["headers"]["x-request-id"],
        id.as_str()
    );
    assert_eq!(id.len(), 36, "a generated UUID: {id}");
}

#[test]
fn chunked_upload_reaches_the_pod_whole_with_content_length() {
    let (pod, gateway) = one_pod_gateway();
    let dir = tempfile::tempdir().expect("tempdir");
    let body = padded_chat_body(300 << 10);
    let file = write_file(dir.path(), "body.json", &body);
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "content-type: application/json",
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
        &format!("@{}", file.display()),
        &gateway.url("/v1/chat/completions"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let last = pod.requests().pop().expect("pod got the request");
    assert_eq!(last["body_sha256"], hex::encode(Sha256::digest(&body)));
    assert_eq!(last["headers"]["content-length"], body.len().to_string());
    assert!(last["headers"].get("transfer-encoding").is_none());
}

#[test]
fn expect_100_continue_is_answered_before_the_body_and_before_the_pod_is_involved() {
    let (pod, gateway) = one_pod_gateway();
    let body = padded_chat_body(2 << 20);
    let mut stream = connect(gateway.port);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nx-request-id: continue-1\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("write head");
    // Nothing of the body is sent until the interim response arrives: kvgate must answer
    // it by itself, without the body and before any pod has seen the request (a gateway
    // that waited for the upstream, or for the body, would leave this read hanging).
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    while parse_head(&received).is_none() {
        let n = stream.read(&mut buf).expect("read the interim response");
        assert!(
            n > 0,
            "kvgate closed the connection instead of answering 100"
        );
        received.extend_from_slice(&buf[..n]);
    }
    let (status, interim, after) = parse_head(&received).expect("interim head");
    assert_eq!(status, 100, "{interim}");
    assert!(
        pod.requests().is_empty(),
        "the pod saw the request before the client sent its body"
    );
    stream.write_all(&body).expect("write body");
    let mut response = received[after..].to_vec();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let (status, head, _) = parse_head(&response).expect("final head");
    assert_eq!(status, 200, "{head}");
    let received = pod.requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["body_len"], body.len());
    assert_eq!(
        received[0]["body_sha256"],
        hex::encode(Sha256::digest(&body))
    );
    assert!(
        received[0]["headers"].get("expect").is_none(),
        "Expect is not forwarded"
    );

    // curl waits for the 100 too (its --expect100-timeout is the only bound it has).
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file(dir.path(), "body.json", &body);
    let out = curl(&[
        "-v",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "content-type: application/json",
        "-H",
        "expect: 100-continue",
        "--expect100-timeout",
        "30",
        "--data-binary",
        &format!("@{}", file.display()),
        &gateway.url("/v1/chat/completions"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP/1.1 100 Continue"),
        "{out:?}"
    );
}

#[test]
fn oversized_bodies_get_413_declared_or_chunked() {
    let pod = FakePod::start();
    let gateway = Kvgate::start(
        &GatewayConfig {
            max_body_bytes: 1 << 20,
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[pod.addr()]),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file(dir.path(), "body.json", &padded_chat_body(2 << 20));
    for extra in [None, Some("transfer-encoding: chunked")] {
        let mut args = vec![
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
        ];
        if let Some(h) = extra {
            args.extend(["-H", h]);
        }
        let data = format!("@{}", file.display());
        let url = gateway.url("/v1/chat/completions");
        args.extend(["--data-binary", &data, &url]);
        let out = curl(&args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').expect("curl output");
        assert_eq!(
            code,
            "413",
            "{extra:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let error = error_of(body.as_bytes());
        assert_eq!(error["code"], "request_too_large");
        assert_eq!(error["type"], "invalid_request_error");
    }
    assert!(pod.requests().is_empty(), "nothing reaches the pod");
}

#[test]
fn client_errors_are_openai_shaped() {
    let (pod, gateway) = one_pod_gateway();
    let json = [("content-type", "application/json")];
    let (status, body) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &json,
        b"{\"model\": ",
    );
    assert_eq!(status, 400);
    let error = error_of(&body);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "invalid_json");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));

    let (status, body) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &json,
        br#"{"model":"qwen","messages":"hi"}"#,
    );
    assert_eq!(status, 400);
    let error = error_of(&body);
    assert_eq!(error["param"], "messages");
    assert_eq!(error["code"], "invalid_type");

    let (status, body) = http_request(
        gateway.port,
        "POST",
        "/v1/completions",
        &json,
        br#"{"model":"nope","prompt":"x"}"#,
    );
    assert_eq!(status, 404);
    assert_eq!(error_of(&body)["code"], "model_not_found");

    let (status, body) = http_request(gateway.port, "GET", "/v1/chat/completions", &[], b"");
    assert_eq!(status, 405);
    assert_eq!(error_of(&body)["code"], "method_not_allowed");

    let (status, body) = http_request(gateway.port, "GET", "/nothing-here", &[], b"");
    assert_eq!(status, 404);
    assert_eq!(error_of(&body)["code"], "unknown_url");

    // A profile the config does not define: refused, naming the ones it does.
    let (status, body) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-kvgate-profile", "no-such-profile"),
        ],
        chat_body("qwen", "hi", false).as_bytes(),
    );
    assert_eq!(status, 400);
    let error = error_of(&body);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "unknown_profile");
    let message = error["message"].as_str().expect("message");
    for part in ["no-such-profile", "x-kvgate-profile", "default"] {
        assert!(message.contains(part), "{message}");
    }

    let sdk = openai_sdk(&gateway.url("/v1"), "nope", "unknown-model");
    assert_eq!(sdk["error"], "not_found");
    assert_eq!(sdk["code"], "model_not_found");
    assert!(pod.requests().is_empty(), "nothing reaches the pod");
}

#[test]
fn models_come_from_config_and_other_v1_paths_are_forwarded() {
    let pod = FakePod::start();
    let gateway = Kvgate::start(
        &GatewayConfig::default()
            .with_model("qwen", &[pod.addr()])
            .with_lora("qwen", "qwen-sql"),
    );
    let (status, body) = http_request(gateway.port, "GET", "/v1/models", &[], b"");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "qwen");
    assert_eq!(models["data"][1]["id"], "qwen-sql");
    assert_eq!(models["data"][1]["parent"], "qwen");

    // A LoRA adapter routes to its base model's pods, the name passed on unchanged.
    let json = [
        ("content-type", "application/json"),
        ("x-request-id", "lora-1"),
    ];
    let body = chat_body("qwen-sql", "select", false);
    let (status, _) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &json,
        body.as_bytes(),
    );
    assert_eq!(status, 200);
    let line = gateway.wait_handled("lora-1");
    assert_eq!(line["model"], "qwen-sql");
    assert_eq!(line["target_model"], "qwen");
    assert_eq!(
        pod.requests().pop().expect("request")["body_sha256"],
        hex::encode(Sha256::digest(body.as_bytes()))
    );

    let sent = br#"{"model":"qwen","input":"hi"}"#;
    let (status, body) = http_request(
        gateway.port,
        "POST",
        "/v1/embeddings",
        &[("content-type", "application/json")],
        sent,
    );
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(echo["path"], "/v1/embeddings");
    assert_eq!(echo["body_len"], sent.len());
    let (status, _) = http_request(gateway.port, "GET", "/v1/files?purpose=batch", &[], b"");
    assert_eq!(status, 200, "the only model's pod takes body-less requests");
    let paths: Vec<Value> = pod.requests().iter().map(|r| r["path"].clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/files?purpose=batch"
        ]
    );
}

#[test]
fn sse_streams_token_by_token() {
    let (_pod, gateway) = one_pod_gateway();
    let tokens = 6;
    let delay_ms = 250;
    let mut stream = connect(gateway.port);
    write_request(
        &mut stream,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-fake-tokens", &tokens.to_string()),
            ("x-fake-delay-ms", &delay_ms.to_string()),
        ],
        chat_body("qwen", "count", true).as_bytes(),
        true,
    );
    let start = Instant::now();
    let mut received = Vec::new();
    let mut token_arrivals = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("read stream");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
        let seen = String::from_utf8_lossy(&received)
            .matches("\"content\"")
            .count();
        while token_arrivals.len() < seen {
            token_arrivals.push(start.elapsed());
        }
    }
    let (status, head, _) = parse_head(&received).expect("head");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/event-stream"));
    assert!(String::from_utf8_lossy(&received).contains("data: [DONE]"));
    assert_eq!(token_arrivals.len(), tokens);
    // The pod takes (tokens × delay) to finish; unbuffered, the first token arrives
    // right after the first delay and the tokens spread over the whole stream.
    let spread = token_arrivals[tokens - 1] - token_arrivals[0];
    println!("token arrivals: {token_arrivals:?}");
    assert!(
        spread >= Duration::from_millis(delay_ms * (tokens as u64 - 2)),
        "tokens arrived bunched together: {token_arrivals:?}"
    );
}

#[test]
fn client_disconnect_mid_stream_cancels_upstream_and_frees_load() {
    let (pod, gateway) = one_pod_gateway();
    let mut stream = connect(gateway.port);
    write_request(
        &mut stream,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "goes-away"),
            ("x-fake-tokens", "200"),
            ("x-fake-delay-ms", "50"),
        ],
        chat_body("qwen", "talk a lot", true).as_bytes(),
        false,
    );
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&received)
        .matches("\"content\"")
        .count()
        < 2
    {
        let n = stream.read(&mut buf).expect("read stream");
        assert!(n > 0, "stream ended early");
        received.extend_from_slice(&buf[..n]);
    }
    drop(stream);

    let record = wait_for(
        "the pod to see the connection close",
        Duration::from_secs(10),
        || {
            pod.requests()
                .into_iter()
                .find(|r| r["headers"]["x-request-id"] == "goes-away" && r["client_closed"] == true)
        },
    );
    assert_eq!(record["completed"], false);
    let line = gateway.wait_handled("goes-away");
    assert_eq!(line["pod_in_flight"], 0, "{line}");
    assert_eq!(line["error"], "the client went away");
}

#[test]
fn dead_pod_is_retried_on_the_next_then_ejected() {
    let alive = FakePod::start();
    let closed = ClosedPort::new();
    let dead = closed.addr.to_string();
    let gateway = Kvgate::start(
        &GatewayConfig {
            eject_after_failures: 2,
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[dead.clone(), alive.addr()]),
    );
    let body = chat_body("qwen", "hello", false);
    let post = |n: usize| {
        let id = format!("retry-{n}");
        let json = [
            ("content-type", "application/json"),
            ("x-request-id", id.as_str()),
        ];
        let (status, _) = http_request(
            gateway.port,
            "POST",
            "/v1/chat/completions",
            &json,
            body.as_bytes(),
        );
        assert_eq!(status, 200, "every request is served");
        gateway.wait_handled(&id)
    };
    // Equal pods tie and the tie-break depends on the request: within a few requests
    // the dead pod comes first twice, each time retried on the live one.
    let mut failures = 0;
    let mut sent = 0;
    while failures < 2 {
        assert!(sent < 40, "the dead pod never came first");
        sent += 1;
        let line = post(sent);
        assert_eq!(line["endpoint"], alive.addr().as_str());
        if line["attempts"] == 2 {
            failures += 1;
        } else {
            assert_eq!(line["attempts"], 1, "{line}");
        }
    }
    let received = alive.requests();
    assert_eq!(received.len(), sent);
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    assert!(received.iter().all(|r| r["body_sha256"] == digest.as_str()));

    // Two consecutive failures ejected it: it is not tried again.
    for n in sent + 1..sent + 13 {
        let line = post(n);
        assert_eq!(line["attempts"], 1, "an ejected pod was tried: {line}");
        assert!(
            line["scores"].as_str().is_some_and(|s| !s.contains(&dead)),
            "{line}"
        );
    }
}

#[test]
fn no_healthy_pod_gives_503() {
    let pod = FakePod::start();
    // Without a panic threshold, failing every check leaves nothing to route to.
    let gateway = Kvgate::start(
        &GatewayConfig {
            health_check_interval_ms: 100,
            profiles: Some(
                "  default:
    filters: [{name: healthy, params: {panicThresholdPercent: 0}}]
    scorers: [{name: kv-cache}, {name: load}]
"
                .into(),
            ),
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[pod.addr()])
        .with_model("idle", &[]),
    );
    let json = [("content-type", "application/json")];
    let (status, body) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &json,
        chat_body("idle", "x", false).as_bytes(),
    );
    assert_eq!(status, 503);
    assert_eq!(error_of(&body)["code"], "no_healthy_pod");

    pod.set_healthy(false);
    let body = wait_for(
        "the health check to fail the pod",
        Duration::from_secs(10),
        || {
            let (status, body) = http_request(
                gateway.port,
                "POST",
                "/v1/chat/completions",
                &json,
                chat_body("qwen", "x", false).as_bytes(),
            );
            (status == 503).then_some(body)
        },
    );
    let error = error_of(&body);
    assert_eq!(error["code"], "no_healthy_pod");
    assert_eq!(error["type"], "server_error");

    pod.set_healthy(true);
    wait_for(
        "the health check to restore the pod",
        Duration::from_secs(10),
        || {
            let (status, _) = http_request(
                gateway.port,
                "POST",
                "/v1/chat/completions",
                &json,
                chat_body("qwen", "x", false).as_bytes(),
            );
            (status == 200).then_some(())
        },
    );
}

#[test]
fn openai_sdk_streaming_and_not_and_the_log_line() {
    let (_pod, gateway) = one_pod_gateway();
    let result = openai_sdk(&gateway.url("/v1"), "qwen", "complete");
    assert_eq!(result["content"], "tok0 tok1 tok2 tok3");
    assert_eq!(
        result["usage"]["prompt_tokens_details"]["cached_tokens"],
        16
    );

    let result = openai_sdk(&gateway.url("/v1"), "qwen", "stream");
    assert_eq!(result["content"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(
        result["usage"]["prompt_tokens_details"]["cached_tokens"],
        16
    );

    let lines = gateway.handled();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["status"], 200);
        assert_eq!(line["model"], "qwen");
        assert_eq!(line["target_model"], "qwen");
        assert_eq!(line["endpoint"], _pod.addr().as_str());
        assert_eq!(line["policy"], "default");
        assert_eq!(line["predicted_cached_tokens"], 0);
        assert_eq!(line["actual_cached_tokens"], 16, "{line}");
        assert_eq!(line["attempts"], 1);
        assert_eq!(line["pod_in_flight"], 0);
        assert!(line["prompt_tokens"].as_u64().is_some_and(|n| n > 0));
        assert!(
            line["scores"]
                .as_str()
                .is_some_and(|s| s.contains("kv-cache:")),
            "{line}"
        );
        assert!(line["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    }
}

#[test]
fn sighup_reloads_the_config_or_keeps_the_running_one() {
    let pod = FakePod::start();
    let config = GatewayConfig::default().with_model("qwen", &[pod.addr()]);
    let gateway = Kvgate::start(&config);
    let body = padded_chat_body(2 << 20);
    let json = [("content-type", "application/json")];
    let post = || http_request(gateway.port, "POST", "/v1/chat/completions", &json, &body).0;
    assert_eq!(post(), 200);

    gateway.reload(
        &GatewayConfig {
            max_body_bytes: 1 << 20,
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[pod.addr()]),
    );
    wait_for("the reload to apply", Duration::from_secs(20), || {
        (post() == 413).then_some(())
    });

    // An invalid config is refused whole.
    gateway.reload(
        &GatewayConfig {
            max_attempts: 0,
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[pod.addr()]),
    );
    wait_for("the refusal to be logged", Duration::from_secs(20), || {
        gateway
            .log()
            .contains("config reload refused")
            .then_some(())
    });
    assert_eq!(post(), 413, "the running config stays");
    let (status, metrics) = http_request(gateway.admin_addr().port(), "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kvgate_config_reloads_total{result=\"failed\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "the refusal is counted:\n{metrics}");
}

#[test]
fn prompts_the_router_cannot_read_still_reach_a_pod() {
    let (pod, gateway) = one_pod_gateway();
    let body = serde_json::json!({
        "model": "qwen",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]}]
    })
    .to_string();
    let json = [
        ("content-type", "application/json"),
        ("x-request-id", "mm-1"),
    ];
    let (status, _) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &json,
        body.as_bytes(),
    );
    assert_eq!(status, 200);
    let line = gateway.wait_handled("mm-1");
    assert_eq!(line["prompt_tokens"], 0, "routed on load alone: {line}");
    assert_eq!(pod.requests().len(), 1);
}
