//! `kvgate inspect` end to end: the real binary, the shipped config and the real
//! Qwen3 tokenizer (made by `.ci/setup`).

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn inspect(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("inspect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvgate runs");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default())
        .expect("write stdin");
    drop(input);
    child.wait_with_output().expect("kvgate exits")
}

#[test]
fn shows_tokens_and_block_hashes_of_a_chat_request() {
    let out = inspect(&["conf/examples/round1.json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let tokens = report["tokenIds"].as_array().expect("token ids");
    assert_eq!(tokens.len() as u64, report["tokenCount"].as_u64().unwrap());
    let blocks = report["blocks"].as_array().expect("blocks");
    assert_eq!(blocks.len(), tokens.len() / 64);
    assert!(report["renderedPrompt"]
        .as_str()
        .unwrap()
        .starts_with("<|im_start|>system\n"));
    // The index key is the event's 64-bit value: the digest's last 8 bytes, big-endian.
    let digest = hex::decode(blocks[0]["digest"].as_str().unwrap()).unwrap();
    let tail: [u8; 8] = digest[digest.len() - 8..].try_into().unwrap();
    assert_eq!(
        blocks[0]["indexKey"].as_u64().unwrap(),
        u64::from_be_bytes(tail)
    );
}

#[test]
fn reads_standard_input_and_completions_prompts() {
    let body = br#"{"model": "Qwen3-32B", "prompt": "Hello, world"}"#;
    let out = inspect(&["--summary"], Some(body));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["endpoint"], "/v1/completions");
    assert!(report.get("tokenIds").is_none());
}

#[test]
fn bad_input_gets_a_clear_error() {
    for (body, expected) in [
        (&b"{not json"[..], "not a JSON object"),
        (
            br#"{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}"#,
            "\"nope\" is not configured",
        ),
        (
            br#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            "model",
        ),
    ] {
        let out = inspect(&["-"], Some(body));
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_reader_that_stops_early_ends_the_output_without_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["inspect", "conf/examples/round1.json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvgate runs");
    // The read end closes before kvgate has loaded its tokenizer, so its first write
    // meets a broken pipe, as under `| head -0`.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("kvgate exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
