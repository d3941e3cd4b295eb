//! controller-scale-bench: how the controller copes with a large cluster.
//!
//! 1. Builds the full state of a synthetic cluster (default 10,000 pods, 1,000 services, 500
//!    AuthorizationPolicies in 100 ambient namespaces): `Model::apply` of every object from an
//!    empty model, then `push` into an `XdsServer`. Target: under 2 s.
//! 2. Peak RSS (VmHWM) of this process after building, and after serving every client.
//!    Target: under 300 MiB. The clients run in a child process so their memory is not
//!    counted as the controller's.
//! 3. Push latency: serves the state on 127.0.0.1 (plaintext), connects the clients (wildcard on
//!    both types), waits until each holds the full state, then changes one pod's canonical
//!    revision at a time and records, per client, the time from just before `Model::apply` to
//!    the client's handler receiving that workload. Target: p99 under 100 ms. Runs once per
//!    `--debounce` value, each with a fresh server and fresh clients.
//!
//! Prints PASS/MISS per target and exits 0 whatever the figures (it measures, it does not
//! test); it exits non-zero only if the benchmark itself could not run.

#[path = "scale_bench/objects.rs"]
mod objects;
#[path = "scale_bench/serving.rs"]
mod serving;
#[path = "scale_bench/stats.rs"]
mod stats;
#[path = "scale_bench/worker.rs"]
mod worker;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use controller::app::{parse_duration, push};
use controller::model::{EndpointMode, Model, ModelConfig, ModelDelta};
use controller::xds::{XdsConfig, XdsMetrics, XdsServer};
use prost::Message;

use objects::ClusterSpec;
use stats::{Memory, memory, ms, verdict};

/// Build-time target.
const BUILD_TARGET: Duration = Duration::from_secs(2);
/// Peak RSS target, MiB.
const RSS_TARGET_MIB: f64 = 300.0;
/// p99 push latency target.
const LATENCY_TARGET: Duration = Duration::from_millis(100);

/// How Services find their pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Membership {
    /// Service selectors evaluated over pods (files source).
    Selector,
    /// EndpointSlices, one per Service (Kubernetes source).
    Slices,
}

/// controller-scale-bench: model build time, memory and xDS push latency at cluster scale.
#[derive(Parser, Debug)]
#[command(about, long_about = None)]
struct Args {
    /// Pods (each backs one Service).
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Services (one Deployment each).
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    /// AuthorizationPolicies (namespace-wide and selector-scoped, ALLOW and DENY).
    #[arg(long, default_value_t = 500)]
    policies: usize,
    /// Namespaces, all labelled `istio.io/dataplane-mode=ambient`.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Nodes the pods are spread over.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Delta-ADS clients (one per node proxy) connected for the latency test.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Pod changes measured per debounce setting.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Server debounce for the latency test; one run per value (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "50ms,10ms", value_parser = parse_duration)]
    debounce: Vec<Duration>,
    /// Pause after every client got a change, before the next one.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    change_gap: Duration,
    /// How Services find their pods.
    #[arg(long, value_enum, default_value = "selector")]
    membership: Membership,
    /// Apply the initial state in batches of this many events (0: one batch).
    #[arg(long, default_value_t = 0)]
    batch_size: usize,
    /// Spread the client connects over this long (0: all at once, as after a restart).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    connect_spread: Duration,
    /// Longest wait for every client to hold the full state.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    sync_timeout: Duration,
    #[command(subcommand)]
    role: Option<Role>,
}

/// Internal roles of the same binary.
#[derive(Subcommand, Debug)]
enum Role {
    /// Runs the clients (started by the benchmark itself).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match args.role {
        Some(Role::Worker(w)) => runtime().and_then(|rt| rt.block_on(worker::run(w))),
        None => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("controller-scale-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// What building the state took.
struct Build {
    events: usize,
    generate: Duration,
    apply: Duration,
    push: Duration,
    addresses: usize,
    authorizations: usize,
    encoded_bytes: usize,
    before: Memory,
    after: Memory,
}

fn xds_server(debounce: Duration) -> anyhow::Result<XdsServer> {
    let metrics = Arc::new(XdsMetrics::unregistered()?);
    Ok(XdsServer::with_config(
        metrics,
        XdsConfig {
            debounce,
            ..XdsConfig::default()
        },
        None,
    ))
}

/// Step 1, run before any async runtime exists so nothing else competes with it.
fn build(args: &Args, spec: &ClusterSpec, model: &mut Model, xds: &XdsServer) -> Build {
    let before = memory("self");
    let started = Instant::now();
    let events = spec.events();
    let generate = started.elapsed();
    let n = events.len();
    let (mut apply, mut push_time) = (Duration::ZERO, Duration::ZERO);
    let mut batches: Vec<Vec<_>> = Vec::new();
    if args.batch_size == 0 {
        batches.push(events);
    } else {
        let mut it = events.into_iter().peekable();
        while it.peek().is_some() {
            batches.push(it.by_ref().take(args.batch_size).collect());
        }
    }
    for batch in batches {
        let t = Instant::now();
        let delta = model.apply(batch);
        apply += t.elapsed();
        let t = Instant::now();
        push(xds, delta);
        push_time += t.elapsed();
    }
    let encoded_bytes = model
        .addresses()
        .map(|(_, a)| a.encoded_len())
        .sum::<usize>()
        + model
            .authorizations()
            .map(|(_, a)| a.encoded_len())
            .sum::<usize>();
    Build {
        events: n,
        generate,
        apply,
        push: push_time,
        addresses: model.addresses().count(),
        authorizations: model.authorizations().count(),
        encoded_bytes,
        before,
        after: memory("self"),
    }
}

/// The model's whole state as one delta, to fill a fresh server.
fn snapshot(model: &Model) -> ModelDelta {
    ModelDelta {
        addresses: model
            .addresses()
            .map(|(n, a)| (n.to_string(), Some(a.clone())))
            .collect(),
        authorizations: model
            .authorizations()
            .map(|(n, a)| (n.to_string(), Some(a.clone())))
            .collect(),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.pods > 0 && args.services > 0 && args.namespaces > 0 && args.nodes > 0,
        "--pods, --services, --namespaces and --nodes must be positive"
    );
    anyhow::ensure!(!args.debounce.is_empty(), "--debounce needs a value");
    let spec = ClusterSpec {
        pods: args.pods,
        services: args.services,
        policies: args.policies,
        namespaces: args.namespaces,
        nodes: args.nodes,
        slices: args.membership == Membership::Slices,
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("controller-scale-bench");
    println!(
        "  cluster: {} pods, {} services, {} AuthorizationPolicies, {} ambient namespaces, {} nodes; membership: {:?}",
        args.pods, args.services, args.policies, args.namespaces, args.nodes, args.membership
    );
    println!(
        "  xDS: plaintext on 127.0.0.1, {} wildcard clients; debounce {} (max_debounce {}, XdsConfig default)",
        args.clients,
        args.debounce
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(" / "),
        ms(XdsConfig::default().max_debounce)
    );
    println!(
        "  machine: {cores} cores, load average {} at start",
        stats::loadavg()
    );

    // 1. Build.
    let mut model = Model::new(ModelConfig {
        mode: match args.membership {
            Membership::Selector => EndpointMode::Selector,
            Membership::Slices => EndpointMode::EndpointSlices,
        },
        ..ModelConfig::default()
    });
    let first_debounce = args.debounce[0];
    let xds = xds_server(first_debounce)?;
    let b = build(&args, &spec, &mut model, &xds);
    let total = b.apply + b.push;
    println!();
    println!(
        "1. Full state from an empty model ({})",
        if args.batch_size == 0 {
            "one batch".to_string()
        } else {
            format!("batches of {} events", args.batch_size)
        }
    );
    row(
        "events generated (not timed)",
        format!("{} in {}", b.events, ms(b.generate)),
    );
    row("Model::apply", ms(b.apply));
    row("push (encode + server store)", ms(b.push));
    row(
        "resources",
        format!(
            "{} addresses, {} authorizations, {:.1} MiB encoded",
            b.addresses,
            b.authorizations,
            b.encoded_bytes as f64 / (1024.0 * 1024.0)
        ),
    );
    row(
        "apply + push",
        format!(
            "{}   target < {}   {}",
            ms(total),
            ms(BUILD_TARGET),
            verdict(total < BUILD_TARGET)
        ),
    );

    println!();
    println!("2. Memory of the controller process (clients run in a separate process)");
    row(
        "before building",
        format!("VmRSS {:.1} MiB", b.before.rss_mib()),
    );
    row(
        "after building, no clients",
        format!(
            "peak VmHWM {:.1} MiB (VmRSS {:.1})   target < {RSS_TARGET_MIB} MiB   {}",
            b.after.hwm_mib(),
            b.after.rss_mib(),
            verdict(b.after.hwm_mib() < RSS_TARGET_MIB)
        ),
    );

    // 3. Serving and push latency, once per debounce.
    let rt = runtime()?;
    let mut next_change = 1;
    let mut first_server = Some(xds);
    let mut results = Vec::new();
    for (i, debounce) in args.debounce.iter().copied().enumerate() {
        let server = match first_server.take() {
            Some(s) => s,
            None => {
                let s = xds_server(debounce)?;
                push(&s, snapshot(&model));
                s
            }
        };
        let phase = serving::Phase {
            clients: args.clients,
            changes: args.changes,
            change_gap: args.change_gap,
            sync_timeout: args.sync_timeout,
            connect_spread: args.connect_spread,
            expect_addresses: b.addresses,
            expect_authorizations: b.authorizations,
        };
        let r = rt.block_on(serving::run(
            &phase,
            &spec,
            &mut model,
            &server,
            &mut next_change,
        ))?;
        server.close();
        drop(server);
        if i == 0 {
            let m = r.synced_memory;
            row(
                &format!("{} clients synced", args.clients),
                format!(
                    "peak VmHWM {:.1} MiB (VmRSS {:.1})",
                    m.hwm_mib(),
                    m.rss_mib()
                ),
            );
            let m = r.server_memory;
            row(
                "after the changes, clients on",
                format!(
                    "peak VmHWM {:.1} MiB (VmRSS {:.1})   target < {RSS_TARGET_MIB} MiB   {}",
                    m.hwm_mib(),
                    m.rss_mib(),
                    verdict(m.hwm_mib() < RSS_TARGET_MIB)
                ),
            );
            row(
                "(client process, not counted)",
                format!("VmHWM {:.1} MiB", r.client_memory.hwm_mib()),
            );
        }
        results.push((debounce, r));
    }

    println!();
    println!(
        "3. Push latency, change -> client handler: {} clients x {} changes per debounce{}",
        args.clients,
        args.changes,
        if args.connect_spread.is_zero() {
            String::new()
        } else {
            format!(" (connects spread over {})", ms(args.connect_spread))
        }
    );
    for (debounce, r) in &results {
        let s = r.latency;
        println!("  debounce {}:", ms(*debounce));
        sub_row(
            "initial sync, all clients",
            format!(
                "{} (CPU: controller {:.1} s, clients {:.1} s)",
                ms(r.sync),
                r.sync_cpu.0.as_secs_f64(),
                r.sync_cpu.1.as_secs_f64()
            ),
        );
        sub_row("apply + push per change", ms(r.apply_push));
        sub_row(
            "latency",
            format!(
                "p50 {}  p90 {}  p99 {}  max {}  ({} samples, {} missing)",
                ms(s.p50),
                ms(s.p90),
                ms(s.p99),
                ms(s.max),
                s.count,
                r.missing
            ),
        );
        sub_row(
            "p99",
            format!(
                "{}   target < {}   {}",
                ms(s.p99),
                ms(LATENCY_TARGET),
                verdict(s.count > 0 && r.missing == 0 && s.p99 < LATENCY_TARGET)
            ),
        );
    }
    println!();
    println!("  load average at end: {}", stats::loadavg());
    Ok(())
}

/// One aligned result line.
fn row(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<32} {value}");
}

/// One aligned result line under a sub-heading.
fn sub_row(label: &str, value: impl std::fmt::Display) {
    println!("    {label:<30} {value}");
}
