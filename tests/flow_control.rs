//! Flow control with real processes: `kvgate serve` in front of one fake vLLM pod
//! (`upstream/fake_vllm.py`), saturated by kvgate's own in-flight count
//! (`saturation.inFlightRequests: 1`), so a request streaming from the pod holds it for as
//! long as the test wants. Requests are real HTTP/1.1 clients on their own connections;
//! every wait is on a condition (the queue-depth gauge, the pod's request log) with a
//! deadline.

// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use upstream::{
    chat_body, connect, parse_head, wait_for, write_request, FakePod, GatewayConfig, Kvgate,
};

const MODEL: &str = "qwen";
const WAIT: Duration = Duration::from_secs(30);

/// What a client got: status, the response head (lower-cased), the body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn error(&self) -> Value {
        serde_json::from_slice::<Value>(&self.body).expect("JSON error body")["error"].clone()
    }
}

fn config(pod: &FakePod, flow: &str) -> GatewayConfig {
    GatewayConfig {
        flow_control: Some(flow.to_string()),
        ..GatewayConfig::default()
    }
    .with_model(MODEL, &[pod.addr()])
}

fn gateway(pod: &FakePod, flow: &str) -> Kvgate {
    Kvgate::start(&config(pod, flow))
}

/// Sends a chat request with `headers` (plus its request id) on a connection of its own
/// and reads the whole answer on a thread.
fn send(port: u16, id: &str, headers: &[(&str, &str)], stream: bool) -> JoinHandle<Answer> {
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.push(("x-request-id".into(), id.into()));
    all.push(("content-type".into(), "application/json".into()));
    let body = chat_body(MODEL, &format!("request {id}"), stream);
    thread::spawn(move || {
        let mut conn = connect(port);
        let pairs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        write_request(
            &mut conn,
            "POST",
            "/v1/chat/completions",
            &pairs,
            body.as_bytes(),
            true,
        );
        let mut response = Vec::new();
        conn.read_to_end(&mut response).expect("read response");
        let (status, head, at) = parse_head(&response).expect("response head");
        Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: response[at..].to_vec(),
        }
    })
}

/// A streaming request that keeps the pod busy for about `tokens × 100 ms`; returns once
/// the pod has it.
fn hold_pod(gateway: &Kvgate, pod: &FakePod, id: &str, tokens: u32) -> JoinHandle<Answer> {
    let tokens = tokens.to_string();
    let holder = send(
        gateway.port,
        id,
        &[("x-fake-tokens", &tokens), ("x-fake-delay-ms", "100")],
        true,
    );
    wait_for_arrivals(pod, &[id]);
    holder
}

/// The request ids the pod received, in order.
fn arrivals(pod: &FakePod) -> Vec<String> {
    pod.requests()
        .iter()
        .filter_map(|r| r["headers"]["x-request-id"].as_str().map(str::to_string))
        .collect()
}

fn wait_for_arrivals(pod: &FakePod, ids: &[&str]) -> Vec<String> {
    wait_for(&format!("the pod to receive {ids:?}"), WAIT, || {
        let got = arrivals(pod);
        ids.iter()
            .all(|id| got.iter().any(|g| g == id))
            .then_some(got)
    })
}

fn depth(gateway: &Kvgate, priority: i32) -> f64 {
    gateway.metric(&format!(
        "kvgate_flow_queue_depth{{model=\"{MODEL}\",priority=\"{priority}\"}}"
    ))
}

fn wait_depth(gateway: &Kvgate, priority: i32, expected: f64) {
    wait_for(
        &format!("queue depth {expected} at priority {priority}"),
        WAIT,
        || (depth(gateway, priority) == expected).then_some(()),
    );
}

fn shed(gateway: &Kvgate, reason: &str) -> f64 {
    gateway.metric(&format!(
        "kvgate_flow_shed_total{{model=\"{MODEL}\",reason=\"{reason}\"}}"
    ))
}

fn wait_count(gateway: &Kvgate, outcome: &str) -> f64 {
    gateway.metric(&format!(
        "kvgate_flow_queue_wait_seconds_count{{model=\"{MODEL}\",outcome=\"{outcome}\"}}"
    ))
}

#[test]
fn waiting_requests_are_dispatched_by_band_then_tenants_in_turn_then_fcfs() {
    let pod = FakePod::start();
    let gateway = gateway(
        &pod,
        "{saturation: {inFlightRequests: 1}, objectives: {chat: Critical, nightly: -5}, shedBelow: -10}",
    );
    let holder = hold_pod(&gateway, &pod, "holder", 50);

    // Queued one by one so that their order of arrival is known.
    let queued = [
        ("t1-a", "tenant-1", None),
        ("t1-b", "tenant-1", None),
        ("nightly", "tenant-3", Some("nightly")),
        ("t1-c", "tenant-1", None),
        ("t2-a", "tenant-2", None),
        ("critical", "tenant-3", Some("chat")),
    ];
    let mut clients = Vec::new();
    for (i, (id, tenant, objective)) in queued.iter().enumerate() {
        let mut headers = vec![("x-gateway-inference-fairness-id", *tenant)];
        if let Some(objective) = objective {
            headers.push(("x-gateway-inference-objective", objective));
        }
        let before = depth(&gateway, 0) + depth(&gateway, 1) + depth(&gateway, -5);
        clients.push(send(gateway.port, id, &headers, false));
        wait_for(&format!("{id} (#{i}) to be queued"), WAIT, || {
            (depth(&gateway, 0) + depth(&gateway, 1) + depth(&gateway, -5) == before + 1.0)
                .then_some(())
        });
    }
    assert_eq!(depth(&gateway, 0), 4.0);
    assert_eq!(depth(&gateway, 1), 1.0);
    assert_eq!(depth(&gateway, -5), 1.0);
    assert_eq!(arrivals(&pod), ["holder"], "nothing passed the queue");

    assert_eq!(holder.join().expect("holder").status, 200);
    for client in clients {
        assert_eq!(client.join().expect("client").status, 200);
    }
    // The critical band first; in the standard band tenants take turns; the sheddable band last.
    assert_eq!(
        arrivals(&pod),
        ["holder", "critical", "t1-a", "t2-a", "t1-b", "t1-c", "nightly"]
    );
    for priority in [-5, 0, 1] {
        assert_eq!(depth(&gateway, priority), 0.0);
    }
    assert_eq!(wait_count(&gateway, "dispatched"), 6.0);
}

#[test]
fn refusals_carry_a_reason_and_retry_after_sheddable_full_and_deadline() {
    let pod = FakePod::start();
    let gateway = gateway(
        &pod,
        "{saturation: {inFlightRequests: 1}, maxQueuedRequests: 1, queueTimeoutMs: 1500, \
         retryAfterSecs: 3, priorityHeader: {name: x-traffic-class, values: {batch: Sheddable}}}",
    );
    let holder = hold_pod(&gateway, &pod, "holder", 60);

    let batch = send(
        gateway.port,
        "batch",
        &[("x-traffic-class", "batch")],
        false,
    )
    .join()
    .expect("batch");
    assert_eq!(batch.status, 429);
    assert!(batch.head.contains("retry-after: 3"), "{}", batch.head);
    assert_eq!(batch.error()["code"], "sheddable");
    assert_eq!(batch.error()["type"], "rate_limit_error");

    let started = Instant::now();
    let waiting = send(gateway.port, "waiting", &[], false);
    wait_depth(&gateway, 0, 1.0);
    let over = send(gateway.port, "over", &[], false).join().expect("over");
    assert_eq!(over.status, 429);
    assert!(over.head.contains("retry-after: 3"), "{}", over.head);
    assert_eq!(over.error()["code"], "queue_full");

    let waited = waiting.join().expect("waiting");
    assert_eq!(waited.status, 503);
    assert!(waited.head.contains("retry-after: 3"), "{}", waited.head);
    let error = waited.error();
    assert_eq!(error["code"], "queue_timeout");
    assert_eq!(error["type"], "server_error");
    assert!(error["message"]
        .as_str()
        .is_some_and(|m| m.contains("saturated")));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(depth(&gateway, 0), 0.0);
    assert_eq!(
        (
            shed(&gateway, "sheddable"),
            shed(&gateway, "queue_full"),
            shed(&gateway, "deadline")
        ),
        (1.0, 1.0, 1.0)
    );
    // None of the refused requests reached the pod.
    assert_eq!(arrivals(&pod), ["holder"]);
    drop(holder);
}

#[test]
fn a_client_that_disconnects_leaves_the_queue_at_once() {
    let pod = FakePod::start();
    let gateway = gateway(&pod, "{saturation: {inFlightRequests: 1}}");
    let holder = hold_pod(&gateway, &pod, "holder", 30);

    let mut conn: TcpStream = connect(gateway.port);
    let body = chat_body(MODEL, "gone before its turn", false);
    write_request(
        &mut conn,
        "POST",
        "/v1/chat/completions",
        &[
            ("x-request-id", "leaver"),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
        false,
    );
    wait_depth(&gateway, 0, 1.0);
    conn.shutdown(Shutdown::Both).expect("close");
    drop(conn);
    // Gone from the queue while the pod is still busy with the holder.
    wait_depth(&gateway, 0, 0.0);
    assert_eq!(wait_count(&gateway, "client_gone"), 1.0);
    let holder = holder.join().expect("holder");
    assert_eq!(holder.status, 200);

    // The pod is free again; the next request passes at once and the leaver never came.
    let after = send(gateway.port, "after", &[], false)
        .join()
        .expect("after");
    assert_eq!(after.status, 200);
    assert_eq!(arrivals(&pod), ["holder", "after"]);
    assert_eq!(wait_count(&gateway, "dispatched"), 0.0);
}

#[test]
fn priorities_reload_and_a_bad_flow_config_keeps_the_old_one() {
    let pod = FakePod::start();
    let sheddable = "{saturation: {inFlightRequests: 1}, \
         priorityHeader: {name: x-traffic-class, values: {batch: Sheddable}}}";
    let gateway = gateway(&pod, sheddable);
    let reload = |flow: &str, result: &str| {
        let series = format!("kvgate_config_reloads_total{{result=\"{result}\"}}");
        let before = gateway.metric(&series);
        gateway.reload(&config(&pod, flow));
        wait_for(&format!("a reload counted {result}"), WAIT, || {
            (gateway.metric(&series) > before).then_some(())
        });
    };

    let holder = hold_pod(&gateway, &pod, "holder-1", 10);
    let batch = send(
        gateway.port,
        "batch-1",
        &[("x-traffic-class", "batch")],
        false,
    );
    assert_eq!(batch.join().expect("batch").status, 429);
    assert_eq!(holder.join().expect("holder").status, 200);

    // batch becomes the most important class.
    reload(
        "{saturation: {inFlightRequests: 1}, \
         priorityHeader: {name: x-traffic-class, values: {batch: Critical}}}",
        "ok",
    );
    // A flow config that fails validation is refused; the one above stays.
    reload(
        "{saturation: {inFlightRequests: 1, kvCacheUsage: 2}, \
         priorityHeader: {name: x-traffic-class, values: {batch: Sheddable}}}",
        "failed",
    );

    let holder = hold_pod(&gateway, &pod, "holder-2", 10);
    let standard = send(gateway.port, "standard", &[], false);
    wait_depth(&gateway, 0, 1.0);
    let batch = send(
        gateway.port,
        "batch-2",
        &[("x-traffic-class", "batch")],
        false,
    );
    wait_depth(&gateway, 1, 1.0);
    assert_eq!(holder.join().expect("holder").status, 200);
    assert_eq!(batch.join().expect("batch").status, 200);
    assert_eq!(standard.join().expect("standard").status, 200);
    assert_eq!(
        arrivals(&pod),
        ["holder-1", "holder-2", "batch-2", "standard"]
    );
}
