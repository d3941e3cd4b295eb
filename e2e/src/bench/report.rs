//! The benchmark's report: per-path results, the median over rounds, the targets, and the
//! table or JSON it prints.

use serde_json::json;

use crate::{http, load};

/// Target (from the issue): mesh/direct single-stream throughput.
pub const MIN_THROUGHPUT_RATIO: f64 = 0.35;
/// Target: microseconds ztunnel may add to the median 1 KiB round trip.
pub const MAX_ADDED_P50_US: f64 = 48.0;
/// Target: mesh/direct new connections per second.
pub const MIN_CONN_RATIO: f64 = 0.26;
/// Target: mesh/direct HTTP requests per second.
pub const MIN_HTTP_RATIO: f64 = 0.37;
/// Idle RSS limit, in MB of 10^6 bytes (the stricter reading of "14 MB").
pub const MAX_IDLE_RSS_MB: f64 = 14.0;

/// Results of one path; the CPU fields are ztunnel's CPU seconds per test (mesh only).
#[derive(Clone)]
pub struct PathResult {
    pub throughput: load::Throughput,
    pub latency: load::Latency,
    pub conns: load::ConnRate,
    /// Requests/s, or why the row was skipped or failed.
    pub http: std::result::Result<http::WrkResult, String>,
    pub cpu: [Option<f64>; 4],
}

/// ztunnel's own footprint and proof that traffic went over mTLS.
pub struct Usage {
    /// Percentage of the machine's CPU busy just before the run (other work skews figures).
    pub busy_before: f64,
    pub cpu_total: f64,
    pub rss_idle: u64,
    pub rss_peak: u64,
    pub mtls_opened_source: f64,
    pub mtls_opened_destination: f64,
}

/// What the run was asked to do, for the report's header.
pub struct RunInfo {
    /// Seconds per timed test.
    pub duration: u64,
    /// Measured round trips in the latency test.
    pub round_trips: usize,
    /// Direct/mesh rounds whose medians are reported.
    pub rounds: usize,
    /// How the mesh path's pods are redirected (`nftables` or `ebpf`).
    pub redirect: &'static str,
    /// Which of throughput, latency and connection rate ran (`--only` skips the others; the
    /// HTTP row carries its own reason).
    pub ran: Ran,
}

/// The tests a run measured; a skipped test gets no figures and no verdict.
#[derive(Clone, Copy)]
pub struct Ran {
    pub throughput: bool,
    pub latency: bool,
    pub conns: bool,
}

/// A verdict only for a test that ran.
fn met(ran: bool, pass: bool) -> Option<bool> {
    ran.then_some(pass)
}

/// Index of the round whose `metric(direct, mesh)` is the median (the lower middle one for an
/// even count).
fn median_index(
    directs: &[PathResult],
    meshes: &[PathResult],
    metric: impl Fn(&PathResult, &PathResult) -> f64,
) -> usize {
    let mut order: Vec<usize> = (0..directs.len().min(meshes.len())).collect();
    order.sort_by(|&a, &b| {
        metric(&directs[a], &meshes[a]).total_cmp(&metric(&directs[b], &meshes[b]))
    });
    order[(order.len() - 1) / 2]
}

/// For each metric, the round with the median mesh/direct ratio (median added µs for latency),
/// both paths' figures taken whole from that round: a row always compares two measurements
/// made back to back, and its p99 and CPU seconds belong to the same round as its median.
pub fn median(directs: &[PathResult], meshes: &[PathResult]) -> Option<(PathResult, PathResult)> {
    if directs.is_empty() || meshes.is_empty() {
        return None;
    }
    let tput = median_index(directs, meshes, |d, m| {
        ratio(m.throughput.gbps(), d.throughput.gbps())
    });
    let lat = median_index(directs, meshes, |d, m| m.latency.p50_us - d.latency.p50_us);
    let conns = median_index(directs, meshes, |d, m| {
        ratio(m.conns.per_sec(), d.conns.per_sec())
    });
    let http = median_index(directs, meshes, |d, m| {
        ratio(http_rps(m).unwrap_or(0.0), http_rps(d).unwrap_or(0.0))
    });
    let pick = |rounds: &[PathResult]| PathResult {
        throughput: rounds[tput].throughput,
        latency: rounds[lat].latency,
        conns: rounds[conns].conns,
        http: rounds[http].http.clone(),
        cpu: [
            rounds[tput].cpu[0],
            rounds[lat].cpu[1],
            rounds[conns].cpu[2],
            rounds[http].cpu[3],
        ],
    };
    Some((pick(directs), pick(meshes)))
}

/// One line with a round's direct and mesh figures and their ratios.
pub fn round_summary(d: &PathResult, m: &PathResult) -> String {
    let http = match (http_rps(d), http_rps(m)) {
        (Some(dr), Some(mr)) => format!("http {dr:.0}/{mr:.0} ({:.2}x)", ratio(mr, dr)),
        _ => "http -".to_string(),
    };
    format!(
        "throughput {:.2}/{:.2} Gbit/s ({:.2}x), p50 {:.1}/{:.1} µs (+{:.1}), conns {:.0}/{:.0} ({:.2}x), {http}",
        d.throughput.gbps(),
        m.throughput.gbps(),
        ratio(m.throughput.gbps(), d.throughput.gbps()),
        d.latency.p50_us,
        m.latency.p50_us,
        m.latency.p50_us - d.latency.p50_us,
        d.conns.per_sec(),
        m.conns.per_sec(),
        ratio(m.conns.per_sec(), d.conns.per_sec()),
    )
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn ratio(mesh: f64, direct: f64) -> f64 {
    if direct > 0.0 { mesh / direct } else { 0.0 }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn http_rps(p: &PathResult) -> Option<f64> {
    p.http.as_ref().ok().map(|r| r.rps)
}

fn fmt_cpu(c: Option<f64>) -> String {
    c.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into())
}

pub fn print_table(args: &RunInfo, d: &PathResult, m: &PathResult, u: &Usage) {
    let tput = ratio(m.throughput.gbps(), d.throughput.gbps());
    let added = m.latency.p50_us - d.latency.p50_us;
    let conn = ratio(m.conns.per_sec(), d.conns.per_sec());
    println!(
        "ztunnel data-path benchmark ({} redirection): {} s per timed test, {} round trips, \
         {} CPUs, machine {:.0}% busy before the run{}",
        args.redirect,
        args.duration,
        args.round_trips,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        u.busy_before,
        if args.rounds > 1 {
            format!(
                "; medians of {} interleaved direct/mesh rounds",
                args.rounds
            )
        } else {
            String::new()
        }
    );
    println!(
        "{:<30} {:>11} {:>11} {:>12} {:>10}  {:<12} result",
        "metric", "direct", "mesh", "mesh/direct", "zt CPU s", "target"
    );
    let row = |name: &str,
               dv: String,
               mv: String,
               rel: String,
               cpu: Option<f64>,
               tgt: &str,
               res: &str| {
        println!(
            "{name:<30} {dv:>11} {mv:>11} {rel:>12} {:>10}  {tgt:<12} {res}",
            fmt_cpu(cpu)
        );
    };
    let skipped = |name: &str| println!("{name:<30} skipped (--only)");
    if !args.ran.throughput {
        skipped("throughput, 1 stream (Gbit/s)");
    } else {
        row(
            "throughput, 1 stream (Gbit/s)",
            format!("{:.2}", d.throughput.gbps()),
            format!("{:.2}", m.throughput.gbps()),
            format!("{tput:.2}x"),
            m.cpu[0],
            ">= 0.35x",
            verdict(tput >= MIN_THROUGHPUT_RATIO),
        );
    }
    if !args.ran.latency {
        skipped("1 KiB round trip (µs)");
    } else {
        row(
            "1 KiB round trip p50 (µs)",
            format!("{:.1}", d.latency.p50_us),
            format!("{:.1}", m.latency.p50_us),
            format!("+{added:.1} µs"),
            m.cpu[1],
            "<= +48 µs",
            verdict(added <= MAX_ADDED_P50_US),
        );
        row(
            "1 KiB round trip p99 (µs)",
            format!("{:.1}", d.latency.p99_us),
            format!("{:.1}", m.latency.p99_us),
            format!("+{:.1} µs", m.latency.p99_us - d.latency.p99_us),
            None,
            "-",
            "",
        );
    }
    if !args.ran.conns {
        skipped("new connections/s (2 clients)");
    } else {
        row(
            "new connections/s (2 clients)",
            format!("{:.0}", d.conns.per_sec()),
            format!("{:.0}", m.conns.per_sec()),
            format!("{conn:.2}x"),
            m.cpu[2],
            ">= 0.26x",
            verdict(conn >= MIN_CONN_RATIO),
        );
    }
    match (http_rps(d), http_rps(m)) {
        (Some(dr), Some(mr)) => {
            let r = ratio(mr, dr);
            row(
                "HTTP requests/s (wrk c16 t2)",
                format!("{dr:.0}"),
                format!("{mr:.0}"),
                format!("{r:.2}x"),
                m.cpu[3],
                ">= 0.37x",
                verdict(r >= MIN_HTTP_RATIO),
            );
        }
        _ => {
            let why = m.http.as_ref().err().or(d.http.as_ref().err());
            println!(
                "{:<30} {}",
                "HTTP requests/s (wrk c16 t2)",
                why.map_or("", |s| s)
            );
        }
    }
    for (path, p) in [("direct", d), ("mesh", m)] {
        if let Ok(http::WrkResult {
            errors: Some(e), ..
        }) = &p.http
        {
            println!("  wrk on {path} reported: {e}");
        }
        if p.conns.errors > 0 {
            println!("  {path}: {} connection attempts failed", p.conns.errors);
        }
    }
    let idle = mb(u.rss_idle);
    println!(
        "ztunnel: CPU {:.2} s over the mesh tests; RSS idle {idle:.1} MB (target < 14 MB: {}), \
         peak {:.1} MB",
        u.cpu_total,
        verdict(idle < MAX_IDLE_RSS_MB),
        mb(u.rss_peak)
    );
    println!(
        "HBONE check: istio_tcp_connections_opened_total{{connection_security_policy=\"mutual_tls\"}} \
         grew by {:.0} (reporter=source) and {:.0} (reporter=destination){}",
        u.mtls_opened_source,
        u.mtls_opened_destination,
        if u.mtls_opened_destination >= 1.0 {
            ""
        } else {
            "  WARNING: traffic did not go over HBONE"
        }
    );
}

fn path_json(p: &PathResult) -> serde_json::Value {
    json!({
        "throughput_gbps": p.throughput.gbps(),
        "throughput_bytes": p.throughput.bytes,
        "latency_p50_us": p.latency.p50_us,
        "latency_p99_us": p.latency.p99_us,
        "latency_samples": p.latency.samples,
        "connections_per_sec": p.conns.per_sec(),
        "connections_completed": p.conns.completed,
        "connection_errors": p.conns.errors,
        "http_rps": http_rps(p),
        "http_note": match &p.http { Ok(r) => r.errors.clone(), Err(e) => Some(e.clone()) },
        "ztunnel_cpu_seconds": {
            "throughput": p.cpu[0], "latency": p.cpu[1], "connections": p.cpu[2], "http": p.cpu[3],
        },
    })
}

pub fn print_json(args: &RunInfo, d: &PathResult, m: &PathResult, u: &Usage) {
    let tput = ratio(m.throughput.gbps(), d.throughput.gbps());
    let added = m.latency.p50_us - d.latency.p50_us;
    let conn = ratio(m.conns.per_sec(), d.conns.per_sec());
    let http = http_rps(d).zip(http_rps(m)).map(|(dr, mr)| ratio(mr, dr));
    let doc = json!({
        "duration_secs": args.duration,
        "rounds": args.rounds,
        "round_trips": args.round_trips,
        "redirect": args.redirect,
        "machine_busy_percent_before": u.busy_before,
        "direct": path_json(d),
        "mesh": path_json(m),
        "ratios": { "throughput": tput, "added_p50_us": added, "connections": conn, "http": http },
        "ztunnel": {
            "cpu_seconds": u.cpu_total,
            "rss_idle_bytes": u.rss_idle,
            "rss_peak_bytes": u.rss_peak,
            "mtls_connections_opened": {
                "source": u.mtls_opened_source, "destination": u.mtls_opened_destination,
            },
        },
        "targets": {
            "throughput": met(args.ran.throughput, tput >= MIN_THROUGHPUT_RATIO),
            "added_p50": met(args.ran.latency, added <= MAX_ADDED_P50_US),
            "connections": met(args.ran.conns, conn >= MIN_CONN_RATIO),
            "http": http.map(|r| r >= MIN_HTTP_RATIO),
            "idle_rss": mb(u.rss_idle) < MAX_IDLE_RSS_MB,
        },
    });
    println!("{doc:#}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(gbit: f64, p50: f64, conns: u64, cpu: f64) -> PathResult {
        PathResult {
            throughput: load::Throughput {
                bytes: (gbit * 1e9 / 8.0) as u64,
                secs: 1.0,
            },
            latency: load::Latency {
                p50_us: p50,
                p99_us: p50 * 2.0,
                samples: 10,
            },
            conns: load::ConnRate {
                completed: conns,
                errors: 0,
                secs: 1.0,
            },
            http: Err("skipped".into()),
            cpu: [Some(cpu); 4],
        }
    }

    #[test]
    fn each_row_is_the_round_with_the_median_ratio_taken_whole() {
        let directs = [
            round(10.0, 100.0, 1000, 0.0),
            round(40.0, 100.0, 1000, 0.0),
            round(20.0, 10.0, 1000, 0.0),
        ];
        let meshes = [
            round(5.0, 150.0, 100, 1.0), // 0.50x, +50 µs, 0.10x
            round(8.0, 130.0, 300, 2.0), // 0.20x, +30 µs, 0.30x
            round(6.0, 110.0, 200, 3.0), // 0.30x, +100 µs, 0.20x
        ];
        let (d, m) = median(&directs, &meshes).unwrap();
        // Throughput: the 0.30x round (2), both paths from it.
        assert!((d.throughput.gbps() - 20.0).abs() < 0.01);
        assert!((m.throughput.gbps() - 6.0).abs() < 0.01);
        assert_eq!(
            m.cpu[0],
            Some(3.0),
            "CPU from the round the throughput came from"
        );
        // Latency: +50 µs (round 0), p99 from the same round.
        assert_eq!((d.latency.p50_us, m.latency.p50_us), (100.0, 150.0));
        assert_eq!(m.latency.p99_us, 300.0);
        // Connections: 0.20x (round 2).
        assert_eq!(m.conns.completed, 200);
        assert!(median(&[], &meshes).is_none());
        // One round is its own median.
        let (d1, m1) = median(&directs[..1], &meshes[..1]).unwrap();
        assert_eq!((d1.conns.completed, m1.conns.completed), (1000, 100));
    }
}
