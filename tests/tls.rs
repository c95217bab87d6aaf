//! TLS on the public listener end to end: `kvgate serve` in a subprocess with a certificate
//! issued by a test CA that the `openssl` CLI makes here; curl and Python's `ssl` module as
//! clients, verifying against that CA. Covers serving, a certificate swapped in a
//! Kubernetes-style Secret volume while a connection stays open, a refused bad pair, and the
//! listener limits over TLS.

// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use upstream::{
    chat_body, curl, curl_head, parse_head, wait_closed, wait_for, FakePod, GatewayConfig, Kvgate,
    HERE,
};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` with a new P-256 key, written to `key`.
fn request_with_new_key(dir: &Path, key: &str, args: &[&str]) {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
    ];
    all.extend_from_slice(args);
    openssl(dir, &all);
}

/// A CA made for this test, and server certificates it issues for 127.0.0.1.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let self_signed = [
            "-x509",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=kvgate test CA",
        ];
        request_with_new_key(dir.path(), "ca.key", &self_signed);
        Self { dir }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for 127.0.0.1 named `cn`: (certificate PEM, key PEM).
    fn issue(&self, cn: &str) -> (Vec<u8>, Vec<u8>) {
        let dir = self.dir.path();
        let (key, csr, pem) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.pem"),
        );
        let subject = format!("/CN={cn}");
        let san = "subjectAltName=IP:127.0.0.1,DNS:localhost";
        request_with_new_key(
            dir,
            &key,
            &["-new", "-out", &csr, "-subj", &subject, "-addext", san],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-copy_extensions",
                "copyall",
                "-out",
                &pem,
            ],
        );
        let read = |name: &str| fs::read(dir.join(name)).expect("read issued file");
        (read(&pem), read(&key))
    }
}

/// A Secret mounted as the kubelet writes it: `tls.crt` and `tls.key` are symlinks through
/// `..data` to a versioned directory, and an update renames a new `..data` over the old one.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(cert: &[u8], key: &[u8]) -> Self {
        let mut volume = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            version: 0,
        };
        volume.update(cert, key);
        for name in ["tls.crt", "tls.key"] {
            symlink(format!("..data/{name}"), volume.dir.path().join(name)).expect("symlink");
        }
        volume
    }

    fn update(&mut self, cert: &[u8], key: &[u8]) {
        self.version += 1;
        let root = self.dir.path();
        let data = format!("..{}", self.version);
        fs::create_dir(root.join(&data)).expect("mkdir");
        fs::write(root.join(&data).join("tls.crt"), cert).expect("write tls.crt");
        fs::write(root.join(&data).join("tls.key"), key).expect("write tls.key");
        symlink(&data, root.join("..data_tmp")).expect("symlink");
        fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap ..data");
    }

    fn files(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("tls.crt"),
            self.dir.path().join("tls.key"),
        )
    }
}

/// The common name of the certificate a new handshake gets.
fn presented_cn(gateway: &Kvgate, ca: &Path) -> Option<String> {
    let out = curl(&[
        "-v",
        "-o",
        "/dev/null",
        "--cacert",
        ca.to_str().expect("utf-8 path"),
        &gateway.url("/v1/models"),
    ]);
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| {
            l.trim_start_matches(['*', ' '])
                .strip_prefix("subject: CN=")
        })
        .map(str::to_string)
}

/// `curl -i` over HTTPS, trusting the test CA: (status, lower-cased head, body).
fn https(ca: &Path, args: &[&str]) -> (u16, String, Vec<u8>) {
    let mut all = vec!["--cacert", ca.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    curl_head(&all)
}

fn error_code(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body).expect("error body is JSON")["error"]["code"].clone()
}

#[test]
fn serves_https_with_the_configured_certificate_and_routes_to_the_pod() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("kvgate-a");
    let files = tempfile::tempdir().expect("tempdir");
    let cert_file = upstream::write_file(files.path(), "cert.pem", &cert);
    let key_file = upstream::write_file(files.path(), "key.pem", &key);
    let pod = FakePod::start();
    let gateway = Kvgate::start(
        &GatewayConfig {
            tls: Some((cert_file, key_file)),
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[pod.addr()]),
    );
    let ca_file = ca.ca_file();

    let body = chat_body("qwen", "Hello over TLS", false);
    let (status, head, response) = https(
        &ca_file,
        &[
            "-H",
            "content-type: application/json",
            "-H",
            "x-request-id: tls-1",
            "-d",
            &body,
            &gateway.url("/v1/chat/completions"),
        ],
    );
    assert_eq!(status, 200, "{head}");
    // curl offers h2 first; ALPN settles on HTTP/1.1, the only protocol kvgate offers.
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let response: Value = serde_json::from_slice(&response).expect("completion JSON");
    assert_eq!(response["object"], "chat.completion");
    assert_eq!(gateway.wait_handled("tls-1")["status"], 200);
    assert_eq!(pod.requests().len(), 1, "the pod got the request");
    assert_eq!(
        presented_cn(&gateway, &ca_file).as_deref(),
        Some("kvgate-a")
    );

    // Both TLS 1.2 and 1.3 handshakes are served.
    let models = gateway.url("/v1/models");
    for version in [
        ["--tlsv1.2", "--tls-max", "1.2"],
        ["--tlsv1.3", "--tls-max", "1.3"],
    ] {
        let (status, _, _) = https(&ca_file, &[version[0], version[1], version[2], &models]);
        assert_eq!(status, 200, "{version:?}");
    }

    // Without the CA the certificate is not trusted; plain HTTP gets no HTTP answer.
    let untrusted = curl(&[&gateway.url("/v1/models")]);
    assert_eq!(untrusted.status.code(), Some(60), "{untrusted:?}");
    let failures = gateway.metric("kvgate_downstream_tls_handshake_failures_total");
    let plain = curl(&[
        "-i",
        &format!("http://127.0.0.1:{}/v1/models", gateway.port),
    ]);
    assert!(
        !plain.status.success(),
        "plain HTTP was answered: {plain:?}"
    );
    assert!(parse_head(&plain.stdout).is_none(), "{plain:?}");
    wait_for(
        "the plain-HTTP client to count as a failed handshake",
        Duration::from_secs(5),
        || {
            (gateway.metric("kvgate_downstream_tls_handshake_failures_total") > failures)
                .then_some(())
        },
    );
}

/// The Python client holding one TLS connection: each line sent makes one request on it.
struct KeptAliveClient {
    child: std::process::Child,
    answers: BufReader<ChildStdout>,
}

impl KeptAliveClient {
    fn connect(port: u16, ca: &Path) -> Self {
        let mut child = Command::new("timeout")
            .args(["60", "python3", &format!("{HERE}/tls_client.py")])
            .arg(port.to_string())
            .arg(ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3 tls_client.py");
        let answers = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, answers }
    }

    fn request(&mut self) -> Value {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("write to client");
        let mut line = String::new();
        self.answers
            .read_line(&mut line)
            .expect("read client answer");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("client answered {line:?}"))
    }
}

impl Drop for KeptAliveClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_renewed_secret_serves_new_handshakes_and_open_connections_continue() {
    let ca = TestCa::new();
    let (cert_a, key_a) = ca.issue("kvgate-a");
    let (cert_b, key_b) = ca.issue("kvgate-b");
    let (cert_c, _) = ca.issue("kvgate-c");
    let mut secret = SecretVolume::new(&cert_a, &key_a);
    let gateway = Kvgate::start(
        &GatewayConfig {
            tls: Some(secret.files()),
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[]),
    );
    let ca_file = ca.ca_file();
    let mut client = KeptAliveClient::connect(gateway.port, &ca_file);
    let first = client.request();
    assert_eq!(
        (first["status"].as_u64(), first["cn"].as_str()),
        (Some(200), Some("kvgate-a"))
    );

    secret.update(&cert_b, &key_b);
    wait_for(
        "new handshakes to get kvgate-b",
        Duration::from_secs(10),
        || (presented_cn(&gateway, &ca_file).as_deref() == Some("kvgate-b")).then_some(()),
    );
    assert_eq!(
        gateway.metric("kvgate_tls_certificate_reloads_total{result=\"ok\"}"),
        1.0
    );

    // The connection opened before the swap was not dropped: same socket, same session.
    let second = client.request();
    assert_eq!(second["status"], 200, "{second}");
    assert_eq!(second["cn"], "kvgate-a", "{second}");
    assert_eq!(second["same_socket"], true, "{second}");
    assert_eq!(second["local_port"], first["local_port"], "{second}");

    // A certificate whose key is not in the Secret is refused; kvgate-b stays in use.
    secret.update(&cert_c, &key_b);
    wait_for(
        "the mismatched pair to be refused",
        Duration::from_secs(10),
        || {
            (gateway.metric("kvgate_tls_certificate_reloads_total{result=\"failed\"}") == 1.0)
                .then_some(())
        },
    );
    assert!(
        gateway.log().contains("TLS certificate reload refused"),
        "{}",
        gateway.log()
    );
    assert_eq!(
        presented_cn(&gateway, &ca_file).as_deref(),
        Some("kvgate-b")
    );
    assert_eq!(client.request()["status"], 200);
}

#[test]
fn sighup_reloads_a_pair_whose_change_no_file_event_shows() {
    let ca = TestCa::new();
    let (cert_a, key_a) = ca.issue("kvgate-a");
    let (cert_b, key_b) = ca.issue("kvgate-b");
    // The configured paths are symlinks into a directory kvgate does not watch, so rewriting
    // the targets there makes no event where kvgate looks.
    let targets = tempfile::tempdir().expect("tempdir");
    let links = tempfile::tempdir().expect("tempdir");
    let target_cert = upstream::write_file(targets.path(), "cert.pem", &cert_a);
    let target_key = upstream::write_file(targets.path(), "key.pem", &key_a);
    symlink(&target_cert, links.path().join("cert.pem")).expect("symlink");
    symlink(&target_key, links.path().join("key.pem")).expect("symlink");
    let gateway = Kvgate::start(
        &GatewayConfig {
            tls: Some((links.path().join("cert.pem"), links.path().join("key.pem"))),
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[]),
    );
    let ca_file = ca.ca_file();
    assert_eq!(
        presented_cn(&gateway, &ca_file).as_deref(),
        Some("kvgate-a")
    );

    fs::write(&target_cert, &cert_b).expect("rewrite the certificate");
    fs::write(&target_key, &key_b).expect("rewrite the key");
    gateway.hang_up();
    wait_for(
        "new handshakes to get kvgate-b after SIGHUP",
        Duration::from_secs(10),
        || (presented_cn(&gateway, &ca_file).as_deref() == Some("kvgate-b")).then_some(()),
    );
}

#[test]
fn listener_limits_hold_over_tls() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("kvgate-a");
    let secret = SecretVolume::new(&cert, &key);
    let gateway = Kvgate::start(
        &GatewayConfig {
            tls: Some(secret.files()),
            max_header_fields: Some(20),
            max_connections: Some(2),
            header_timeout_ms: Some(3000),
            ..GatewayConfig::default()
        }
        .with_model("qwen", &[]),
    );
    let ca_file = ca.ca_file();
    // The start-up readiness probe holds a slot until kvgate has seen it close.
    wait_for("no client connection open", Duration::from_secs(5), || {
        (gateway.metric("kvgate_downstream_connections") == 0.0).then_some(())
    });

    let mut args = Vec::new();
    for i in 0..25 {
        args.extend(["-H".to_string(), format!("x-field-{i}: v")]);
    }
    args.push(gateway.url("/v1/models"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, head, body) = https(&ca_file, &args);
    assert_eq!(status, 431, "{head}");
    assert_eq!(error_code(&body), "too_many_header_fields");
    wait_for(
        "the refused client's connection to close",
        Duration::from_secs(5),
        || (gateway.metric("kvgate_downstream_connections") == 0.0).then_some(()),
    );

    // Two clients that connect and never start a handshake take both slots...
    let opened = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect"))
        .collect();
    wait_for("both slots taken", Duration::from_secs(5), || {
        (gateway.metric("kvgate_downstream_connections") == 2.0).then_some(())
    });
    // ...so the next client is refused, over TLS, in kvgate's JSON.
    let (status, head, body) = https(&ca_file, &[&gateway.url("/v1/models")]);
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert_eq!(error_code(&body), "too_many_connections");

    // The stalled handshakes are cut at the header deadline, which covers the handshake.
    for stream in &mut stalled {
        let (closed, sent) = wait_closed(stream);
        let after = closed - opened;
        assert!(
            sent.is_empty(),
            "kvgate wrote to a client that never said hello"
        );
        assert!(
            (Duration::from_millis(2900)..Duration::from_secs(15)).contains(&after),
            "closed after {after:?}"
        );
    }
    assert_eq!(
        gateway.metric("kvgate_downstream_timeouts_total{phase=\"header\"}"),
        2.0
    );
    let (status, _, _) = https(&ca_file, &[&gateway.url("/v1/models")]);
    assert_eq!(status, 200, "slots are free again");
}
