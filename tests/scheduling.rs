//! Multi-plugin scheduling scenarios: real profiles built from YAML, real `Pod`s with
//! the router's own load accounting, and a real `BlockIndex` filled the way KV events
//! fill it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kvgate::config::ProfileConfig;
use kvgate::discovery::PodEndpoint;
use kvgate::index::{BlockIndex, IndexConfig, Tier};
use kvgate::plugins::{PluginContext, PluginError, SchedulingRequest};
use kvgate::pods::{EventTrust, InFlight, Pod, PodSet};
use kvgate::scheduler::{Decision, Pipeline};

const BLOCK_SIZE: usize = 16;

const PRECISE: &str = "
filters: [{name: healthy}]
scorers:
  - {name: kv-cache, weight: 1}
  - {name: load, weight: 1}
picker: {name: max-score}
";

fn endpoint(i: u32) -> PodEndpoint {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 0, i as u8 + 1));
    PodEndpoint {
        key: format!("serving/vllm-{i}"),
        name: format!("vllm-{i}"),
        http: SocketAddr::new(ip, 8000),
        events: None,
        replay: None,
        topic_host: ip.to_string(),
        role: Default::default(),
    }
}

/// `n` synced pods; ids start at `first_id` (another replica numbers pods differently).
fn pods(n: u32, first_id: u32) -> PodSet {
    PodSet {
        pods: (0..n)
            .map(|i| {
                let pod = Arc::new(Pod::new(first_id + i, endpoint(i)));
                pod.set_trust(pod.cache_epoch(), EventTrust::Synced);
                pod
            })
            .collect(),
    }
}

fn context() -> PluginContext {
    PluginContext {
        index: Arc::new(BlockIndex::new(IndexConfig {
            budget_bytes: 16 << 20,
            shards: 4,
        })),
        targets: Arc::default(),
        block_size: BLOCK_SIZE,
        pod_kv_blocks: 4_096,
    }
}

fn pipeline(yaml: &str, ctx: &PluginContext) -> Pipeline {
    let cfg: ProfileConfig = yaml_serde::from_str(yaml).expect("profile YAML parses");
    Pipeline::build("test", &cfg, ctx).expect("profile builds")
}

/// A prompt of `n` full blocks whose keys start at `first`.
fn blocks(first: u64, n: u64) -> Vec<u64> {
    (first..first + n).collect()
}

fn request<'a>(id: &'a str, block_keys: &'a [u64], now_ms: u64) -> SchedulingRequest<'a> {
    SchedulingRequest {
        request_id: id,
        model: "qwen3",
        scope: 0,
        adapter: None,
        block_keys,
        block_size: BLOCK_SIZE,
        prompt_tokens: block_keys.len() * BLOCK_SIZE,
        session: None,
        now: Duration::from_millis(now_ms),
    }
}

/// What the proxy does with a decision: send to the first pod, account its load, and
/// tell the profile.
fn route(pipeline: &Pipeline, req: &SchedulingRequest<'_>, decision: &Decision) -> InFlight {
    let chosen = decision.ranked.first().expect("a pod was chosen");
    let guard = chosen.pod.begin_request(chosen.uncached_tokens(req) as u64);
    pipeline.routed(req, chosen);
    guard
}

fn chosen_id(decision: &Decision) -> u32 {
    decision.ranked.first().expect("a pod was chosen").pod.id
}

fn scorer_score(decision: &Decision, pod: u32, scorer: &str) -> f64 {
    let rank = decision
        .ranked
        .iter()
        .position(|c| c.pod.id == pod)
        .expect("pod is ranked");
    let slot = decision
        .scorer_names
        .iter()
        .position(|n| *n == scorer)
        .expect("scorer is in the profile");
    decision.scores[rank].0[slot]
}

#[test]
fn cached_prefix_goes_to_its_holder() {
    let ctx = context();
    let set = pods(4, 0);
    let system = blocks(1_000, 48);
    ctx.index.store(2, 0, Tier::Gpu, &system);
    let precise = pipeline(PRECISE, &ctx);

    // The prompt extends the cached system prompt with a new question.
    let mut prompt = system.clone();
    prompt.extend(blocks(9_000, 16));
    let req = request("r1", &prompt, 0);
    let decision = precise.schedule(&req, &set);
    assert_eq!(chosen_id(&decision), 2);
    assert_eq!(decision.ranked[0].cached_blocks, 48);
    assert_eq!(
        decision.ranked.len(),
        4,
        "the others stay as retry fallbacks"
    );
    assert!((scorer_score(&decision, 2, "kv-cache") - 0.75).abs() < 1e-12);
}

#[test]
fn overloaded_holder_yields_to_load() {
    let ctx = context();
    let set = pods(4, 0);
    let prefix = blocks(5_000, 64);
    ctx.index.store(1, 0, Tier::Gpu, &prefix);
    let precise = pipeline(PRECISE, &ctx);
    let req = request("r", &prefix, 0);

    // A moderate backlog (below saturationTokens = 262,144 more than the idlest pod):
    // affinity holds.
    let busy = set.pods[1].begin_request(200_000);
    assert_eq!(chosen_id(&precise.schedule(&req, &set)), 1);

    // Past twice the threshold the cache credit is gone and load decides; the least
    // loaded pod wins.
    let _more = set.pods[1].begin_request(400_000);
    let _other = set.pods[3].begin_request(2_000);
    let decision = precise.schedule(&req, &set);
    assert_eq!(scorer_score(&decision, 1, "kv-cache"), 0.0);
    assert!([0, 2].contains(&chosen_id(&decision)));
    assert_eq!(decision.ranked.last().map(|c| c.pod.id), Some(1));

    // When every pod is as busy as the holder, the cache still steers.
    drop(busy);
    let _load: Vec<InFlight> = [0, 2, 3]
        .iter()
        .map(|&i| set.pods[i].begin_request(600_000))
        .collect();
    assert_eq!(chosen_id(&precise.schedule(&req, &set)), 1);
}

#[test]
fn speculative_credit_colocates_a_burst_of_a_new_prefix() {
    let ctx = context();
    let set = pods(4, 0);
    let precise = pipeline(PRECISE, &ctx);
    let without = pipeline(
        "
scorers:
  - {name: kv-cache, params: {speculativeTtlMs: 0}}
  - {name: load}
",
        &ctx,
    );
    let shared = blocks(70_000, 64);
    let burst = |profile: &Pipeline| {
        let mut guards = Vec::new();
        let mut chosen = Vec::new();
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            // Within 2 s, before any event could confirm the blocks.
            let req = request(id, &shared, 100 * i as u64);
            let decision = profile.schedule(&req, &set);
            chosen.push(chosen_id(&decision));
            guards.push(route(profile, &req, &decision));
        }
        chosen
    };
    let together = burst(&precise);
    assert!(together.iter().all(|&p| p == together[0]), "{together:?}");

    let scattered = burst(&without);
    let mut distinct = scattered.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "without speculation: {scattered:?}");

    // After the TTL, with no event confirming, the speculation is gone.
    let late = request("e", &shared, 40_000);
    let decision = precise.schedule(&late, &set);
    assert_eq!(scorer_score(&decision, together[0], "kv-cache"), 0.0);
}

#[test]
fn untrusted_and_unknown_pods_get_no_cache_credit() {
    let ctx = context();
    let set = pods(3, 0);
    let prefix = blocks(300, 32);
    ctx.index.store(0, 0, Tier::Gpu, &prefix);
    ctx.index.store(1, 0, Tier::Gpu, &prefix);
    set.pods[0].set_trust(set.pods[0].cache_epoch(), EventTrust::Untrusted);
    set.pods[1].set_trust(set.pods[1].cache_epoch(), EventTrust::Unknown);
    let precise = pipeline(PRECISE, &ctx);
    // The untrusted pod is the least loaded: it is still routed to, on load alone.
    let _l1 = set.pods[1].begin_request(0);
    let _l2 = set.pods[2].begin_request(0);
    let decision = precise.schedule(&request("r", &prefix, 0), &set);
    for pod in 0..3 {
        assert_eq!(scorer_score(&decision, pod, "kv-cache"), 0.0);
    }
    assert_eq!(chosen_id(&decision), 0);
    assert_eq!(decision.ranked[0].cached_blocks, 0);
}

#[test]
fn cold_requests_spread_by_load() {
    let ctx = context();
    let set = pods(4, 0);
    let precise = pipeline(PRECISE, &ctx);
    let mut guards = Vec::new();
    let mut per_pod = [0usize; 4];
    let prompts: Vec<Vec<u64>> = (0..8).map(|i| blocks(1_000_000 * (i + 1), 8)).collect();
    for (i, prompt) in prompts.iter().enumerate() {
        let req = request("cold", prompt, i as u64);
        let decision = precise.schedule(&req, &set);
        per_pod[chosen_id(&decision) as usize] += 1;
        guards.push(route(&precise, &req, &decision));
    }
    assert_eq!(per_pod, [2, 2, 2, 2]);
}

#[test]
fn ties_break_identically_on_independent_replicas() {
    let ctx_a = context();
    let ctx_b = context();
    let replica_a = pipeline(PRECISE, &ctx_a);
    let replica_b = pipeline(PRECISE, &ctx_b);
    let pods_a = pods(6, 0);
    // Another replica discovered the same pods in another order, with other ids.
    let mut pods_b = pods(6, 500);
    pods_b.pods.reverse();

    let mut winners = std::collections::HashSet::new();
    for first in 0..60u64 {
        let prompt = blocks(first * 7_919, 4);
        let a = replica_a.schedule(&request("x", &prompt, 0), &pods_a);
        let b = replica_b.schedule(&request("y", &prompt, 0), &pods_b);
        let key = |d: &Decision| {
            d.ranked
                .iter()
                .map(|c| c.pod.endpoint.key.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b), "whole ranking agrees");
        winners.insert(key(&a)[0].clone());
    }
    assert!(winners.len() >= 4, "tie-breaks spread: {winners:?}");
}

#[test]
fn prefix_plugin_learns_from_routing() {
    let ctx = context();
    let set = pods(4, 0);
    let approximate = pipeline(
        "
scorers:
  - {name: prefix, weight: 2}
  - {name: load, weight: 1}
",
        &ctx,
    );
    let conversation = blocks(40_000, 32);
    let first = request("turn-1", &conversation, 0);
    let decision = approximate.schedule(&first, &set);
    let holder = chosen_id(&decision);
    let _turn1 = route(&approximate, &first, &decision);

    // The next turn extends the conversation: it follows the router's memory even
    // though the holder is now the busiest pod. The index was never told anything.
    let mut next = conversation.clone();
    next.extend(blocks(90_000, 8));
    let second = request("turn-2", &next, 50);
    let decision = approximate.schedule(&second, &set);
    assert_eq!(chosen_id(&decision), holder);
    assert_eq!(decision.ranked[0].cached_blocks, 32);
    assert!((scorer_score(&decision, holder, "prefix") - 0.8).abs() < 1e-12);
}

#[test]
fn ttft_weighs_the_cached_prefix_against_the_queue() {
    let ctx = context();
    let set = pods(2, 0);
    let prompt = blocks(600, 256); // 4,096 tokens
    ctx.index.store(0, 0, Tier::Gpu, &prompt[..192]);
    // kv-cache at weight 0 only feeds `cached_blocks` to the ttft scorer after it.
    let by_time = pipeline(
        "
scorers:
  - {name: kv-cache, weight: 0, params: {saturationTokens: 1000000}}
  - {name: ttft, params: {priorTokensPerSecond: 16000, baseLatencyMs: 0}}
",
        &ctx,
    );
    let req = request("r", &prompt, 0);
    // Holder: 1,000 queued + 1,024 uncached < 4,096 cold tokens on the idle pod.
    let queued = set.pods[0].begin_request(1_000);
    assert_eq!(chosen_id(&by_time.schedule(&req, &set)), 0);
    // Holder: 4,000 queued + 1,024 > 4,096.
    drop(queued);
    let _queued = set.pods[0].begin_request(4_000);
    assert_eq!(chosen_id(&by_time.schedule(&req, &set)), 1);
}

#[test]
fn no_healthy_pod_means_no_ranking_without_a_panic_threshold() {
    let ctx = context();
    let set = pods(2, 0);
    let strict = pipeline(
        &PRECISE.replace(
            "{name: healthy}",
            "{name: healthy, params: {panicThresholdPercent: 0}}",
        ),
        &ctx,
    );
    set.pods[0].set_health_check(false);
    set.pods[1].record_failure(1_000, 1, Duration::from_secs(5));
    let decision = strict.schedule(&request("r", &[1, 2], 2_000), &set);
    assert!(decision.ranked.is_empty());
    let decision = strict.schedule(&request("r", &[1, 2], 6_000), &set);
    assert_eq!(chosen_id(&decision), 1);
    // At the default threshold, a fleet failing every check is still routed: to the pod
    // whose requests did not fail.
    let precise = pipeline(PRECISE, &ctx);
    let decision = precise.schedule(&request("r", &[1, 2], 2_000), &set);
    assert_eq!(chosen_id(&decision), 0);
}

#[test]
fn session_and_round_robin_profiles() {
    let ctx = context();
    let set = pods(3, 0);
    let sticky = pipeline(
        "
scorers:
  - {name: session, weight: 2}
  - {name: least-request}
",
        &ctx,
    );
    let prompt = blocks(1, 2);
    let mut req = request("r", &prompt, 0);
    req.session = Some("user-17");
    let decision = sticky.schedule(&req, &set);
    let home = chosen_id(&decision);
    let _g = route(&sticky, &req, &decision);
    let _busier = set.pods[home as usize].begin_request(0);
    assert_eq!(chosen_id(&sticky.schedule(&req, &set)), home);

    let rr = pipeline("picker: {name: round-robin}", &ctx);
    let firsts: Vec<u32> = (0..3)
        .map(|_| chosen_id(&rr.schedule(&req, &set)))
        .collect();
    assert_eq!(firsts, vec![0, 1, 2]);
}

#[test]
fn profiles_are_checked_when_built() {
    let ctx = context();
    let build = |yaml: &str| {
        let cfg: ProfileConfig = yaml_serde::from_str(yaml).expect("YAML parses");
        Pipeline::build("bad", &cfg, &ctx).err()
    };
    assert!(matches!(
        build("scorers: [{name: kv-cash}]"),
        Some(PluginError::Unknown { .. })
    ));
    assert!(matches!(
        build("picker: {name: load}"),
        Some(PluginError::WrongRole { .. })
    ));
    assert!(matches!(
        build("filters: [{name: random}]"),
        Some(PluginError::WrongRole { .. })
    ));
    assert!(matches!(
        build("scorers: [{name: kv-cache, params: {cpuDiscount: 2}}]"),
        Some(PluginError::Params { .. })
    ));
    assert!(matches!(
        build("scorers: [{name: load, params: {bogus: 1}}]"),
        Some(PluginError::Params { .. })
    ));
}

#[test]
fn a_disaggregated_profile_picks_decode_pods_and_prefill_pods_among_their_roles() {
    use kvgate::discovery::PodRole;
    let ctx = context();
    // Pods 0, 1 prefill; 2 decode; 3 both. The prompt is cached on prefill pod 1.
    let roles = [
        PodRole::Prefill,
        PodRole::Prefill,
        PodRole::Decode,
        PodRole::Both,
    ];
    let set = PodSet {
        pods: roles
            .iter()
            .enumerate()
            .map(|(i, &role)| {
                let pod = Arc::new(Pod::new(
                    i as u32,
                    PodEndpoint {
                        role,
                        ..endpoint(i as u32)
                    },
                ));
                pod.set_trust(pod.cache_epoch(), EventTrust::Synced);
                pod
            })
            .collect(),
    };
    let prompt = blocks(5_000, 32);
    ctx.index.store(1, 0, Tier::Gpu, &prompt);
    let pd = pipeline(
        &format!("{PRECISE}prefill: {{minUncachedTokens: 64}}\n"),
        &ctx,
    );
    let req = request("pd-1", &prompt, 0);

    let decode = pd.schedule(&req, &set);
    let mut decode_pods: Vec<u32> = decode.ranked.iter().map(|c| c.pod.id).collect();
    decode_pods.sort_unstable();
    assert_eq!(decode_pods, [2, 3], "decode pods and both-pods only");

    let stage = pd.prefill().expect("the profile is disaggregated");
    assert_eq!(stage.min_uncached_tokens, 64);
    let prefill = stage.pipeline.schedule(&req, &set);
    assert_eq!(chosen_id(&prefill), 1, "the prefill pod holding the prompt");
    assert_eq!(prefill.ranked[0].cached_blocks, 32);
    let mut prefill_pods: Vec<u32> = prefill.ranked.iter().map(|c| c.pod.id).collect();
    prefill_pods.sort_unstable();
    assert_eq!(prefill_pods, [0, 1, 3], "prefill pods and both-pods only");

    // An aggregated profile ignores roles.
    assert_eq!(pipeline(PRECISE, &ctx).schedule(&req, &set).ranked.len(), 4);
    assert!(pipeline(PRECISE, &ctx).prefill().is_none());
}
