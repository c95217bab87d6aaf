//! The manifests under deploy/: rendered with `kubectl kustomize` (offline), validated strictly
//! against the Kubernetes 1.33 OpenAPI schemas (the API version kvgate's k8s-openapi feature
//! targets) with the `kubernetes-validate` package, then checked for what schemas cannot see:
//! selectors that match, probes on the admin port, least-privilege RBAC, a kvgate config that
//! kvgate itself accepts, and one that agrees with the vLLM fleet it fronts.

#[path = "support/manifests.rs"]
mod manifests;

use std::net::SocketAddr;
use std::sync::Arc;

use kvgate::config::{Config, EventsMode, LogFormat};
use kvgate::discovery::{DiscoveryConfig, PortRef};
use kvgate::index::{BlockIndex, IndexConfig};
use kvgate::plugins::PluginContext;
use kvgate::scheduler::ModelScheduler;
use manifests::{documents, find, kustomize, run_checker};
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
/// Matches k8s-openapi's `v1_33` feature in Cargo.toml.
const KUBERNETES_VERSION: &str = "1.33.0";

fn rendered() -> Vec<Value> {
    documents(&kustomize("deploy"))
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A probe's or Service's port: a number, or a container port's name.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    container["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == *port))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container has no port {port}"))
}

fn arg_after<'a>(container: &'a Value, flag: &str) -> &'a str {
    let args = container["args"].as_array().expect("args");
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no value for {flag}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no env {name}"))
}

fn selector_matches(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas() {
    for dir in ["deploy", "deploy/kvgate", "deploy/vllm-example"] {
        let report = run_checker(
            "validate_manifests.py",
            &[KUBERNETES_VERSION],
            &kustomize(dir),
        );
        println!("{dir}:\n{report}");
    }
}

#[test]
fn kvgate_deployment_is_highly_available_and_locked_down() {
    let docs = rendered();
    let deployment = find(&docs, "Deployment", "kvgate");
    let spec = &deployment["spec"];
    assert!(
        spec["replicas"].as_u64() >= Some(2),
        "kvgate needs at least 2 replicas"
    );
    let pod = &spec["template"]["spec"];
    let kvgate = container(deployment, "kvgate");

    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &kvgate[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            resolve_port(kvgate, &get["port"]),
            9090,
            "{probe} must hit the admin port"
        );
    }
    let ports: Vec<u64> = kvgate["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    // No events port: in connect mode kvgate dials the pods, nothing dials kvgate.
    assert_eq!(ports, [8080, 9090]);

    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(kvgate["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(kvgate["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(kvgate["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(kvgate["resources"]["requests"]["cpu"].is_string());
    assert!(kvgate["resources"]["limits"]["memory"].is_string());

    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    let pre_stop = kvgate["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("preStop sleep");
    assert!(
        pre_stop < grace,
        "preStop ({pre_stop}s) must leave time for shutdown ({grace}s)"
    );

    let spread = pod["topologySpreadConstraints"]
        .as_array()
        .expect("topology spread");
    let labels = &pod_labels(deployment);
    assert!(spread
        .iter()
        .any(|c| c["topologyKey"] == "kubernetes.io/hostname"
            && selector_matches(&c["labelSelector"]["matchLabels"], labels)));
    assert_eq!(pod["serviceAccountName"], "kvgate");
}

fn pod_labels(deployment: &Value) -> Value {
    deployment["spec"]["template"]["metadata"]["labels"].clone()
}

#[test]
fn services_and_budget_select_the_kvgate_pods() {
    let docs = rendered();
    let deployment = find(&docs, "Deployment", "kvgate");
    let labels = pod_labels(deployment);
    let kvgate = container(deployment, "kvgate");
    assert!(selector_matches(
        &deployment["spec"]["selector"]["matchLabels"],
        &labels
    ));

    let services = [
        ("kvgate", "LoadBalancer", 8080),
        ("kvgate-admin", "ClusterIP", 9090),
    ];
    for (name, kind, port) in services {
        let service = find(&docs, "Service", name);
        assert_eq!(service["spec"]["type"], kind, "{name}");
        assert!(
            selector_matches(&service["spec"]["selector"], &labels),
            "{name} selects no kvgate pod"
        );
        let service_port = &service["spec"]["ports"][0];
        assert_eq!(service_port["port"], port, "{name}");
        assert_eq!(
            resolve_port(kvgate, &service_port["targetPort"]),
            port,
            "{name} targetPort"
        );
    }
    // A Service in front of kvgate's events would spread pods' connections over the replicas,
    // so each replica would see only some pods' events: connect mode needs none.
    let fronting: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "Service" && selector_matches(&d["spec"]["selector"], &labels))
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    assert_eq!(fronting, services.map(|(name, _, _)| name));
    assert!(!docs
        .iter()
        .any(|d| d["kind"] == "Service" && d["metadata"]["name"] == "kvgate-events"));
    let budget = find(&docs, "PodDisruptionBudget", "kvgate");
    assert!(selector_matches(
        &budget["spec"]["selector"]["matchLabels"],
        &labels
    ));
    let replicas = deployment["spec"]["replicas"].as_u64().expect("replicas");
    assert!(budget["spec"]["maxUnavailable"].as_u64() < Some(replicas));
}

#[test]
fn rbac_is_read_only_on_what_discovery_watches() {
    let docs = rendered();
    let role = find(&docs, "Role", "kvgate-discovery");
    let mut granted: Vec<(String, String)> = Vec::new();
    for rule in role["rules"].as_array().expect("rules") {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .expect("verbs")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule}");
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in rule["apiGroups"].as_array().expect("apiGroups") {
            for resource in rule["resources"].as_array().expect("resources") {
                granted.push((
                    group.as_str().expect("group").to_string(),
                    resource.as_str().expect("resource").to_string(),
                ));
            }
        }
    }
    granted.sort();
    let expected = [
        ("", "endpoints"),
        ("", "pods"),
        ("discovery.k8s.io", "endpointslices"),
        ("inference.networking.k8s.io", "inferencepools"),
    ];
    assert_eq!(
        granted,
        expected.map(|(g, r)| (g.to_string(), r.to_string()))
    );
    assert!(!docs
        .iter()
        .any(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding"));

    let binding = find(&docs, "RoleBinding", "kvgate-discovery");
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], "kvgate-discovery");
    let subject = &binding["subjects"][0];
    assert_eq!(subject["kind"], "ServiceAccount");
    assert_eq!(subject["name"], "kvgate");
    assert_eq!(
        subject["namespace"],
        find(&docs, "ServiceAccount", "kvgate")["metadata"]["namespace"]
    );
}

/// The kvgate.yaml that the kvgate pods mount, as rendered into their ConfigMap.
fn mounted_config(docs: &[Value]) -> &str {
    let kvgate_deployment = find(docs, "Deployment", "kvgate");
    let config_map_name = kvgate_deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find_map(|v| v["configMap"]["name"].as_str()))
        .expect("config volume");
    let mount_dir = container(kvgate_deployment, "kvgate")["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "config"))
        .and_then(|m| m["mountPath"].as_str())
        .expect("config mount");
    assert_eq!(
        arg_after(container(kvgate_deployment, "kvgate"), "--config"),
        format!("{mount_dir}/kvgate.yaml")
    );
    find(docs, "ConfigMap", config_map_name)["data"]["kvgate.yaml"]
        .as_str()
        .expect("kvgate.yaml")
}

#[test]
fn deploy_config_is_a_valid_kvgate_config() {
    let docs = rendered();
    let text = mounted_config(&docs);
    // Its paths are absolute (/models/...), so `load`'s path resolution would change nothing.
    let config = Config::parse(text).expect("kvgate.yaml parses as kvgate's Config");
    config.validate().expect("kvgate.yaml is valid");

    // Reachable from the Services and the kubelet's probes, not only from inside the pod.
    let any_interface = |addr: SocketAddr| addr.ip().is_unspecified();
    assert!(any_interface(config.server.listen) && config.server.listen.port() == 8080);
    assert!(any_interface(config.server.admin) && config.server.admin.port() == 9090);
    assert_eq!(config.events.mode, EventsMode::Connect);
    assert_eq!(config.logging.format, LogFormat::Json);

    // Every profile builds with kvgate's own plugin registry.
    let model = &config.models[0];
    assert_eq!(model.profile, "default");
    let ctx = PluginContext {
        index: Arc::new(BlockIndex::new(IndexConfig {
            budget_bytes: 16 << 20,
            shards: 4,
        })),
        targets: Arc::default(),
        block_size: model.block_size,
        pod_kv_blocks: model.pod_kv_blocks,
    };
    let scheduler = ModelScheduler::build(&config.profiles, &model.profile, &ctx)
        .expect("every profile builds");
    assert_eq!(
        scheduler.profile_names().collect::<Vec<_>>(),
        ["approximate", "default"]
    );
    let default = &config.profiles["default"];
    let scorers: Vec<(&str, f64)> = default
        .scorers
        .iter()
        .map(|s| (s.name.as_str(), s.weight))
        .collect();
    assert_eq!(
        scorers,
        [("kv-cache", 2.0), ("load", 1.0), ("kv-headroom", 0.5)]
    );
    assert_eq!(default.filters[0].name, "healthy");
    assert_eq!(default.picker.name, "max-score");
}

#[test]
fn kvgate_config_agrees_with_the_vllm_fleet() {
    let docs = rendered();
    let kvgate_deployment = find(&docs, "Deployment", "kvgate");
    let text = mounted_config(&docs);
    let config: Value = yaml_serde::from_str(text).expect("kvgate.yaml is YAML");
    let model = &config["models"][0];
    let model_name = model["name"].as_str().expect("model name");

    let discovery: DiscoveryConfig = serde_json::from_value(model["discovery"].clone())
        .expect("discovery section parses as kvgate's DiscoveryConfig");
    discovery.validate().expect("discovery section is valid");
    let DiscoveryConfig::Kubernetes(kube) = discovery else {
        panic!("the example discovers through Kubernetes")
    };

    let service_name = kube.service.as_deref().expect("service");
    let service = find(&docs, "Service", service_name);
    let namespace = kube.namespace.as_deref().expect("namespace");
    assert_eq!(service["metadata"]["namespace"], namespace);
    let vllm = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && selector_matches(&service["spec"]["selector"], &pod_labels(d))
        })
        .expect("a Deployment behind the discovered Service");
    let engine = container(vllm, "vllm");
    let Some(PortRef::Number(port)) = kube.port else {
        panic!("numeric port expected")
    };
    assert_eq!(
        resolve_port(engine, &service["spec"]["ports"][0]["targetPort"]),
        u64::from(port)
    );
    assert_eq!(arg_after(engine, "--port"), port.to_string());

    // Everything the block hashes depend on must match on both sides.
    assert_eq!(arg_after(engine, "--served-model-name"), model_name);
    assert_eq!(
        arg_after(engine, "--block-size"),
        model["blockSize"].to_string()
    );
    assert_eq!(
        arg_after(engine, "--prefix-caching-hash-algo"),
        model["hashAlgo"]
    );
    assert_eq!(env(engine, "PYTHONHASHSEED")["value"], model["hashSeed"]);
    let image = engine["image"].as_str().expect("image");
    assert_eq!(
        image.rsplit(':').next(),
        Some(format!("v{}", model["vllmRelease"].as_str().expect("release")).as_str())
    );

    // Events in connect mode: each pod binds its PUB and replay ROUTER on the ports discovery
    // hands every kvgate replica, topic per pod IP.
    let events: Value = serde_json::from_str(arg_after(engine, "--kv-events-config"))
        .expect("--kv-events-config is JSON");
    assert_eq!(events["enable_kv_cache_events"], true);
    assert_eq!(events["publisher"], "zmq");
    assert_eq!(events["topic"], format!("kv@$(POD_IP)@{model_name}"));
    assert!(events["topic"].as_str().expect("topic").starts_with(
        config["events"]["topicPrefix"]
            .as_str()
            .expect("topicPrefix")
    ));
    assert_eq!(
        env(engine, "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(config["events"]["mode"], "connect");
    assert_eq!(config["events"]["replay"], true);
    let events_port = kube.events_port.expect("discovery eventsPort");
    let replay_port = kube.replay_port.expect("discovery replayPort");
    assert_ne!(events_port, replay_port);
    assert_ne!(events_port, port);
    assert_ne!(replay_port, port);
    // A `*` host makes vLLM bind (a host name would make it connect out).
    assert_eq!(events["endpoint"], format!("tcp://*:{events_port}"));
    assert_eq!(events["replay_endpoint"], format!("tcp://*:{replay_port}"));
    assert_eq!(
        resolve_port(engine, &Value::from("kv-events")),
        u64::from(events_port)
    );
    assert_eq!(
        resolve_port(engine, &Value::from("kv-replay")),
        u64::from(replay_port)
    );
    assert!(
        config["events"].get("bind").is_none(),
        "events.bind is unused in connect mode"
    );
    assert!(engine["args"]
        .as_array()
        .expect("args")
        .iter()
        .any(|a| a == "--enable-prefix-caching"));

    // kvgate reads the very tokenizer files vLLM loads: same claim, the model's directory.
    let claim = |deployment: &Value| {
        deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .and_then(|vs| {
                vs.iter()
                    .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
            })
            .map(str::to_string)
    };
    assert_eq!(claim(kvgate_deployment), claim(vllm));
    let kvgate = container(kvgate_deployment, "kvgate");
    let model_mount = kvgate["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "model"))
        .expect("model mount");
    let model_dir = engine["args"][0].as_str().expect("model path");
    let tokenizer = model["tokenizer"].as_str().expect("tokenizer");
    let mount_path = model_mount["mountPath"].as_str().expect("mountPath");
    let sub_path = model_mount["subPath"].as_str().expect("subPath");
    let engine_mount = engine["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "model"))
        .and_then(|m| m["mountPath"].as_str())
        .expect("vLLM model mount");
    assert_eq!(format!("{engine_mount}/{sub_path}"), model_dir);
    assert_eq!(tokenizer, format!("{mount_path}/tokenizer.json"));
}

/// A `KEY value` instruction of the Containerfile's `prebuilt` target (the one built here).
fn containerfile_instruction(key: &str) -> String {
    let text = std::fs::read_to_string(format!("{DEPLOY}/Containerfile")).expect("Containerfile");
    text.lines()
        .skip_while(|l| !l.starts_with("FROM scratch AS prebuilt"))
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in the prebuilt target"))
        .to_string()
}

#[test]
fn kvgate_runs_the_image_deploy_containerfile_builds() {
    let docs = rendered();
    let deployment = find(&docs, "Deployment", "kvgate");
    let kvgate = container(deployment, "kvgate");
    // kustomization.yaml's `images:` tags it with the version `kvgate --version` prints.
    let image = kvgate["image"].as_str().expect("image");
    assert_eq!(
        image
            .rsplit_once(':')
            .map(|(name, tag)| (name.ends_with("/kvgate"), tag)),
        Some((true, env!("CARGO_PKG_VERSION")))
    );
    // The image's entrypoint is kvgate itself, so the args name the subcommand.
    assert_eq!(
        containerfile_instruction("ENTRYPOINT"),
        r#"["/usr/local/bin/kvgate"]"#
    );
    assert_eq!(kvgate["args"][0], "serve");
    let user = containerfile_instruction("USER");
    let pod = &deployment["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(
        user,
        format!("{}:{}", pod["runAsUser"], pod["runAsGroup"]),
        "the Deployment runs as the image's user"
    );
}

#[test]
fn the_tls_secret_is_mounted_where_the_documented_server_tls_points() {
    let docs = rendered();
    let deployment = find(&docs, "Deployment", "kvgate");
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == "tls"))
        .expect("tls volume");
    assert_eq!(volume["secret"]["secretName"], "kvgate-tls");
    // Plain HTTP (the default) must start without the Secret.
    assert_eq!(volume["secret"]["optional"], true);
    let mount = container(deployment, "kvgate")["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "tls"))
        .expect("tls mount");
    assert_eq!(mount["readOnly"], true);
    let dir = mount["mountPath"].as_str().expect("mountPath");

    // deploy/README.md's snippet, added under `server:` of the mounted config.
    let readme = std::fs::read_to_string(format!("{DEPLOY}/README.md")).expect("README");
    let snippet = readme
        .lines()
        .find(|l| l.trim_start().starts_with("tls: {certFile:"))
        .expect("the server.tls line in deploy/README.md");
    let text = mounted_config(&docs).replacen("server:\n", &format!("server:\n{snippet}\n"), 1);
    let config = Config::parse(&text).expect("the config with TLS parses");
    config.validate().expect("the config with TLS is valid");
    let tls = config.server.tls.expect("server.tls");
    // A `kubernetes.io/tls` Secret (`kubectl create secret tls`, cert-manager) holds these two keys.
    assert_eq!(tls.cert_file, std::path::Path::new(dir).join("tls.crt"));
    assert_eq!(tls.key_file, std::path::Path::new(dir).join("tls.key"));
}
