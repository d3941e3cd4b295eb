//! Command line of `meshctl`: every flag is documented here, which is what `--help` prints.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default state directory of the sandbox.
pub const DEFAULT_STATE_DIR: &str = "/var/run/mesh-sandbox";

/// meshctl: tools for the mesh.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "Tools for the ambient mesh")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: TopCommand,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// Run a local multi-node mesh on this host, without Kubernetes.
    Sandbox(SandboxArgs),
}

/// `meshctl sandbox`.
#[derive(Debug, Args)]
#[command(
    about = "Run a local multi-node mesh on this host, without Kubernetes",
    long_about = "Run a local multi-node mesh on this host, without Kubernetes (needs root).\n\n\
        Every node is a network namespace running the real node agent (mesh-cni-agent) and \
        ztunnel; the controller (mesh-controller, files source) runs in its own namespace. Pods \
        are network namespaces wired by the CNI bridge plugin and then mesh-cni, exactly as a \
        container runtime would; a pod's containers run their command/args as host commands \
        inside the pod's namespace. Nothing changes in the host's own network configuration.\n\n\
        Typical use:\n  meshctl sandbox up --nodes 2 -f meshctl/testdata/demo.yaml\n  \
        meshctl sandbox get pods\n  meshctl sandbox exec demo/client -- mesh-testapp call \
        http://echo.demo.svc.cluster.local:8080/ --count 5\n  meshctl sandbox down"
)]
pub struct SandboxArgs {
    /// Directory holding the sandbox's state (state.json), cluster objects (cluster/), CA,
    /// tokens, sockets and logs (logs/).
    #[arg(long, env = "MESH_SANDBOX_DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: SandboxCommand,
}

/// `meshctl sandbox` subcommands.
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Start the controller and N nodes, then apply manifests; returns once all is ready.
    Up(UpArgs),
    /// Create or update objects from Kubernetes YAML files or directories.
    Apply(FilesArgs),
    /// Delete the objects named in Kubernetes YAML files or directories.
    Delete(FilesArgs),
    /// Run a command inside a pod's network namespace; exits with the command's code.
    Exec(ExecArgs),
    /// List pods, services or workloads (as ztunnel sees them).
    Get(GetArgs),
    /// Print the log of a component or pod.
    Logs(LogsArgs),
    /// Print the Prometheus metrics of a component.
    Metrics(MetricsArgs),
    /// Stop ztunnel or the node agent (SIGTERM, wait for exit) and start it again.
    Restart(RestartArgs),
    /// Rolling upgrade of ztunnel: start a new one beside the old one, then drain the old one.
    Upgrade(UpgradeArgs),
    /// Stop everything and remove every namespace, process and file the sandbox created.
    Down(DownArgs),
}

/// Flags of `up`.
#[derive(Debug, Args)]
#[command(
    after_help = "Layout: netns msb-underlay holds bridge br0; the controller runs in msb-cp \
    (172.30.0.254); node i runs in msb-node<i> (172.30.0.<10+i>) with pods in 10.244.<i>.0/24; \
    Services get cluster IPs from 10.96.0.0/16."
)]
pub struct UpArgs {
    /// Number of nodes (each a network namespace with a node agent and a ztunnel).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub nodes: u8,

    /// Manifest file or directory to apply once the cluster is up (repeatable; `-` reads stdin).
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    pub files: Vec<PathBuf>,

    /// Directory with mesh-controller, mesh-cni-agent, mesh-cni, ztunnel and mesh-testapp
    /// [default: the directory of the meshctl executable].
    #[arg(long, env = "MESH_SANDBOX_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Directory with the standard CNI plugins (bridge, host-local).
    #[arg(long, env = "MESH_SANDBOX_CNI_BIN_DIR", default_value = "/usr/lib/cni")]
    pub cni_bin_dir: PathBuf,

    /// Log filter (RUST_LOG) for the controller, node agents and ztunnels.
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// How long to wait for each component (and each pod) to become ready.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// How node agents redirect ambient pods into ztunnel: `nftables` (rules, as Istio) or
    /// `ebpf` (sk_lookup and tc programs; IPv4 only, kernel 6.6+).
    #[arg(long, value_enum, default_value = "nftables")]
    pub redirect_mode: crate::state::RedirectMode,
}

/// Flags of `apply` and `delete`.
#[derive(Debug, Args)]
#[command(
    after_help = "Kinds: Namespace, Pod, Deployment (spec.replicas), Service, \
    ServiceAccount, Istio kinds (security.istio.io, networking.istio.io, telemetry.istio.io, \
    extensions.istio.io) and Gateway API kinds (gateway.networking.k8s.io). Every document is \
    validated first; if any is invalid nothing is applied. A pod's containers run \
    `command` + `args` as host commands (the sandbox's binary directory is first on PATH) with \
    POD_NAME, POD_NAMESPACE, POD_IP, NODE_NAME, SERVICE_ACCOUNT and the container's env set. \
    Pods are scheduled by spec.nodeName, nodeSelector kubernetes.io/hostname, or to the node \
    with fewest pods."
)]
pub struct FilesArgs {
    /// Manifest file or directory (*.yaml, *.yml, *.json, recursive); repeatable; `-` reads
    /// stdin.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    pub files: Vec<PathBuf>,

    /// How long to wait for pods to become ready and for the mesh to see changes.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Flags of `exec`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: meshctl sandbox exec demo/client -- mesh-testapp call \
    http://echo.demo.svc.cluster.local:8080/ --count 5"
)]
pub struct ExecArgs {
    /// `<namespace>/<pod>` (or just `<pod>` in namespace default); a Deployment name stands
    /// for its first pod.
    pub target: String,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// What `get` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    /// Pods: namespace, name, node, IP, status, ambient enrollment, identity.
    #[value(alias = "pod", alias = "po")]
    Pods,
    /// Services: namespace, name, cluster IP, ports, ready endpoints.
    #[value(alias = "service", alias = "svc")]
    Services,
    /// Workloads as the node ztunnels see them (from their config_dump).
    #[value(alias = "workload")]
    Workloads,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// A JSON array of objects.
    Json,
}

/// Flags of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to list.
    #[arg(value_enum)]
    pub resource: Resource,

    /// Only objects in this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Flags of `logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// `controller`, `agent` (every node) or `agent-<node>`, `ztunnel` or `ztunnel-<node>`,
    /// `cni-<node>` (plugin invocations), or a pod as `<namespace>/<pod>` (a Deployment name
    /// stands for its first pod).
    pub component: String,

    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,

    /// Keep printing new lines as they are written (Ctrl-C to stop).
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// Flags of `metrics`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: meshctl sandbox metrics ztunnel-node1 | grep istio_tcp_connections_opened"
)]
pub struct MetricsArgs {
    /// `controller`, `agent-<node>`, `ztunnel-<node>`, or `agent` / `ztunnel` for every node
    /// (each node's text preceded by a `# node <name>` comment). ztunnel's metrics are read
    /// from wherever the node's current ztunnel serves them (the port moves on upgrades).
    pub component: String,
}

/// A per-node component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NodeComponent {
    /// The node proxy.
    Ztunnel,
    /// The node agent (mesh-cni-agent).
    Agent,
}

impl NodeComponent {
    /// Name used in logs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ztunnel => "ztunnel",
            Self::Agent => "agent",
        }
    }
}

/// Flags of `restart`.
#[derive(Debug, Args)]
#[command(
    after_help = "Each selected node in turn: SIGTERM (ztunnel stops accepting at once and \
    drains open connections for up to 2s), wait for the process to exit (SIGKILL after \
    --drain-timeout), start it again with the same flags and environment, wait until it is \
    ready. While a node's ztunnel is down, its pods' connections are refused (the pods' \
    redirection stays in place: traffic never bypasses the mesh). After an agent restart, also \
    waits until ztunnel has reconnected to it over ZDS.\n\n\
    Example: meshctl sandbox restart ztunnel --node node1"
)]
pub struct RestartArgs {
    /// What to restart.
    #[arg(value_enum)]
    pub component: NodeComponent,

    /// Node to restart it on (repeatable) [default: every node, one after the other].
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,

    /// How long the old process may take to exit after SIGTERM before it is killed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long to wait for the new process to become ready.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// What `upgrade` can upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UpgradeComponent {
    /// The node proxy.
    Ztunnel,
}

/// Flags of `upgrade`.
#[derive(Debug, Args)]
#[command(
    after_help = "Each selected node in turn, as a DaemonSet rolling update with surge would: \
    start a second ztunnel with the same configuration (binary from the sandbox's binary \
    directory, so a rebuilt ztunnel is picked up), its admin/metrics/readiness ports moved \
    (15000/15020/15021 and 15100/15120/15121 alternate, since those listeners cannot be shared); \
    the node agent hands every pod to the newest ZDS connection and sends it a snapshot, and \
    the in-pod listeners (15001/15006/15008) use SO_REUSEPORT, so both serve. Once the new \
    ztunnel is ready and listens in every enrolled pod of the node, the old one gets SIGTERM: \
    it stops accepting, lets open connections finish within its drain deadline (2s) and exits. \
    Fails if it has not exited within --drain-timeout (it is then killed). Connections still \
    queued on the old listeners when they close move to the new ones only with \
    net.ipv4.tcp_migrate_req=1 in the pod namespace (else they are reset; a warning names such \
    pods).\n\n\
    Example: meshctl sandbox upgrade ztunnel --node node0"
)]
pub struct UpgradeArgs {
    /// What to upgrade.
    #[arg(value_enum)]
    pub component: UpgradeComponent,

    /// Node to upgrade it on (repeatable) [default: every node, one after the other].
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,

    /// How long the old ztunnel may take to drain and exit after SIGTERM before it is killed
    /// (and the upgrade reported as failed).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long to wait for the new ztunnel to become ready and take over the node's pods.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Flags of `down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Keep the logs/ directory (everything else in the state directory is removed).
    #[arg(long)]
    pub keep_logs: bool,
}

/// Parses durations like `500ms`, `30s`, `2m`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "sandbox",
            "exec",
            "demo/client",
            "--",
            "mesh-testapp",
            "call",
            "-n",
            "5",
        ])
        .unwrap();
        let TopCommand::Sandbox(s) = cli.command;
        let SandboxCommand::Exec(e) = s.command else {
            panic!("not exec")
        };
        assert_eq!(e.target, "demo/client");
        assert_eq!(e.command, ["mesh-testapp", "call", "-n", "5"]);
    }

    #[test]
    fn get_accepts_kubectl_aliases() {
        let cli = Cli::try_parse_from(["meshctl", "sandbox", "get", "svc", "-o", "json"]).unwrap();
        let TopCommand::Sandbox(s) = cli.command;
        let SandboxCommand::Get(g) = s.command else {
            panic!("not get")
        };
        assert_eq!(g.resource, Resource::Services);
        assert_eq!(g.output, Output::Json);
    }

    #[test]
    fn restart_and_upgrade_take_repeatable_nodes() {
        let cli = Cli::try_parse_from([
            "meshctl", "sandbox", "restart", "agent", "--node", "node0", "--node", "node1",
        ])
        .unwrap();
        let TopCommand::Sandbox(s) = cli.command;
        let SandboxCommand::Restart(r) = s.command else {
            panic!("not restart")
        };
        assert_eq!(r.component, NodeComponent::Agent);
        assert_eq!(r.nodes, ["node0", "node1"]);
        let cli = Cli::try_parse_from([
            "meshctl",
            "sandbox",
            "upgrade",
            "ztunnel",
            "--drain-timeout",
            "3s",
        ])
        .unwrap();
        let TopCommand::Sandbox(s) = cli.command;
        let SandboxCommand::Upgrade(u) = s.command else {
            panic!("not upgrade")
        };
        assert!(u.nodes.is_empty(), "no --node means every node");
        assert_eq!(u.drain_timeout, Duration::from_secs(3));
        assert!(Cli::try_parse_from(["meshctl", "sandbox", "upgrade", "agent"]).is_err());
    }

    #[test]
    fn up_rejects_zero_nodes() {
        assert!(Cli::try_parse_from(["meshctl", "sandbox", "up", "--nodes", "0"]).is_err());
    }
}
