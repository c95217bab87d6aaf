//! The demo's comparison: per profile, what the client measured (hit rate, TTFT) and what
//! the gateways' `Request handled` lines say (which pod each replica picked, predicted
//! and reported cached tokens); the table, the line that says why the winner wins, and
//! the plot.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::fleet::Handled;
use crate::bench::metrics::Figures;
use crate::bench::report::{escape, linear_ticks, percent, tick_label, PALETTE};
use crate::bench::workload::Segment;

/// What kind of routing a profile does, for the line under the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// Reads the block index fed by the pods' KV events.
    Events,
    /// Remembers its own routing decisions.
    OwnHistory,
    /// Ignores where prompts are cached.
    CacheBlind,
}

/// One profile's row.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileFigures {
    /// The name in the table (`kv-cache`, `prefix`, `round-robin`).
    pub name: String,
    /// The gateway profile that ran it.
    pub profile: String,
    pub routing: Routing,
    /// Measured requests answered, with the client's figures over them.
    #[serde(flatten)]
    pub figures: Figures,
    /// Requests whose response broke off (in flight on the pod when it restarted).
    pub failed: u64,
    /// How often a replica sent a prefix to the pod the other replica last sent it to.
    pub agreement: Option<f64>,
    pub agreement_compared: u64,
    /// Cached tokens the gateways predicted when routing, and the pods reported.
    pub predicted_cached_tokens: u64,
    pub reported_cached_tokens: u64,
    /// Of those, on the restarted pod once it restarted.
    pub predicted_after_restart: u64,
    pub reported_after_restart: u64,
    /// Requests each pod answered (from the gateways' lines).
    pub pod_requests: Vec<u64>,
}

/// Where and when the run restarted a pod.
pub struct RestartMark<'a> {
    /// The pod's address as the gateways log it.
    pub pod: &'a str,
    /// Requests from this index on arrived after the restart.
    pub first_after: usize,
}

/// The gateways' side of one profile's run.
pub struct Routed<'a> {
    pub segment: &'a Segment,
    /// Request `i`'s `Request handled` line, if it was seen.
    pub handled: &'a [Option<Handled>],
    pub replicas: usize,
    /// The pods' addresses, in the simulation's order.
    pub pods: &'a [String],
    pub restart: &'a RestartMark<'a>,
}

impl Routed<'_> {
    fn measured(&self, index: usize) -> bool {
        let stage = self.segment.requests[index].stage as usize;
        self.segment.stages.get(stage).is_some_and(|s| s.measured)
    }

    /// (picks that matched the other replica's last pick for the prefix, picks compared):
    /// a prefix is the request's first block, the last pick is remembered through the
    /// warm-up, and only measured requests are counted.
    pub fn agreement(&self) -> (u64, u64) {
        let mut last: HashMap<(u64, usize), &str> = HashMap::new();
        let (mut same, mut compared) = (0, 0);
        for (i, (request, line)) in self.segment.requests.iter().zip(self.handled).enumerate() {
            let (Some(line), Some(&prefix)) = (line, request.block_keys.first()) else {
                continue;
            };
            let Some(pod) = line.pod.as_deref() else {
                continue;
            };
            if self.measured(i) {
                for other in (0..self.replicas).filter(|&r| r != line.replica) {
                    if let Some(&theirs) = last.get(&(prefix, other)) {
                        compared += 1;
                        same += u64::from(theirs == pod);
                    }
                }
            }
            last.insert((prefix, line.replica), pod);
        }
        (same, compared)
    }

    pub fn figures(
        &self,
        name: &str,
        profile: &str,
        routing: Routing,
        client: &Figures,
        failed: u64,
    ) -> ProfileFigures {
        let (same, compared) = self.agreement();
        let mut figures = ProfileFigures {
            name: name.to_string(),
            profile: profile.to_string(),
            routing,
            figures: client.clone(),
            failed,
            agreement: (compared > 0).then(|| same as f64 / compared as f64),
            agreement_compared: compared,
            predicted_cached_tokens: 0,
            reported_cached_tokens: 0,
            predicted_after_restart: 0,
            reported_after_restart: 0,
            pod_requests: vec![0; self.pods.len()],
        };
        for (i, line) in self.handled.iter().enumerate() {
            let Some(line) = line else { continue };
            if let Some(pod) = line.pod.as_deref() {
                if let Some(n) = self.pods.iter().position(|p| p == pod) {
                    figures.pod_requests[n] += 1;
                }
            }
            if !self.measured(i) {
                continue;
            }
            let predicted = line.predicted_cached_tokens.unwrap_or(0);
            let reported = line.actual_cached_tokens.unwrap_or(0);
            figures.predicted_cached_tokens += predicted;
            figures.reported_cached_tokens += reported;
            if i >= self.restart.first_after && line.pod.as_deref() == Some(self.restart.pod) {
                figures.predicted_after_restart += predicted;
                figures.reported_after_restart += reported;
            }
        }
        figures
    }
}

fn secs(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.2}"))
}

fn kilo(tokens: u64) -> String {
    if tokens >= 10_000 {
        format!("{}k", (tokens as f64 / 1e3).round())
    } else {
        tokens.to_string()
    }
}

/// The comparison table, one row per profile.
pub fn table(rows: &[ProfileFigures]) -> String {
    let mut out = String::from(
        "| profile | hit rate | TTFT p50 (s) | TTFT p90 (s) | replicas agree | cached tokens predicted / reported | failed |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} / {} | {} |",
            row.name,
            percent(Some(row.figures.hit_rate)),
            secs(row.figures.ttft_p50_s),
            secs(row.figures.ttft_p90_s),
            percent(row.agreement),
            kilo(row.predicted_cached_tokens),
            kilo(row.reported_cached_tokens),
            row.failed,
        );
    }
    out
}

/// The profile with the best hit rate (TTFT p90 breaks a tie).
pub fn winner(rows: &[ProfileFigures]) -> Option<&ProfileFigures> {
    rows.iter().max_by(|a, b| {
        a.figures.hit_rate.total_cmp(&b.figures.hit_rate).then(
            b.figures
                .ttft_p90_s
                .unwrap_or(f64::INFINITY)
                .total_cmp(&a.figures.ttft_p90_s.unwrap_or(f64::INFINITY)),
        )
    })
}

/// One line: who wins, by how much, and why, in the figures of the table.
pub fn why_line(rows: &[ProfileFigures], restarted_pod: usize) -> String {
    let Some(best) = winner(rows) else {
        return String::new();
    };
    let next = rows
        .iter()
        .filter(|r| r.name != best.name)
        .max_by(|a, b| a.figures.hit_rate.total_cmp(&b.figures.hit_rate));
    let mut line = format!("{} wins", best.name);
    let Some(next) = next else {
        return line;
    };
    let _ = write!(
        line,
        " ({} hit rate and {} s TTFT p90 against {}'s {} and {} s): ",
        percent(Some(best.figures.hit_rate)),
        secs(best.figures.ttft_p90_s),
        next.name,
        percent(Some(next.figures.hit_rate)),
        secs(next.figures.ttft_p90_s),
    );
    line.push_str(&match best.routing {
        Routing::Events => format!(
            "every replica reads every pod's KV events, so both sent a prefix to the pod that holds it ({} agreement against {}) and saw pod {} lose its cache when it restarted",
            percent(best.agreement),
            percent(next.agreement),
            restarted_pod + 1,
        ),
        Routing::OwnHistory => format!(
            "it keeps each prefix where its replica last sent it ({} agreement), which here beats {}",
            percent(best.agreement),
            next.name,
        ),
        Routing::CacheBlind => "spreading load evenly beats cache affinity on this traffic".into(),
    });
    match next.routing {
        Routing::OwnHistory => {
            let _ = write!(
                line,
                "; {} knows only its own replica's routing, so the replicas placed prefixes on different pods, evicted each other's and predicted {} cached tokens where the pods reported {} ({} / {} on pod {} after its restart).",
                next.name,
                kilo(next.predicted_cached_tokens),
                kilo(next.reported_cached_tokens),
                kilo(next.predicted_after_restart),
                kilo(next.reported_after_restart),
                restarted_pod + 1,
            );
        }
        Routing::Events | Routing::CacheBlind => {
            let _ = write!(line, "; {} does not.", next.name);
        }
    }
    line
}

/// One panel of the plot: a bar (or a pair of bars) per profile.
struct Panel<'a> {
    title: &'a str,
    values: Vec<Vec<f64>>,
    /// Labels of the bars within a profile's group, when there are several.
    series: &'a [&'a str],
    label: fn(f64) -> String,
}

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 240.0;
const MARGIN: f64 = 46.0;

/// Four panels side by side: hit rate, TTFT p90, replicas agreeing, cached tokens
/// predicted against reported.
pub fn plot(rows: &[ProfileFigures], subtitle: &str) -> String {
    let panels = [
        Panel {
            title: "prompt-token hit rate (%)",
            values: rows
                .iter()
                .map(|r| vec![r.figures.hit_rate * 100.0])
                .collect(),
            series: &[],
            label: |v| format!("{v:.0}"),
        },
        Panel {
            title: "TTFT p90 (s)",
            values: rows
                .iter()
                .map(|r| vec![r.figures.ttft_p90_s.unwrap_or(0.0)])
                .collect(),
            series: &[],
            label: |v| format!("{v:.2}"),
        },
        Panel {
            title: "replicas agree (%)",
            values: rows
                .iter()
                .map(|r| vec![r.agreement.unwrap_or(0.0) * 100.0])
                .collect(),
            series: &[],
            label: |v| format!("{v:.0}"),
        },
        Panel {
            title: "cached tokens (k)",
            values: rows
                .iter()
                .map(|r| {
                    vec![
                        r.predicted_cached_tokens as f64 / 1e3,
                        r.reported_cached_tokens as f64 / 1e3,
                    ]
                })
                .collect(),
            series: &["predicted", "reported"],
            label: |v| format!("{v:.0}"),
        },
    ];
    let width = panels.len() as f64 * PANEL_W;
    let height = PANEL_H + 110.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="{width}" height="{height}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">kvgate demo: {} profiles, gateway replicas, one pod restarted</text><text x="{}" y="40" text-anchor="middle" fill="#555">{}</text>"##,
        width / 2.0,
        rows.len(),
        width / 2.0,
        escape(subtitle)
    );
    for (p, panel) in panels.iter().enumerate() {
        draw_panel(&mut out, panel, rows, p as f64 * PANEL_W);
    }
    let legend_y = height - 18.0;
    for (i, row) in rows.iter().enumerate() {
        let x = 20.0 + i as f64 * 150.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{:.1}" width="14" height="10" fill="{}"/><text x="{:.1}" y="{legend_y}">{}</text>"#,
            legend_y - 9.0,
            PALETTE[i % PALETTE.len()],
            x + 20.0,
            escape(&row.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn draw_panel(out: &mut String, panel: &Panel<'_>, rows: &[ProfileFigures], left: f64) {
    let top = 64.0;
    let (x0, y0) = (left + MARGIN, top + PANEL_H - 30.0);
    let plot_w = PANEL_W - MARGIN - 14.0;
    let plot_h = PANEL_H - 50.0;
    let max = panel
        .values
        .iter()
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        .max(1e-9);
    let ticks = linear_ticks(0.0, max * 1.1);
    let hi = ticks.last().copied().unwrap_or(max).max(max);
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
        left + PANEL_W / 2.0,
        top + 4.0,
        escape(panel.title)
    );
    for t in ticks {
        let y = y0 - t / hi * plot_h;
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + plot_w,
            x0 - 5.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let group_w = plot_w / rows.len().max(1) as f64;
    for (i, values) in panel.values.iter().enumerate() {
        let bar_w = group_w * 0.7 / values.len().max(1) as f64;
        for (k, &value) in values.iter().enumerate() {
            let h = value / hi * plot_h;
            let x = x0 + i as f64 * group_w + group_w * 0.15 + k as f64 * bar_w;
            // The second bar of a pair is drawn lighter.
            let opacity = if k == 0 { 1.0 } else { 0.45 };
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}" fill-opacity="{opacity}"><title>{}{}: {}</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                y0 - h,
                (bar_w - 2.0).max(1.0),
                PALETTE[i % PALETTE.len()],
                escape(&rows[i].name),
                panel
                    .series
                    .get(k)
                    .map_or(String::new(), |s| format!(" {s}")),
                (panel.label)(value),
                x + bar_w / 2.0,
                y0 - h - 3.0,
                (panel.label)(value)
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<line x1="{x0}" y1="{y0}" x2="{:.1}" y2="{y0}" stroke="#333"/>"##,
        x0 + plot_w
    );
    if !panel.series.is_empty() {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">solid: {}, light: {}</text>"##,
            left + PANEL_W / 2.0,
            y0 + 18.0,
            escape(panel.series[0]),
            escape(panel.series.get(1).copied().unwrap_or_default())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{BenchRequest, Stage};
    use std::sync::Arc;

    fn segment(prefixes: &[u64]) -> Segment {
        let stage = Stage {
            label: String::new(),
            offered_qps: 1.0,
            start_ms: 0.0,
            end_ms: 1.0,
            measured: true,
        };
        Segment {
            label: String::new(),
            stages: vec![stage],
            requests: prefixes
                .iter()
                .map(|&p| BenchRequest {
                    arrival_ms: 0.0,
                    stage: 0,
                    block_keys: Arc::from(vec![p, 99]),
                    prompt_tokens: 128,
                    output_tokens: 1,
                    follows: None,
                    live: None,
                    replica: None,
                    adapter: None,
                })
                .collect(),
            pooled_hit_ceiling: 0.0,
        }
    }

    fn line(replica: usize, pod: &str, predicted: u64, actual: u64) -> Option<Handled> {
        Some(Handled {
            replica,
            pod: Some(pod.into()),
            predicted_cached_tokens: Some(predicted),
            actual_cached_tokens: Some(actual),
            ..Handled::default()
        })
    }

    #[test]
    fn replicas_agree_when_they_pick_the_pod_the_other_picked_last() {
        let segment = segment(&[1, 1, 1, 2, 2, 1]);
        let handled = [
            line(0, "a", 0, 0),
            // Replica 1's first pick of prefix 1: compared with replica 0's "a".
            line(1, "a", 64, 64),
            line(0, "a", 64, 64),
            line(0, "b", 0, 0),
            // Prefix 2 on another pod than replica 0 chose: a disagreement.
            line(1, "c", 0, 0),
            // After the restart of "a": predicted 64, reported 0.
            line(1, "a", 64, 0),
        ];
        let pods = ["a".to_string(), "b".to_string(), "c".to_string()];
        let restart = RestartMark {
            pod: "a",
            first_after: 5,
        };
        let routed = Routed {
            segment: &segment,
            handled: &handled,
            replicas: 2,
            pods: &pods,
            restart: &restart,
        };
        assert_eq!(routed.agreement(), (3, 4));
        let row = routed.figures("kv", "default", Routing::Events, &Figures::default(), 0);
        assert_eq!(row.agreement, Some(0.75));
        assert_eq!(
            (row.predicted_cached_tokens, row.reported_cached_tokens),
            (192, 128)
        );
        assert_eq!(
            (row.predicted_after_restart, row.reported_after_restart),
            (64, 0)
        );
        assert_eq!(row.pod_requests, vec![4, 1, 1]);
    }

    fn row(name: &str, routing: Routing, hit: f64, p90: f64) -> ProfileFigures {
        ProfileFigures {
            name: name.into(),
            profile: name.into(),
            routing,
            figures: Figures {
                hit_rate: hit,
                ttft_p90_s: Some(p90),
                ..Figures::default()
            },
            failed: 0,
            agreement: Some(0.5),
            agreement_compared: 10,
            predicted_cached_tokens: 400_000,
            reported_cached_tokens: 300_000,
            predicted_after_restart: 20_000,
            reported_after_restart: 0,
            pod_requests: vec![1, 1],
        }
    }

    #[test]
    fn the_line_names_the_winner_and_its_reason() {
        let rows = [
            row("kv-cache", Routing::Events, 0.95, 0.15),
            row("prefix", Routing::OwnHistory, 0.80, 0.37),
            row("round-robin", Routing::CacheBlind, 0.40, 0.40),
        ];
        let line = why_line(&rows, 1);
        assert!(line.starts_with("kv-cache wins (95.0 % hit rate"), "{line}");
        assert!(line.contains("pod 2 lose its cache"), "{line}");
        assert!(line.contains("predicted 400k cached tokens where the pods reported 300k"));
        let table = table(&rows);
        assert!(table.contains("| prefix | 80.0 % | — | 0.37 | 50.0 % | 400k / 300k | 0 |"));
        let svg = plot(&rows, "test");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("replicas agree"));
    }
}
