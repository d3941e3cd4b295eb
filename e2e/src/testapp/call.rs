//! The `call` side: sends N requests with C workers and summarizes who answered and how.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::client::{HttpConn, Outcome, RequestSpec, Target, request_once};

/// What the `call` command does.
#[derive(Debug, Clone)]
pub struct CallConfig {
    /// Where to send requests.
    pub target: Target,
    /// Total number of requests.
    pub count: u64,
    /// Workers sending in parallel.
    pub concurrency: usize,
    /// Request details shared by every request.
    pub spec: RequestSpec,
    /// Keep one connection per worker instead of one per request.
    pub reuse: bool,
}

/// Latency distribution in milliseconds (fractional).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Fastest request.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest request.
    pub max: f64,
}

/// Aggregate result of a `call` run; printed as JSON with `--json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Target URL.
    pub url: String,
    /// Requests sent.
    pub count: u64,
    /// Requests that succeeded (2xx, grpc-status 0, full TCP echo).
    pub succeeded: u64,
    /// Requests that did not.
    pub failed: u64,
    /// Counts by status code (`"200"`, `"grpc-0"`, `"ok"`).
    pub codes: BTreeMap<String, u64>,
    /// Counts by answering pod.
    pub pods: BTreeMap<String, u64>,
    /// Counts by answering version.
    pub versions: BTreeMap<String, u64>,
    /// Counts by peer IP the server reported (port stripped).
    pub peer_ips: BTreeMap<String, u64>,
    /// Counts by error kind.
    pub errors: BTreeMap<String, u64>,
    /// Last error message per kind, for diagnosis.
    pub error_samples: BTreeMap<String, String>,
    /// Latency over all requests.
    pub latency_ms: Latency,
    /// With a count of 1: the response body (JSON when parseable, else text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

impl Summary {
    /// True when every request succeeded.
    pub fn all_ok(&self) -> bool {
        self.failed == 0 && self.succeeded == self.count
    }

    /// Counts one outcome into the summary.
    pub fn record(&mut self, o: &Outcome) {
        if o.success {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
        if let Some(c) = &o.code {
            *self.codes.entry(c.clone()).or_default() += 1;
        }
        if let Some(p) = &o.pod {
            *self.pods.entry(p.clone()).or_default() += 1;
        }
        if let Some(v) = &o.version {
            *self.versions.entry(v.clone()).or_default() += 1;
        }
        if let Some(p) = &o.peer {
            *self.peer_ips.entry(strip_port(p).to_string()).or_default() += 1;
        }
        if let Some((kind, msg)) = &o.error {
            *self.errors.entry(kind.as_str().to_string()).or_default() += 1;
            self.error_samples
                .insert(kind.as_str().to_string(), msg.clone());
        }
    }

    /// Human-readable lines: `200 x10`, `pod reviews-v1-0 x4`, `error timeout x2`, totals.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if let Some(b) = &self.body {
            let shown = match b {
                Value::String(s) => s.trim_end().to_string(),
                v => serde_json::to_string_pretty(v).unwrap_or_default(),
            };
            out.push_str(&shown);
            out.push('\n');
        }
        for (k, n) in &self.codes {
            out.push_str(&format!("{k} x{n}\n"));
        }
        for (k, n) in &self.pods {
            out.push_str(&format!("pod {k} x{n}\n"));
        }
        for (k, n) in &self.versions {
            out.push_str(&format!("version {k} x{n}\n"));
        }
        for (k, n) in &self.peer_ips {
            out.push_str(&format!("peer {k} x{n}\n"));
        }
        for (k, n) in &self.errors {
            let sample = self.error_samples.get(k).map(String::as_str).unwrap_or("");
            out.push_str(&format!("error {k} x{n} ({sample})\n"));
        }
        let l = &self.latency_ms;
        out.push_str(&format!(
            "total {} ok {} failed {} latency ms min {:.2} p50 {:.2} p99 {:.2} max {:.2}\n",
            self.count, self.succeeded, self.failed, l.min, l.p50, l.p99, l.max
        ));
        out
    }
}

/// `10.0.0.1:5000` -> `10.0.0.1`, `[::1]:5000` -> `::1`; anything else unchanged.
fn strip_port(peer: &str) -> &str {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(_) => {
            let host = peer.rsplit_once(':').map(|(h, _)| h).unwrap_or(peer);
            host.trim_start_matches('[').trim_end_matches(']')
        }
        Err(_) => peer,
    }
}

fn latency(mut ms: Vec<f64>) -> Latency {
    if ms.is_empty() {
        return Latency::default();
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Latency {
        min: ms[0],
        p50: at(0.5),
        p99: at(0.99),
        max: ms[ms.len() - 1],
    }
}

/// Runs the requests and summarizes them. Outcomes stream to the aggregator over a bounded
/// channel so memory stays flat for large counts.
pub async fn run(cfg: CallConfig) -> Summary {
    let cfg = Arc::new(cfg);
    let next = Arc::new(AtomicU64::new(0));
    let workers = usize::try_from(cfg.count.max(1))
        .unwrap_or(usize::MAX)
        .min(cfg.concurrency.max(1));
    let (tx, mut rx) = mpsc::channel::<Outcome>(1024);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let cfg = cfg.clone();
        let next = next.clone();
        let tx = tx.clone();
        set.spawn(async move {
            let mut conn: Option<HttpConn> = None;
            while next.fetch_add(1, Ordering::Relaxed) < cfg.count {
                let o = request_once(&cfg.target, &cfg.spec, &mut conn, cfg.reuse).await;
                if tx.send(o).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut summary = Summary {
        url: cfg.target.url.clone(),
        count: cfg.count,
        ..Summary::default()
    };
    let mut lat = Vec::new();
    let mut last = None;
    while let Some(o) = rx.recv().await {
        // Microsecond resolution keeps the JSON readable.
        lat.push((o.latency.as_secs_f64() * 1e6).round() / 1000.0);
        summary.record(&o);
        last = Some(o);
    }
    // Workers only stop early by panicking; count what they never sent as failed.
    while set.join_next().await.is_some() {}
    let seen = summary.succeeded + summary.failed;
    if seen < summary.count {
        summary.failed += summary.count - seen;
    }
    summary.latency_ms = latency(lat);
    if cfg.count == 1
        && let Some(o) = last
    {
        summary.body = Some(
            serde_json::from_slice(&o.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&o.body).into_owned())),
        );
    }
    summary
}
