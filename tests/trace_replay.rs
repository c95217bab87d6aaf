//! The traffic trace through real processes: `kvgate serve` in front of `kvgate sim` pods
//! records multi-turn conversations sent by the openai SDK; the trace holds what a replay
//! needs and nothing of the prompts, rotates at its size limit, follows a hot reload, and
//! `kvgate bench --trace` replays it to a verdict whose hit rate matches the live one.

// Shared with the other end-to-end tests, which use parts of it this file does not.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sim::{model_yaml, SimPods, BLOCK};
use upstream::{http_request, wait_for, Serve};

const PODS: usize = 4;
const MODEL: &str = "qwen";
const DOCUMENTS: usize = 4;
const CONVERSATIONS: usize = 24;
const TURNS: usize = 2;
const LIMIT: Duration = Duration::from_secs(60);
/// `trace.maxBytes`: the smallest allowed, so these conversations rotate the file.
const MAX_BYTES: u64 = 65_536;
const CONVERSATIONS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trace/conversations.py");

/// `kvgate serve` on a config file it reloads.
struct Gateway {
    /// Stops the process (and prints its log if the test fails) when dropped.
    _serve: Serve,
    listen: u16,
    admin: u16,
    config: PathBuf,
    pods: String,
}

/// Writes a gateway config with `trace` as its trace section (empty: none), whole and
/// renamed over the old one as an editor saves, so a reload never reads half a file.
/// The listeners bind port 0; the gateway reports the ports it got.
fn write_config(config: &Path, pods: &str, trace: &str) {
    let yaml = format!(
        "server:
  listen: 127.0.0.1:0
  admin: 127.0.0.1:0
  threads: 1
events:
  mode: connect
  replay: true
logging:
  level: info
  format: json
{trace}"
    ) + &model_yaml(MODEL, pods);
    let staged = config.with_extension("staged");
    fs::write(&staged, yaml).expect("write config");
    fs::rename(&staged, config).expect("replace config");
}

impl Gateway {
    fn start(dir: &Path, pods: String, trace: &str) -> Self {
        let config = dir.join("kvgate.yaml");
        write_config(&config, &pods, trace);
        let upgrade_sock = dir.join("upgrade.sock");
        let (serve, listening) = Serve::start(
            &config,
            &dir.join("kvgate.log"),
            &["--upgrade-sock", upgrade_sock.to_str().expect("UTF-8 path")],
        );
        let gateway = Self {
            _serve: serve,
            listen: listening.proxy,
            admin: listening.admin,
            config,
            pods,
        };
        wait_for("the gateway to be ready", LIMIT, || {
            (http_request(gateway.admin, "GET", "/readyz", &[], b"").0 == 200).then_some(())
        });
        gateway
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = http_request(self.admin, "GET", "/metrics", &[], b"");
        String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Rewrites the config and waits until the gateway applied it.
    fn reload(&self, trace: &str) {
        let before = self.metric("kvgate_config_reloads_total{result=\"ok\"}");
        write_config(&self.config, &self.pods, trace);
        wait_for("the reload", LIMIT, || {
            (self.metric("kvgate_config_reloads_total{result=\"ok\"}") > before).then_some(())
        });
    }

    fn chat(&self, question: &str) -> Value {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 4});
        let (status, response) = http_request(
            self.listen,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&response));
        serde_json::from_slice(&response).expect("JSON response")
    }
}

/// The complete lines of a trace file and its rotated predecessors, oldest first.
fn trace_lines(path: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = (1..=3)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .collect();
    files.push(path.to_path_buf());
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .flat_map(|text| {
            // The writer may be halfway through the last line.
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            complete
                .lines()
                .map(|l| serde_json::from_str(l).expect("a trace line is JSON"))
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// The document of conversations.py, to inspect a request it sends.
fn document(n: usize) -> String {
    (0..220)
        .map(|w| format!("clause{n}x{w} binds section {}.", (n * 13 + w * 7) % 41))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn recorded_traffic_holds_no_prompt_rotates_reloads_and_replays_to_the_live_hit_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim_config = dir.path().join("sim.yaml");
    fs::write(&sim_config, model_yaml(MODEL, "[]")).expect("write sim config");
    let sim = SimPods::start(
        &sim_config,
        PODS,
        &[
            "--events-bind-base-port",
            "0",
            "--replay-base-port",
            "0",
            "--time-scale",
            "0.1",
        ],
    );
    let pods = (0..PODS)
        .map(|i| {
            format!(
                "{{http: \"{}\", events: \"{}\", replay: \"{}\", topicHost: \"{}\"}}",
                sim.field(i, "http"),
                sim.field(i, "pubEndpoint"),
                sim.field(i, "replayEndpoint"),
                sim.topic_host(i, MODEL),
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let trace = dir.path().join("trace.jsonl");
    let trace_section =
        format!("trace: {{path: trace.jsonl, maxBytes: {MAX_BYTES}, maxFiles: 3}}\n");
    let gateway = Gateway::start(dir.path(), format!("[{pods}]"), &trace_section);

    // A real client: the openai SDK, streaming every other request.
    let out = Command::new("timeout")
        .args(["300", "python3", CONVERSATIONS_PY])
        .arg(format!("http://127.0.0.1:{}/v1", gateway.listen))
        .args([MODEL, &DOCUMENTS.to_string(), &CONVERSATIONS.to_string()])
        .arg(TURNS.to_string())
        .output()
        .expect("run conversations.py");
    assert!(
        out.status.success(),
        "conversations.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let usages: Value = serde_json::from_slice(&out.stdout).expect("JSON usages");
    let usages = usages["usages"].as_array().expect("usages").clone();
    let requests = CONVERSATIONS * TURNS;
    assert_eq!(usages.len(), requests);
    let sum = |field: &str| {
        usages
            .iter()
            .map(|u| u[field].as_u64().expect("a usage count"))
            .sum::<u64>()
    };
    let live_hit_rate = sum("cached_tokens") as f64 / sum("prompt_tokens") as f64;

    let lines = wait_for("every request in the trace", LIMIT, || {
        let lines = trace_lines(&trace);
        (lines.len() == requests).then_some(lines)
    });
    // What a replay needs, in order of arrival, with Mooncake's fields first.
    let mut inputs: Vec<u64> = usages
        .iter()
        .map(|u| u["prompt_tokens"].as_u64().unwrap())
        .collect();
    let mut recorded: Vec<u64> = lines
        .iter()
        .map(|l| l["input_length"].as_u64().expect("input_length"))
        .collect();
    inputs.sort_unstable();
    recorded.sort_unstable();
    assert_eq!(
        recorded, inputs,
        "one line per request, with its prompt tokens"
    );
    let mut last = 0;
    for line in &lines {
        let timestamp = line["timestamp"].as_u64().expect("timestamp in ms");
        assert!(timestamp >= last, "lines in arrival order within a file");
        last = timestamp;
        let input = line["input_length"].as_u64().unwrap();
        assert_eq!(line["output_length"], 8);
        assert_eq!(line["block_size"], BLOCK);
        let ids = line["hash_ids"].as_array().expect("hash_ids");
        assert_eq!(
            ids.len() as u64,
            input / BLOCK as u64,
            "one id per full block"
        );
        assert!(ids
            .iter()
            .all(|id| id.as_u64().is_some_and(|v| v < 1 << 53)));
        assert_eq!(line["model"], MODEL);
        assert_eq!(line["policy"], "default");
        assert_eq!(line["status"], 200);
        let pod = line["pod"].as_str().expect("pod");
        assert!((0..PODS).any(|i| sim.field(i, "http") == pod), "{pod}");
        assert!(line["predicted_cached_tokens"].is_u64());
        assert!(line["actual_cached_tokens"].is_u64());
    }
    // Conversations over one document share its blocks; documents differ from the first block.
    let firsts: std::collections::HashSet<u64> = lines
        .iter()
        .map(|l| l["hash_ids"][0].as_u64().unwrap())
        .collect();
    assert_eq!(firsts.len(), DOCUMENTS, "one chain per document");

    // Nothing of the prompts: no text, and not the block hashes themselves.
    let mut files = vec![trace.clone()];
    files.extend((1..=3).map(|n| PathBuf::from(format!("{}.{n}", trace.display()))));
    let raw: String = files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .collect();
    assert!(!raw.contains("clause") && !raw.contains("binds"));
    let body = dir.path().join("first.json");
    let first_request = json!({"model": MODEL, "max_tokens": 8, "messages": [
        {"role": "system", "content": format!("Answer from this contract.\n{}", document(0))},
        {"role": "user", "content": "Question 0 of reader 0: what binds clause0x0?"},
    ]});
    fs::write(&body, first_request.to_string()).expect("write body");
    let inspect = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["inspect", "--config"])
        .arg(&gateway.config)
        .arg(&body)
        .output()
        .expect("kvgate inspect");
    assert!(inspect.status.success());
    let inspected: Value = serde_json::from_slice(&inspect.stdout).expect("inspect JSON");
    let keys: Vec<u64> = inspected["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| b["indexKey"].as_u64().expect("indexKey"))
        .collect();
    assert_eq!(lines[0]["input_length"], inspected["tokenCount"]);
    assert_eq!(lines[0]["hash_ids"].as_array().unwrap().len(), keys.len());
    let ids: Vec<u64> = lines
        .iter()
        .flat_map(|l| {
            l["hash_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
        })
        .collect();
    assert!(
        keys.iter().all(|k| !ids.contains(k)),
        "the trace holds keyed ids, not the prompt's block hashes"
    );

    // Rotated at maxBytes, keeping maxFiles.
    assert!(PathBuf::from(format!("{}.1", trace.display())).exists());
    for file in files.iter().filter(|f| f.exists()) {
        assert!(
            fs::metadata(file).unwrap().len() <= MAX_BYTES,
            "{}",
            file.display()
        );
    }

    // A reload turns recording off, and on again into another file.
    gateway.reload("");
    gateway.chat("off the record");
    let second = dir.path().join("second.jsonl");
    gateway.reload("trace: {path: second.jsonl}\n");
    gateway.chat("on the record again");
    let again = wait_for("the second file's line", LIMIT, || {
        let lines = trace_lines(&second);
        (!lines.is_empty()).then_some(lines)
    });
    assert_eq!(
        again.len(),
        1,
        "the request sent while off was not recorded"
    );
    assert_eq!(trace_lines(&trace).len(), requests);

    // The replay: every policy in virtual time on a fleet sized like the recording one.
    let report_dir = dir.path().join("bench");
    let mut traces: Vec<String> = files
        .iter()
        .filter(|f| f.exists())
        .map(|f| f.display().to_string())
        .collect();
    traces.reverse();
    let bench = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["bench", "--quiet", "--trace", &traces.join(","), "--config"])
        .arg(&gateway.config)
        .arg("--out")
        .arg(&report_dir)
        .output()
        .expect("kvgate bench --trace");
    let stdout = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    assert!(stdout.contains("## Verdict"), "{stdout}");
    assert!(stdout.contains("wins with TTFT p90"), "{stdout}");
    assert!(
        stdout.contains("at 4×"),
        "speed-ups 1, 2 and 4 by default: {stdout}"
    );
    // The report is named after the first file given.
    let stem = Path::new(&traces[0])
        .file_stem()
        .expect("a file name")
        .to_string_lossy()
        .into_owned();
    let report: Value = serde_json::from_slice(
        &fs::read(report_dir.join(format!("{stem}.json"))).expect("report written"),
    )
    .expect("report JSON");
    // Sequential conversations tie on load, so a new document may land on a pod already
    // holding another: the fleet is sized from the pods the trace names, not the fleet's.
    let named: std::collections::HashSet<&str> =
        lines.iter().map(|l| l["pod"].as_str().unwrap()).collect();
    assert_eq!(
        report["pods"],
        named.len(),
        "as many pods as the trace shows"
    );
    let at_1x = &report["segments"][0];
    let precise = at_1x["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .find(|p| p["summary"]["policy"] == "precise")
        .expect("precise was replayed");
    let replayed = precise["summary"]["hitRate"].as_f64().expect("hit rate");
    eprintln!("hit rate: replayed {replayed:.4}, live {live_hit_rate:.4}");
    // Target: within 2 points; the margin absorbs a loaded machine's timing in the live run.
    assert!(
        (replayed - live_hit_rate).abs() <= 0.05,
        "replayed {replayed:.3} vs live {live_hit_rate:.3}"
    );
}
