//! `mesh-cni-agent`: flags and wiring.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use meshconfig::source::files::FileSource;
use meshconfig::source::kube::KubeSource;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::cluster::ClusterView;
use super::enroll::{EnrollConfig, Enroller};
use super::metrics::Metrics;
use super::redirect::RedirectMode;
use super::rules::RedirectConfig;
use super::server;
use super::zds::{ZdsHub, ZdsServer};
use crate::plugin_kubeconfig::{self, ApiCredentials};

/// Where pod and namespace labels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A directory of Kubernetes YAML (the sandbox, VMs, tests).
    Files,
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kube,
}

/// `--redirect-mode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// nftables REDIRECT (outbound) and TPROXY (inbound) rules.
    Nftables,
    /// eBPF sk_lookup (outbound) and tc ingress (inbound) programs.
    Ebpf,
}

/// Node agent for ambient mode: decides which pods on this node are in the mesh, installs
/// in-pod traffic redirection for them and hands their network namespaces to ztunnel (ZDS).
#[derive(Debug, Parser)]
#[command(name = "mesh-cni-agent", version)]
pub struct Args {
    /// This node's name; only pods with spec.nodeName equal to it are handled.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where namespace and pod labels come from.
    #[arg(long, value_enum, default_value = "kube")]
    pub config_source: SourceKind,
    /// Directory of Kubernetes YAML for `--config-source files`.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Unix socket ztunnel connects to for pod netns hand-off (ZDS).
    #[arg(
        long,
        env = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub zds_socket: PathBuf,
    /// Unix socket the CNI plugin sends ADD/DEL/CHECK to.
    #[arg(long, default_value = crate::protocol::DEFAULT_AGENT_SOCKET)]
    pub plugin_socket: PathBuf,
    /// Directory for the agent's pod records (survive agent restarts).
    #[arg(long, default_value = "/var/run/mesh-cni")]
    pub state_dir: PathBuf,
    /// Metrics (/metrics) and readiness (/healthz/ready) listen address.
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub monitoring_addr: SocketAddr,
    /// How often every enrolled pod's redirection is verified (and repaired if it drifted).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,
    /// How long a CNI ADD waits for its pod to appear in the config source.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub pod_wait: Duration,
    /// How pods are redirected into ztunnel: `nftables` (REDIRECT/TPROXY rules, as Istio) or
    /// `ebpf` (sk_lookup and tc programs, no netfilter or conntrack on the pod's packets;
    /// IPv4 only, needs kernel 6.6+, and ztunnel must see --bpf-pin-root).
    #[arg(long, env = "REDIRECT_MODE", value_enum, default_value = "nftables")]
    pub redirect_mode: ModeArg,
    /// bpffs directory for the eBPF mode's per-pod pins (mounted there if it is not one).
    #[arg(long, env = "BPF_PIN_ROOT", default_value = ebpf::DEFAULT_PIN_ROOT)]
    pub bpf_pin_root: PathBuf,
    /// Also redirect DNS (UDP/TCP 53) to ztunnel's DNS proxy on 15053 (nftables mode).
    #[arg(long, default_value_t = false)]
    pub dns_capture: bool,
    /// Install IPv6 redirection too (skipped in pods with IPv6 disabled).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,
    /// Install the plugin binary into --cni-bin-dir and chain it into the node's CNI config
    /// (Kubernetes DaemonSet mode). It stays there when the agent stops, so pods created while
    /// the agent is down or upgrading still fail closed; remove it with --uninstall.
    #[arg(long, default_value_t = false)]
    pub install_cni: bool,
    /// Remove the plugin from --cni-net-dir and --cni-bin-dir, then exit (mesh uninstall).
    #[arg(long, default_value_t = false)]
    pub uninstall: bool,
    /// The node's CNI binary directory (with --install-cni).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI network config directory (with --install-cni).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_net_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.uninstall {
        let changed = crate::install::uninstall(&args.cni_bin_dir, &args.cni_net_dir)
            .context("removing the CNI plugin from the node")?;
        for conf in changed {
            tracing::info!(config = %conf.display(), "removed mesh-cni from the node's CNI config");
        }
        return Ok(());
    }
    let redirect = match args.redirect_mode {
        ModeArg::Nftables => RedirectMode::Nftables(RedirectConfig {
            dns_capture: args.dns_capture,
            ipv6: args.ipv6,
        }),
        ModeArg::Ebpf if args.dns_capture => {
            anyhow::bail!(
                "--dns-capture needs --redirect-mode nftables (eBPF mode steers TCP only)"
            )
        }
        ModeArg::Ebpf => RedirectMode::Ebpf {
            pin_root: args.bpf_pin_root.clone(),
        },
    };
    tracing::info!(mode = ?redirect, "in-pod redirection");
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let view = Arc::new(RwLock::new(ClusterView::new(args.node_name.clone())));
    let (view_tx, view_rx) = watch::channel(0u64);
    let hub = ZdsHub::default();
    let enroller = Arc::new(Enroller::new(
        EnrollConfig {
            redirect,
            state_dir: args.state_dir.clone(),
            pod_wait: args.pod_wait,
        },
        view.clone(),
        view_rx,
        hub.clone(),
        metrics.clone(),
    ));
    let tasks = tokio_util::task::TaskTracker::new();

    // Config source -> cluster view.
    let (tx, mut rx) = mpsc::channel(64);
    match args.config_source {
        SourceKind::Files => {
            let dir = args
                .config_dir
                .clone()
                .context("--config-source files needs --config-dir")?;
            let errors = metrics.config_errors.clone();
            let source = FileSource::new(
                dir,
                tx,
                Arc::new(move |e| {
                    errors.inc();
                    tracing::error!(error = %e, "rejected configuration document");
                }),
            );
            tasks.spawn(source.run(shutdown.clone()));
        }
        SourceKind::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let errors = metrics.config_errors.clone();
            let source = KubeSource::new(
                client,
                tx,
                Arc::new(move |kind, e| {
                    errors.inc();
                    tracing::warn!(%kind, error = e, "watch error");
                }),
            )
            .for_node(args.node_name.clone());
            tasks.spawn(source.run(shutdown.clone()));
        }
    }
    {
        let view = view.clone();
        tasks.spawn(async move {
            let mut version = 0u64;
            while let Some(batch) = rx.recv().await {
                let changed = view.write().unwrap_or_else(|p| p.into_inner()).apply(batch);
                if changed {
                    version += 1;
                    let _ = view_tx.send(version);
                }
            }
        });
    }

    // Pods remembered from a previous run go back into ZDS before any ztunnel connects.
    enroller.restore().await;
    let zds = ZdsServer::bind(&args.zds_socket)
        .with_context(|| format!("listening for ztunnel on {}", args.zds_socket.display()))?;
    tasks.spawn(zds.run(hub.clone(), shutdown.clone()));
    let plugin = server::bind(&args.plugin_socket).with_context(|| {
        format!(
            "listening for the CNI plugin on {}",
            args.plugin_socket.display()
        )
    })?;
    tasks.spawn(server::serve(plugin, enroller.clone(), shutdown.clone()));
    let mon = tokio::net::TcpListener::bind(args.monitoring_addr)
        .await
        .with_context(|| format!("binding monitoring port {}", args.monitoring_addr))?;
    let ready: monitoring::ReadyCheck = {
        let view = view.clone();
        Arc::new(move || {
            if view.read().map(|v| v.synced()).unwrap_or(false) {
                Ok(())
            } else {
                Err("config source not synced".into())
            }
        })
    };
    tasks.spawn(monitoring::serve(
        mon,
        metrics.registry.clone(),
        ready,
        shutdown.clone(),
    ));
    tasks.spawn(reconcile_loop(
        enroller.clone(),
        hub.clone(),
        metrics.clone(),
        args.reconcile_interval,
        shutdown.clone(),
    ));
    if args.install_cni {
        install(&args)?;
        if matches!(args.config_source, SourceKind::Kube) {
            tasks.spawn(kubeconfig_refresh_loop(
                args.cni_net_dir.clone(),
                shutdown.clone(),
            ));
        }
    }
    tracing::info!(
        node = %args.node_name,
        zds = %args.zds_socket.display(),
        plugin = %args.plugin_socket.display(),
        monitoring = %args.monitoring_addr,
        "node agent running"
    );

    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
    // Redirection stays in enrolled pods on purpose: traffic fails closed until the next agent.
    Ok(())
}

/// Reconciles on every view change and repairs drift periodically.
async fn reconcile_loop(
    enroller: Arc<Enroller>,
    hub: ZdsHub,
    metrics: Metrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut changes = enroller.view_changes();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                enroller.reconcile().await;
            }
            _ = tick.tick() => {
                enroller.reconcile().await;
                enroller.repair().await;
            }
            _ = shutdown.cancelled() => return,
        }
        metrics.ztunnel_connections.set(hub.connections() as i64);
    }
}

/// Chains the plugin into the node's CNI config. The entry tells the plugin how to decide on
/// its own while the agent is down: the config directory (files source) or a kubeconfig
/// written from the agent's service account (Kubernetes source).
fn install(args: &Args) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("locating the agent binary")?;
    let plugin = me.with_file_name("mesh-cni");
    let mut entry = serde_json::json!({
        "type": "mesh-cni",
        "agentSocket": args.plugin_socket,
    });
    match args.config_source {
        SourceKind::Files => {
            if let Some(dir) = &args.config_dir {
                entry["configDir"] = serde_json::json!(dir);
            }
        }
        SourceKind::Kube => {
            if refresh_plugin_kubeconfig(&args.cni_net_dir)? {
                entry["kubeconfig"] = serde_json::json!(plugin_kubeconfig::path(&args.cni_net_dir));
            } else {
                tracing::warn!(
                    "not running in a cluster (KUBERNETES_SERVICE_HOST unset): while the agent is \
                     down the plugin cannot ask the API server and refuses every pod"
                );
            }
        }
    }
    let conf = crate::install::install(&plugin, &args.cni_bin_dir, &args.cni_net_dir, entry)
        .context("installing the CNI plugin")?;
    tracing::info!(config = %conf.display(), "chained mesh-cni into the node's CNI config");
    Ok(())
}

/// Writes the plugin's kubeconfig from the in-cluster service account if it changed; returns
/// whether there are in-cluster credentials at all.
fn refresh_plugin_kubeconfig(cni_net_dir: &std::path::Path) -> anyhow::Result<bool> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    let port = std::env::var("KUBERNETES_SERVICE_PORT").ok();
    let account = std::path::Path::new(plugin_kubeconfig::SERVICE_ACCOUNT_DIR);
    let Some(creds) = ApiCredentials::in_cluster(host.as_deref(), port.as_deref(), account)
        .context("reading the service account for the plugin's kubeconfig")?
    else {
        return Ok(false);
    };
    if plugin_kubeconfig::write(cni_net_dir, &creds)? {
        tracing::info!(
            path = %plugin_kubeconfig::path(cni_net_dir).display(),
            "wrote the CNI plugin's kubeconfig"
        );
    }
    Ok(true)
}

/// Keeps the plugin's kubeconfig token current: projected tokens rotate (hourly by default).
async fn kubeconfig_refresh_loop(cni_net_dir: PathBuf, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let dir = cni_net_dir.clone();
                match tokio::task::spawn_blocking(move || refresh_plugin_kubeconfig(&dir)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "refreshing the CNI plugin's kubeconfig"),
                    Err(e) => tracing::warn!(error = %e, "kubeconfig refresh task failed"),
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
