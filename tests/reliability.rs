//! Issue 16, reliability, with real processes: `kvgate serve` in front of `kvgate sim`
//! pods (the stand-in for vLLM with its KV events) or fake vLLM pods in Python
//! processes (`upstream/fake_vllm.py`), driven over real sockets.
//!
//! * A pod that restarts with an empty cache is predicted and routed as empty.
//! * A request a pod received is never sent to a second pod.
//! * A client cannot make kvgate hold memory it has not sent.
//! * Health fails safe: probed before ready, recovered pods admitted at once, and a
//!   fleet failing every check still served.

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use sim::{document, SimPods};
use upstream::{
    chat_body, connect, http_request, parse_head, wait_for, ClosedPort, FakePod, GatewayConfig,
    Kvgate,
};

const MODEL: &str = "qwen";
const LIMIT: Duration = Duration::from_secs(60);

/// Posts a chat body with a request id (and extra headers): (status, parsed body).
fn post_chat(gateway: &Kvgate, id: &str, extra: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json"), ("x-request-id", id)];
    headers.extend_from_slice(extra);
    let (status, body) = http_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.as_bytes(),
    );
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn admin_get(gateway: &Kvgate, path: &str) -> (u16, Vec<u8>) {
    http_request(gateway.admin_addr().port(), "GET", path, &[], b"")
}

/// `/debug/pods` of the model: each pod's `healthy`, by address.
fn pods_healthy(gateway: &Kvgate) -> Vec<(String, bool)> {
    let (status, body) = admin_get(gateway, "/debug/pods");
    assert_eq!(status, 200);
    let view: Value = serde_json::from_slice(&body).expect("pods JSON");
    view["models"][MODEL]
        .as_array()
        .expect("the model's pods")
        .iter()
        .map(|p| {
            (
                p["http"].as_str().unwrap_or_default().to_string(),
                p["healthy"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// A metric without labels from the admin listener.
fn metric(gateway: &Kvgate, name: &str) -> Option<f64> {
    let (_, text) = admin_get(gateway, "/metrics");
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn accepts(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().expect("pod address");
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

#[test]
fn a_restarted_pod_is_predicted_and_routed_as_the_empty_cache_it_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = SimPods::start_publishing(dir.path(), MODEL, 3);
    let gateway = Kvgate::start_yaml(|listen, admin| sim.gateway_config(MODEL, listen, admin, 200));
    let body =
        json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": document(0)}]})
            .to_string();

    // Two rounds of the prompt: the second finds it cached where the first went.
    let (status, first) = post_chat(&gateway, "before-1", &[], &body);
    assert_eq!(status, 200, "{first}");
    let pod = gateway.wait_handled("before-1")["endpoint"]
        .as_str()
        .expect("endpoint")
        .to_string();
    let prompt_blocks = first["usage"]["prompt_tokens"].as_f64().expect("usage") / 16.0;
    wait_for("the pod's events to be indexed", LIMIT, || {
        (metric(&gateway, "kvgate_index_entries")? >= prompt_blocks.floor()).then_some(())
    });
    let (status, _) = post_chat(&gateway, "before-2", &[], &body);
    assert_eq!(status, 200);
    let second = gateway.wait_handled("before-2");
    assert_eq!(second["endpoint"], pod.as_str(), "{second}");
    assert!(
        second["actual_cached_tokens"].as_u64() > Some(0),
        "{second}"
    );

    // The pod's process goes away and a new one, with an empty cache, takes its port.
    let (status, _) = http_request(
        pod.parse::<SocketAddr>().expect("address").port(),
        "POST",
        "/sim/restart?downMs=1500",
        &[],
        b"",
    );
    assert_eq!(status, 202);
    wait_for("the pod to go down", LIMIT, || {
        (!accepts(&pod)).then_some(())
    });
    wait_for("the pod to come back", LIMIT, || {
        accepts(&pod).then_some(())
    });
    wait_for("kvgate to route to the pod again", LIMIT, || {
        pods_healthy(&gateway)
            .contains(&(pod.clone(), true))
            .then_some(())
    });

    // kvgate predicts what the pod has (nothing) and no longer prefers it for the prefix.
    let (status, after) = post_chat(&gateway, "after-1", &[], &body);
    assert_eq!(status, 200, "{after}");
    let line = gateway.wait_handled("after-1");
    assert_eq!(
        line["predicted_cached_tokens"], line["actual_cached_tokens"],
        "kvgate predicted cached tokens the restarted pod no longer has: {line}"
    );
    let scores = line["scores"].as_str().expect("scores");
    let restarted = scores
        .split(' ')
        .find(|s| s.starts_with(&format!("{pod}=")))
        .unwrap_or_else(|| panic!("no score for {pod}: {scores}"));
    assert!(
        restarted.contains("kv-cache:0.000"),
        "the restarted pod still gets cache credit: {line}"
    );
}

#[test]
fn a_stream_the_pod_breaks_off_is_broken_off_for_the_client_too() {
    // Real time: 200 tokens take seconds to stream.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sim.yaml");
    fs::write(&config, sim::model_yaml(MODEL, "[]")).expect("write sim config");
    let sim = SimPods::start(
        &config,
        1,
        &["--events-bind-base-port", "0", "--replay-base-port", "0"],
    );
    let gateway = Kvgate::start_yaml(|listen, admin| sim.gateway_config(MODEL, listen, admin, 0));
    let body = json!({"model": MODEL, "max_tokens": 200, "stream": true,
        "messages": [{"role": "user", "content": "a long answer, please"}]})
    .to_string();
    let mut stream = connect(gateway.port);
    stream.set_read_timeout(Some(LIMIT)).expect("read timeout");
    // A keep-alive request: kvgate decides whether the connection lives on.
    upstream::write_request(
        &mut stream,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "cut-1"),
        ],
        body.as_bytes(),
        false,
    );
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("\"content\"") {
        let n = stream.read(&mut buf).expect("the stream's first tokens");
        assert!(n > 0, "closed before the first token");
        response.extend_from_slice(&buf[..n]);
    }

    // The pod's process dies mid-stream.
    let pod: SocketAddr = sim.field(0, "http").parse().expect("address");
    let (status, _) = http_request(pod.port(), "POST", "/sim/kill?downMs=60000", &[], b"");
    assert_eq!(status, 202);

    // The client sees the stream broken off, and the connection closed: no last chunk that
    // would pass the cut stream off as complete and the connection as reusable.
    stream
        .read_to_end(&mut response)
        .expect("kvgate closes the connection");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "the cut stream ended with a last chunk, as if complete: {text}"
    );
    let line = gateway.wait_handled("cut-1");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("broke off the response")),
        "{line}"
    );
}

#[test]
fn a_request_a_pod_received_is_never_sent_to_another_pod() {
    let pods: Vec<FakePod> = (0..3).map(|_| FakePod::start()).collect();
    let addrs: Vec<String> = pods.iter().map(FakePod::addr).collect();
    let gateway = Kvgate::start(&GatewayConfig::default().with_model(MODEL, &addrs));
    let body = chat_body(MODEL, "a prompt that crashes whichever pod reads it", false);

    // Every pod that reads it closes the connection without answering.
    let (status, error) = post_chat(&gateway, "crash-1", &[("x-fake-hangup", "1")], &body);
    let received: usize = pods
        .iter()
        .map(|p| {
            p.requests()
                .iter()
                .filter(|r| r["headers"]["x-request-id"] == "crash-1")
                .count()
        })
        .sum();
    assert_eq!(received, 1, "the request reached {received} pods");
    assert_eq!(status, 502, "{error}");
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    assert_eq!(error["error"]["code"], "upstream_no_response", "{error}");
    let line = gateway.wait_handled("crash-1");
    assert_eq!(line["attempts"], 1, "{line}");

    // The fleet goes on serving.
    let (status, _) = post_chat(&gateway, "after-crash", &[], &body);
    assert_eq!(status, 200);
}

#[test]
fn a_pooled_connection_the_pod_closed_while_idle_is_replaced_not_failed() {
    // uvicorn closes idle keep-alive connections after 5 s; this pod after 300 ms.
    let pod = FakePod::start_with(&["--model", MODEL, "--idle-timeout-ms", "300"]);
    let gateway = Kvgate::start(&GatewayConfig::default().with_model(MODEL, &[pod.addr()]));
    let idle_closed = || {
        let (_, body) = http_request(pod.port, "GET", "/_test/idle_closed", &[], b"");
        serde_json::from_slice::<Value>(&body).expect("JSON")["closed"]
            .as_u64()
            .expect("count")
    };
    let body = chat_body(MODEL, "hello again", false);
    for n in 0..3 {
        let before = idle_closed();
        let id = format!("pooled-{n}");
        let (status, answer) = post_chat(&gateway, &id, &[], &body);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(gateway.wait_handled(&id)["attempts"], 1);
        wait_for("the pod to close kvgate's idle connection", LIMIT, || {
            (idle_closed() > before).then_some(())
        });
    }
    assert_eq!(pod.requests().len(), 3);
}

/// (VmRSS, VmData) of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmData:"))
}

#[test]
fn declared_body_lengths_make_kvgate_hold_no_memory() {
    const FLOOD: usize = 256;
    const DECLARED: usize = 32 << 20;
    let pod = FakePod::start();
    let gateway = Kvgate::start(
        &GatewayConfig {
            max_body_bytes: DECLARED,
            body_timeout_ms: Some(3_000),
            ..GatewayConfig::default()
        }
        .with_model(MODEL, &[pod.addr()]),
    );
    let body = chat_body(MODEL, "warm up", false);
    assert_eq!(post_chat(&gateway, "warm-up", &[], &body).0, 200);
    let base = memory_kib(gateway.pid());

    // Peak memory while the flood is held open.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = thread::spawn({
        let (stop, pid) = (Arc::clone(&stop), gateway.pid());
        move || {
            let mut peak = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                let (rss, data) = memory_kib(pid);
                peak = (peak.0.max(rss), peak.1.max(data));
                thread::sleep(Duration::from_millis(10));
            }
            peak
        }
    });
    // Each connection declares 32 MiB, sends a few bytes and stalls.
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|_| {
            let mut stream = connect(gateway.port);
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: application/json\r\nContent-Length: {DECLARED}\r\n\r\n{{\"model\": \"{MODEL}\""
            );
            stream.write_all(head.as_bytes()).expect("write");
            stream
        })
        .collect();
    // Each is answered 408 once its body is overdue: kvgate read every one of them.
    for mut stream in flood {
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let status = parse_head(&response).map(|(status, _, _)| status);
        assert_eq!(status, Some(408), "{}", String::from_utf8_lossy(&response));
    }
    stop.store(true, Ordering::SeqCst);
    let peak = sampler.join().expect("sampler");
    let (rss_growth, data_growth) = (
        peak.0.saturating_sub(base.0) >> 10,
        peak.1.saturating_sub(base.1) >> 10,
    );
    eprintln!(
        "{FLOOD} connections declaring {} MiB each: peak RSS +{rss_growth} MiB, peak data +{data_growth} MiB",
        DECLARED >> 20
    );
    assert!(rss_growth < 64, "RSS grew by {rss_growth} MiB");
    assert!(
        data_growth < 128,
        "allocated memory grew by {data_growth} MiB (the flood declared {} MiB)",
        (FLOOD * DECLARED) >> 20
    );
    assert_eq!(post_chat(&gateway, "after-flood", &[], &body).0, 200);
}

#[test]
fn bodies_beyond_the_buffer_budget_get_503_until_it_frees() {
    const BUDGET: usize = 1 << 20;
    let pod = FakePod::start();
    let config = |budget: usize| {
        GatewayConfig {
            max_body_bytes: BUDGET,
            max_buffered_body_bytes: Some(budget),
            ..GatewayConfig::default()
        }
        .with_model(MODEL, &[pod.addr()])
    };
    let gateway = Kvgate::start(&config(BUDGET));
    let buffered = || metric(&gateway, "kvgate_request_body_buffered_bytes");

    // An upload that stalls just short of its declared 1 MiB holds (nearly) the whole budget.
    const SENT: usize = BUDGET - 16;
    let mut slow = connect(gateway.port);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {BUDGET}\r\n\r\n"
    );
    slow.write_all(head.as_bytes()).expect("write");
    slow.write_all(&[b' '; SENT]).expect("write");
    wait_for("the stalled upload to be buffered", LIMIT, || {
        (buffered()? >= SENT as f64).then_some(())
    });

    // Any other body is refused meanwhile, with a hint to come back.
    let body = chat_body(MODEL, "a small request", false);
    let (status, head, error) = {
        let mut stream = connect(gateway.port);
        upstream::write_request(
            &mut stream,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.as_bytes(),
            true,
        );
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("read");
        let (status, head, at) = parse_head(&response).expect("response head");
        let error: Value = serde_json::from_slice(&response[at..]).expect("JSON error");
        (status, head.to_ascii_lowercase(), error)
    };
    assert_eq!(status, 503, "{error}");
    assert_eq!(error["error"]["code"], "body_buffer_full", "{error}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert_eq!(
        metric(&gateway, "kvgate_request_body_buffer_full_total"),
        Some(1.0)
    );

    // A reload raises the budget for the next requests, while the upload still stalls.
    gateway.reload(&config(2 * BUDGET));
    wait_for("a request to fit the reloaded budget", LIMIT, || {
        (post_chat(&gateway, "reloaded-budget", &[], &body).0 == 200).then_some(())
    });

    // The upload gives up: its share comes back.
    drop(slow);
    wait_for("the budget to be free", LIMIT, || {
        (buffered()? == 0.0).then_some(())
    });
    assert_eq!(post_chat(&gateway, "after-budget", &[], &body).0, 200);
}

#[test]
fn pods_that_start_after_the_gateway_are_probed_first_and_admitted_at_once() {
    // The pods' ports held closed (bound, not listening) until the pods listen on them.
    let ports = [ClosedPort::shared(), ClosedPort::shared()];
    let addrs: Vec<String> = ports.iter().map(|p| p.addr.to_string()).collect();
    // A full health round only every minute.
    let gateway = Kvgate::start(
        &GatewayConfig {
            health_check_interval_ms: 60_000,
            ..GatewayConfig::default()
        }
        .with_model(MODEL, &addrs),
    );
    // Ready means probed: nothing listens on the pods' ports yet.
    let health = pods_healthy(&gateway);
    assert_eq!(health.len(), 2);
    assert!(health.iter().all(|(_, ok)| !ok), "{health:?}");

    let pods: Vec<FakePod> = ports
        .iter()
        .map(|p| {
            let port = p.addr.port().to_string();
            FakePod::start_with(&["--model", MODEL, "--port", &port, "--reuse-port"])
        })
        .collect();
    wait_for(
        "both pods to pass their health checks",
        Duration::from_secs(10),
        || {
            pods_healthy(&gateway)
                .iter()
                .all(|(_, ok)| *ok)
                .then_some(())
        },
    );
    let body = chat_body(MODEL, "hello", false);
    assert_eq!(post_chat(&gateway, "late-pods", &[], &body).0, 200);
    assert_eq!(pods.iter().map(|p| p.requests().len()).sum::<usize>(), 1);

    // A pod discovery adds is probed at once, not at the next full round a minute away.
    let closed = ClosedPort::new();
    let down = closed.addr.to_string();
    let mut listed = addrs.clone();
    listed.push(down.clone());
    gateway.reload(
        &GatewayConfig {
            health_check_interval_ms: 60_000,
            ..GatewayConfig::default()
        }
        .with_model(MODEL, &listed),
    );
    wait_for(
        "the added pod to fail its first probe",
        Duration::from_secs(10),
        || {
            pods_healthy(&gateway)
                .contains(&(down.clone(), false))
                .then_some(())
        },
    );
    assert_eq!(post_chat(&gateway, "added-pod", &[], &body).0, 200);
}

#[test]
fn a_fleet_failing_every_health_check_is_still_served() {
    let pods: Vec<FakePod> = (0..2).map(|_| FakePod::start()).collect();
    let addrs: Vec<String> = pods.iter().map(FakePod::addr).collect();
    let gateway = Kvgate::start(
        &GatewayConfig {
            health_check_interval_ms: 200,
            ..GatewayConfig::default()
        }
        .with_model(MODEL, &addrs),
    );
    // A health endpoint that fails while the pods serve (e.g. too slow under load).
    for pod in &pods {
        pod.set_healthy(false);
    }
    wait_for("every pod to fail its health check", LIMIT, || {
        pods_healthy(&gateway)
            .iter()
            .all(|(_, ok)| !ok)
            .then_some(())
    });
    let body = chat_body(MODEL, "still there?", false);
    let (status, answer) = post_chat(&gateway, "panic", &[], &body);
    assert_eq!(status, 200, "{answer}");
}
