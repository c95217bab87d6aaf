//! `kvgate bench --workload flow`: two tenants on W1 past the knee, with and without the
//! gateway's flow control (`crate::flow`), in virtual time.
//!
//! The interactive tenant (Critical) sends W1 requests at a steady rate for three periods;
//! the batch tenant (Sheddable) bursts during the middle one, taking the offered load to
//! about twice the fleet's knee. Three runs of the same policy from cold pods: the
//! interactive tenant alone (its unloaded TTFT), both tenants without flow control, and
//! both with the model's `flowControl`; with its `forwardPriority` the pods of that run
//! order their own queues by the forwarded priority (vLLM's `--scheduling-policy
//! priority`), the other runs' pods are FCFS, vLLM's default. Each run reports TTFT p50/p90/p99 per tenant,
//! requests served and refused (by reason), and goodput: output tokens of served requests
//! per second of the run.

use std::path::Path;
use std::sync::atomic::AtomicUsize;

use serde::Serialize;

use super::metrics::{percentile, RunData};
use super::policy;
use super::virtual_time::{self, FlowStage, SimSetup};
use super::workload::{self, BenchRequest, Ladder, Segment, Stage};
use super::{load_context, shape, BenchArgs, BenchError, Context, Steps};
use crate::flow::{FlowConfig, Priority};
use crate::metrics::flow::ShedReason;
use crate::sim::SchedulingPolicy;

/// Interactive QPS and the batch tenant's burst QPS when `--qps` does not say: W1's knee on
/// 8 simulated pods is about 18–22 QPS (README, Benchmarks), so 4 + 36 is twice it.
const DEFAULT_QPS: (f64, f64) = (4.0, 36.0);
/// Seconds of each period when `--duration` does not say.
const DEFAULT_PERIOD_S: f64 = 60.0;

const INTERACTIVE: &str = "interactive";
const BATCH: &str = "batch";

/// One tenant's figures in one run.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantFigures {
    pub tenant: String,
    pub offered: usize,
    pub served: usize,
    pub ttft_p50_s: Option<f64>,
    pub ttft_p90_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    /// Refused by flow control: sheddable, queue_full, queue_bytes, displaced (429),
    /// deadline (503).
    pub refused: Vec<(String, usize)>,
}

/// One run.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRun {
    pub label: String,
    pub tenants: Vec<TenantFigures>,
    /// Output tokens of served requests per second of simulated time.
    pub goodput_tokens_per_s: f64,
    /// Requests neither served nor refused (must be 0).
    pub lost: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowReport {
    pub description: String,
    pub policy: String,
    pub runs: Vec<FlowRun>,
    /// Interactive TTFT p90 under the burst with flow control / alone (target ≤ 2).
    pub interactive_p90_ratio: Option<f64>,
    /// Goodput with flow control / without (target ≥ 1).
    pub goodput_ratio: Option<f64>,
}

/// Runs the three runs and prints (and writes) the report.
pub fn run(args: &BenchArgs) -> Result<FlowReport, BenchError> {
    let steps = Steps::new(args.quiet);
    let ctx = load_context(args)?;
    let flow = ctx.model.flow_control.clone().ok_or_else(|| {
        BenchError::Usage(format!(
            "model {:?} of {} has no flowControl (conf/bench/flow.yaml has one)",
            ctx.model.name,
            args.config.display()
        ))
    })?;
    let (interactive_qps, batch_qps) = match args.qps.as_slice() {
        [] => DEFAULT_QPS,
        [interactive, batch] => (*interactive, *batch),
        _ => {
            return Err(BenchError::Usage(
                "--workload flow takes --qps <interactive>,<batch burst>".into(),
            ))
        }
    };
    let period_s = args.duration.unwrap_or(DEFAULT_PERIOD_S);
    steps.line(format_args!("building the two tenants' W1 requests"));
    let (mixed, classes) = two_tenants(args, &ctx, interactive_qps, batch_qps, period_s)?;
    let alone = interactive_only(&mixed, &classes);
    let policy_name = args.policies.first().map_or("precise", String::as_str);
    let spec = policy::resolve(policy_name, &ctx.config, &ctx.model)?;
    let setup = SimSetup::for_model(
        &ctx.config,
        &ctx.model.name,
        args.pods.unwrap_or(super::DEFAULT_PODS),
        ctx.pod_params.clone(),
        args.seed,
    );
    let stage = FlowStage {
        config: flow.clone(),
        classes: classes.clone(),
    };
    let mut flow_setup = setup.clone();
    if flow.forward_priority {
        flow_setup.pod_params.scheduling_policy = SchedulingPolicy::Priority;
    }
    let simulate = |label: &str, segment: &Segment, flow: Option<&FlowStage>| {
        steps.line(format_args!("simulating {label}"));
        let setup = if flow.is_some() { &flow_setup } else { &setup };
        virtual_time::simulate_with_flow(segment, &spec, setup, flow, &AtomicUsize::new(0)).map_err(
            |source| BenchError::Sim {
                policy: spec.name.clone(),
                segment: label.to_string(),
                source: Box::new(source),
            },
        )
    };
    let alone_classes: Vec<(Priority, String)> = classes
        .iter()
        .filter(|(_, tenant)| tenant == INTERACTIVE)
        .cloned()
        .collect();
    let runs = vec![
        figures(
            "interactive alone",
            &alone,
            &alone_classes,
            &simulate("interactive alone", &alone, None)?,
        ),
        figures(
            "both, no flow control",
            &mixed,
            &classes,
            &simulate("both, no flow control", &mixed, None)?,
        ),
        figures(
            "both, flow control",
            &mixed,
            &classes,
            &simulate("both, flow control", &mixed, Some(&stage))?,
        ),
    ];
    let p90 = |run: &FlowRun| run.tenants.first().and_then(|t| t.ttft_p90_s);
    let interactive_p90_ratio = match (p90(&runs[2]), p90(&runs[0])) {
        (Some(loaded), Some(alone)) if alone > 0.0 => Some(loaded / alone),
        _ => None,
    };
    let goodput_ratio = (runs[1].goodput_tokens_per_s > 0.0)
        .then(|| runs[2].goodput_tokens_per_s / runs[1].goodput_tokens_per_s);
    let report = FlowReport {
        description: format!(
            "W1 on {}: {INTERACTIVE} (Critical) {interactive_qps} QPS for {} s; \
             {BATCH} (Sheddable) {batch_qps} QPS for {period_s} s from {period_s} s; {} pods, \
             policy {}",
            ctx.model.name,
            3.0 * period_s,
            setup.pods,
            spec.name
        ),
        policy: spec.name.clone(),
        runs,
        interactive_p90_ratio,
        goodput_ratio,
    };
    let markdown = markdown(&report, &flow);
    println!("{markdown}");
    write(&args.out, &report, &markdown)?;
    Ok(report)
}

/// W1 for each tenant (different question draws), merged in arrival order, with each
/// request's (priority, tenant).
fn two_tenants(
    args: &BenchArgs,
    ctx: &Context,
    interactive_qps: f64,
    batch_qps: f64,
    period_s: f64,
) -> Result<(Segment, Vec<(Priority, String)>), BenchError> {
    let shape = shape(args, workload::SharedPrefixShape::w1());
    let tenant = |qps: f64, seconds: f64, seed: u64| {
        let ladder = Ladder {
            warmup: None,
            steps: vec![(qps, seconds)],
        };
        workload::shared_prefix("flow", &shape, &ladder, &ctx.hasher, seed, false)
    };
    let interactive = tenant(interactive_qps, 3.0 * period_s, args.seed)?;
    let batch = tenant(batch_qps, period_s, args.seed.wrapping_add(1))?;
    let offset_ms = period_s * 1e3;
    let mut tagged: Vec<(BenchRequest, Priority, &str)> = Vec::new();
    for segment in interactive.segments {
        tagged.extend(
            segment
                .requests
                .into_iter()
                .map(|r| (r, Priority::CRITICAL, INTERACTIVE)),
        );
    }
    for segment in batch.segments {
        tagged.extend(segment.requests.into_iter().map(|mut r| {
            r.arrival_ms += offset_ms;
            (r, Priority::SHEDDABLE, BATCH)
        }));
    }
    tagged.sort_by(|a, b| a.0.arrival_ms.total_cmp(&b.0.arrival_ms));
    let stage = Stage {
        label: "flow".into(),
        offered_qps: interactive_qps + batch_qps / 3.0,
        start_ms: 0.0,
        end_ms: 3.0 * offset_ms,
        measured: true,
    };
    let mut requests = Vec::with_capacity(tagged.len());
    let mut classes = Vec::with_capacity(tagged.len());
    for (mut request, priority, tenant) in tagged {
        request.stage = 0;
        requests.push(request);
        classes.push((priority, tenant.to_string()));
    }
    Ok((
        Segment {
            label: "two tenants".into(),
            stages: vec![stage],
            requests,
            pooled_hit_ceiling: 0.0,
        },
        classes,
    ))
}

/// The interactive tenant's requests alone.
fn interactive_only(mixed: &Segment, classes: &[(Priority, String)]) -> Segment {
    Segment {
        label: "interactive alone".into(),
        stages: mixed.stages.clone(),
        requests: mixed
            .requests
            .iter()
            .zip(classes)
            .filter(|(_, (_, tenant))| tenant == INTERACTIVE)
            .map(|(r, _)| r.clone())
            .collect(),
        pooled_hit_ceiling: 0.0,
    }
}

fn figures(
    label: &str,
    segment: &Segment,
    classes: &[(Priority, String)],
    data: &RunData,
) -> FlowRun {
    let tenant_of = |request: u32| classes.get(request as usize).map(|(_, t)| t.as_str());
    let mut tenants = Vec::new();
    for tenant in [INTERACTIVE, BATCH] {
        let offered = classes.iter().filter(|(_, t)| t == tenant).count();
        if offered == 0 {
            continue;
        }
        let mut ttft: Vec<f64> = data
            .records
            .iter()
            .filter(|r| tenant_of(r.request) == Some(tenant))
            .map(|r| r.ttft_ms / 1e3)
            .collect();
        ttft.sort_by(f64::total_cmp);
        let refused = [
            ShedReason::Sheddable,
            ShedReason::QueueFull,
            ShedReason::QueueBytes,
            ShedReason::Deadline,
            ShedReason::Displaced,
        ]
        .into_iter()
        .map(|reason| {
            let count = data
                .refused
                .iter()
                .filter(|(r, why)| *why == reason && tenant_of(*r) == Some(tenant))
                .count();
            (reason.as_str().to_string(), count)
        })
        .filter(|(_, count)| *count > 0)
        .collect();
        tenants.push(TenantFigures {
            tenant: tenant.to_string(),
            offered,
            served: ttft.len(),
            ttft_p50_s: percentile(&ttft, 50.0),
            ttft_p90_s: percentile(&ttft, 90.0),
            ttft_p99_s: percentile(&ttft, 99.0),
            refused,
        });
    }
    let output_tokens: u64 = data
        .records
        .iter()
        .map(|r| u64::from(r.output_tokens))
        .sum();
    FlowRun {
        label: label.to_string(),
        tenants,
        goodput_tokens_per_s: if data.span_s > 0.0 {
            output_tokens as f64 / data.span_s
        } else {
            0.0
        },
        lost: segment
            .requests
            .len()
            .saturating_sub(data.records.len() + data.refused.len()),
    }
}

fn markdown(report: &FlowReport, flow: &FlowConfig) -> String {
    let seconds = |v: Option<f64>| v.map_or("–".to_string(), |s| format!("{s:.2}"));
    let mut out = format!(
        "## Flow control: two tenants on W1\n\n{}\n\nSaturation: {:?}; shedBelow {}, \
         queueTimeoutMs {}, maxQueuedRequests {}, maxQueuedBytes {}, forwardPriority {}.\n\n\
         | run | tenant | offered | served | refused | TTFT p50 s | p90 s | p99 s | goodput tok/s |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        report.description,
        flow.saturation,
        flow.shed_below.0,
        flow.queue_timeout_ms,
        flow.max_queued_requests,
        flow.max_queued_bytes,
        flow.forward_priority,
    );
    for run in &report.runs {
        for (i, tenant) in run.tenants.iter().enumerate() {
            let refused: Vec<String> = tenant
                .refused
                .iter()
                .map(|(reason, n)| format!("{n} {reason}"))
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                if i == 0 { run.label.as_str() } else { "" },
                tenant.tenant,
                tenant.offered,
                tenant.served,
                if refused.is_empty() {
                    "0".to_string()
                } else {
                    refused.join(", ")
                },
                seconds(tenant.ttft_p50_s),
                seconds(tenant.ttft_p90_s),
                seconds(tenant.ttft_p99_s),
                if i == 0 {
                    format!("{:.0}", run.goodput_tokens_per_s)
                } else {
                    String::new()
                },
            ));
        }
    }
    let ratio = |v: Option<f64>| v.map_or("–".to_string(), |r| format!("{r:.2}×"));
    out.push_str(&format!(
        "\nInteractive TTFT p90 with flow control / alone: {} (target ≤ 2×). Goodput with / \
         without flow control: {} (target ≥ 1×). Requests lost: {}.\n",
        ratio(report.interactive_p90_ratio),
        ratio(report.goodput_ratio),
        report.runs.iter().map(|r| r.lost).sum::<usize>(),
    ));
    out
}

fn write(out: &Path, report: &FlowReport, markdown: &str) -> Result<(), BenchError> {
    let io = |e: std::io::Error| BenchError::Usage(format!("writing {}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(io)?;
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| BenchError::Usage(format!("serializing the flow report: {e}")))?;
    std::fs::write(out.join("flow.json"), json).map_err(io)?;
    std::fs::write(out.join("flow.md"), markdown).map_err(io)?;
    eprintln!("wrote {}", out.join("flow.json").display());
    Ok(())
}
