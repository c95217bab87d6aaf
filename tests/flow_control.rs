//! Flow control with real processes: `kvgate serve` in front of one fake vLLM pod
//! (`upstream/fake_vllm.py`), saturated by kvgate's own in-flight count
//! (`saturation.inFlightRequests: 1`), so a request streaming from the pod holds it for as
//! long as the test wants. Requests are real HTTP/1.1 clients on their own connections;
//! every wait is on a condition (the queue-depth gauge, the pod's request log) with a
//! deadline.

// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

// Shared with the routing tests, which use more of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sim::SimPods;
use upstream::{
    chat_body, connect, http_request, parse_head, wait_for, write_request, FakePod, GatewayConfig,
    Kvgate,
};

const MODEL: &str = "qwen";
const WAIT: Duration = Duration::from_secs(30);

/// What a client got: status, the response head (lower-cased), the body, and when it had
/// all of it.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
    done: Instant,
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
    send_body(
        port,
        id,
        headers,
        chat_body(MODEL, &format!("request {id}"), stream),
    )
}

/// As [`send`], with the body given.
fn send_body(port: u16, id: &str, headers: &[(&str, &str)], body: String) -> JoinHandle<Answer> {
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.push(("x-request-id".into(), id.into()));
    all.push(("content-type".into(), "application/json".into()));
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
        let done = Instant::now();
        let (status, head, at) = parse_head(&response).expect("response head");
        Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: response[at..].to_vec(),
            done,
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
fn a_full_queue_gives_a_waiting_lower_band_requests_place_to_a_more_important_one() {
    let pod = FakePod::start();
    let gateway = gateway(
        &pod,
        "{saturation: {inFlightRequests: 1}, maxQueuedRequests: 2, shedBelow: -10, \
         retryAfterSecs: 2, priorityHeader: {name: x-traffic-class, \
         values: {interactive: Critical, batch: Sheddable}}}",
    );
    let holder = hold_pod(&gateway, &pod, "holder", 30);
    let batch = [("x-traffic-class", "batch")];
    let first = send(gateway.port, "batch-1", &batch, false);
    wait_depth(&gateway, -1, 1.0);
    let second = send(gateway.port, "batch-2", &batch, false);
    wait_depth(&gateway, -1, 2.0);
    // Full: one more batch request is refused as before.
    let third = send(gateway.port, "batch-3", &batch, false)
        .join()
        .expect("batch-3");
    assert_eq!(third.status, 429);
    assert_eq!(third.error()["code"], "queue_full");

    // A Critical request takes the place of the newest batch request.
    let critical = send(
        gateway.port,
        "critical",
        &[("x-traffic-class", "interactive")],
        false,
    );
    let displaced = second.join().expect("batch-2");
    assert_eq!(displaced.status, 429);
    assert!(
        displaced.head.contains("retry-after: 2"),
        "{}",
        displaced.head
    );
    let error = displaced.error();
    assert_eq!(error["code"], "displaced");
    assert_eq!(error["type"], "rate_limit_error");
    assert!(error["message"]
        .as_str()
        .is_some_and(|m| m.contains("more important request")));
    assert_eq!((depth(&gateway, 1), depth(&gateway, -1)), (1.0, 1.0));
    assert_eq!(shed(&gateway, "displaced"), 1.0);
    assert_eq!(wait_count(&gateway, "displaced"), 1.0);

    assert_eq!(holder.join().expect("holder").status, 200);
    assert_eq!(critical.join().expect("critical").status, 200);
    assert_eq!(first.join().expect("batch-1").status, 200);
    // The displaced and the refused requests never reached the pod.
    assert_eq!(arrivals(&pod), ["holder", "critical", "batch-1"]);
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

/// Flow control that never holds a request back (the pods queue everything themselves),
/// forwarding priorities: `x-traffic-class: interactive` is Critical, `batch` Sheddable.
const FORWARDING: &str = "{saturation: {inFlightRequests: 1000}, forwardPriority: true, \
     priorityHeader: {name: x-traffic-class, values: {interactive: Critical, batch: Sheddable}}}";

/// One `kvgate sim` pod of [`MODEL`] running one request at a time (`maxNumSeqs: 1`), in
/// real time, with `extra` arguments.
fn sim_pod(dir: &std::path::Path, extra: &[&str]) -> SimPods {
    let config = dir.join("sim.yaml");
    std::fs::write(&config, sim::model_yaml(MODEL, "[]")).expect("write sim config");
    let params = dir.join("pod.yaml");
    std::fs::write(&params, "maxNumSeqs: 1\n").expect("write pod params");
    let mut args = vec!["--pod-params", params.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    SimPods::start(&config, 1, &args)
}

fn sim_gateway(pods: &SimPods, flow: &str) -> Kvgate {
    Kvgate::start(
        &GatewayConfig {
            flow_control: Some(flow.to_string()),
            ..GatewayConfig::default()
        }
        .with_model(MODEL, &[pods.field(0, "http").to_string()]),
    )
}

/// A chat body generating `max_tokens` tokens, with `extra` top-level fields.
fn sim_body(id: &str, max_tokens: u32, extra: Value) -> String {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("request {id}")}],
        "max_tokens": max_tokens,
    });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body.to_string()
}

/// A `vllm:` gauge of the sim pod.
fn pod_gauge(pods: &SimPods, name: &str) -> f64 {
    let port: u16 = pods
        .field(0, "http")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pod port");
    let (status, body) = http_request(port, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} on the pod"))
}

fn wait_pod_waiting(pods: &SimPods, expected: f64) {
    wait_for(
        &format!("{expected} requests waiting in the pod"),
        WAIT,
        || (pod_gauge(pods, "vllm:num_requests_waiting") == expected).then_some(()),
    );
}

#[test]
fn the_forwarded_priority_is_vllms_lower_first_value_unless_the_client_set_one() {
    // An FCFS pod (vLLM's default) refuses any non-zero priority, naming it: what kvgate
    // forwarded shows in the pod's own error.
    let dir = tempfile::tempdir().expect("tempdir");
    let pods = sim_pod(dir.path(), &[]);
    let gateway = sim_gateway(&pods, FORWARDING);
    let ask = |id: &str, class: Option<&str>, extra: Value| {
        let headers: Vec<(&str, &str)> =
            class.map(|c| ("x-traffic-class", c)).into_iter().collect();
        send_body(gateway.port, id, &headers, sim_body(id, 2, extra))
            .join()
            .expect(id)
    };
    for (class, vllm) in [("interactive", -1), ("batch", 1)] {
        let refused = ask(class, Some(class), json!({}));
        assert_eq!(refused.status, 400, "{class}");
        assert_eq!(
            refused.error()["message"],
            format!("Got priority {vllm} but Priority scheduling is not enabled."),
        );
    }
    // Standard is vLLM's default 0; a client's own priority is forwarded as it is.
    assert_eq!(ask("standard", None, json!({})).status, 200);
    assert_eq!(
        ask("own", Some("interactive"), json!({"priority": 0})).status,
        200
    );
    // Switched off, nothing is added.
    let off = sim_gateway(
        &pods,
        "{saturation: {inFlightRequests: 1000}, \
         priorityHeader: {name: x-traffic-class, values: {interactive: Critical}}}",
    );
    let plain = send_body(
        off.port,
        "off",
        &[("x-traffic-class", "interactive")],
        sim_body("off", 2, json!({})),
    );
    assert_eq!(plain.join().expect("off").status, 200);
}

#[test]
fn a_critical_request_overtakes_batch_work_queued_in_a_priority_pod() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pods = sim_pod(dir.path(), &["--scheduling-policy", "priority"]);
    let gateway = sim_gateway(&pods, FORWARDING);
    let batch = [("x-traffic-class", "batch")];

    // The pod runs one request at a time: the holder runs (about 4 s), the rest queue in
    // the pod, since flow control lets everything through.
    let holder = send_body(
        gateway.port,
        "holder",
        &batch,
        sim_body("holder", 300, json!({})),
    );
    wait_for("the holder to run", WAIT, || {
        (pod_gauge(&pods, "vllm:num_requests_running") == 1.0).then_some(())
    });
    let mut queued = Vec::new();
    for (i, id) in ["batch-1", "batch-2", "batch-3"].into_iter().enumerate() {
        queued.push(send_body(
            gateway.port,
            id,
            &batch,
            sim_body(id, 20, json!({})),
        ));
        wait_pod_waiting(&pods, (i + 1) as f64);
    }
    let critical = send_body(
        gateway.port,
        "critical",
        &[("x-traffic-class", "interactive")],
        sim_body("critical", 5, json!({})),
    );
    wait_pod_waiting(&pods, 4.0);
    assert_eq!(
        pod_gauge(&pods, "vllm:num_requests_running"),
        1.0,
        "the holder still runs: everything else waited in the pod"
    );

    let holder = holder.join().expect("holder");
    let critical = critical.join().expect("critical");
    let batches: Vec<Answer> = queued
        .into_iter()
        .map(|c| c.join().expect("batch"))
        .collect();
    for answer in batches.iter().chain([&holder, &critical]) {
        assert_eq!(answer.status, 200);
    }
    // One request at a time: the order they finished is the order the pod served them.
    // The Critical request came last and went first; the batch ones kept their order.
    assert!(holder.done < critical.done);
    assert!(critical.done < batches[0].done);
    assert!(batches[0].done < batches[1].done && batches[1].done < batches[2].done);
}
