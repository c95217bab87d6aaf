//! `deploy/seed/` and `deploy/crds/`: rendered with `kubectl kustomize` (offline), validated
//! strictly against the Kubernetes 1.33 schemas (`kubernetes-validate`) and the custom resources
//! against the shipped CRDs' schemas, then checked for what schemas cannot see: kvgate answers
//! on the name the guide's pods connect to, its config completed from the guide's policy agrees
//! with the pods' vLLM arguments, and only the needed ports are open.

#[path = "support/manifests.rs"]
mod manifests;

use kvgate::cluster::{compose, PolicyObjects};
use kvgate::config::{Config, EventsMode};
use manifests::{documents, find, kustomize, run_checker};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn seed_overlay_and_crds_are_valid_against_their_schemas() {
    let seed = kustomize("deploy/seed");
    let crds = [
        format!("{ROOT}/deploy/crds/inferencepools.inference.networking.x-k8s.io.yaml"),
        format!(
            "{ROOT}/deploy/crds/inferencetrafficpolicies.inferenceextension.alibabacloud.com.yaml"
        ),
    ];
    let custom = run_checker("validate_custom_resources.py", &[&crds[0], &crds[1]], &seed);
    assert!(custom.contains("2/2 custom resources valid"), "{custom}");
    let builtin: Vec<String> = documents(&seed)
        .into_iter()
        .filter(|d| {
            !matches!(
                d["kind"].as_str(),
                Some("InferencePool" | "InferenceTrafficPolicy")
            )
        })
        .map(|d| serde_json::to_string(&d).expect("JSON"))
        .collect();
    // JSON documents are YAML documents.
    run_checker(
        "validate_manifests.py",
        &["1.33.0"],
        &builtin.join("\n---\n"),
    );
    run_checker(
        "validate_manifests.py",
        &["1.33.0"],
        &kustomize("deploy/crds"),
    );
}

#[test]
fn kvgate_takes_the_gateways_place_for_the_guides_pods() {
    let docs = documents(&kustomize("deploy/seed"));
    let vllm = find(&docs, "Deployment", "qwen3");
    let args = vllm["spec"]["template"]["spec"]["containers"][0]["args"][0]
        .as_str()
        .expect("vllm args");
    // The pods connect to epp-<pool namespace>-<pool name>.envoy-gateway-system:5557.
    let alias = find(&docs, "Service", "epp-default-qwen-inference-pool");
    assert_eq!(alias["metadata"]["namespace"], "envoy-gateway-system");
    assert!(args.contains(
        "tcp://epp-default-qwen-inference-pool.envoy-gateway-system.svc.cluster.local:5557"
    ));
    assert_eq!(alias["spec"]["type"], "ExternalName");
    let target = alias["spec"]["externalName"].as_str().expect("target");
    let events = find(&docs, "Service", "kvgate-events");
    assert_eq!(
        target,
        format!(
            "{}.{}.svc.cluster.local",
            events["metadata"]["name"].as_str().unwrap(),
            events["metadata"]["namespace"].as_str().unwrap()
        )
    );
    assert_eq!(events["spec"]["ports"][0]["port"], 5557);
    let peers = find(&docs, "Service", "kvgate-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");

    // kvgate's config, completed from the guide's policy, hashes as the pods do.
    let config = Config::load(std::path::Path::new(&format!(
        "{ROOT}/deploy/seed/kvgate.yaml"
    )))
    .expect("seed kvgate.yaml loads");
    assert_eq!(config.events.mode, EventsMode::Bind);
    assert!(config.relay.is_some());
    let policy = find(&docs, "InferenceTrafficPolicy", "inference-policy");
    let pool = find(&docs, "InferencePool", "qwen-inference-pool");
    assert_eq!(policy["spec"]["poolRef"]["name"], pool["metadata"]["name"]);
    // The model volume holds the tokenizer in the pods; here the repository's copy stands in.
    let mut config = config;
    let policies = config.traffic_policies.as_mut().expect("trafficPolicies");
    policies.tokenizer_root = None;
    policies.tokenizers.insert(
        "Qwen/Qwen3-32B".into(),
        format!("{ROOT}/.tokenizers/qwen3").into(),
    );
    let objects = PolicyObjects::from_iter([("inference-policy".to_string(), policy.clone())]);
    let composed = compose(config, &objects).expect("the guide's policy is honoured");
    let model = &composed.models[0];
    assert!(args.contains(&format!("--block-size {}", model.block_size)));
    assert!(args.contains("--prefix-caching-hash-algo sha256_cbor_64bit"));
    assert!(args.contains("--served-model-name Qwen3-32B") && model.name == "Qwen3-32B");
    let env = &vllm["spec"]["template"]["spec"]["containers"][0]["env"];
    let seed = env
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "PYTHONHASHSEED"))
        .expect("PYTHONHASHSEED");
    assert_eq!(seed["value"].as_str(), model.hash_seed.as_deref());
    assert!(args.contains("\\\"topic\\\":\\\"kv@${POD_IP}@Qwen3-32B\\\""));
    assert!(
        !args.contains("replay_endpoint"),
        "the guide's pods have no replay endpoint"
    );

    // Only the public port is open to all.
    let policy = find(&docs, "NetworkPolicy", "kvgate");
    for rule in policy["spec"]["ingress"].as_array().expect("rules") {
        let port = rule["ports"][0]["port"].as_u64().expect("port");
        match port {
            8080 => assert!(rule.get("from").is_none()),
            5557 => assert_eq!(
                rule["from"][0]["podSelector"]["matchLabels"]["app"],
                "qwen3"
            ),
            5558 => assert_eq!(
                rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
                "kvgate"
            ),
            9090 => assert!(rule["from"][0].get("namespaceSelector").is_some()),
            other => panic!("unexpected open port {other}"),
        }
    }
    let deployment = find(&docs, "Deployment", "kvgate");
    assert!(deployment["spec"]["replicas"].as_u64().expect("replicas") >= 2);
    let mounts = &deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"];
    let model_mount = mounts
        .as_array()
        .and_then(|m| m.iter().find(|v| v["name"] == "model"))
        .expect("model volume");
    assert_eq!(model_mount["readOnly"], true);
    let role = find(&docs, "Role", "kvgate-traffic-policy");
    let writes: Vec<&Value> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["verbs"].as_array().unwrap().iter().any(|v| v == "create"))
        .collect();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0]["resources"][0], "events");
}
