//! ztunnel data-path benchmark: the same traffic between two pod network namespaces, once
//! directly over a veth and once through ztunnel (in-pod redirection + HBONE), with the
//! mesh/direct ratios checked against the project's targets. Needs root.

#[path = "../bench/http.rs"]
mod http;
#[path = "../bench/load.rs"]
mod load;
#[path = "../bench/procfs.rs"]
mod procfs;
#[path = "../bench/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use e2e::netns::TestNet;
use e2e::zds::{ZdsPeer, ZdsServer};
use e2e::ztunnel::{Ztunnel, metric_sum};
use report::{PathResult, RunInfo, Usage};

/// Netns id of the direct path (high, so it never collides with the integration tests).
const DIRECT_ID: u8 = 231;
/// Netns id of the mesh path.
const MESH_ID: u8 = 232;
/// Client threads of the connection-rate test.
const CONN_THREADS: u16 = 2;
/// Measures ztunnel's data path against a direct veth path.
#[derive(Parser, Debug)]
#[command(name = "ztunnel-bench", about)]
struct Args {
    /// ztunnel binary to benchmark.
    #[arg(long, default_value = "target/release/ztunnel")]
    ztunnel: PathBuf,
    /// Seconds for each timed test (throughput, connection rate, HTTP).
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Measured 1 KiB round trips in the latency test.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Alternate direct and mesh this many times and report each metric's median (the
    /// ztunnel CPU and RSS figures then cover every mesh round).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Run only these tests (comma-separated: throughput, latency, conns, http); skipped rows
    /// show zeros. For quick iteration and profiling one workload at a time.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// How the mesh path's pods are redirected into ztunnel: the node agent's eBPF programs
    /// (sk_lookup/tc, no netfilter; its fastest mode) or its nftables rules (REDIRECT/TPROXY,
    /// conntrack; its default, as Istio).
    #[arg(long, value_enum, default_value = "ebpf")]
    redirect: Redirect,
}

/// In-pod redirection mode of the mesh path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Redirect {
    /// nftables REDIRECT (outbound) and TPROXY (inbound).
    Nftables,
    /// eBPF sk_lookup (outbound) and tc sk_assign (inbound).
    Ebpf,
}

impl Redirect {
    fn name(self) -> &'static str {
        match self {
            Redirect::Nftables => "nftables",
            Redirect::Ebpf => "ebpf",
        }
    }
}

impl Args {
    /// Whether test `name` should run.
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|t| t == name)
    }
}

fn run_ok(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Lets clients reuse TIME_WAIT ports (same setting on both paths), so the connection-rate
/// test measures the proxy rather than the kernel's ephemeral-port search.
fn tune_pods(net: &TestNet) -> Result<()> {
    for pod in [&net.a, &net.b] {
        run_ok(&[
            "ip",
            "netns",
            "exec",
            &pod.ns,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
        ])?;
    }
    Ok(())
}

/// Runs `f` and returns ztunnel's CPU seconds spent meanwhile (when a pid is given).
fn timed<T>(pid: Option<u32>, f: impl FnOnce() -> Result<T>) -> Result<(T, Option<f64>)> {
    let before = pid.map(procfs::cpu_seconds).transpose()?;
    let value = f()?;
    let after = pid.map(procfs::cpu_seconds).transpose()?;
    Ok((value, before.zip(after).map(|(b, a)| a - b)))
}

fn measure(
    net: &TestNet,
    args: &Args,
    tools: &std::result::Result<http::Tools, String>,
    dir: &Path,
    zt_pid: Option<u32>,
    label: &str,
) -> Result<PathResult> {
    let servers = load::Servers::start(&net.b.ns)?;
    let dur = Duration::from_secs(args.duration);
    let (ns, ip) = (net.a.ns.as_str(), net.b.ip);
    // The first connection pays for certificates and the HBONE connection; keep it out.
    load::latency(ns, ip, 0, 100).context("warm-up connection")?;
    let progress = |what: &str| {
        if !args.json {
            eprintln!("[{label}] {what}...");
        }
    };

    let (mut throughput, mut c0) = (
        load::Throughput {
            bytes: 0,
            secs: 0.0,
        },
        None,
    );
    if args.runs("throughput") {
        progress("single-stream throughput");
        (throughput, c0) = timed(zt_pid, || load::throughput(&servers, ns, ip, dur))?;
    }
    let (mut latency, mut c1) = (
        load::Latency {
            p50_us: 0.0,
            p99_us: 0.0,
            samples: 0,
        },
        None,
    );
    if args.runs("latency") {
        progress("request/response latency");
        (latency, c1) = timed(zt_pid, || load::latency(ns, ip, 1_000, args.round_trips))?;
    }
    let (mut conns, mut c2) = (
        load::ConnRate {
            completed: 0,
            errors: 0,
            secs: 0.0,
        },
        None,
    );
    if args.runs("conns") {
        progress("new connections per second");
        (conns, c2) = timed(zt_pid, || load::conn_rate(ns, ip, CONN_THREADS, dur))?;
    }
    let (http, c3) = match tools {
        _ if !args.runs("http") => (Err("skipped (--only)".to_string()), None),
        Err(missing) => (
            Err(format!(
                "skipped: {missing} not installed (run scripts/bench.sh, which installs them)"
            )),
            None,
        ),
        Ok(tools) => {
            progress("HTTP requests per second (nginx + wrk)");
            let nginx = http::Nginx::start(tools, &net.b.ns, &dir.join(format!("nginx-{label}")))?;
            let url = format!("http://{ip}:{}/", http::HTTP_PORT);
            let (r, cpu) = timed(zt_pid, || Ok(http::wrk(tools, ns, &url, dur)))?;
            drop(nginx);
            (r.map_err(|e| format!("failed: {e:#}")), cpu)
        }
    };
    // Marks the end of the measured part, for profilers driven by these progress lines.
    progress("done");
    Ok(PathResult {
        throughput,
        latency,
        conns,
        http,
        cpu: [c0, c1, c2, c3],
    })
}

fn config_yaml(net: &TestNet) -> String {
    let pod = |name: &str, sa: &str, ip| {
        format!(
            "- uid: Kubernetes//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
             serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  \
             canonicalName: {sa}-app\n  canonicalRevision: v1\n  services: {{}}\n"
        )
    };
    format!(
        "workloads:\n{}{}",
        pod("a", "client", net.a.ip),
        pod("b", "server", net.b.ip)
    )
}

fn mtls_opened(zt: &Ztunnel, reporter: &str) -> f64 {
    metric_sum(
        &zt.metrics(),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", reporter),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

/// The mesh path, kept up across rounds: both pods redirected into the real ztunnel.
struct MeshPath {
    net: TestNet,
    zt: Ztunnel,
    // Held so ztunnel keeps its ZDS connection (and so its pods) for the whole run.
    _zds: ZdsServer,
    _peer: ZdsPeer,
    // eBPF mode: unpinned after ztunnel is gone.
    _pins: Option<e2e::netns::EbpfPins>,
    pid: u32,
    rss_idle: u64,
    opened_before: (f64, f64),
    cpu_before: f64,
}

fn start_mesh(bin: &Path, dir: &Path, redirect: Redirect) -> Result<MeshPath> {
    let net = TestNet::new(MESH_ID);
    let uids = [
        format!("{}-uid-a", net.prefix),
        format!("{}-uid-b", net.prefix),
    ];
    let pins = match redirect {
        Redirect::Nftables => {
            net.install_redirection();
            None
        }
        Redirect::Ebpf => Some(net.install_ebpf_redirection([&uids[0], &uids[1]])),
    };
    tune_pods(&net)?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, config_yaml(&net))?;
    let uds = dir.join("zds.sock");
    let zds = ZdsServer::bind(&uds);
    let mut zt = Ztunnel::start(bin, &net.zt, dir, &config, &uds, &[]);
    let peer = zds.accept();
    for (uid, pod, name, sa) in [
        (&uids[0], &net.a, "a", "client"),
        (&uids[1], &net.b, "b", "server"),
    ] {
        let err = peer.add(uid, name, "default", sa, &pod.netns_fd());
        if !err.is_empty() {
            bail!("ZDS add {name} rejected: {err}");
        }
    }
    let err = peer.snapshot_sent();
    if !err.is_empty() {
        bail!("ZDS snapshot rejected: {err}");
    }
    zt.wait_ready();
    let pid = zt.pid();
    // Let start-up allocations settle before reading the idle footprint.
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = procfs::status_bytes(pid, "VmRSS")?;
    let opened_before = (mtls_opened(&zt, "source"), mtls_opened(&zt, "destination"));
    let cpu_before = procfs::cpu_seconds(pid)?;
    Ok(MeshPath {
        net,
        zt,
        _zds: zds,
        _peer: peer,
        _pins: pins,
        pid,
        rss_idle,
        opened_before,
        cpu_before,
    })
}

/// ztunnel's footprint and mTLS counters over every round.
fn mesh_usage(m: &MeshPath) -> Result<Usage> {
    let cpu_total = procfs::cpu_seconds(m.pid)? - m.cpu_before;
    let rss_peak = procfs::status_bytes(m.pid, "VmHWM")?;
    // Connection counters are reported when connections open; give stragglers a moment.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Usage {
        busy_before: 0.0,
        cpu_total,
        rss_idle: m.rss_idle,
        rss_peak,
        mtls_opened_source: mtls_opened(&m.zt, "source") - m.opened_before.0,
        mtls_opened_destination: mtls_opened(&m.zt, "destination") - m.opened_before.1,
    })
}

/// Every netns this run may create (TestNet names them `zt<id>t-{a,b,zt}`).
fn netns_names() -> Vec<String> {
    [DIRECT_ID, MESH_ID]
        .iter()
        .flat_map(|id| ["a", "b", "zt"].map(|s| format!("zt{id}t-{s}")))
        .collect()
}

/// On SIGINT/SIGTERM, kills what runs inside our namespaces (ztunnel, nginx, wrk) and removes
/// them; without this an interrupted run would leave them behind (no unwinding on signals).
fn cleanup_on_signal() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Blocked before any other thread exists, so only the waiter below receives them.
    set.thread_block().context("block signals")?;
    std::thread::spawn(move || {
        let Ok(sig) = set.wait() else { return };
        eprintln!("ztunnel-bench: {sig:?}, cleaning up");
        for ns in netns_names() {
            let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
            let pids = pids.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            for pid in pids.unwrap_or_default().split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        std::process::exit(130);
    });
    Ok(())
}

fn run(args: &Args) -> Result<(PathResult, PathResult, Usage)> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("needs root (network namespaces, nftables); run it with sudo or as root");
    }
    cleanup_on_signal()?;
    let bin = std::fs::canonicalize(&args.ztunnel).with_context(|| {
        format!(
            "ztunnel binary {} not found; build it with `cargo build --release -p ztunnel` \
             or run scripts/bench.sh",
            args.ztunnel.display()
        )
    })?;
    let tools = http::find_tools();
    if let Err(missing) = &tools {
        eprintln!(
            "note: {missing} not installed; the HTTP row is skipped. \
             Run scripts/bench.sh to install them."
        );
    }
    let busy_before = procfs::machine_busy_percent(Duration::from_secs(1))?;
    if busy_before > 10.0 && !args.json {
        eprintln!(
            "warning: the machine is {busy_before:.0}% busy before the run; figures will be noisy"
        );
    }
    let dir = std::env::temp_dir().join("ztunnel-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let direct_net = TestNet::new(DIRECT_ID);
    tune_pods(&direct_net)?;
    let mesh = start_mesh(&bin, &dir, args.redirect)?;
    // Direct and mesh alternate, so drift on the machine (other load, the hypervisor) hits
    // both paths alike; the report shows each metric's median over the rounds.
    let (mut directs, mut meshes) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        if args.rounds > 1 && !args.json {
            eprintln!("==> round {round}/{}", args.rounds);
        }
        directs
            .push(measure(&direct_net, args, &tools, &dir, None, "direct").context("direct path")?);
        meshes.push(
            measure(&mesh.net, args, &tools, &dir, Some(mesh.pid), "mesh")
                .with_context(|| format!("mesh path (ztunnel log: {})", dir.display()))?,
        );
        if args.rounds > 1 && !args.json {
            // Every round's figures, so the spread behind the medians is visible.
            if let (Some(d), Some(m)) = (directs.last(), meshes.last()) {
                eprintln!("    round {round}: {}", report::round_summary(d, m));
            }
        }
    }
    let mut usage = mesh_usage(&mesh)?;
    usage.busy_before = busy_before;
    let (direct, mesh) = report::median(&directs, &meshes).context("no round ran")?;
    Ok((direct, mesh, usage))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok((direct, mesh, usage)) => {
            let info = RunInfo {
                duration: args.duration,
                round_trips: args.round_trips,
                rounds: args.rounds.max(1),
                redirect: args.redirect.name(),
                ran: report::Ran {
                    throughput: args.runs("throughput"),
                    latency: args.runs("latency"),
                    conns: args.runs("conns"),
                },
            };
            if args.json {
                report::print_json(&info, &direct, &mesh, &usage);
            } else {
                report::print_table(&info, &direct, &mesh, &usage);
            }
            // A missed target is a measurement, not a failure.
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztunnel-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
