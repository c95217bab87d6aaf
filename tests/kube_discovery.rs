//! kvgate's discovery against the stand-in apiserver (tests/k8s/apiserver_standin.py), a
//! separate process speaking the Kubernetes list/watch protocol on 127.0.0.1. The stand-in is
//! not a real apiserver (see its docstring for what it does and does not model); kubectl is run
//! against it here to show that the protocol it speaks is the real one.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use kvgate::discovery::{
    run_discovery, DiscoveryConfig, KubeDiscoveryConfig, PodEndpoint, PodRole, PortRef, Snapshot,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use upstream::Serve;

const STANDIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/k8s/apiserver_standin.py"
);
const WAIT: Duration = Duration::from_secs(20);
const SERVICE: &str = "vllm-qwen3-32b";
const MODEL: &str = "qwen";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A stand-in apiserver process with its state file, restartable on the same port.
struct Standin {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<&'static str>,
    http: reqwest::Client,
}

impl Standin {
    fn start(extra: &[&'static str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut standin = Self {
            child: None,
            port: 0,
            dir,
            extra: extra.to_vec(),
            http: reqwest::Client::new(),
        };
        standin.spawn();
        standin
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("standin.log"))
            .expect("stand-in log");
        let mut child = Command::new("python3")
            .arg(STANDIN)
            .args(["--port", &self.port.to_string()])
            .arg("--state-file")
            .arg(self.dir.path().join("state.json"))
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start the stand-in apiserver (python3)");
        let stdout = child.stdout.take().expect("piped stdout");
        self.port = read_listening_port(stdout);
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill stand-in");
            child.wait().expect("reap stand-in");
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("kubeconfig");
        let server = self.url("");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{server: \"{server}\"}}\n\
                 users:\n- name: nobody\n  user: {{}}\ncontexts:\n- name: standin\n  context: {{cluster: standin, \
                 user: nobody, namespace: default}}\ncurrent-context: standin\n"
            ),
        )
        .expect("write kubeconfig");
        path
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, &Value)>,
    ) -> Value {
        let mut request = self.http.request(method.clone(), self.url(path));
        if let Some((content_type, body)) = body {
            request = request
                .header("Content-Type", content_type)
                .body(body.to_string());
        }
        let response = request.send().await.expect("stand-in request");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON response");
        assert!(status.is_success(), "{method} {path}: {status} {body}");
        body
    }

    async fn create(&self, collection: &str, object: Value) -> Value {
        self.request(
            reqwest::Method::POST,
            collection,
            Some(("application/json", &object)),
        )
        .await
    }

    async fn patch(&self, path: &str, patch: Value) -> Value {
        self.request(
            reqwest::Method::PATCH,
            path,
            Some(("application/merge-patch+json", &patch)),
        )
        .await
    }

    async fn delete(&self, path: &str) -> Value {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    async fn control(&self, path: &str) -> Value {
        self.request(reqwest::Method::POST, path, None).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("standin.log")).unwrap_or_default()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_listening_port(stdout: ChildStdout) -> u16 {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(WAIT)
        .expect("stand-in did not report its port");
    line.trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected stand-in banner {line:?}"))
}

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

fn endpoint(ip: &str, pod: &str, uid: &str) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "targetRef": {"kind": "Pod", "namespace": "default", "name": pod, "uid": uid},
    })
}

fn slice(name: &str, service: &str, endpoints: Vec<Value>) -> Value {
    slice_on(name, service, 8000, endpoints)
}

/// A slice whose endpoints serve HTTP on `port`.
fn slice_on(name: &str, service: &str, port: u16, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// One `run_discovery` task and the receiving end of its snapshots.
struct Discovery {
    rx: watch::Receiver<Snapshot>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), kvgate::discovery::DiscoveryError>>,
}

impl Discovery {
    fn start(cfg: DiscoveryConfig) -> Self {
        init_tracing();
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run_discovery(cfg, "Qwen3-32B".into(), tx, shutdown));
        Self { rx, stop, task }
    }

    fn kubernetes(standin: &Standin, cfg: KubeDiscoveryConfig) -> Self {
        Self::start(DiscoveryConfig::Kubernetes(KubeDiscoveryConfig {
            kubeconfig: Some(standin.kubeconfig()),
            ..cfg
        }))
    }

    /// Waits (bounded) until the snapshot satisfies `check`; returns it.
    async fn until(&mut self, what: &str, check: impl Fn(&[PodEndpoint]) -> bool) -> Snapshot {
        let outcome = tokio::time::timeout(WAIT, self.rx.wait_for(|s| check(s)))
            .await
            .map(|waited| waited.map(|snapshot| snapshot.clone()));
        match outcome {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(_)) => panic!("discovery ended while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; last snapshot {:?}",
                keys(&self.rx.borrow())
            ),
        }
    }

    async fn until_keys(&mut self, what: &str, expected: &[&str]) -> Snapshot {
        self.until(what, |s| keys(s) == expected).await
    }

    async fn stop(self) {
        self.stop.send(true).expect("discovery still listening");
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("discovery did not stop on shutdown")
            .expect("discovery task panicked");
        result.expect("discovery returned an error");
    }
}

fn keys(snapshot: &[PodEndpoint]) -> Vec<&str> {
    snapshot.iter().map(|e| e.key.as_str()).collect()
}

fn service_config() -> KubeDiscoveryConfig {
    KubeDiscoveryConfig {
        namespace: Some("default".into()),
        service: Some(SERVICE.into()),
        label_selector: None,
        inference_pool: None,
        port: Some(PortRef::Name("http".into())),
        events_port: Some(5557),
        replay_port: Some(5558),
        kubeconfig: None,
        context: None,
        role_label: None,
    }
}

#[tokio::test]
async fn endpointslice_lifecycle() {
    let standin = Standin::start(&[]);
    standin
        .create(
            SLICES,
            slice(
                "qwen-a",
                SERVICE,
                vec![endpoint("10.0.0.5", "vllm-0", "uid-0")],
            ),
        )
        .await;
    // Another Service's slice must not leak in through the label selector.
    standin
        .create(
            SLICES,
            slice(
                "other-a",
                "other",
                vec![endpoint("10.9.9.9", "other-0", "uid-x")],
            ),
        )
        .await;

    let mut discovery = Discovery::kubernetes(&standin, service_config());
    let initial = discovery
        .until_keys("the initial list", &["default/vllm-0/uid-0"])
        .await;
    assert_eq!(
        initial[0],
        PodEndpoint {
            key: "default/vllm-0/uid-0".into(),
            name: "vllm-0".into(),
            http: "10.0.0.5:8000".parse::<SocketAddr>().unwrap(),
            events: Some("tcp://10.0.0.5:5557".into()),
            replay: Some("tcp://10.0.0.5:5558".into()),
            topic_host: "10.0.0.5".into(),
            role: Default::default(),
        }
    );

    // A second slice of the same Service (the controller splits large services).
    standin
        .create(
            SLICES,
            slice(
                "qwen-b",
                SERVICE,
                vec![endpoint("10.0.0.6", "vllm-1", "uid-1")],
            ),
        )
        .await;
    discovery
        .until_keys(
            "an added ready endpoint",
            &["default/vllm-0/uid-0", "default/vllm-1/uid-1"],
        )
        .await;

    let mut not_ready = endpoint("10.0.0.6", "vllm-1", "uid-1");
    not_ready["conditions"] = json!({"ready": false, "serving": false, "terminating": false});
    standin
        .patch(
            &format!("{SLICES}/qwen-b"),
            json!({"endpoints": [not_ready]}),
        )
        .await;
    discovery
        .until_keys("a not-ready endpoint to leave", &["default/vllm-0/uid-0"])
        .await;

    // Ready again, and a missing `ready` counts as ready per the API.
    let mut unset = endpoint("10.0.0.6", "vllm-1", "uid-1");
    unset["conditions"] = json!({});
    standin
        .patch(&format!("{SLICES}/qwen-b"), json!({"endpoints": [unset]}))
        .await;
    discovery
        .until_keys(
            "an endpoint without conditions",
            &["default/vllm-0/uid-0", "default/vllm-1/uid-1"],
        )
        .await;

    // Terminating but still serving (graceful shutdown) is not ready for new requests.
    let mut draining = endpoint("10.0.0.6", "vllm-1", "uid-1");
    draining["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    standin
        .patch(
            &format!("{SLICES}/qwen-b"),
            json!({"endpoints": [draining]}),
        )
        .await;
    discovery
        .until_keys("a terminating endpoint to leave", &["default/vllm-0/uid-0"])
        .await;

    // The pod restarts: same name and IP, new UID, so a new key.
    standin
        .patch(
            &format!("{SLICES}/qwen-a"),
            json!({"endpoints": [endpoint("10.0.0.5", "vllm-0", "uid-0b")]}),
        )
        .await;
    discovery
        .until_keys("the restarted pod's new key", &["default/vllm-0/uid-0b"])
        .await;

    // A slice losing its Service label leaves the selector: the watch reports a delete.
    standin
        .patch(
            &format!("{SLICES}/qwen-a"),
            json!({"metadata": {"labels": {"kubernetes.io/service-name": "elsewhere"}}}),
        )
        .await;
    discovery
        .until_keys("a slice leaving the selector", &[])
        .await;
    standin
        .create(
            SLICES,
            slice(
                "qwen-c",
                SERVICE,
                vec![endpoint("10.0.0.7", "vllm-2", "uid-2")],
            ),
        )
        .await;
    discovery
        .until_keys("a new slice", &["default/vllm-2/uid-2"])
        .await;
    standin.delete(&format!("{SLICES}/qwen-c")).await;
    discovery.until_keys("a deleted slice", &[]).await;

    discovery.stop().await;
}

#[tokio::test]
async fn compaction_forces_a_relist_and_discovery_continues() {
    let standin = Standin::start(&[]);
    standin
        .create(
            SLICES,
            slice(
                "qwen-a",
                SERVICE,
                vec![
                    endpoint("10.0.0.5", "vllm-0", "uid-0"),
                    endpoint("10.0.0.6", "vllm-1", "uid-1"),
                ],
            ),
        )
        .await;
    let mut discovery = Discovery::kubernetes(&standin, service_config());
    discovery
        .until_keys(
            "the initial list",
            &["default/vllm-0/uid-0", "default/vllm-1/uid-1"],
        )
        .await;

    // Held watches deliver nothing, so the change below can reach discovery only through a
    // re-list, which the 410 Gone after compaction forces.
    standin.control("/_ctl/watches?paused=true").await;
    standin
        .patch(
            &format!("{SLICES}/qwen-a"),
            json!({"endpoints": [endpoint("10.0.0.5", "vllm-0", "uid-0")]}),
        )
        .await;
    standin.control("/_ctl/compact").await;
    discovery
        .until_keys("the re-list after 410 Gone", &["default/vllm-0/uid-0"])
        .await;
    standin.control("/_ctl/watches?paused=false").await;

    standin
        .create(
            SLICES,
            slice(
                "qwen-b",
                SERVICE,
                vec![endpoint("10.0.0.7", "vllm-2", "uid-2")],
            ),
        )
        .await;
    discovery
        .until_keys(
            "a watch event after the re-list",
            &["default/vllm-0/uid-0", "default/vllm-2/uid-2"],
        )
        .await;
    let log = standin.log();
    let relists = log
        .lines()
        .filter(|l| {
            l.contains("GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?")
                && !l.contains("watch=true")
        })
        .count();
    assert!(
        relists >= 2,
        "expected an initial list and a re-list:\n{log}"
    );
    discovery.stop().await;
}

#[tokio::test]
async fn apiserver_outage_keeps_the_last_snapshot_and_catches_up() {
    let mut standin = Standin::start(&[]);
    standin
        .create(
            SLICES,
            slice(
                "qwen-a",
                SERVICE,
                vec![endpoint("10.0.0.5", "vllm-0", "uid-0")],
            ),
        )
        .await;
    let mut discovery = Discovery::kubernetes(&standin, service_config());
    let before = discovery
        .until_keys("the initial list", &["default/vllm-0/uid-0"])
        .await;

    standin.kill();
    // Long enough for the watch to drop and a few re-list attempts to fail.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !discovery.rx.has_changed().expect("discovery alive"),
        "a snapshot was published while the apiserver was down"
    );
    assert_eq!(*discovery.rx.borrow(), before);

    standin.restart();
    standin
        .create(
            SLICES,
            slice(
                "qwen-b",
                SERVICE,
                vec![endpoint("10.0.0.6", "vllm-1", "uid-1")],
            ),
        )
        .await;
    discovery
        .until_keys(
            "the change made after the restart",
            &["default/vllm-0/uid-0", "default/vllm-1/uid-1"],
        )
        .await;
    discovery.stop().await;
}

#[tokio::test]
async fn endpoints_fallback_when_endpointslices_are_not_served() {
    let standin = Standin::start(&["--no-endpointslices"]);
    let endpoints = |ready: Vec<Value>, not_ready: Vec<Value>| {
        json!({
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": SERVICE},
            "subsets": [{
                "addresses": ready,
                "notReadyAddresses": not_ready,
                "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            }],
        })
    };
    let address = |ip: &str, pod: &str, uid: &str| json!({"ip": ip, "targetRef": {"kind": "Pod", "namespace": "default", "name": pod, "uid": uid}});
    standin
        .create(
            "/api/v1/namespaces/default/endpoints",
            endpoints(
                vec![address("10.0.0.5", "vllm-0", "uid-0")],
                vec![address("10.0.0.6", "vllm-1", "uid-1")],
            ),
        )
        .await;
    let mut discovery = Discovery::kubernetes(&standin, service_config());
    discovery
        .until_keys("ready Endpoints addresses", &["default/vllm-0/uid-0"])
        .await;
    standin
        .patch(
            &format!("/api/v1/namespaces/default/endpoints/{SERVICE}"),
            json!({"subsets": endpoints(vec![address("10.0.0.6", "vllm-1", "uid-1")], vec![])["subsets"]}),
        )
        .await;
    discovery
        .until_keys("the updated Endpoints", &["default/vllm-1/uid-1"])
        .await;
    assert!(
        standin.log().contains("GET /apis/discovery.k8s.io/v1 "),
        "discovery was not consulted"
    );
    discovery.stop().await;
}

const PODS: &str = "/api/v1/namespaces/default/pods";
const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools";

fn pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                                 "ports": [{"name": "http", "containerPort": 8000}]}]},
    })
}

fn pod_status(ip: &str, ready: bool) -> Value {
    json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
    }})
}

#[tokio::test]
async fn inference_pool_selects_ready_pods() {
    let standin = Standin::start(&[]);
    let created = standin
        .create(
            PODS,
            pod(
                "vllm-0",
                json!({"app": "vllm", "model": "qwen", "llm-d.ai/role": "prefill"}),
            ),
        )
        .await;
    let uid0 = created["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    standin
        .patch(
            &format!("{PODS}/vllm-0/status"),
            pod_status("10.0.1.1", true),
        )
        .await;
    let created = standin
        .create(
            PODS,
            pod("vllm-1", json!({"app": "vllm", "model": "llama"})),
        )
        .await;
    let uid1 = created["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    standin
        .patch(
            &format!("{PODS}/vllm-1/status"),
            pod_status("10.0.1.2", true),
        )
        .await;
    standin
        .create(
            POOLS,
            json!({
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": "qwen-pool"},
                "spec": {
                    "selector": {"matchLabels": {"app": "vllm", "model": "qwen"}},
                    "targetPorts": [{"number": 8000}],
                    "endpointPickerRef": {"name": "kvgate", "port": {"number": 9002}},
                },
            }),
        )
        .await;

    let mut discovery = Discovery::kubernetes(
        &standin,
        KubeDiscoveryConfig {
            service: None,
            port: None,
            inference_pool: Some("qwen-pool".into()),
            ..service_config()
        },
    );
    let key0 = format!("default/vllm-0/{uid0}");
    let key1 = format!("default/vllm-1/{uid1}");
    let snapshot = discovery
        .until_keys("the pool's ready pods", &[&key0])
        .await;
    assert_eq!(
        snapshot[0].http,
        "10.0.1.1:8000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        snapshot[0].role,
        PodRole::Prefill,
        "from its llm-d.ai/role label"
    );

    standin
        .patch(
            &format!("{PODS}/vllm-0/status"),
            pod_status("10.0.1.1", false),
        )
        .await;
    discovery.until_keys("a pod turning not-ready", &[]).await;
    standin
        .patch(
            &format!("{PODS}/vllm-0/status"),
            pod_status("10.0.1.1", true),
        )
        .await;
    discovery.until_keys("the pod ready again", &[&key0]).await;

    // The pool's selector widens: the pod watch restarts on the new selector.
    standin
        .patch(
            &format!("{POOLS}/qwen-pool"),
            json!({"spec": {"selector": {"matchLabels": {"app": "vllm", "model": null}}}}),
        )
        .await;
    let mut both = [key0.as_str(), key1.as_str()];
    both.sort();
    let widened = discovery.until_keys("the widened pool", &both).await;
    let unlabelled = widened.iter().find(|e| e.key == key1).expect("vllm-1");
    assert_eq!(unlabelled.role, PodRole::Both, "no role label");

    standin.delete(&format!("{PODS}/vllm-1")).await;
    discovery.until_keys("a deleted pod", &[&key0]).await;
    standin.delete(&format!("{POOLS}/qwen-pool")).await;
    discovery.until_keys("a deleted pool", &[]).await;
    discovery.stop().await;
}

#[tokio::test]
async fn static_list_is_published_once_and_stops_on_shutdown() {
    let cfg: DiscoveryConfig = yaml_serde::from_str(
        "static:\n  pods:\n  - {http: '127.0.0.1:8001', events: 'tcp://127.0.0.1:5557'}\n  - {http: '127.0.0.1:8002', name: b, topicHost: pod-b}\n",
    )
    .expect("static discovery config");
    let mut discovery = Discovery::start(cfg);
    let snapshot = discovery
        .until_keys("the static list", &["127.0.0.1:8001", "127.0.0.1:8002"])
        .await;
    assert_eq!(snapshot[0].events.as_deref(), Some("tcp://127.0.0.1:5557"));
    assert_eq!(snapshot[0].topic_host, "127.0.0.1");
    assert_eq!(
        (snapshot[1].name.as_str(), snapshot[1].topic_host.as_str()),
        ("b", "pod-b")
    );
    discovery.stop().await;
}

#[test]
fn config_shapes() {
    let cfg: DiscoveryConfig = yaml_serde::from_str(
        "kubernetes: {namespace: default, service: vllm-qwen3-32b, port: 8000}",
    )
    .expect("kubernetes");
    assert!(
        matches!(&cfg, DiscoveryConfig::Kubernetes(k) if k.port == Some(PortRef::Number(8000)))
    );
    cfg.validate().expect("valid");
    assert!(yaml_serde::from_str::<DiscoveryConfig>(
        "kubernetes: {service: x, port: 8000, bogus: 1}"
    )
    .is_err());
    assert!(yaml_serde::from_str::<DiscoveryConfig>("consul: {}").is_err());
    let roles: DiscoveryConfig =
        yaml_serde::from_str("kubernetes: {inferencePool: qwen-pool, roleLabel: example.com/role}")
            .expect("roleLabel");
    roles
        .validate()
        .expect("a role label with an InferencePool");
    let roles: DiscoveryConfig =
        yaml_serde::from_str("kubernetes: {service: x, port: 8000, roleLabel: example.com/role}")
            .expect("parses");
    let err = roles
        .validate()
        .expect_err("EndpointSlices carry no pod labels");
    assert!(
        err.to_string().contains("roleLabel needs inferencePool"),
        "{err}"
    );
    let duplicate: DiscoveryConfig =
        yaml_serde::from_str("static: {pods: [{http: '127.0.0.1:1'}, {http: '127.0.0.1:1'}]}")
            .expect("static");
    assert!(duplicate.validate().is_err());
}

/// kubectl, the reference client, against the stand-in: discovery, create, get, raw get, and a
/// watch that sees an object created after it started.
#[test]
fn kubectl_speaks_to_the_standin() {
    let standin = Standin::start(&[]);
    let kubeconfig = standin.kubeconfig();
    let cache = standin.dir.path().join("kubectl-cache");
    let kubectl = |args: &[&str], stdin: Option<&Value>| -> String {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(body) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(body.to_string().as_bytes())
                .expect("write manifest");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("kubectl output");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            standin.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let version = kubectl(&["version", "-o", "json"], None);
    assert!(version.contains("v1.33.0-standin"), "{version}");
    // The stand-in serves no OpenAPI documents, so kubectl cannot validate client-side.
    let created = kubectl(
        &["create", "--validate=false", "-f", "-"],
        Some(&slice(
            "qwen-a",
            SERVICE,
            vec![endpoint("10.0.0.5", "vllm-0", "uid-0")],
        )),
    );
    assert!(
        created.contains("endpointslice.discovery.k8s.io/qwen-a created"),
        "{created}"
    );

    let listed: Value =
        serde_json::from_str(&kubectl(&["get", "endpointslices", "-o", "json"], None))
            .expect("JSON");
    assert_eq!(listed["items"][0]["metadata"]["name"], "qwen-a");
    assert_eq!(
        listed["items"][0]["endpoints"][0]["targetRef"]["uid"],
        "uid-0"
    );
    let raw: Value = serde_json::from_str(&kubectl(
        &[
            "get",
            "--raw",
            &format!("{SLICES}?labelSelector=kubernetes.io%2Fservice-name+in+%28{SERVICE}%2Cx%29"),
        ],
        None,
    ))
    .expect("JSON");
    assert_eq!(raw["kind"], "EndpointSliceList");
    assert_eq!(raw["items"].as_array().map(Vec::len), Some(1));
    let none: Value = serde_json::from_str(&kubectl(
        &[
            "get",
            "--raw",
            &format!("{SLICES}?labelSelector=kubernetes.io%2Fservice-name+notin+%28{SERVICE}%29"),
        ],
        None,
    ))
    .expect("JSON");
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0));

    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args(["get", "endpointslices", "--watch", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run kubectl --watch");
    let (tx, rx) = mpsc::channel();
    let stdout = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let expect_line = |wanted: &str| loop {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("kubectl --watch never printed {wanted:?}"));
        if line.contains(wanted) {
            break;
        }
    };
    // Printed from kubectl's initial list; what follows can only come through the watch.
    expect_line("ADDED");
    kubectl(
        &["create", "--validate=false", "-f", "-"],
        Some(&slice(
            "qwen-b",
            SERVICE,
            vec![endpoint("10.0.0.6", "vllm-1", "uid-1")],
        )),
    );
    expect_line("ADDED      qwen-b");
    kubectl(&["delete", "endpointslice", "qwen-b"], None);
    expect_line("DELETED    qwen-b");
    watch.kill().expect("stop kubectl --watch");
    watch.wait().expect("reap kubectl");
    let log = standin.log();
    assert!(log.contains("watch=true"), "kubectl did not watch:\n{log}");
    // kubectl took the aggregated discovery documents and never fell back to per-group ones.
    assert!(
        !log.contains("GET /apis/discovery.k8s.io/v1?"),
        "kubectl fell back to legacy discovery:\n{log}"
    );
}

/// `kvgate serve` discovering its pods from the stand-in: two `kvgate sim` pods on their own
/// loopback addresses (127.0.0.2 and 127.0.0.3, each in a slice of its own since their
/// ports differ), publishing their KV events to kvgate's bound SUB. Deleting a pod's slice
/// removes the pod from the gateway and its blocks from the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_from_its_endpointslice_leaves_the_gateways_index() {
    let standin = Standin::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kvgate.yaml");
    let discovery = format!(
        "{{kubernetes: {{namespace: default, service: {SERVICE}, port: http, kubeconfig: \"{}\"}}}}",
        standin.kubeconfig().display()
    );
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:0\n  admin: 127.0.0.1:0\n  healthCheckIntervalMs: 0\n  \
             scrapeIntervalMs: 0\n  threads: 2\nevents:\n  mode: bind\n  bind: tcp://127.0.0.1:0\n\
             logging:\n  level: info\n  format: json\n{}",
            sim::model_yaml(MODEL, "[]").replace(
                "discovery: {static: {pods: []}}",
                &format!("discovery: {discovery}")
            )
        ),
    )
    .expect("write config");
    let (gateway, listening) = Serve::start(&config, &dir.path().join("kvgate.log"), &[]);
    let events = listening.events.clone().expect("a bound event SUB");
    let admin = listening.admin;

    let sim_config = dir.path().join("sim.yaml");
    std::fs::write(&sim_config, sim::model_yaml(MODEL, "[]")).expect("write sim config");
    let start_pod = |host: &str| {
        sim::SimPods::start(
            &sim_config,
            1,
            &[
                "--host",
                host,
                "--events-connect",
                &events,
                "--topic-host",
                "{host}",
            ],
        )
    };
    let pods = [start_pod("127.0.0.2"), start_pod("127.0.0.3")];
    let addrs: Vec<String> = pods
        .iter()
        .map(|p| p.field(0, "http").to_string())
        .collect();
    for (n, addr) in addrs.iter().enumerate() {
        let (ip, port) = addr.rsplit_once(':').expect("host:port");
        standin
            .create(
                SLICES,
                slice_on(
                    &format!("qwen-{n}"),
                    SERVICE,
                    port.parse().expect("port"),
                    vec![endpoint(ip, &format!("vllm-{n}"), &format!("uid-{n}"))],
                ),
            )
            .await;
    }
    let listed = |pods: &[Value]| {
        let mut http: Vec<String> = pods
            .iter()
            .filter_map(|p| p["http"].as_str().map(str::to_string))
            .collect();
        http.sort();
        http
    };
    upstream::wait_for("both pods discovered", WAIT, || {
        (listed(&upstream::debug_pods(admin, MODEL)) == addrs).then_some(())
    });

    // Each pod serves a document of its own; kvgate indexes both from their events.
    let mut blocks = Vec::new();
    for (n, addr) in addrs.iter().enumerate() {
        let text: Vec<String> = (0..120).map(|w| format!("pod{n} fact{w}")).collect();
        let body = json!({"model": MODEL, "prompt": text.join(" "), "max_tokens": 1});
        let (ip, port) = addr.rsplit_once(':').expect("host:port");
        let answer = reqwest::Client::new()
            .post(format!("http://{ip}:{port}/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("request")
            .json::<Value>()
            .await
            .expect("JSON answer");
        let prompt = answer["usage"]["prompt_tokens"].as_u64().expect("usage");
        blocks.push(prompt / sim::BLOCK as u64);
    }
    let entries = || upstream::metric(admin, "kvgate_index_entries");
    let both = (blocks[0] + blocks[1]) as f64;
    upstream::wait_for("both pods' blocks in the index", WAIT, || {
        (entries() >= both).then_some(())
    });

    // The second pod leaves the Service: its slice is deleted.
    standin.delete(&format!("{SLICES}/qwen-1")).await;
    upstream::wait_for("the deleted pod to leave the gateway", WAIT, || {
        (listed(&upstream::debug_pods(admin, MODEL)) == addrs[..1]).then_some(())
    });
    // What stays is the first pod's: its prompt's blocks (and at most the one its single
    // output token may have completed).
    upstream::wait_for("its blocks to leave the index", WAIT, || {
        (entries() <= (blocks[0] + 1) as f64).then_some(())
    });
    assert!(entries() >= blocks[0] as f64);
    // The gateway says so: the pod left its routing and its entries left the index.
    let fields = gateway.log_fields();
    let logged = |message: &str, field: &str, value: &str| {
        fields
            .iter()
            .any(|f| f["message"] == message && f[field] == value)
    };
    assert!(
        logged("pod removed", "pod", &addrs[1])
            && logged(
                "pod removed: its KV index entries are retired",
                "topic_host",
                "127.0.0.3"
            ),
        "{}",
        gateway.log()
    );
}
