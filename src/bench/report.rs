//! Benchmark output: a JSON document with every figure, a markdown summary, and SVG
//! plots (TTFT p90 and output throughput against offered load, hit rate per policy),
//! drawn by hand so that no plotting dependency is needed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::metrics::{self, PolicySummary, RunData, StageSummary};
use super::policy::{IndexFeed, PolicySpec};
use super::workload::{Segment, Stage};
use crate::sim::PodParams;

/// Everything one `kvgate bench` invocation measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub workload: String,
    pub description: String,
    /// `virtual` or `live`.
    pub mode: String,
    pub pods: usize,
    pub model: String,
    pub pod_params: PodParams,
    pub slo_ttft_p90_s: f64,
    pub seed: u64,
    pub segments: Vec<SegmentReport>,
    /// A trace replay's verdict: which policy wins, by how much, at what load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentReport {
    pub label: String,
    pub requests: usize,
    /// Prompt-token hit rate of one infinite cache shared by all pods.
    pub pooled_hit_ceiling: f64,
    pub stages: Vec<Stage>,
    pub policies: Vec<PolicyReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    pub profile: String,
    pub feed: IndexFeed,
    pub summary: PolicySummary,
    pub stages: Vec<StageSummary>,
}

impl SegmentReport {
    /// Summarizes each policy's run (in `policies` order) and relates hit rates to the
    /// oracle's and to the pooled ceiling.
    pub fn new(
        segment: &Segment,
        policies: &[PolicySpec],
        runs: &[RunData],
        slo_ttft_p90_s: f64,
    ) -> Self {
        let mut reports: Vec<PolicyReport> = policies
            .iter()
            .zip(runs)
            .map(|(policy, run)| {
                let stages = metrics::stage_summaries(&segment.stages, run);
                let summary = metrics::policy_summary(
                    &policy.name,
                    &segment.stages,
                    &stages,
                    run,
                    slo_ttft_p90_s,
                );
                PolicyReport {
                    profile: policy.profile_name.clone(),
                    feed: policy.feed,
                    summary,
                    stages,
                }
            })
            .collect();
        let oracle = reports
            .iter()
            .find(|r| r.feed == IndexFeed::Oracle)
            .map(|r| r.summary.figures.hit_rate);
        let ceiling = segment.pooled_hit_ceiling;
        for report in &mut reports {
            let hit = report.summary.figures.hit_rate;
            report.summary.hit_vs_oracle = oracle.filter(|o| *o > 0.0).map(|o| hit / o);
            report.summary.hit_vs_ceiling = (ceiling > 0.0).then(|| hit / ceiling);
        }
        Self {
            label: segment.label.clone(),
            requests: segment.requests.len(),
            pooled_hit_ceiling: ceiling,
            stages: segment.stages.clone(),
            policies: reports,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialize the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// The files written for a report.
#[derive(Debug)]
pub struct Written {
    pub markdown: String,
    pub files: Vec<PathBuf>,
}

/// Writes `<name>.json`, `<name>.md` and the SVG plots into `dir`.
pub fn write(report: &BenchReport, dir: &Path, name: &str) -> Result<Written, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let markdown = markdown(report);
    let mut files = Vec::new();
    let mut put = |file: String, contents: &[u8]| -> Result<(), ReportError> {
        let path = dir.join(file);
        std::fs::write(&path, contents).map_err(|source| ReportError::Write {
            path: path.clone(),
            source,
        })?;
        files.push(path);
        Ok(())
    };
    put(format!("{name}.json"), &serde_json::to_vec_pretty(report)?)?;
    put(format!("{name}.md"), markdown.as_bytes())?;
    put(format!("{name}-ttft-p90.svg"), ttft_plot(report).as_bytes())?;
    put(
        format!("{name}-throughput.svg"),
        throughput_plot(report).as_bytes(),
    )?;
    put(
        format!("{name}-hit-rate.svg"),
        hit_rate_plot(report).as_bytes(),
    )?;
    Ok(Written { markdown, files })
}

fn seconds(value: Option<f64>) -> String {
    match value {
        None => "—".into(),
        Some(s) if s < 10.0 => format!("{s:.2}"),
        Some(s) if s < 100.0 => format!("{s:.1}"),
        Some(s) => format!("{s:.0}"),
    }
}

pub(crate) fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{:.1} %", v * 100.0))
}

fn count(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// A ladder's QPS as given (`22`, `2.5`); a trace's measured rate to two decimals.
fn qps_text(qps: f64) -> String {
    let rounded = (qps * 100.0).round() / 100.0;
    format!("{rounded}")
}

fn knee_text(summary: &PolicySummary) -> (String, String) {
    match (summary.knee_qps, summary.knee_output_tokens_per_s) {
        (Some(qps), Some(tokens)) if summary.knee_at_top => (
            format!("≥ {}", qps_text(qps)),
            format!("≥ {}", count(tokens)),
        ),
        (Some(qps), Some(tokens)) => (qps_text(qps), count(tokens)),
        _ => ("—".into(), "—".into()),
    }
}

/// The markdown summary: per segment, one row per policy, then per-stage matrices.
pub fn markdown(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# kvgate bench: {} ({} mode, {} pods of {})\n",
        report.workload, report.mode, report.pods, report.model
    );
    let _ = writeln!(out, "{}\n", report.description);
    let _ = writeln!(
        out,
        "Pod: {} KV blocks × {} tokens, max {} seqs, {}-token step budget. Knee = highest offered QPS up to which every stage kept TTFT p90 < {} s. Balance = mean over scrapes of max/mean in-flight requests per pod.\n",
        report.pod_params.kv_blocks,
        report.pod_params.block_size,
        report.pod_params.max_num_seqs,
        report.pod_params.max_num_batched_tokens,
        report.slo_ttft_p90_s,
    );
    for segment in &report.segments {
        if report.segments.len() > 1 {
            let _ = writeln!(out, "## {}\n", segment.label);
        }
        let _ = writeln!(
            out,
            "{} requests; pooled-cache hit-rate ceiling {}.\n",
            segment.requests,
            percent(Some(segment.pooled_hit_ceiling))
        );
        // Only comparisons with gateway replicas get the replica columns.
        let replicated = segment.policies.iter().any(|p| p.summary.replicas > 1);
        out.push_str("| policy | hit rate | of oracle | of ceiling | wasted prefill | TTFT p50 (s) | TTFT p90 (s) | TTFT p99 (s) | TPOT p50 (ms) | ITL p50 (ms) | ITL p90 (ms) | ITL p99 (ms) | peak output tok/s | knee QPS | knee output tok/s | balance | preemptions |");
        out.push_str(if replicated {
            " replicas | same pick |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        } else {
            "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        });
        for policy in &segment.policies {
            let s = &policy.summary;
            let f = &s.figures;
            let (knee_qps, knee_tokens) = knee_text(s);
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.policy,
                percent(Some(f.hit_rate)),
                percent(s.hit_vs_oracle),
                percent(s.hit_vs_ceiling),
                percent(f.wasted_prefill),
                seconds(f.ttft_p50_s),
                seconds(f.ttft_p90_s),
                seconds(f.ttft_p99_s),
                f.tpot_p50_ms.map_or("—".into(), |v| format!("{v:.1}")),
                f.itl_p50_ms.map_or("—".into(), |v| format!("{v:.1}")),
                f.itl_p90_ms.map_or("—".into(), |v| format!("{v:.1}")),
                f.itl_p99_ms.map_or("—".into(), |v| format!("{v:.1}")),
                count(s.peak_output_tokens_per_s),
                knee_qps,
                knee_tokens,
                s.balance.map_or("—".into(), |b| format!("{b:.2}")),
                f.preemptions,
            );
            if replicated {
                let _ = write!(out, " {} | {} |", s.replicas, percent(s.same_pick_rate));
            }
            out.push('\n');
        }
        out.push('\n');
        if segment.stages.len() > 1 {
            stage_matrix(&mut out, segment, "TTFT p90 (s)", |s| {
                seconds(s.figures.ttft_p90_s)
            });
            stage_matrix(&mut out, segment, "Prompt-token hit rate", |s| {
                percent(Some(s.figures.hit_rate))
            });
            stage_matrix(&mut out, segment, "Output tokens/s", |s| {
                count(s.output_tokens_per_s)
            });
        }
        let loads: Vec<String> = segment
            .policies
            .iter()
            .filter(|p| p.summary.adapter_loads > 0)
            .map(|p| format!("{} {}", p.summary.policy, p.summary.adapter_loads))
            .collect();
        if !loads.is_empty() {
            let _ = writeln!(out, "LoRA adapter swap-ins: {}.\n", loads.join(", "));
        }
        let failures: Vec<String> = segment
            .policies
            .iter()
            .filter(|p| p.summary.failed > 0 || p.summary.oracle_mismatches > 0)
            .map(|p| {
                format!(
                    "{}: {} failed requests, {} oracle/index mismatches",
                    p.summary.policy, p.summary.failed, p.summary.oracle_mismatches
                )
            })
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(out, "Problems: {}.\n", failures.join("; "));
        }
    }
    if let Some(verdict) = &report.verdict {
        let _ = writeln!(out, "## Verdict\n\n{verdict}");
    }
    out
}

/// Which policy wins each speed-up of a trace replay (lowest TTFT p90, then highest hit
/// rate; the oracle is a bound, not a contender), by how much over the runner-up, and the
/// highest load at which each policy still keeps TTFT p90 under the SLO.
pub fn verdict(report: &BenchReport) -> String {
    let mut out = String::new();
    let p90 = |p: &PolicyReport| p.summary.figures.ttft_p90_s.unwrap_or(f64::INFINITY);
    let mut held: Vec<(String, Option<String>)> = Vec::new();
    for segment in &report.segments {
        let mut ranked: Vec<&PolicyReport> = segment
            .policies
            .iter()
            .filter(|p| p.feed != IndexFeed::Oracle)
            .collect();
        ranked.sort_by(|a, b| {
            p90(a).total_cmp(&p90(b)).then(
                b.summary
                    .figures
                    .hit_rate
                    .total_cmp(&a.summary.figures.hit_rate),
            )
        });
        let load = segment
            .stages
            .iter()
            .rfind(|s| s.measured)
            .map_or(0.0, |s| s.offered_qps);
        if let Some(winner) = ranked.first() {
            let _ = write!(
                out,
                "- at {} ({} QPS): **{}** (profile `{}`) wins with TTFT p90 {} s and hit rate {}",
                segment.label,
                qps_text(load),
                winner.summary.policy,
                winner.profile,
                seconds(winner.summary.figures.ttft_p90_s),
                percent(Some(winner.summary.figures.hit_rate)),
            );
            if let Some(next) = ranked.get(1) {
                let ratio = p90(next) / p90(winner);
                let _ = write!(
                    out,
                    "; next is {} with {} s ({}) and {}",
                    next.summary.policy,
                    seconds(next.summary.figures.ttft_p90_s),
                    if ratio.is_finite() {
                        format!("{ratio:.1}× the winner's")
                    } else {
                        "no answer".into()
                    },
                    percent(Some(next.summary.figures.hit_rate)),
                );
            }
            out.push_str(".\n");
        }
        // The SLO holds up to the first speed-up that breaks it (segments go up in load).
        for policy in &ranked {
            let name = &policy.summary.policy;
            let index = match held.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    held.push((name.clone(), Some(String::new())));
                    held.len() - 1
                }
            };
            if let Some(best) = &mut held[index].1 {
                if p90(policy) < report.slo_ttft_p90_s {
                    *best = format!("{} ({} QPS)", segment.label, qps_text(load));
                } else {
                    held[index].1 = None;
                }
            }
        }
    }
    let slo: Vec<String> = held
        .into_iter()
        .map(|(name, best)| match best {
            Some(best) if !best.is_empty() => format!("{name} up to {best}"),
            _ => format!("{name} only below the loads tried"),
        })
        .collect();
    if !slo.is_empty() {
        let _ = writeln!(
            out,
            "- TTFT p90 under {} s: {}.",
            report.slo_ttft_p90_s,
            slo.join(", ")
        );
    }
    out
}

fn stage_matrix(
    out: &mut String,
    segment: &SegmentReport,
    title: &str,
    cell: impl Fn(&StageSummary) -> String,
) {
    let _ = writeln!(out, "**{title} per stage**\n");
    out.push_str("| stage |");
    for policy in &segment.policies {
        let _ = write!(out, " {} |", policy.summary.policy);
    }
    out.push_str("\n|---|");
    for _ in &segment.policies {
        out.push_str("---:|");
    }
    out.push('\n');
    for (i, stage) in segment.stages.iter().enumerate() {
        let _ = write!(out, "| {} |", stage.label);
        for policy in &segment.policies {
            let text = policy.stages.get(i).map_or("—".into(), &cell);
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out.push('\n');
}

pub(crate) const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 56.0;

pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// Round tick values covering [lo, hi].
pub(crate) fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| span / s <= 7.0)
        .unwrap_or(10.0 * magnitude);
    let mut ticks = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi + step * 1e-9 {
        ticks.push(t);
        t += step;
    }
    ticks
}

pub(crate) fn tick_label(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value.abs() >= 1_000.0 {
        format!("{}k", value / 1_000.0)
    } else if value.abs() >= 1.0 {
        format!("{}", (value * 100.0).round() / 100.0)
    } else {
        format!("{value}")
    }
}

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn fraction(&self, v: f64) -> f64 {
        if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo).max(1e-12)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if !self.log {
            return linear_ticks(self.lo, self.hi);
        }
        let mut ticks = Vec::new();
        let mut decade = 10f64.powf(self.lo.log10().floor());
        let decades = (self.hi / self.lo).log10();
        let steps: &[f64] = if decades <= 2.0 {
            &[1.0, 2.0, 5.0]
        } else {
            &[1.0]
        };
        while decade <= self.hi * 1.0001 {
            for m in steps {
                let t = decade * m;
                if t >= self.lo * 0.9999 && t <= self.hi * 1.0001 {
                    ticks.push(t);
                }
            }
            decade *= 10.0;
        }
        ticks
    }
}

fn svg_open(out: &mut String, title: &str) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        escape(title)
    );
}

fn plot_area() -> (f64, f64, f64, f64) {
    (LEFT, TOP, WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM)
}

fn axes(out: &mut String, x: &Axis, y: &Axis, x_label: &str, y_label: &str, x_ticks: bool) {
    let (left, top, width, height) = plot_area();
    let bottom = top + height;
    for t in y.ticks() {
        let py = bottom - y.fraction(t) * height;
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + width,
            left - 6.0,
            py + 4.0,
            tick_label(t)
        );
    }
    if x_ticks {
        for t in x.ticks() {
            let px = left + x.fraction(t) * width;
            let _ = writeln!(
                out,
                r##"<line x1="{px:.1}" y1="{bottom}" x2="{px:.1}" y2="{:.1}" stroke="#999"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                bottom + 5.0,
                bottom + 19.0,
                tick_label(t)
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + width / 2.0,
        bottom + 42.0,
        escape(x_label)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + height / 2.0,
        escape(y_label)
    );
}

fn legend(out: &mut String, names: &[&str]) {
    let (left, top, width, _) = plot_area();
    let x = left + width + 16.0;
    for (i, name) in names.iter().enumerate() {
        let y = top + 8.0 + i as f64 * 20.0;
        let color = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{:.1}" width="14" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            y - 9.0,
            x + 20.0,
            y,
            escape(name)
        );
    }
}

fn line_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
    threshold: Option<(f64, &str)>,
) -> String {
    let mut out = String::new();
    svg_open(&mut out, title);
    let points = || series.iter().flat_map(|s| s.points.iter());
    let finite = |v: &f64| v.is_finite() && (!log_y || *v > 0.0);
    let xs: Vec<f64> = points().map(|p| p.0).filter(|v| v.is_finite()).collect();
    let mut ys: Vec<f64> = points().map(|p| p.1).filter(finite).collect();
    if let Some((t, _)) = threshold {
        ys.push(t);
    }
    if xs.is_empty() || ys.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text></svg>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
        return out;
    }
    let x_lo = xs.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let x_hi = xs.iter().copied().fold(0.0, f64::max).max(x_lo + 1.0);
    let y_min = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let y_max = ys.iter().copied().fold(0.0, f64::max);
    let y = if log_y {
        Axis {
            lo: 10f64.powf(y_min.log10().floor()),
            hi: 10f64
                .powf(y_max.log10().ceil())
                .max(10f64.powf(y_min.log10().floor() + 1.0)),
            log: true,
        }
    } else {
        let top = *linear_ticks(0.0, y_max.max(1e-9) * 1.05)
            .last()
            .unwrap_or(&1.0);
        Axis {
            lo: 0.0,
            hi: top.max(y_max),
            log: false,
        }
    };
    let x = Axis {
        lo: x_lo,
        hi: x_hi,
        log: false,
    };
    axes(&mut out, &x, &y, x_label, y_label, true);
    let (left, top, width, height) = plot_area();
    let bottom = top + height;
    if let Some((t, label)) = threshold {
        let py = bottom - y.fraction(t) * height;
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#555" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            left + width,
            left + width - 4.0,
            py - 5.0,
            escape(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(px, py)| px.is_finite() && finite(py))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let coords: Vec<String> = pts
            .iter()
            .map(|&(px, py)| {
                format!(
                    "{:.1},{:.1}",
                    left + x.fraction(px) * width,
                    bottom - y.fraction(py) * height
                )
            })
            .collect();
        if coords.len() > 1 {
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                coords.join(" ")
            );
        }
        for c in &coords {
            let (cx, cy) = c.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>"#);
        }
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

/// Measured stages of every segment as (offered QPS, value) per policy.
fn series_by_policy(
    report: &BenchReport,
    value: impl Fn(&StageSummary) -> Option<f64>,
) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for segment in &report.segments {
        for policy in &segment.policies {
            let name = &policy.summary.policy;
            let index = match series.iter().position(|s| &s.name == name) {
                Some(i) => i,
                None => {
                    series.push(Series {
                        name: name.clone(),
                        points: Vec::new(),
                    });
                    series.len() - 1
                }
            };
            for stage in policy.stages.iter().filter(|s| s.measured) {
                if let Some(v) = value(stage) {
                    series[index].points.push((stage.offered_qps, v));
                }
            }
        }
    }
    series
}

fn ttft_plot(report: &BenchReport) -> String {
    let series = series_by_policy(report, |s| s.figures.ttft_p90_s);
    let slo = format!("SLO {} s", report.slo_ttft_p90_s);
    line_plot(
        &format!(
            "TTFT p90 vs offered load: {} ({} pods)",
            report.workload, report.pods
        ),
        "offered load (QPS)",
        "TTFT p90 (s, log scale)",
        &series,
        true,
        Some((report.slo_ttft_p90_s, &slo)),
    )
}

fn throughput_plot(report: &BenchReport) -> String {
    let series = series_by_policy(report, |s| Some(s.output_tokens_per_s));
    line_plot(
        &format!(
            "Output throughput vs offered load: {} ({} pods)",
            report.workload, report.pods
        ),
        "offered load (QPS)",
        "output tokens/s",
        &series,
        false,
        None,
    )
}

fn hit_rate_plot(report: &BenchReport) -> String {
    let mut out = String::new();
    svg_open(
        &mut out,
        &format!(
            "Prompt-token hit rate per policy: {} ({} pods)",
            report.workload, report.pods
        ),
    );
    let mut names: Vec<&str> = Vec::new();
    for segment in &report.segments {
        for policy in &segment.policies {
            if !names.contains(&policy.summary.policy.as_str()) {
                names.push(&policy.summary.policy);
            }
        }
    }
    let x = Axis {
        lo: 0.0,
        hi: 1.0,
        log: false,
    };
    let y = Axis {
        lo: 0.0,
        hi: 1.0,
        log: false,
    };
    let percent_axis = Axis {
        lo: 0.0,
        hi: 100.0,
        log: false,
    };
    axes(
        &mut out,
        &x,
        &percent_axis,
        if report.segments.len() > 1 {
            "segment (dashed: pooled-cache ceiling)"
        } else {
            "policy (dashed: pooled-cache ceiling)"
        },
        "hit rate (%)",
        false,
    );
    let (left, top, width, height) = plot_area();
    let bottom = top + height;
    let groups = report.segments.len().max(1);
    let group_width = width / groups as f64;
    let bar = (group_width * 0.8) / names.len().max(1) as f64;
    for (g, segment) in report.segments.iter().enumerate() {
        let group_left = left + g as f64 * group_width + group_width * 0.1;
        for policy in &segment.policies {
            let Some(i) = names.iter().position(|n| *n == policy.summary.policy) else {
                continue;
            };
            let hit = policy.summary.figures.hit_rate.clamp(0.0, 1.0);
            let h = y.fraction(hit) * height;
            let bx = group_left + i as f64 * bar;
            let _ = writeln!(
                out,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {:.1} %</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{:.0}</text>"#,
                bottom - h,
                (bar - 2.0).max(1.0),
                PALETTE[i % PALETTE.len()],
                escape(&policy.summary.policy),
                hit * 100.0,
                bx + bar / 2.0,
                bottom - h - 3.0,
                hit * 100.0
            );
        }
        let ceiling_y = bottom - y.fraction(segment.pooled_hit_ceiling.clamp(0.0, 1.0)) * height;
        let _ = writeln!(
            out,
            r##"<line x1="{group_left:.1}" y1="{ceiling_y:.1}" x2="{:.1}" y2="{ceiling_y:.1}" stroke="#333" stroke-dasharray="6 4"/>"##,
            group_left + group_width * 0.8
        );
        if report.segments.len() > 1 {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                group_left + group_width * 0.4,
                bottom + 19.0,
                escape(&segment.label)
            );
        }
    }
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knee_rates_print_short() {
        assert_eq!(qps_text(22.0), "22");
        assert_eq!(qps_text(2.5), "2.5");
        assert_eq!(qps_text(3.9069456158649585), "3.91");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            linear_ticks(0.0, 60.0),
            vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
        );
        let log = Axis {
            lo: 0.1,
            hi: 100.0,
            log: true,
        };
        assert_eq!(log.ticks(), vec![0.1, 1.0, 10.0, 100.0]);
        assert!((log.fraction(1.0) - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    #[test]
    fn an_empty_plot_is_still_valid_svg() {
        let svg = line_plot("t", "x", "y", &[], true, None);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
