//! CNI ADD latency with and without our chained plugin: N pod sandboxes wired by the bridge +
//! host-local plugins alone, with a no-op chained plugin (Debian's `tuning`, the cost of any chained
//! plugin), then N ambient and N non-ambient pods through bridge + mesh-cni with
//! the real node agent, controller and ztunnel running. Prints p50/p99 and the added latency.
//! Needs root; run via `scripts/cni-bench.sh`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::cni::{CniNode, PodSandbox};
use e2e::node::{Binaries, MeshNode};

/// Measures CNI ADD latency (baseline chain vs chain with mesh-cni).
#[derive(Parser)]
struct Args {
    /// Pods per scenario.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Directory holding the mesh binaries (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// p50 and p99 of a set of durations, in milliseconds.
fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
    };
    (at(0.50), at(0.99))
}

fn time_adds(cni: &CniNode, pods: &[PodSandbox]) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(pods.len());
    for p in pods {
        let start = Instant::now();
        cni.add(p)
            .map_err(|e| anyhow::anyhow!("ADD {}/{}: {e:?}", p.namespace, p.name))?;
        out.push(start.elapsed());
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(e2e::require_root(), "needs root (network namespaces)");
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("no binary directory"))?,
    };
    let bins = Binaries::in_dir(&bin_dir);
    anyhow::ensure!(
        args.pods <= 120,
        "at most 120 pods (ambient + non-ambient share one /24)"
    );

    eprintln!(
        "==> {} pods each: bridge + host-local alone (baseline), + a no-op chained plugin, then \
         + mesh-cni for ambient and non-ambient pods, interleaved on one node with the controller, node agent and ztunnel running",
        args.pods
    );
    // The agent's default reconcile interval, as on a real node.
    let mut node = MeshNode::start_with_reconcile(&bins, 80, "10s");
    node.namespace("amb", true);
    node.namespace("plain", false);
    let with_mesh = node.cni.conflist.clone();
    let mut without_mesh = with_mesh.clone();
    if let Some(plugins) = without_mesh["plugins"].as_array_mut() {
        plugins.retain(|p| p["type"] != "mesh-cni");
    }
    // What any chained plugin costs (one more exec with the previous result on stdin): Debian's
    // `tuning` plugin with nothing to tune.
    let mut with_noop = without_mesh.clone();
    if let Some(plugins) = with_noop["plugins"].as_array_mut() {
        plugins.push(serde_json::json!({"type": "tuning"}));
    }
    let mut base = Vec::new();
    let mut noop = Vec::new();
    let mut amb = Vec::new();
    let mut plain = Vec::new();
    for i in 0..args.pods {
        for (ns, list) in [
            ("base", &mut base),
            ("noop", &mut noop),
            ("amb", &mut amb),
            ("plain", &mut plain),
        ] {
            let p = node.cni.sandbox(ns, &format!("p{i}"));
            node.write_pod(&p, "default", &[], None);
            list.push(p);
        }
    }
    // The pods exist in the API before their sandboxes are created (kubelet acts on scheduled
    // pods), so let the agent's watch catch up first, as it would have in a cluster.
    std::thread::sleep(Duration::from_secs(2));
    let (mut baseline, mut ambient, mut non_ambient) = (Vec::new(), Vec::new(), Vec::new());
    let mut noop_chained = Vec::new();
    // Interleaved, so background noise hits every scenario alike.
    for i in 0..args.pods {
        node.cni.conflist = without_mesh.clone();
        baseline.extend(time_adds(&node.cni, &base[i..=i])?);
        // Baseline sandboxes give their address back, so 2 x pods fit the node's /24.
        node.cni
            .del(&base[i])
            .map_err(|e| anyhow::anyhow!("DEL baseline pod: {e:?}"))?;
        node.cni.conflist = with_noop.clone();
        noop_chained.extend(time_adds(&node.cni, &noop[i..=i])?);
        node.cni
            .del(&noop[i])
            .map_err(|e| anyhow::anyhow!("DEL no-op chained pod: {e:?}"))?;
        node.cni.conflist = with_mesh.clone();
        ambient.extend(time_adds(&node.cni, &amb[i..=i])?);
        non_ambient.extend(time_adds(&node.cni, &plain[i..=i])?);
    }
    if std::env::var_os("CNI_BENCH_KEEP_LOG").is_some() {
        let log = node.agent.as_ref().map(|a| a.log()).unwrap_or_default();
        std::fs::write("/tmp/cni-bench-agent.log", log)?;
    }
    let enrolled = node.agent_metric("mesh_cni_enrolled_pods", &[]);
    anyhow::ensure!(
        enrolled as usize == args.pods,
        "expected {} enrolled pods, agent reports {enrolled}",
        args.pods
    );

    let (b50, b99) = percentiles(baseline);
    let (a50, a99) = percentiles(ambient);
    let (n50, n99) = percentiles(non_ambient);
    let (t50, t99) = percentiles(noop_chained);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "pods": args.pods,
                "baseline_ms": {"p50": b50, "p99": b99},
                "ambient_ms": {"p50": a50, "p99": a99},
                "non_ambient_ms": {"p50": n50, "p99": n99},
                "noop_chained_ms": {"p50": t50, "p99": t99},
                "added_ambient_ms": {"p50": a50 - b50, "p99": a99 - b99},
                "added_non_ambient_ms": {"p50": n50 - b50, "p99": n99 - b99},
                "target_added_p99_ms": 20.0,
            })
        );
    } else {
        println!("CNI ADD latency over {} pods (ms)", args.pods);
        println!("{:<34} {:>8} {:>8}", "", "p50", "p99");
        println!(
            "{:<34} {b50:>8.2} {b99:>8.2}",
            "bridge + host-local (baseline)"
        );
        println!(
            "{:<34} {t50:>8.2} {t99:>8.2}",
            "+ tuning (no-op chained plugin)"
        );
        println!("{:<34} {a50:>8.2} {a99:>8.2}", "+ mesh-cni, ambient pod");
        println!(
            "{:<34} {n50:>8.2} {n99:>8.2}",
            "+ mesh-cni, non-ambient pod"
        );
        println!(
            "added by mesh-cni: ambient p50 {:+.2} p99 {:+.2}; non-ambient p50 {:+.2} p99 {:+.2} (target: p99 added < 20 ms) -> {}",
            a50 - b50,
            a99 - b99,
            n50 - b50,
            n99 - b99,
            if a99 - b99 < 20.0 { "PASS" } else { "MISS" }
        );
        println!(
            "non-ambient pod vs a no-op chained plugin: p50 {:+.2} p99 {:+.2}",
            n50 - t50,
            n99 - t99
        );
    }
    Ok(())
}
