//! `kvgate demo` as a user runs it: the real binary starts `kvgate sim` and `kvgate serve`
//! as its children, sends the seed chat through the gateway and runs the live comparison.
//! The shipped config is used with free ports substituted, so the test can run beside
//! others; the pods run four times faster than modelled to keep it short.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Seven consecutive free ports: four pods, the gateway, its admin listener, the event SUB.
fn free_ports() -> u16 {
    let start = 20_000 + (std::process::id() % 2_000) as u16 * 10;
    (0..200u16)
        .map(|k| start.wrapping_add(k * 7) % 40_000 + 20_000)
        .find(|&base| (0..7).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .expect("seven free consecutive ports")
}

fn config(dir: &Path, base: u16) -> std::path::PathBuf {
    let shipped =
        std::fs::read_to_string(Path::new(ROOT).join("conf/kvgate.yaml")).expect("shipped config");
    let mut text = shipped
        .replace("../.tokenizers", &format!("{ROOT}/.tokenizers"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", base + 4))
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{}", base + 5))
        .replace(
            "tcp://127.0.0.1:5557",
            &format!("tcp://127.0.0.1:{}", base + 6),
        );
    for i in 1..=4u16 {
        text = text.replace(
            &format!("127.0.0.1:800{i}"),
            &format!("127.0.0.1:{}", base + i - 1),
        );
    }
    assert!(!text.contains(":8001"), "every shipped port was replaced");
    let path = dir.join("kvgate.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn demo_runs_the_chat_and_the_comparison_and_leaves_nothing_running() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = free_ports();
    let config = config(dir.path(), base);
    let out = dir.path().join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["demo", "--config"])
        .arg(&config)
        .arg("--chat")
        .arg(Path::new(ROOT).join("conf/examples/round1.json"))
        .args([
            "--duration",
            "3",
            "--qps",
            "4",
            "--time-scale",
            "0.25",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("kvgate demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");

    for round in ["demo-round-1", "demo-round-2"] {
        let line = stdout
            .lines()
            .find(|l| l.contains("Request handled") && l.contains(&format!("request_id={round}")))
            .unwrap_or_else(|| panic!("the gateway's line for {round} is shown:\n{stdout}"));
        assert!(line.contains("status=200"), "{line}");
        assert!(line.contains("policy=\"default\""), "{line}");
    }
    for profile in ["kv-cache", "prefix", "round-robin"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {profile} |")))
            .unwrap_or_else(|| panic!("a table row for {profile}:\n{stdout}"));
        assert!(
            row.trim_end().ends_with("| 0 |"),
            "no failed requests: {row}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("demo.json")).expect("report written"))
            .expect("report parses");
    assert_eq!(report["mode"], "live");
    let policies = report["segments"][0]["policies"]
        .as_array()
        .expect("policies");
    assert_eq!(policies.len(), 3);
    for policy in policies {
        let served: u64 = policy["summary"]["podRequests"]
            .as_array()
            .expect("per-pod counts")
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .sum();
        assert_eq!(
            served,
            policy["summary"]["requests"].as_u64().unwrap(),
            "every request was served by one of the pods"
        );
    }
    // The children are gone: their ports can be bound again.
    for port in base..base + 7 {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken after the demo"
        );
    }
}
