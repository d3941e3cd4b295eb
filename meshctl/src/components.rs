//! The mesh's own processes: the controller (files source) in the control plane namespace and,
//! on every node, the node agent and ztunnel — the same binaries and flags as in Kubernetes —
//! started detached with their logs in the state directory, and waited on until ready.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::netns;
use crate::network::{CONTROL_PLANE_NETNS, CONTROLLER_IP};
use crate::processes::{self, ProcessRecord, Spawn};
use crate::state::{NodeState, RedirectMode, State, StateDir};

/// Controller ports.
pub const XDS_PORT: u16 = 15012;
/// Controller monitoring port (/ready, /metrics).
pub const CONTROLLER_MONITORING_PORT: u16 = 15014;
/// Node agent monitoring port inside a node namespace (/healthz/ready, /metrics).
pub const AGENT_MONITORING_PORT: u16 = 15114;
/// ztunnel readiness port.
pub const ZTUNNEL_READY_PORT: u16 = 15021;
/// ztunnel admin port (127.0.0.1; /config_dump).
pub const ZTUNNEL_ADMIN_PORT: u16 = 15000;
/// ztunnel metrics port.
pub const ZTUNNEL_STATS_PORT: u16 = 15020;

/// A ztunnel's admin, metrics and readiness ports in its node's namespace. During an upgrade
/// two ztunnels share the namespace and these listeners do not share ports, so upgrades
/// alternate between the standard set and the standard set + 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZtunnelPorts {
    /// Admin API on 127.0.0.1 (/config_dump).
    pub admin: u16,
    /// Prometheus metrics (/metrics).
    pub stats: u16,
    /// Readiness (/healthz/ready).
    pub readiness: u16,
}

impl Default for ZtunnelPorts {
    fn default() -> Self {
        Self {
            admin: ZTUNNEL_ADMIN_PORT,
            stats: ZTUNNEL_STATS_PORT,
            readiness: ZTUNNEL_READY_PORT,
        }
    }
}

impl ZtunnelPorts {
    /// Offset of the alternate set.
    const SHIFT: u16 = 100;

    /// The set the next ztunnel on the node uses while this one still runs.
    pub fn other(self) -> Self {
        let shift = |p: u16, std: u16| if p == std { std + Self::SHIFT } else { std };
        let d = Self::default();
        Self {
            admin: shift(self.admin, d.admin),
            stats: shift(self.stats, d.stats),
            readiness: shift(self.readiness, d.readiness),
        }
    }
}

/// The mesh binaries the sandbox runs.
pub const MESH_BINARIES: &[&str] = &[
    "mesh-controller",
    "mesh-cni-agent",
    "mesh-cni",
    "ztunnel",
    "mesh-testapp",
];

/// Default binary directory: where meshctl itself is.
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the meshctl executable")?;
    Ok(exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

/// Fails with one clear message listing every missing binary or tool.
pub fn check_binaries(bin_dir: &Path, cni_bin_dir: &Path) -> anyhow::Result<()> {
    let mut missing: Vec<String> = Vec::new();
    for b in MESH_BINARIES {
        let p = bin_dir.join(b);
        if !p.is_file() {
            missing.push(format!(
                "{} (build with `cargo build --bins`, or pass --bin-dir)",
                p.display()
            ));
        }
    }
    for p in crate::cni::standard_plugins(cni_bin_dir) {
        if !p.is_file() {
            missing.push(format!(
                "{} (install the containernetworking-plugins package, or pass --cni-bin-dir)",
                p.display()
            ));
        }
    }
    for tool in ["ip", "nft"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            missing.push(format!("{tool} (install iproute2 / nftables)"));
        }
    }
    if !missing.is_empty() {
        bail!("missing binaries:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

/// Environment common to the components.
/// In eBPF mode, where `node`'s agent pins its pods' programs and its ztunnel finds them: a
/// directory per node on the shared bpffs, so `sandbox down` can remove what is left.
pub fn bpf_pin_root(state: &State, node: &NodeState) -> Option<PathBuf> {
    (state.redirect_mode == RedirectMode::Ebpf).then(|| node_pin_root(&node.name))
}

/// The pin directory of node `name` in eBPF mode.
pub fn node_pin_root(name: &str) -> PathBuf {
    Path::new(ebpf::DEFAULT_PIN_ROOT).join(format!("{SANDBOX_PIN_PREFIX}{name}"))
}

/// Prefix of the sandbox's per-node pin directories under [`ebpf::DEFAULT_PIN_ROOT`].
pub const SANDBOX_PIN_PREFIX: &str = "sandbox-";

fn base_env(state: &State) -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("RUST_LOG".into(), state.log_level.clone()),
        ("RUST_BACKTRACE".into(), "1".into()),
    ]
}

fn s(p: PathBuf) -> String {
    p.display().to_string()
}

/// A started component.
pub struct Started {
    /// Display name.
    pub name: String,
    /// The child (for early-exit detection while waiting).
    pub child: Child,
    /// Its record.
    pub record: ProcessRecord,
    /// Its log.
    pub log: PathBuf,
    /// Namespace and address answering 200 when ready.
    pub probe: (String, SocketAddr, &'static str),
}

fn start(
    name: &str,
    dir: &StateDir,
    netns: &str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    probe: (SocketAddr, &'static str),
) -> anyhow::Result<Started> {
    let log = dir.log(name);
    let child = processes::spawn(&Spawn {
        netns,
        program: &program,
        args: &args,
        env: &env,
        log: &log,
        cwd: dir.root(),
    })?;
    let record = ProcessRecord::of(child.id())
        .with_context(|| format!("{name} exited immediately; see {}", log.display()))?;
    Ok(Started {
        name: name.to_string(),
        child,
        record,
        log,
        probe: (netns.to_string(), probe.0, probe.1),
    })
}

/// Starts the controller in the control plane namespace.
pub fn start_controller(dir: &StateDir, state: &State) -> anyhow::Result<Started> {
    let args = vec![
        "--config-source".into(),
        "files".into(),
        "--config-dir".into(),
        s(dir.cluster_dir()),
        "--ca-dir".into(),
        s(dir.ca_dir()),
        "--node-tokens".into(),
        s(dir.node_tokens()),
        "--serving-ip".into(),
        CONTROLLER_IP.to_string(),
    ];
    start(
        "controller",
        dir,
        CONTROL_PLANE_NETNS,
        state.bin_dir.join("mesh-controller"),
        args,
        base_env(state),
        (
            SocketAddr::from((CONTROLLER_IP, CONTROLLER_MONITORING_PORT)),
            "/ready",
        ),
    )
}

/// Starts the node agent of `node`.
pub fn start_agent(dir: &StateDir, state: &State, node: &NodeState) -> anyhow::Result<Started> {
    let n = &node.name;
    let mut args = vec![
        "--node-name".into(),
        n.clone(),
        "--config-source".into(),
        "files".into(),
        "--config-dir".into(),
        s(dir.cluster_dir()),
        "--zds-socket".into(),
        s(dir.ztunnel_socket(n)),
        "--plugin-socket".into(),
        s(dir.plugin_socket(n)),
        "--state-dir".into(),
        s(dir.agent_state(n)),
        "--monitoring-addr".into(),
        format!("0.0.0.0:{AGENT_MONITORING_PORT}"),
    ];
    if let Some(root) = bpf_pin_root(state, node) {
        args.extend([
            "--redirect-mode".into(),
            "ebpf".into(),
            "--bpf-pin-root".into(),
            s(root),
        ]);
    }
    start(
        &format!("agent-{n}"),
        dir,
        &node.netns,
        state.bin_dir.join("mesh-cni-agent"),
        args,
        base_env(state),
        (
            SocketAddr::from(([127, 0, 0, 1], AGENT_MONITORING_PORT)),
            "/healthz/ready",
        ),
    )
}

/// Starts ztunnel on `node` with the node's `ztunnel_ports`, fetching config and certificates
/// from the controller.
pub fn start_ztunnel(dir: &StateDir, state: &State, node: &NodeState) -> anyhow::Result<Started> {
    let n = &node.name;
    let ports = node.ztunnel_ports;
    let xds = format!("https://{CONTROLLER_IP}:{XDS_PORT}");
    let root = s(dir.root_cert());
    let mut env = base_env(state);
    env.extend(
        [
            ("XDS_ADDRESS", xds.clone()),
            ("CA_ADDRESS", xds),
            ("XDS_ROOT_CA", root.clone()),
            ("CA_ROOT_CA", root),
            ("AUTH_TOKEN", s(dir.token(n))),
            ("NODE_NAME", n.clone()),
            ("POD_NAME", format!("ztunnel-{n}")),
            ("POD_NAMESPACE", "istio-system".into()),
            ("INSTANCE_IP", node.ip.to_string()),
            ("PROXY_MODE", "shared".into()),
            ("INPOD_UDS", s(dir.ztunnel_socket(n))),
            ("DRAIN_DURATION", "2s".into()),
            ("ADMIN_ADDR", format!("127.0.0.1:{}", ports.admin)),
            ("STATS_ADDR", format!("[::]:{}", ports.stats)),
            ("READINESS_ADDR", format!("[::]:{}", ports.readiness)),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    if let Some(root) = bpf_pin_root(state, node) {
        env.push(("BPF_PIN_ROOT".into(), s(root)));
    }
    start(
        &format!("ztunnel-{n}"),
        dir,
        &node.netns,
        state.bin_dir.join("ztunnel"),
        Vec::new(),
        env,
        (
            SocketAddr::from(([127, 0, 0, 1], ports.readiness)),
            "/healthz/ready",
        ),
    )
}

/// Waits until `c` answers 200 on its readiness URL; fails (with its log tail) if it exits or
/// `timeout` passes.
pub fn wait_ready(c: &mut Started, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (ns, addr, path) = c.probe.clone();
    loop {
        if let Ok((200, _)) = netns::http_get(&ns, addr, path, Duration::from_secs(2)) {
            return Ok(started.elapsed());
        }
        if let Ok(Some(status)) = c.child.try_wait() {
            bail!(
                "{} exited ({status}) before becoming ready; last log lines of {}:\n{}",
                c.name,
                c.log.display(),
                processes::log_tail(&c.log, 25)
            );
        }
        if started.elapsed() > timeout {
            bail!(
                "{} not ready after {timeout:?} (GET http://{addr}{path} in {ns}); last log lines of {}:\n{}",
                c.name,
                c.log.display(),
                processes::log_tail(&c.log, 25)
            );
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// GET `path` from ztunnel's admin (`/config_dump`) or metrics (`/metrics`) port on `node`,
/// wherever the node's current ztunnel serves it; the body of a 200.
pub fn ztunnel_get(node: &NodeState, path: &str) -> anyhow::Result<String> {
    let ports = node.ztunnel_ports;
    let port = if path.starts_with("/metrics") || path.starts_with("/stats") {
        ports.stats
    } else {
        ports.admin
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body) = netns::http_get(&node.netns, addr, path, Duration::from_secs(5))
        .with_context(|| format!("GET {path} from ztunnel on {} (:{port})", node.name))?;
    if status != 200 {
        bail!("ztunnel on {} answered {status} for {path}", node.name);
    }
    Ok(body)
}

/// ztunnel's /config_dump on `node`.
pub fn ztunnel_config_dump(node: &NodeState) -> anyhow::Result<serde_json::Value> {
    let body = ztunnel_get(node, "/config_dump")?;
    serde_json::from_str(&body).context("parsing ztunnel's config_dump")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_mode_gives_each_node_its_own_pin_root() {
        let mut state = State::new("/b".into(), "/c".into(), "info".into());
        let node = NodeState {
            name: "node1".into(),
            index: 1,
            netns: "mesh-node1".into(),
            ip: "10.0.0.1".parse().unwrap(),
            pod_subnet: "10.1.1.0".parse().unwrap(),
            agent: None,
            ztunnel: None,
            ztunnel_ports: ZtunnelPorts::default(),
        };
        assert_eq!(
            bpf_pin_root(&state, &node),
            None,
            "nftables mode pins nothing"
        );
        state.redirect_mode = RedirectMode::Ebpf;
        let root = bpf_pin_root(&state, &node).unwrap();
        assert_eq!(
            root,
            Path::new(ebpf::DEFAULT_PIN_ROOT).join("sandbox-node1")
        );
    }

    #[test]
    fn upgrades_alternate_between_two_port_sets() {
        let std = ZtunnelPorts::default();
        let alt = std.other();
        assert_eq!((alt.admin, alt.stats, alt.readiness), (15100, 15120, 15121));
        assert_eq!(alt.other(), std);
    }
}
