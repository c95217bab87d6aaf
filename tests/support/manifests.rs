//! deploy/'s Kubernetes manifests as kubectl renders them, for the tests that read them.

use std::io::Write;
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;

/// `kubectl kustomize` of `dir`, a path relative to the repository.
pub fn kustomize(dir: &str) -> String {
    let path = format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("kubectl")
        .args(["kustomize", &path])
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// Every document of a multi-document YAML stream.
pub fn documents(yaml: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The object of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"))
}

/// Runs `python3 tests/k8s/<script> <args>` with `stdin`; its stdout, asserting it succeeded.
pub fn run_checker(script: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("python3")
        .arg(format!("{}/tests/k8s/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("feed manifests");
    let out = child.wait_with_output().expect("checker output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
