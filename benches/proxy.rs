//! The gateway's speed: latency kvgate adds over calling the pod directly (4k- and 100k-token chat
//! requests), tiny-request throughput through kvgate vs through nginx proxying the same pod, and
//! kvgate's CPU-seconds per request. One simulated pod (`kvgate sim`, sped up) is the upstream.
//!
//! `cargo bench --bench proxy` (Cargo builds the `kvgate` binary it runs, in the same
//! profile). Every process but nginx binds port 0 and reports the port it got; nginx
//! cannot, so it gets a port that was free a moment ago and is restarted on another if it
//! loses that port to someone else.

#[path = "support/child.rs"]
mod child;
#[path = "support/http.rs"]
mod http;
#[path = "support/smoke.rs"]
mod smoke;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &str = "Qwen3-32B";
const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const THROUGHPUT_CONCURRENCY: usize = 32;
/// Linux's USER_HZ, the unit of utime/stime in /proc/<pid>/stat.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Kills every child on drop, so a panicking bench leaves no servers behind.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sequential requests per latency figure.
fn latency_rounds() -> usize {
    smoke::size(50, 3)
}

/// How long each throughput figure is measured.
fn throughput_window() -> Duration {
    smoke::size(Duration::from_secs(5), Duration::from_millis(300))
}

/// A port that was free a moment ago, for nginx, which cannot report one it picked.
fn probed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

fn gateway_config(pod: u16) -> String {
    let tok = format!("{REPO}/.tokenizers/qwen3");
    format!(
        "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  maxBodyBytes: 67108864
  threads: 1
events:
  mode: off
logging:
  level: warn
  format: text
models:
  - name: {MODEL}
    tokenizer: {tok}/tokenizer.json
    tokenizerConfig: {tok}/tokenizer_config.json
    blockSize: 64
    hashAlgo: sha256_cbor
    hashSeed: \"42\"
    vllmRelease: \"0.11.0\"
    podKvBlocks: 4802
    discovery:
      static:
        pods: [{{http: \"127.0.0.1:{pod}\"}}]
"
    )
}

fn nginx_config(dir: &Path, listen: u16, pod: u16) -> String {
    let d = dir.display();
    format!(
        "daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream pod {{ server 127.0.0.1:{pod}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{listen};
    client_max_body_size 64m;
    location / {{
      proxy_pass http://pod;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }}
  }}
}}
"
    )
}

async fn wait_ok(client: &reqwest::Client, url: &str, children: &mut Children) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        for child in &mut children.0 {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("a server exited ({status}) before {url} answered");
            }
        }
        assert!(Instant::now() < deadline, "{url} not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Document text from the LooGLE trace, at least `chars` long (~4 chars per token).
fn loogle_text(chars: usize) -> String {
    let path = format!("{SHARED}/data/traces/loogle_longdep_qa.jsonl");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut text = String::new();
    for line in BufReader::new(file).lines() {
        let line = line.expect("read trace line");
        let row: serde_json::Value = serde_json::from_str(&line).expect("trace line is JSON");
        if let Some(input) = row.get("input").and_then(|v| v.as_str()) {
            text.push_str(input);
            text.push('\n');
        }
        if text.len() >= chars {
            break;
        }
    }
    assert!(text.len() >= chars, "trace too short for {chars} chars");
    let cut = (0..=chars)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    text.truncate(cut);
    text
}

fn chat_body(text: &str) -> bytes::Bytes {
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 1,
    }))
    .expect("serialize body")
    .into()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / CLOCK_TICKS_PER_SEC
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct LatencyRun {
    added_p50_ms: f64,
    added_p99_ms: f64,
    direct_p50_ms: f64,
    cpu_per_request: f64,
}

async fn added_latency(
    client: &reqwest::Client,
    direct: &str,
    gateway: &str,
    text: &str,
    gateway_pid: u32,
) -> LatencyRun {
    // Warm both paths (connections, tokenizer caches) before measuring.
    for _ in 0..3 {
        http::timed_post(client, direct, &[], chat_body(text)).await;
        http::timed_post(client, gateway, &[], chat_body(text)).await;
    }
    let mut added = Vec::with_capacity(latency_rounds());
    let mut directs = Vec::with_capacity(latency_rounds());
    let mut gateway_cpu = 0.0;
    for round in 0..latency_rounds() {
        // A distinct prompt per round and per path: the pod tokenizes (and caches) what it is
        // sent, so a prompt it saw on the other path would make the second request of a round
        // cheaper at the pod. Alternating the order cancels any remaining warm-up effect.
        let direct_body = chat_body(&format!("Round {round} direct. {text}"));
        let gateway_body = chat_body(&format!("Round {round} kvgate. {text}"));
        let (d, g) = if round % 2 == 0 {
            let d = http::timed_post(client, direct, &[], direct_body).await;
            let before = cpu_seconds(gateway_pid);
            let g = http::timed_post(client, gateway, &[], gateway_body).await;
            gateway_cpu += cpu_seconds(gateway_pid) - before;
            (d, g)
        } else {
            let before = cpu_seconds(gateway_pid);
            let g = http::timed_post(client, gateway, &[], gateway_body).await;
            gateway_cpu += cpu_seconds(gateway_pid) - before;
            (http::timed_post(client, direct, &[], direct_body).await, g)
        };
        added.push((g.as_secs_f64() - d.as_secs_f64()) * 1e3);
        directs.push(d.as_secs_f64() * 1e3);
    }
    added.sort_by(f64::total_cmp);
    directs.sort_by(f64::total_cmp);
    LatencyRun {
        added_p50_ms: percentile(&added, 0.5),
        added_p99_ms: percentile(&added, 0.99),
        direct_p50_ms: percentile(&directs, 0.5),
        cpu_per_request: gateway_cpu / latency_rounds() as f64,
    }
}

/// Requests per second of tiny completions at a fixed concurrency, and how many were sent.
async fn throughput(client: &reqwest::Client, url: &str) -> (f64, u64) {
    let body: bytes::Bytes = serde_json::to_vec(&serde_json::json!({
        "model": MODEL, "prompt": "hi", "max_tokens": 1,
    }))
    .expect("serialize body")
    .into();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + throughput_window();
    let workers: Vec<_> = (0..THROUGHPUT_CONCURRENCY)
        .map(|_| {
            let (client, url, body, done) =
                (client.clone(), url.to_string(), body.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    http::timed_post(&client, &url, &[], body.clone()).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("throughput worker");
    }
    let n = done.load(Ordering::Relaxed);
    (n as f64 / start.elapsed().as_secs_f64(), n)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(run());
}

/// nginx proxying `pod`, on a probed port; started again on another if the port was
/// taken in between (nginx then exits at once).
async fn start_nginx(
    client: &reqwest::Client,
    dir: &Path,
    pod: u16,
    children: &mut Children,
) -> u16 {
    let conf = dir.join("nginx.conf");
    for _ in 0..5 {
        let port = probed_port();
        std::fs::write(&conf, nginx_config(dir, port, pod)).expect("write nginx config");
        let mut nginx = Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let url = format!("http://127.0.0.1:{port}/health");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = nginx.try_wait() {
                break;
            }
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                children.0.push(nginx);
                return port;
            }
            assert!(Instant::now() < deadline, "nginx not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!(
        "nginx did not start: see {}",
        dir.join("nginx-error.log").display()
    );
}

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_kvgate");
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("create log file");
    // The sim reads only the model from the config; the gateway's pod list follows.
    let config = dir.path().join("kvgate.yaml");
    std::fs::write(&config, gateway_config(0)).expect("write kvgate config");
    // The 100k-token request needs a longer context than the simulated pod's default.
    let pod_params = dir.path().join("pod.yaml");
    std::fs::write(&pod_params, "maxModelLen: 131072\nkvBlocks: 8192\n").expect("write pod params");

    let mut children = Children::default();
    let mut sim = Command::new(bin)
        .args(["sim", "--config"])
        .arg(&config)
        .args(["--pods", "1", "--base-port", "0", "--time-scale", "0.001"])
        .arg("--pod-params")
        .arg(&pod_params)
        .stdout(Stdio::piped())
        .stderr(log("sim.err"))
        .spawn()
        .expect("start kvgate sim");
    let ready = child::json_line(&mut sim, "ready");
    children.0.push(sim);
    let pod = child::port_of(&ready["pods"][0]["http"]);
    std::fs::write(&config, gateway_config(pod)).expect("write kvgate config");
    let mut gateway = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--upgrade-sock"])
        .arg(dir.path().join("upgrade.sock"))
        .args(["--pid-file"])
        .arg(dir.path().join("kvgate.pid"))
        .stdout(Stdio::piped())
        .stderr(log("kvgate.err"))
        .spawn()
        .expect("start kvgate serve");
    let listening = child::json_line(&mut gateway, "listening");
    let gateway_pid = gateway.id();
    children.0.push(gateway);
    let (listen, admin) = (
        child::port_of(&listening["proxy"]),
        child::port_of(&listening["admin"]),
    );

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(THROUGHPUT_CONCURRENCY * 2)
        .build()
        .expect("http client");
    wait_ok(
        &client,
        &format!("http://127.0.0.1:{pod}/health"),
        &mut children,
    )
    .await;
    wait_ok(
        &client,
        &format!("http://127.0.0.1:{admin}/readyz"),
        &mut children,
    )
    .await;
    let nginx_port = start_nginx(&client, dir.path(), pod, &mut children).await;

    let direct_chat = format!("http://127.0.0.1:{pod}/v1/chat/completions");
    let gateway_chat = format!("http://127.0.0.1:{listen}/v1/chat/completions");
    println!("kvgate proxy bench: 1 sim pod (time-scale 0.001), kvgate threads=1, nginx worker_processes=1");
    let rounds = latency_rounds();
    let sizes: &[(&str, usize)] = if smoke::smoke() {
        &[("4k-token", 16_000)]
    } else {
        &[("4k-token", 16_000), ("100k-token", 400_000)]
    };
    for &(label, chars) in sizes {
        let text = loogle_text(chars);
        let r = added_latency(&client, &direct_chat, &gateway_chat, &text, gateway_pid).await;
        smoke::figure("direct latency", r.direct_p50_ms);
        println!(
            "{label:>10} chat ({rounds} seq): added latency p50 {:.2} ms, p99 {:.2} ms (direct p50 {:.2} ms); kvgate CPU {:.2} ms/request",
            r.added_p50_ms,
            r.added_p99_ms,
            r.direct_p50_ms,
            r.cpu_per_request * 1e3
        );
    }

    let completions = |port: u16| format!("http://127.0.0.1:{port}/v1/completions");
    throughput(&client, &completions(listen)).await;
    let cpu_before = cpu_seconds(gateway_pid);
    let (kvgate_rps, kvgate_n) = throughput(&client, &completions(listen)).await;
    let kvgate_cpu = cpu_seconds(gateway_pid) - cpu_before;
    let (nginx_rps, _) = throughput(&client, &completions(nginx_port)).await;
    let (direct_rps, _) = throughput(&client, &completions(pod)).await;
    for (name, rps) in [
        ("kvgate", kvgate_rps),
        ("nginx", nginx_rps),
        ("direct", direct_rps),
    ] {
        smoke::figure(name, rps);
    }
    println!(
        "tiny completions, concurrency {THROUGHPUT_CONCURRENCY}, {:?} each: kvgate {kvgate_rps:.0} req/s, nginx {nginx_rps:.0} req/s, ratio kvgate/nginx {:.2} (pod direct {direct_rps:.0} req/s)",
        throughput_window(),
        kvgate_rps / nginx_rps
    );
    println!(
        "kvgate CPU per tiny request: {:.1} µs ({kvgate_cpu:.2} CPU-s over {kvgate_n} requests)",
        kvgate_cpu / kvgate_n as f64 * 1e6
    );
    drop(children);
}
