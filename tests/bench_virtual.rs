//! A small virtual-time benchmark through the public CLI options: the real profiles of
//! `conf/kvgate.yaml`, the real block index fed by the simulated pods' KV events, and the
//! written report. Asserts what must hold whatever the timings: every request finishes,
//! cache-aware routing reuses more than cache-blind routing, the oracle's index equals the
//! pods' caches, and the JSON parses.

use clap::Parser;
use kvgate::bench::{self, BenchArgs};
use kvgate::config::Config;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn args(extra: &[&str]) -> BenchArgs {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/kvgate.yaml");
    let mut argv = vec!["kvgate-bench", "--config", config, "--quiet"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("valid options").bench
}

/// W1 scaled down: 4 pods whose KV holds about 60% of the prefixes, light load.
const W1_SMALL: &[&str] = &[
    "--workload",
    "w1",
    "--pods",
    "4",
    "--pod-kv-blocks",
    "600",
    "--groups",
    "40",
    "--prefix-tokens",
    "1024",
    "--question-tokens",
    "256",
    "--output-tokens",
    "24",
    "--qps",
    "4,8",
    "--duration",
    "30",
    "--warmup",
    "20",
    "--warmup-qps",
    "8",
    "--policies",
    "round-robin,least-request,approximate,precise,precise-500ms,precise-loss10%,oracle",
];

#[test]
fn w1_small_orders_policies_by_cache_reuse() {
    let out = tempfile::tempdir().expect("temp dir");
    let mut args = args(W1_SMALL);
    args.out = out.path().to_path_buf();
    let report = bench::evaluate(&args).expect("benchmark runs");
    assert_eq!(report.segments.len(), 1);
    let segment = &report.segments[0];
    let hit = |name: &str| {
        segment
            .policies
            .iter()
            .find(|p| p.summary.policy == name)
            .unwrap_or_else(|| panic!("{name} was run"))
            .summary
            .figures
            .hit_rate
    };
    for policy in &segment.policies {
        let finished: usize = policy.stages.iter().map(|s| s.figures.requests).sum();
        assert_eq!(
            finished, segment.requests,
            "{}: every request finishes",
            policy.summary.policy
        );
        assert_eq!(policy.summary.failed, 0);
        assert_eq!(
            policy.summary.pod_requests.iter().sum::<u64>(),
            segment.requests as u64
        );
        assert!(
            policy.summary.figures.hit_rate <= segment.pooled_hit_ceiling + 1e-9,
            "{} beats the pooled ceiling",
            policy.summary.policy
        );
    }
    let (rr, least, approximate, precise, oracle) = (
        hit("round-robin"),
        hit("least-request"),
        hit("approximate"),
        hit("precise"),
        hit("oracle"),
    );
    assert!(
        approximate > rr + 0.2,
        "approximate {approximate} vs round-robin {rr}"
    );
    assert!(
        approximate > least + 0.2,
        "approximate {approximate} vs least-request {least}"
    );
    assert!(
        precise >= approximate - 0.01,
        "precise {precise} vs approximate {approximate}"
    );
    assert!(
        oracle >= precise - 0.01,
        "oracle {oracle} vs precise {precise}"
    );
    assert!(hit("precise-500ms") > rr + 0.2);

    let by_name = |name: &str| {
        &segment
            .policies
            .iter()
            .find(|p| p.summary.policy == name)
            .expect("policy ran")
            .summary
    };
    assert_eq!(
        by_name("oracle").oracle_mismatches,
        0,
        "the oracle index mirrors the pods"
    );
    assert!(by_name("precise").event_batches > 0);
    assert_eq!(by_name("precise").event_batches_lost, 0);
    let lossy = by_name("precise-loss10%");
    let lost =
        lossy.event_batches_lost as f64 / (lossy.event_batches + lossy.event_batches_lost) as f64;
    assert!((0.05..0.15).contains(&lost), "lost {lost} of batches");
    assert_eq!(by_name("round-robin").event_batches, 0);

    let written = bench::report::write(&report, out.path(), "w1-small").expect("report written");
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("w1-small.json")).expect("JSON written"),
    )
    .expect("JSON parses");
    assert_eq!(json["workload"], "w1");
    assert_eq!(
        json["segments"][0]["policies"].as_array().map(Vec::len),
        Some(7)
    );
    assert!(json["segments"][0]["policies"][3]["stages"][1]["ttftP90S"].is_number());
    assert!(written.markdown.contains("| precise |"));
    for svg in [
        "w1-small-ttft-p90.svg",
        "w1-small-throughput.svg",
        "w1-small-hit-rate.svg",
    ] {
        let text = std::fs::read_to_string(out.path().join(svg)).expect("plot written");
        assert!(
            text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        assert!(text.contains("oracle"), "{svg} has a legend");
    }
}

/// The summary of the policy run as `name`.
fn policy_summary<'a>(
    segment: &'a bench::report::SegmentReport,
    name: &str,
) -> &'a bench::metrics::PolicySummary {
    &segment
        .policies
        .iter()
        .find(|p| p.summary.policy == name)
        .unwrap_or_else(|| panic!("{name} was run"))
        .summary
}

/// Issue 7.4: gateway replicas in connect mode, each with its own index fed by every
/// pod's events and no shared store, against one gateway. Precise replicas agree on the
/// pod and keep the hit rate; approximate replicas, which only remember their own routing,
/// scatter each prefix over as many pods as there are replicas.
#[test]
fn replicas_agree_without_a_shared_store() {
    let mut argv = W1_SMALL.to_vec();
    let last = argv.len() - 1;
    argv[last] = "precise,precise-x2,precise-x4,approximate,approximate-x4,round-robin-x2";
    let out = tempfile::tempdir().expect("temp dir");
    let mut args = args(&argv);
    args.out = out.path().to_path_buf();
    let report = bench::evaluate(&args).expect("benchmark runs");
    let segment = &report.segments[0];
    let summary = |name: &str| policy_summary(segment, name);
    let one = summary("precise");
    assert_eq!(one.replicas, 1);
    assert_eq!(one.same_pick_rate, None);
    for name in ["precise-x2", "precise-x4"] {
        let many = summary(name);
        let same = many.same_pick_rate.expect("replicas were asked");
        assert!(same > 0.85, "{name}: replicas picked the same pod {same}");
        assert!(
            many.figures.hit_rate > one.figures.hit_rate - 0.02,
            "{name}: hit {} vs one gateway {}",
            many.figures.hit_rate,
            one.figures.hit_rate
        );
        assert_eq!(
            many.pod_requests.iter().sum::<u64>(),
            segment.requests as u64
        );
    }
    assert_eq!(summary("precise-x4").replicas, 4);
    let approximate = summary("approximate").figures.hit_rate;
    let scattered = summary("approximate-x4");
    assert!(
        scattered.figures.hit_rate < approximate - 0.1,
        "unshared approximate replicas lose reuse: {} vs {approximate}",
        scattered.figures.hit_rate
    );
    assert!(scattered.same_pick_rate.expect("asked") < 0.6);
    assert_eq!(
        summary("round-robin-x2").same_pick_rate,
        None,
        "asking a rotating picker would move it"
    );
    let markdown = bench::report::markdown(&report);
    assert!(markdown.contains("| replicas | same pick |"));
}

/// The LoRA workload scaled down, with no prompt shared between requests so that the
/// kv-cache scorer has nothing to follow: only `lora-affinity` keeps an adapter's requests
/// where the adapter is loaded.
#[test]
fn adapter_aware_routing_swaps_less_and_answers_sooner() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/bench/lora.yaml");
    let argv = [
        "kvgate-bench",
        "--config",
        config,
        "--quiet",
        "--workload",
        "lora",
        "--max-loras",
        "2",
        "--pods",
        "4",
        "--adapters",
        "12",
        "--prefix-tokens",
        "0",
        "--question-tokens",
        "512",
        "--output-tokens",
        "64",
        "--qps",
        "4,8",
        "--duration",
        "30",
        "--warmup",
        "0",
    ];
    let mut args = Cli::try_parse_from(argv).expect("valid options").bench;
    let out = tempfile::tempdir().expect("temp dir");
    args.out = out.path().to_path_buf();
    let report = bench::evaluate(&args).expect("benchmark runs");
    let segment = &report.segments[0];
    let summary = |name: &str| policy_summary(segment, name);
    let (blind, aware) = (summary("lora-blind"), summary("precise"));
    for policy in [blind, aware] {
        assert_eq!(policy.failed, 0);
        assert_eq!(policy.figures.requests, segment.requests);
        assert!(
            policy.adapter_loads > 0,
            "{}: adapters swap in",
            policy.policy
        );
    }
    assert!(
        aware.adapter_loads * 3 < blind.adapter_loads * 2,
        "swap-ins: aware {} vs blind {}",
        aware.adapter_loads,
        blind.adapter_loads
    );
    let p90 = |s: &bench::metrics::PolicySummary| s.figures.ttft_p90_s.expect("TTFT p90");
    assert!(
        p90(aware) < 0.5 * p90(blind),
        "TTFT p90: aware {} vs blind {}",
        p90(aware),
        p90(blind)
    );
    let err = bench::evaluate(&args_with_live()).expect_err("virtual time only");
    assert!(err.to_string().contains("virtual time only"), "{err}");
}

fn args_with_live() -> BenchArgs {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/bench/lora.yaml");
    let argv = [
        "kvgate-bench",
        "--config",
        config,
        "--quiet",
        "--workload",
        "lora",
        "--live",
        "http://127.0.0.1:1",
        "--qps",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0",
    ];
    Cli::try_parse_from(argv).expect("valid options").bench
}

#[test]
fn the_same_seed_gives_the_same_results() {
    let mut small: Vec<&str> = W1_SMALL.to_vec();
    let policies = small.len() - 1;
    small[policies] = "precise";
    let first = bench::evaluate(&args(&small)).expect("runs");
    let second = bench::evaluate(&args(&small)).expect("runs");
    let figures = |r: &bench::report::BenchReport| {
        let s = &r.segments[0].policies[0].summary;
        (
            s.figures.hit_rate,
            s.figures.ttft_p90_s,
            s.pod_requests.clone(),
        )
    };
    assert_eq!(figures(&first), figures(&second));
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    let err = bench::evaluate(&args(&["--policies", "precise-fast"]))
        .expect_err("unknown condition")
        .to_string();
    assert!(err.contains("precise-fast"), "{err}");
    let err = bench::evaluate(&args(&["--qps", "0", "--warmup", "0"]))
        .expect_err("zero QPS")
        .to_string();
    assert!(err.contains("QPS"), "{err}");
}

#[test]
fn the_cli_says_each_step_on_stderr() {
    let out = tempfile::tempdir().expect("temp dir");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args([
            "bench",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/kvgate.yaml"),
        ])
        .args([
            "--workload",
            "w1",
            "--pods",
            "2",
            "--groups",
            "4",
            "--prefix-tokens",
            "256",
        ])
        .args([
            "--question-tokens",
            "64",
            "--output-tokens",
            "8",
            "--qps",
            "2",
        ])
        .args(["--duration", "10", "--warmup", "0", "--policies", "precise"])
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run kvgate bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let steps: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("kvgate bench: "))
        .collect();
    let expected = [
        "loading ",
        "model Qwen3-32B, 2 pods; building the workload",
        "workload w1: ",
        "simulating in virtual time",
        "writing the report to ",
    ];
    assert_eq!(steps.len(), expected.len(), "{stderr}");
    for (step, start) in steps.iter().zip(expected) {
        assert!(
            step.starts_with(start),
            "{step:?} should start with {start:?}"
        );
    }
    // The progress bar's last line comes between the simulation and the report.
    assert!(stderr.contains("100.0%"), "{stderr}");
    assert!(stderr.contains("wrote "), "{stderr}");
}

/// A W1 shape small enough for a debug build: 6 groups of 512-token prefixes, 64-token questions.
const TINY_SHAPE: [&str; 6] = [
    "--groups",
    "6",
    "--prefix-tokens",
    "512",
    "--question-tokens",
    "64",
];

/// The configs README's benchmark figures name (`--config conf/bench/...`): every one it
/// names is there and every one there is named; each keeps conf/kvgate.yaml's model and
/// changes its default (precise) profile or adds flow control; a small run goes through with each.
#[test]
fn the_benchmark_configs_readme_names_exist_and_run() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let named: std::collections::BTreeSet<String> = readme
        .match_indices("conf/bench/")
        .filter_map(|(at, _)| {
            readme[at..]
                .split(|c: char| c.is_whitespace() || "`),;".contains(c))
                .next()
                .filter(|name| name.ends_with(".yaml"))
                .map(str::to_string)
        })
        .collect();
    let present: std::collections::BTreeSet<String> = std::fs::read_dir(root.join("conf/bench"))
        .expect("conf/bench")
        .map(|entry| {
            let name = entry.expect("entry").file_name();
            format!("conf/bench/{}", name.to_string_lossy())
        })
        .collect();
    assert_eq!(
        named, present,
        "README's --config files and conf/bench/ differ"
    );

    let shipped = Config::load(&root.join("conf/kvgate.yaml")).expect("conf/kvgate.yaml");
    for path in &present {
        let config = Config::load(&root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (model, base) = (&config.models[0], &shipped.models[0]);
        assert_eq!(model.name, base.name, "{path}");
        assert_eq!(
            format!("{:?}", model.hash_settings()),
            format!("{:?}", base.hash_settings()),
            "{path}"
        );
        assert_eq!(model.pod_kv_blocks, base.pod_kv_blocks, "{path}");
        assert_eq!(model.profile, base.profile, "{path}");
        for profile in ["approximate", "round-robin"] {
            assert_eq!(
                format!("{:?}", config.profiles.get(profile)),
                format!("{:?}", shipped.profiles.get(profile)),
                "{path}: {profile}"
            );
        }
        assert!(
            format!("{:?}", config.profiles.get("default"))
                != format!("{:?}", shipped.profiles.get("default"))
                || model.flow_control.is_some()
                || config
                    .profiles
                    .keys()
                    .any(|name| !shipped.profiles.contains_key(name)),
            "{path} leaves the precise profile as it is and adds no flow control nor profile"
        );

        let out = tempfile::tempdir().expect("temp dir");
        let config_path = root.join(path);
        let argv = [
            "kvgate-bench",
            "--config",
            config_path.to_str().expect("path"),
            "--quiet",
            "--workload",
            "w1",
            "--pods",
            "2",
            "--output-tokens",
            "8",
            "--qps",
            "2",
            "--duration",
            "10",
            "--warmup",
            "0",
            "--policies",
            "precise,precise-x2",
        ]
        .into_iter()
        .chain(TINY_SHAPE);
        let mut args = Cli::try_parse_from(argv).expect("valid options").bench;
        args.out = out.path().to_path_buf();
        let report = bench::evaluate(&args).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(!report.segments.is_empty(), "{path}");
    }
}

/// `--workload flow` at a tiny size, one pod that 200 QPS of batch takes past
/// conf/bench/flow.yaml's `inFlightRequests`: the interactive tenant alone, both tenants without and
/// with flow control. Nothing is lost; with flow control the batch tenant waits and the
/// Critical one goes first; the report is written.
#[test]
fn flow_control_runs_two_tenants_with_and_without_queueing() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("conf/bench/flow.yaml");
    let out = tempfile::tempdir().expect("temp dir");
    let argv = [
        "kvgate-bench",
        "--config",
        config.to_str().expect("path"),
        "--quiet",
        "--workload",
        "flow",
        "--pods",
        "1",
        "--output-tokens",
        "64",
        "--qps",
        "2,200",
        "--duration",
        "10",
    ]
    .into_iter()
    .chain(TINY_SHAPE);
    let mut args = Cli::try_parse_from(argv).expect("valid options").bench;
    args.out = out.path().to_path_buf();
    let report = bench::flow::run(&args).expect("flow bench runs");
    assert_eq!(report.runs.len(), 3);
    for run in &report.runs {
        assert_eq!(
            run.lost, 0,
            "{}: every request served or refused",
            run.label
        );
        assert!(run.goodput_tokens_per_s > 0.0, "{}", run.label);
    }
    assert_eq!(report.runs[0].tenants.len(), 1, "interactive alone");
    let interactive = &report.runs[2].tenants[0];
    assert_eq!(interactive.tenant, "interactive");
    assert!(
        interactive.refused.is_empty(),
        "Critical is never refused here"
    );
    let p90 = |run: usize, tenant: usize| {
        report.runs[run].tenants[tenant]
            .ttft_p90_s
            .expect("served requests")
    };
    assert!(
        p90(2, 1) > p90(1, 1),
        "batch waits in kvgate with flow control"
    );
    assert!(p90(2, 0) < p90(2, 1), "Critical is dispatched first");
    assert!(report.interactive_p90_ratio.is_some());
    let json = std::fs::read_to_string(out.path().join("flow.json")).expect("flow.json");
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(parsed["runs"].as_array().map(Vec::len), Some(3));
}

/// Prefill/decode disaggregation at equal pod count (conf/bench/pd.yaml), W1 scaled down:
/// 2 prefill + 2 decode pods against 4 aggregated ones. Every request is answered by a
/// decode pod; choosing the prefill pod by its cache reuses more than choosing it by load.
#[test]
fn disaggregated_policies_answer_from_decode_pods_and_report_inter_token_latency() {
    let mut argv = W1_SMALL.to_vec();
    let last = argv.len() - 1;
    argv[last] = "precise,pd-kv-cache,pd-load";
    argv.extend_from_slice(&["--prefill-pods", "2"]);
    let out = tempfile::tempdir().expect("temp dir");
    let mut args = args(&argv);
    args.config = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/bench/pd.yaml").into();
    args.out = out.path().to_path_buf();
    let report = bench::evaluate(&args).expect("benchmark runs");
    let segment = &report.segments[0];
    for policy in &segment.policies {
        let s = &policy.summary;
        assert_eq!(s.failed, 0, "{}", s.policy);
        assert_eq!(
            s.figures.requests,
            measured_requests(policy),
            "{}",
            s.policy
        );
        assert!(s.figures.itl_p90_ms.is_some(), "{}: ITL measured", s.policy);
    }
    for name in ["pd-kv-cache", "pd-load"] {
        let pd = policy_summary(segment, name);
        assert_eq!(
            &pd.pod_requests[..2],
            &[0, 0],
            "{name}: prefill pods answer nobody"
        );
        assert_eq!(
            pd.pod_requests.iter().sum::<u64>(),
            segment.requests as u64,
            "{name}"
        );
    }
    let hit = |name: &str| policy_summary(segment, name).figures.hit_rate;
    assert!(
        hit("pd-kv-cache") > hit("pd-load"),
        "kv-cache {} vs load {}",
        hit("pd-kv-cache"),
        hit("pd-load")
    );
    let markdown = bench::report::markdown(&report);
    assert!(markdown.contains("| ITL p50 (ms) | ITL p90 (ms) | ITL p99 (ms) |"));

    // A disaggregated profile needs prefill pods and decode pods.
    args.prefill_pods = Some(4);
    let err = bench::evaluate(&args)
        .expect_err("no decode pod")
        .to_string();
    assert!(err.contains("1 to 3 prefill pods"), "{err}");
}

/// Requests of a policy's measured stages.
fn measured_requests(policy: &bench::report::PolicyReport) -> usize {
    policy
        .stages
        .iter()
        .filter(|s| s.measured)
        .map(|s| s.figures.requests)
        .sum()
}
