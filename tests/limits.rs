//! The public listener's limits end to end: real clients (curl, raw sockets) against
//! `kvgate serve` in a subprocess. Header size and field count, the connection limit,
//! and the header, body and keep-alive deadlines that cut slow and idle clients.

// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use upstream::{
    connect, curl_head, parse_head, wait_closed, wait_for, write_request, GatewayConfig, Kvgate,
};

/// kvgate answers `GET /v1/models` itself: no pod is needed to exercise the listener.
fn gateway(config: GatewayConfig) -> Kvgate {
    Kvgate::start(&config.with_model("qwen", &[]))
}

/// `curl -i` of `GET /v1/models` with extra headers: (status, response head, body).
fn get_models(gateway: &Kvgate, headers: &[String]) -> (u16, String, Vec<u8>) {
    let mut args = Vec::new();
    for h in headers {
        args.extend(["-H".to_string(), h.clone()]);
    }
    args.push(gateway.url("/v1/models"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl_head(&args)
}

fn error_of(body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).expect("error body is JSON");
    v["error"].clone()
}

/// Reads one response with a `Content-Length` body from a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((status, head, body_at)) = parse_head(&buf) {
            let length: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(str::trim)?
                        .parse()
                        .ok()
                })
                .expect("content-length");
            while buf.len() < body_at + length {
                let n = stream.read(&mut chunk).expect("read body");
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return (status, head, buf[body_at..body_at + length].to_vec());
        }
        let n = stream.read(&mut chunk).expect("read head");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A `GET /v1/models` on a kept-alive connection: its status.
fn models_on(stream: &mut TcpStream) -> u16 {
    write_request(stream, "GET", "/v1/models", &[], b"", false);
    read_response(stream).0
}

#[test]
fn oversized_headers_and_too_many_fields_get_431_json() {
    let gateway = gateway(GatewayConfig {
        max_header_bytes: Some(4096),
        max_header_fields: Some(20),
        ..GatewayConfig::default()
    });

    let (status, _, body) = get_models(&gateway, &[format!("x-pad: {}", "a".repeat(3000))]);
    assert_eq!(status, 200, "a header under both limits passes");
    assert_eq!(
        serde_json::from_slice::<Value>(&body).expect("json")["object"],
        "list"
    );

    let (status, head, body) = get_models(&gateway, &[format!("x-pad: {}", "a".repeat(5000))]);
    assert_eq!(status, 431, "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let error = error_of(&body);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "request_header_too_large");
    assert!(error["message"].as_str().expect("message").contains("4096"));

    let many: Vec<String> = (0..25).map(|i| format!("x-field-{i}: v")).collect();
    let (status, head, body) = get_models(&gateway, &many);
    assert_eq!(status, 431, "{head}");
    let error = error_of(&body);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "too_many_header_fields");
    assert!(error["message"].as_str().expect("message").contains("20"));

    // Past Pingora's own parser limit (256 fields) Pingora answers a bare 400 before kvgate
    // sees the request; the config cannot set a limit above it.
    let beyond: Vec<String> = (0..300).map(|i| format!("x-field-{i}: v")).collect();
    let (status, _, _) = get_models(&gateway, &beyond);
    assert_eq!(status, 400);

    assert_eq!(
        gateway.metric("kvgate_requests_total{model=\"unknown\",pod=\"none\",policy=\"unknown\",status=\"431\"}"
        ),
        2.0
    );
}

#[test]
fn connections_beyond_the_limit_are_refused_until_one_closes() {
    let gateway = gateway(GatewayConfig {
        max_connections: Some(2),
        ..GatewayConfig::default()
    });
    // The start-up readiness probe holds a slot until kvgate has seen it close.
    wait_for("no client connection open", Duration::from_secs(5), || {
        (gateway.metric("kvgate_downstream_connections") == 0.0).then_some(())
    });
    let mut first = connect(gateway.port);
    let mut second = connect(gateway.port);
    assert_eq!(models_on(&mut first), 200);
    assert_eq!(models_on(&mut second), 200);

    let (status, head, body) = get_models(&gateway, &[]);
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let error = error_of(&body);
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "too_many_connections");

    // The connections under the limit keep working.
    assert_eq!(models_on(&mut first), 200);
    assert_eq!(models_on(&mut second), 200);

    drop(first);
    wait_for(
        "a new connection to be accepted once one closed",
        Duration::from_secs(5),
        || (get_models(&gateway, &[]).0 == 200).then_some(()),
    );
    assert_eq!(models_on(&mut second), 200);

    // A reload raises the limit for the next connections.
    let mut third = connect(gateway.port);
    assert_eq!(models_on(&mut third), 200);
    assert_eq!(get_models(&gateway, &[]).0, 503, "two are open again");
    gateway.reload(
        &GatewayConfig {
            max_connections: Some(3),
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[]),
    );
    // Applying a reload loads the model's tokenizer again: slow on a loaded debug build.
    wait_for("the reload to be applied", Duration::from_secs(60), || {
        (gateway.metric("kvgate_config_reloads_total{result=\"ok\"}") >= 1.0).then_some(())
    });
    wait_for(
        "a third connection to be accepted after the reload",
        Duration::from_secs(10),
        || (get_models(&gateway, &[]).0 == 200).then_some(()),
    );
    drop(third);
    assert!(gateway.metric("kvgate_downstream_connections_refused_total") >= 2.0);
    // Only `second` is left once kvgate has seen curl's connections close.
    wait_for(
        "the open connections gauge to settle",
        Duration::from_secs(5),
        || (gateway.metric("kvgate_downstream_connections") == 1.0).then_some(()),
    );
}

#[test]
fn slow_and_idle_clients_are_cut_at_their_deadlines() {
    let header_timeout = Duration::from_millis(1000);
    let idle_timeout = Duration::from_millis(1500);
    let gateway = gateway(GatewayConfig {
        header_timeout_ms: Some(header_timeout.as_millis() as u64),
        keep_alive_timeout_ms: Some(idle_timeout.as_millis() as u64),
        ..GatewayConfig::default()
    });
    // Generous: the bound only has to tell "cut by kvgate" from "never cut" (Pingora's
    // own per-read timeout is 60 s).
    let slack = Duration::from_secs(4);

    // Half a header line, then nothing.
    let mut stalled = connect(gateway.port);
    let start = Instant::now();
    stalled
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-slow: abc")
        .expect("write");
    let (closed, got) = wait_closed(&mut stalled);
    let after = closed - start;
    assert!(got.is_empty(), "no response to half a header");
    assert!(
        after >= header_timeout - Duration::from_millis(50),
        "{after:?}"
    );
    assert!(after < header_timeout + slack, "{after:?}");

    // A header trickled a byte every 200 ms: every read is quick, the whole header is not.
    let mut trickle = connect(gateway.port);
    let mut writer = trickle.try_clone().expect("clone");
    let start = Instant::now();
    let dripper = thread::spawn(move || {
        for byte in b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-slow: "
            .iter()
            .cycle()
        {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
    let (closed, got) = wait_closed(&mut trickle);
    let after = closed - start;
    assert!(got.is_empty(), "no response to a trickled header");
    assert!(
        after >= header_timeout - Duration::from_millis(50),
        "{after:?}"
    );
    assert!(after < header_timeout + slack, "{after:?}");
    drop(trickle);
    dripper.join().expect("dripper");

    // A connection that never sends anything counts as an unfinished header.
    let mut silent = connect(gateway.port);
    let start = Instant::now();
    let (closed, _) = wait_closed(&mut silent);
    assert!(closed - start < header_timeout + slack);

    // Keep-alive: a request within the idle timeout reuses the connection; then idle
    // past it, the connection is closed.
    let mut kept = connect(gateway.port);
    assert_eq!(models_on(&mut kept), 200);
    assert_eq!(models_on(&mut kept), 200, "reused within the idle timeout");
    let idle_from = Instant::now();
    let (closed, got) = wait_closed(&mut kept);
    let after = closed - idle_from;
    assert!(got.is_empty());
    assert!(
        after >= idle_timeout - Duration::from_millis(50),
        "{after:?}"
    );
    assert!(after < idle_timeout + slack, "{after:?}");

    let timeouts = |phase: &str| {
        gateway.metric(&format!(
            "kvgate_downstream_timeouts_total{{phase=\"{phase}\"}}"
        ))
    };
    assert_eq!(timeouts("header"), 3.0);
    assert_eq!(timeouts("idle"), 1.0);
    // Counted, and logged at debug by kvgate: not echoed as Pingora errors.
    let log = gateway.log();
    assert!(!log.contains("\"level\":\"ERROR\""), "{log}");
    wait_for(
        "every connection to be released",
        Duration::from_secs(5),
        || (gateway.metric("kvgate_downstream_connections") == 0.0).then_some(()),
    );
}

#[test]
fn a_body_trickled_past_its_deadline_gets_408_and_a_close() {
    let body_timeout = Duration::from_millis(1000);
    let gateway = gateway(GatewayConfig {
        body_timeout_ms: Some(body_timeout.as_millis() as u64),
        ..GatewayConfig::default()
    });
    let body = br#"{"model":"qwen","messages":[{"role":"user","content":"a slow upload"}]}"#;

    // The whole body in one write is read at once.
    let mut prompt = connect(gateway.port);
    write_request(
        &mut prompt,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        body,
        true,
    );
    let (status, _, _) = read_response(&mut prompt);
    assert_eq!(status, 503, "read, routed, and no pod to take it");

    // The header at once, then the body a byte every 200 ms: each read is quick, the body is not.
    let mut slow = connect(gateway.port);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).expect("write head");
    let start = Instant::now();
    let mut writer = slow.try_clone().expect("clone");
    let dripper = thread::spawn(move || {
        for byte in body {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
    let (status, head, answer) = read_response(&mut slow);
    let after = start.elapsed();
    assert_eq!(status, 408, "{head}");
    let error = error_of(&answer);
    assert_eq!(error["code"], "request_timeout", "{error}");
    assert_eq!(error["type"], "invalid_request_error", "{error}");
    assert!(
        after >= body_timeout - Duration::from_millis(50),
        "{after:?}"
    );
    assert!(after < body_timeout + Duration::from_secs(4), "{after:?}");
    // No lingering for the rest of a body that slow: the connection closes at once.
    let (closed, _) = wait_closed(&mut slow);
    assert!(closed - start < body_timeout + Duration::from_secs(4));
    drop(slow);
    dripper.join().expect("dripper");
    assert_eq!(
        gateway.metric("kvgate_downstream_timeouts_total{phase=\"body\"}"),
        1.0
    );
}
