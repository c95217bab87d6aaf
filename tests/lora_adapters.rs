//! LoRA adapters end to end: `kvgate serve` in front of `kvgate sim --max-loras` pods, driven
//! by curl. The gateway learns which adapters each pod holds from the pods'
//! `vllm:lora_requests_info` (its scrape), routes an adapter's request to the pod that runs
//! the adapter, else to a pod with a free slot; a canary split spreads one model name over
//! adapters by weight and the pod receives the chosen adapter; a bad split is refused.

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sim::{model_yaml_with, ModelSettings, SimPods};
use upstream::{curl, debug_pods, wait_for, Kvgate, Serve};

const MODEL: &str = "Qwen3-32B";
const ADAPTERS: &str = "    loraAdapters: [{name: sql}, {name: chat}, {name: code}, {name: sql-v2}]
    adapterSplits:
      canary: [{adapter: sql, weight: 3}, {adapter: sql-v2, weight: 1}]
";
const WAIT: Duration = Duration::from_secs(60);

fn model(pods: &str) -> String {
    model_yaml_with(
        MODEL,
        pods,
        &ModelSettings {
            extra: ADAPTERS,
            ..ModelSettings::default()
        },
    )
}

fn start_sim(dir: &Path, pods: usize, extra: &[&str]) -> SimPods {
    let config = dir.join("sim.yaml");
    std::fs::write(&config, model("[]")).expect("write sim config");
    SimPods::start(&config, pods, extra)
}

/// A gateway over `sim`'s pods that scrapes them every 50 ms and scores with `scorers`.
fn start_gateway(sim: &SimPods, scorers: &str) -> Kvgate {
    let pods = (0..sim.pods.len())
        .map(|i| format!("{{http: \"{}\"}}", sim.field(i, "http")))
        .collect::<Vec<_>>()
        .join(", ");
    Kvgate::start_yaml(|listen, admin| {
        format!(
            "server:
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:{admin}
  healthCheckIntervalMs: 0
  scrapeIntervalMs: 50
  threads: 1
events:
  mode: off
logging:
  level: info
  format: json
profiles:
  default:
    filters: [{{name: healthy}}]
    scorers: {scorers}
    picker: {{name: max-score}}
"
        ) + &model(&format!("[{pods}]"))
    })
}

/// A streamed chat request held open on a pod until dropped: its adapter stays running there.
struct HeldRequest(Child);

impl HeldRequest {
    fn start(pod: &str, adapter: &str) -> Self {
        let body = json!({
            "model": adapter,
            "messages": [{"role": "user", "content": format!("keep {adapter} busy")}],
            "stream": true,
            "max_tokens": 20_000,
        });
        let child = Command::new("curl")
            .args([
                "--silent",
                "--no-buffer",
                "--max-time",
                "300",
                "-o",
                "/dev/null",
            ])
            .args(["-H", "content-type: application/json", "-d"])
            .arg(body.to_string())
            .arg(format!("http://{pod}/v1/chat/completions"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start curl");
        Self(child)
    }
}

impl Drop for HeldRequest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends a chat request for `model` through the gateway; returns the pod that served it.
fn routed_to(gateway: &Kvgate, model: &str, request_id: &str) -> String {
    let out = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        &format!("x-request-id: {request_id}"),
        "-d",
        &json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("a question for {model}")}],
            "max_tokens": 1,
        })
        .to_string(),
        &gateway.url("/v1/chat/completions"),
    ]);
    let response: Value = serde_json::from_slice(&out.stdout).expect("JSON response");
    assert_eq!(response["model"], model, "{response}");
    let line = gateway.wait_handled(request_id);
    line["endpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("no endpoint in {line}"))
        .to_string()
}

/// The adapters running on each pod (by address) as the gateway's last scrape saw them
/// (`None`: not scraped yet).
fn scraped_running(gateway: &Kvgate) -> HashMap<String, Option<Vec<String>>> {
    debug_pods(gateway.admin_addr().port(), MODEL)
        .iter()
        .map(|pod| {
            let http = pod["http"].as_str().unwrap_or_default().to_string();
            (
                http,
                serde_json::from_value(pod["lora"]["running"].clone()).ok(),
            )
        })
        .collect()
}

#[test]
fn adapter_requests_go_where_the_adapter_runs_else_to_a_free_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One adapter slot per pod: a pod running one adapter has no room for another.
    let sim = start_sim(dir.path(), 3, &["--max-loras", "1"]);
    let gateway = start_gateway(
        &sim,
        "[{name: lora-affinity, weight: 2}, {name: load, weight: 1}]",
    );
    let pod = |i: usize| sim.field(i, "http").to_string();
    let _sql = HeldRequest::start(&pod(0), "sql");
    let _chat = HeldRequest::start(&pod(1), "chat");
    let expected = HashMap::from([
        (pod(0), Some(vec!["sql".to_string()])),
        (pod(1), Some(vec!["chat".to_string()])),
        (pod(2), Some(vec![])),
    ]);
    wait_for("the gateway to scrape each pod's adapters", WAIT, || {
        (scraped_running(&gateway) == expected).then_some(())
    });

    // The load scorer alone would pick the idle pod 2 every time.
    assert_eq!(routed_to(&gateway, "sql", "to-sql"), pod(0));
    assert_eq!(routed_to(&gateway, "chat", "to-chat"), pod(1));
    // Loaded nowhere: pods 0 and 1 have no free slot.
    assert_eq!(routed_to(&gateway, "code", "to-code"), pod(2));

    let line = gateway.wait_handled("to-sql");
    assert!(
        line["scores"]
            .as_str()
            .is_some_and(|s| s.contains("lora-affinity:1.000")),
        "{line}"
    );
}

#[test]
fn a_canary_split_sends_each_adapter_its_share_and_the_pod_gets_the_chosen_adapter() {
    const REQUESTS: usize = 400;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_sim(dir.path(), 1, &["--time-scale", "0.01"]);
    let gateway = start_gateway(&sim, "[{name: load, weight: 1}]");
    let body = json!({
        "model": "canary",
        "messages": [{"role": "user", "content": "which adapter answers?"}],
        "max_tokens": 1,
    })
    .to_string();
    let url = gateway.url("/v1/chat/completions");
    // One curl, one connection, every request.
    let mut args = vec![
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        "-w",
        "\\n",
    ];
    args.extend(std::iter::repeat_n(url.as_str(), REQUESTS));
    let out = curl(&args);
    let mut served: HashMap<String, usize> = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let response: Value = serde_json::from_str(line).expect("JSON response");
        let model = response["model"].as_str().expect("model").to_string();
        *served.entry(model).or_default() += 1;
    }
    assert_eq!(served.values().sum::<usize>(), REQUESTS, "{served:?}");
    assert_eq!(served.len(), 2, "only the split's adapters: {served:?}");
    // sql-v2 weighs 1 of 4: 100 expected, σ ≈ 8.7; 5σ either side.
    let canary = served.get("sql-v2").copied().unwrap_or(0);
    assert!((57..=143).contains(&canary), "{served:?}");

    // Each log line names the client's model and the adapter chosen for it.
    let handled = wait_for("every request's log line", WAIT, || {
        let handled = gateway.handled();
        (handled.len() >= REQUESTS).then_some(handled)
    });
    let mut logged: HashMap<String, usize> = HashMap::new();
    for line in &handled {
        assert_eq!(line["model"], "canary", "{line}");
        let choice = line["split_choice"].as_str().expect("split_choice");
        *logged.entry(choice.to_string()).or_default() += 1;
    }
    assert_eq!(logged, served);
}

#[test]
fn a_split_over_an_unknown_adapter_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kvgate.yaml");
    let bad = model("[]").replace("adapter: sql-v2", "adapter: sql-v3");
    std::fs::write(
        &config,
        format!("server:\n  listen: 127.0.0.1:0\n  admin: 127.0.0.1:0\n{bad}"),
    )
    .expect("write config");
    let log = dir.path().join("kvgate.log");
    let mut serve = Serve::spawn(&config, &log, &[]);
    serve.wait_exit(WAIT);
    let text = serve.log();
    assert!(
        text.contains("adapter split \\\"canary\\\"") || text.contains("adapter split \"canary\""),
        "{text}"
    );
    assert!(text.contains("sql-v3"), "{text}");
}
