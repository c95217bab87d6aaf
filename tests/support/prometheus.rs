//! A real Prometheus server (the Debian `prometheus` package; `.ci/setup` installs
//! it) scraping kvgate's admin listener, queried through its HTTP API.
//!
//! `Prometheus::start` writes a config with a 1 s scrape of the given targets
//! (job `kvgate`), checks it with `promtool check config`, starts the server on
//! loopback port 0 with its TSDB in a temp dir, reads the port it got from its log
//! ("Listening on"), and waits until it is ready.
//! The process is killed when the value drops. Every wait is bounded; a timeout
//! panics with the last answer and the tail of Prometheus's log.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any wait on Prometheus may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);

/// One element of an instant-query result.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(env: &str, name: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| name.to_string())
}

/// The address of Prometheus's `msg="Listening on" address=...` log line.
fn listening_address(log: &Path) -> Option<String> {
    std::fs::read_to_string(log).ok()?.lines().find_map(|line| {
        line.contains("msg=\"Listening on\"")
            .then(|| line.split("address=").nth(1))
            .flatten()
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second. Binaries come from
    /// `$PROMETHEUS` / `$PROMTOOL` or `PATH`.
    pub async fn start(targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: kvgate\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let check = Command::new(binary("PROMTOOL", "promtool"))
            .args(["check", "config"])
            .arg(&config)
            .output()
            .expect("run promtool (apt-get install prometheus, or set $PROMTOOL)");
        assert!(
            check.status.success(),
            "promtool check config failed:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("http client");
        let log = dir.path().join("prometheus.log");
        let mut child = Command::new(binary("PROMETHEUS", "prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("start prometheus (apt-get install prometheus, or set $PROMETHEUS)");
        let deadline = Instant::now() + WAIT;
        let mut base = None;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", tail(&log));
            }
            if base.is_none() {
                base = listening_address(&log).map(|addr| format!("http://{addr}"));
            }
            if let Some(base) = &base {
                let ready = http.get(format!("{base}/-/ready")).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return Self {
                        child,
                        base: base.clone(),
                        log,
                        http,
                        _dir: dir,
                    };
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("prometheus not ready after {WAIT:?}:\n{}", tail(&log));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(params)
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("GET {path}: body: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("GET {path} {params:?}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// Runs an instant query. Errors are PromQL errors (bad syntax, bad types).
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await?;
        let value = |v: &Value| -> Result<f64, String> {
            let text = v[1].as_str().ok_or_else(|| format!("sample {v}"))?;
            // Prometheus writes NaN and infinities as "NaN", "+Inf", "-Inf".
            text.parse::<f64>().map_err(|e| format!("sample {v}: {e}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .ok_or_else(|| format!("result of {promql}: {data}"))?
                .iter()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                .collect()
                        })
                        .unwrap_or_default();
                    Ok(Sample {
                        labels,
                        value: value(&s["value"])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: value(&data["result"])?,
            }]),
            other => Err(format!("{promql}: unexpected result type {other:?}")),
        }
    }

    /// Polls `promql` until `accept` holds for its result, and returns that result.
    pub async fn wait_for(&self, promql: &str, accept: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = self.query(promql).await;
            if let Ok(samples) = &last {
                if accept(samples) {
                    return samples.clone();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {WAIT:?} for `{promql}`; last answer: {last:?}\nprometheus log:\n{}",
                    tail(&self.log)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `promql` returns exactly one sample with value `expected`.
    pub async fn wait_for_value(&self, promql: &str, expected: f64) {
        self.wait_for(promql, |s| {
            s.len() == 1 && (s[0].value - expected).abs() <= 1e-9 * expected.abs().max(1.0)
        })
        .await;
    }

    /// Waits until every scrape target is up and has been scraped at least `scrapes` times.
    pub async fn wait_for_scrapes(&self, targets: usize, scrapes: usize) {
        self.wait_for("count_over_time(up{job=\"kvgate\"}[5m])", |s| {
            s.len() == targets && s.iter().all(|x| x.value >= scrapes as f64)
        })
        .await;
        self.wait_for("up{job=\"kvgate\"}", |s| {
            s.len() == targets && s.iter().all(|x| x.value == 1.0)
        })
        .await;
    }

    /// Values of `label` over the series `selector` matches (what Grafana's
    /// `label_values(selector, label)` variable query lists).
    pub async fn label_values(&self, label: &str, selector: &str) -> Result<Vec<String>, String> {
        let data = self
            .api(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", selector)],
            )
            .await?;
        Ok(data
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }
}
