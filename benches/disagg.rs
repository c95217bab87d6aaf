//! What the two legs of a disaggregated request cost kvgate itself: the same 4k-token
//! chat request through kvgate's aggregated profile (one pod exchange) and through a
//! prefill/decode profile (a prefill leg, then a decode leg), paired round by round, with
//! one exchange with the pod directly in the same round. kvgate's own extra time for the
//! two legs is `pd − aggregated − direct`: the second leg's pod exchange is taken out.
//!
//! The pods are stand-ins in this process that answer at once and speak vLLM's P/D
//! request protocol (a prefill leg is answered with `kv_transfer_params`), so that only
//! kvgate's time differs between the paths; `tests/disagg.rs` checks the protocol itself.
//!
//! `cargo bench --bench disagg` (a smoke run under `cargo test`).

#[path = "support/child.rs"]
mod child;
#[path = "support/http.rs"]
mod http;
#[path = "support/smoke.rs"]
mod smoke;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

const MODEL: &str = "Qwen3-32B";
const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Kills kvgate on drop, so a panicking bench leaves no server behind.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An instant pod: a one-token completion, with `kv_transfer_params` when asked to
/// prefill for a remote decoder (what vLLM's NixlConnector answers).
async fn completion(body: axum::body::Bytes) -> axum::Json<Value> {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let prefill = request["kv_transfer_params"]["do_remote_decode"] == true;
    let transfer = prefill.then(|| {
        json!({"do_remote_prefill": true, "do_remote_decode": false,
               "remote_engine_id": "bench-engine", "remote_block_ids": [0, 1, 2, 3],
               "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1})
    });
    axum::Json(json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4096, "completion_tokens": 1, "total_tokens": 4097,
                  "prompt_tokens_details": {"cached_tokens": 0}},
        "kv_transfer_params": transfer,
    }))
}

async fn start_pod() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a pod port");
    let port = listener.local_addr().expect("pod address").port();
    let app = Router::new()
        .route("/v1/chat/completions", post(completion))
        .route("/health", get(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn gateway_config(prefill: u16, decode: u16) -> String {
    let tok = format!("{REPO}/.tokenizers/qwen3");
    format!(
        "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  threads: 1
events:
  mode: off
logging:
  level: warn
  format: text
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: [{{name: kv-cache}}, {{name: load}}]
  pd:
    filters: [{{name: healthy}}]
    scorers: [{{name: kv-cache}}, {{name: load}}]
    prefill: {{minUncachedTokens: 0}}
models:
  - name: {MODEL}
    tokenizer: {tok}/tokenizer.json
    tokenizerConfig: {tok}/tokenizer_config.json
    blockSize: 64
    hashAlgo: sha256_cbor
    hashSeed: \"42\"
    vllmRelease: \"0.11.0\"
    discovery:
      static:
        pods: [{{http: \"127.0.0.1:{prefill}\", role: prefill}}, {{http: \"127.0.0.1:{decode}\", role: decode}}]
"
    )
}

/// The `listening` line kvgate prints once its sockets are open: (proxy, admin) ports.
fn listening(child: &mut Child) -> (u16, u16) {
    let listening = child::json_line(child, "listening");
    (
        child::port_of(&listening["proxy"]),
        child::port_of(&listening["admin"]),
    )
}

/// Document text from the LooGLE trace, `chars` long (~4 chars per token).
fn loogle_text(chars: usize) -> String {
    let path = format!("{SHARED}/data/traces/loogle_longdep_qa.jsonl");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut text = String::new();
    for line in BufReader::new(file).lines() {
        let row: Value = serde_json::from_str(&line.expect("read trace line")).expect("JSON");
        if let Some(input) = row["input"].as_str() {
            text.push_str(input);
            text.push('\n');
        }
        if text.len() >= chars {
            break;
        }
    }
    let cut = (0..=chars.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    text.truncate(cut);
    text
}

/// One chat exchange through `profile`, in milliseconds.
async fn timed_post(client: &reqwest::Client, url: &str, profile: &str, text: String) -> f64 {
    let body = serde_json::to_vec(&json!({
        "model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8,
    }))
    .expect("serialize body");
    http::timed_post(client, url, &[("x-kvgate-profile", profile)], body.into())
        .await
        .as_secs_f64()
        * 1e3
}

fn p50(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn run() {
    let (prefill, decode) = (start_pod().await, start_pod().await);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("kvgate.yaml");
    std::fs::write(&config, gateway_config(prefill, decode)).expect("write kvgate config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("kvgate.err")).expect("log file"))
        .spawn()
        .expect("start kvgate serve");
    let (listen, admin) = listening(&mut child);
    let _gateway = Gateway(child);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "kvgate not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let direct = format!("http://127.0.0.1:{decode}/v1/chat/completions");
    let gateway = format!("http://127.0.0.1:{listen}/v1/chat/completions");
    let text = loogle_text(16_000);
    let rounds = smoke::size(200, 5);
    let (mut directs, mut aggregated, mut two_legs, mut extra) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds + 5 {
        // A distinct prompt per path and round, so that no path finds the other's text in
        // kvgate's token cache; the order rotates to cancel warm-up effects.
        let prompt = |path: &str| format!("Round {round} {path}. {text}");
        let mut times = [0.0; 3];
        for k in 0..3 {
            let path = (round + k) % 3;
            times[path] = match path {
                0 => timed_post(&client, &direct, "default", prompt("direct")).await,
                1 => timed_post(&client, &gateway, "default", prompt("aggregated")).await,
                _ => timed_post(&client, &gateway, "pd", prompt("pd")).await,
            };
        }
        if round >= 5 {
            directs.push(times[0]);
            aggregated.push(times[1]);
            two_legs.push(times[2]);
            extra.push(times[2] - times[1] - times[0]);
        }
    }
    let (d, a, pd, own) = (p50(directs), p50(aggregated), p50(two_legs), p50(extra));
    smoke::figure("direct p50", d);
    smoke::figure("aggregated p50", a);
    smoke::figure("two-leg p50", pd);
    println!(
        "4k-token chat, {rounds} rounds, kvgate threads=1, instant stand-in pods: direct p50 {d:.3} ms, \
         through kvgate aggregated p50 {a:.3} ms, prefill/decode p50 {pd:.3} ms; \
         kvgate's own extra time for the two legs (pd − aggregated − direct, per round) p50 {own:.3} ms"
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(run());
}
