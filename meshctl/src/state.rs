//! The sandbox's persistent state: where everything lives on disk (`StateDir`) and what was
//! created (`State`, saved as state.json after every step so `down` works after a crash).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::components::ZtunnelPorts;
pub use crate::names::{NsName, ObjectId};
use crate::processes::ProcessRecord;

/// Version of the state.json format.
pub const STATE_VERSION: u32 = 1;

/// Errors reading or writing the state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No state.json: nothing is running.
    #[error("no sandbox is running (no {0}); start one with `meshctl sandbox up`")]
    NotRunning(PathBuf),
    /// state.json exists but is unreadable.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// state.json is not valid.
    #[error("{path} is corrupt ({source}); `meshctl sandbox down` still cleans up")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Writing failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Paths inside the state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// state.json.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The lock file serializing mutating commands.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// The "API server": one YAML file per object, watched by the controller and agents.
    pub fn cluster_dir(&self) -> PathBuf {
        self.root.join("cluster")
    }

    /// The controller's CA directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// The root certificate the controller publishes.
    pub fn root_cert(&self) -> PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    /// The controller's node tokens file.
    pub fn node_tokens(&self) -> PathBuf {
        self.root.join("node-tokens.yaml")
    }

    /// The bearer token file of `node`'s ztunnel.
    pub fn token(&self, node: &str) -> PathBuf {
        self.root.join("tokens").join(node)
    }

    /// Directory of all logs.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Log file of a component (`controller`, `agent-node0`, ...).
    pub fn log(&self, component: &str) -> PathBuf {
        self.logs_dir().join(format!("{component}.log"))
    }

    /// Log file of a pod's containers.
    pub fn pod_log(&self, namespace: &str, name: &str) -> PathBuf {
        self.logs_dir()
            .join("pods")
            .join(format!("{namespace}_{name}.log"))
    }

    /// Per-node runtime directory.
    pub fn run_dir(&self, node: &str) -> PathBuf {
        self.root.join("run").join(node)
    }

    /// ZDS socket between the node agent and ztunnel.
    pub fn ztunnel_socket(&self, node: &str) -> PathBuf {
        self.run_dir(node).join("ztunnel.sock")
    }

    /// The node agent's socket for the CNI plugin.
    pub fn plugin_socket(&self, node: &str) -> PathBuf {
        self.run_dir(node).join("plugin.sock")
    }

    /// The node agent's record directory.
    pub fn agent_state(&self, node: &str) -> PathBuf {
        self.run_dir(node).join("agent-state")
    }

    /// host-local IPAM data directory of a node.
    pub fn ipam_dir(&self, node: &str) -> PathBuf {
        self.run_dir(node).join("ipam")
    }

    /// The node's CNI network config list (written for reference and debugging).
    pub fn conflist(&self, node: &str) -> PathBuf {
        self.run_dir(node).join("cni.conflist")
    }

    /// The node's kube-proxy nft script.
    pub fn kubeproxy_script(&self, node: &str) -> PathBuf {
        self.run_dir(node).join("kubeproxy.nft")
    }

    /// Loads state.json.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.state_file();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotRunning(path));
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&text).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Saves state.json atomically (temporary file + rename).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.state_file();
        let text = serde_json::to_vec_pretty(state).map_err(|e| StateError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&path, &text).map_err(|source| StateError::Write { path, source })
    }

    /// Takes the exclusive lock of mutating commands, waiting for another holder to finish.
    pub fn lock(&self) -> anyhow::Result<nix::fcntl::Flock<File>> {
        use nix::fcntl::{Flock, FlockArg};
        std::fs::create_dir_all(&self.root)?;
        let path = self.lock_file();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(l),
            Err((file, _)) => {
                eprintln!("waiting for another meshctl sandbox command to finish...");
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
            }
        }
    }
}

/// Writes `data` to `path` via a temporary file in the same directory and a rename, so readers
/// (the controller's file watcher, `down`) never see a partial file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// One node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// Node name (`node<i>`).
    pub name: String,
    /// Index i.
    pub index: u8,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the underlay.
    pub ip: Ipv4Addr,
    /// Its pods' subnet (a /24).
    pub pod_subnet: Ipv4Addr,
    /// The node agent.
    pub agent: Option<ProcessRecord>,
    /// ztunnel.
    pub ztunnel: Option<ProcessRecord>,
    /// Where that ztunnel serves admin, metrics and readiness (moves on every upgrade).
    #[serde(default)]
    pub ztunnel_ports: ZtunnelPorts,
}

/// Lifecycle of a pod as the sandbox's kubelet sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodPhase {
    /// Sandbox being created.
    Pending,
    /// Containers started.
    Running,
    /// Sandbox or container start failed.
    Failed,
}

impl fmt::Display for PodPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One container process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container name.
    pub name: String,
    /// Its process, once started.
    pub process: Option<ProcessRecord>,
}

/// One pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodState {
    /// Namespace and name.
    pub id: NsName,
    /// metadata.uid.
    pub uid: String,
    /// Node it runs on.
    pub node: String,
    /// Its network namespace.
    pub netns: String,
    /// CNI container id.
    pub container_id: String,
    /// IP from CNI ADD.
    pub ip: Option<Ipv4Addr>,
    /// Phase.
    pub phase: PodPhase,
    /// Owning Deployment, if expanded from one.
    pub owner: Option<String>,
    /// Hash of the spec as applied (a change recreates the pod).
    pub spec_hash: String,
    /// Hash of labels and annotations as applied (a change rewrites the object).
    pub meta_hash: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Service account.
    pub service_account: String,
    /// Named container ports (for Service targetPort names).
    pub named_ports: BTreeMap<String, u16>,
    /// TCP ports the containers declare (readiness waits for them to listen).
    pub tcp_ports: Vec<u16>,
    /// The spec as applied (nodeName as the user wrote it).
    #[serde(default)]
    pub spec: k8s_openapi::api::core::v1::PodSpec,
    /// Container processes.
    pub containers: Vec<ContainerState>,
}

/// A Service port's target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

/// Transport of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (not forwarded by the sandbox kube-proxy).
    Sctp,
}

impl Protocol {
    /// nft's name of the protocol.
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortState {
    /// Port name.
    pub name: Option<String>,
    /// Protocol.
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
    /// Where it forwards to on the pods.
    pub target: TargetPort,
}

/// One Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Namespace and name.
    pub id: NsName,
    /// Allocated cluster IP (None for headless Services).
    pub cluster_ip: Option<Ipv4Addr>,
    /// Pod selector (None: no selector, endpoints are managed elsewhere).
    pub selector: Option<BTreeMap<String, String>>,
    /// Ports.
    pub ports: Vec<ServicePortState>,
    /// Hash of the object as applied.
    pub hash: String,
}

/// One Deployment (its pods are `<name>-<i>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentState {
    /// Replicas as applied.
    pub replicas: u32,
}

/// Everything the sandbox created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Where the mesh binaries are.
    pub bin_dir: PathBuf,
    /// Where the standard CNI plugins are.
    pub cni_bin_dir: PathBuf,
    /// RUST_LOG of components.
    pub log_level: String,
    /// True once `up` finished.
    pub ready: bool,
    /// Every netns created, in creation order.
    pub netns: Vec<String>,
    /// The controller.
    pub controller: Option<ProcessRecord>,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Pods.
    pub pods: BTreeMap<NsName, PodState>,
    /// Services.
    pub services: BTreeMap<NsName, ServiceState>,
    /// Deployments.
    pub deployments: BTreeMap<NsName, DeploymentState>,
    /// Other objects written verbatim, with a hash of what was written.
    pub objects: BTreeMap<String, (ObjectId, String)>,
    /// Namespace labels (for enrollment checks).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// How the node agents redirect pods into ztunnel.
    #[serde(default)]
    pub redirect_mode: RedirectMode,
}

/// The node agents' `--redirect-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// nftables REDIRECT/TPROXY rules in each pod, as Istio installs them.
    #[default]
    Nftables,
    /// eBPF programs (sk_lookup, tc) in each pod: no netfilter on the pod's packets.
    Ebpf,
}

impl State {
    /// An empty state for a sandbox about to start.
    pub fn new(bin_dir: PathBuf, cni_bin_dir: PathBuf, log_level: String) -> Self {
        Self {
            version: STATE_VERSION,
            bin_dir,
            cni_bin_dir,
            log_level,
            ready: false,
            netns: Vec::new(),
            controller: None,
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            deployments: BTreeMap::new(),
            objects: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            redirect_mode: RedirectMode::default(),
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Remembers a netns name (before it is created, so a crash leaves a record).
    pub fn remember_netns(&mut self, name: &str) {
        if !self.netns.iter().any(|n| n == name) {
            self.netns.push(name.to_string());
        }
    }

    /// Resolves `ns/name` to a pod, or a Deployment name to its first pod.
    pub fn find_pod(&self, target: &NsName) -> Option<&PodState> {
        if let Some(p) = self.pods.get(target) {
            return Some(p);
        }
        self.pods
            .values()
            .filter(|p| {
                p.id.namespace == target.namespace && p.owner.as_deref() == Some(&target.name)
            })
            .min_by_key(|p| replica_index(&p.id.name))
    }

    /// Cluster IPs in use.
    pub fn used_cluster_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.services
            .values()
            .filter_map(|s| s.cluster_ip)
            .collect()
    }
}

/// The replica index of `<deploy>-<i>` (for ordering).
fn replica_index(name: &str) -> u32 {
    name.rsplit_once('-')
        .and_then(|(_, i)| i.parse().ok())
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        let mut s = State::new("/bin".into(), "/usr/lib/cni".into(), "info".into());
        s.remember_netns("msb-underlay");
        s.nodes.push(NodeState {
            name: "node0".into(),
            index: 0,
            netns: "msb-node0".into(),
            ip: Ipv4Addr::new(172, 30, 0, 10),
            pod_subnet: Ipv4Addr::new(10, 244, 0, 0),
            agent: Some(ProcessRecord {
                pid: 42,
                start_time: 7,
            }),
            ztunnel: None,
            ztunnel_ports: ZtunnelPorts::default(),
        });
        for i in [1, 0, 10] {
            let id = NsName::new("demo", format!("echo-{i}"));
            s.pods.insert(
                id.clone(),
                PodState {
                    id,
                    uid: format!("u{i}"),
                    node: "node0".into(),
                    netns: format!("msb-node0-{i}"),
                    container_id: "c".into(),
                    ip: Some(Ipv4Addr::new(10, 244, 0, 2 + i as u8)),
                    phase: PodPhase::Running,
                    owner: Some("echo".into()),
                    spec_hash: "h".into(),
                    meta_hash: "m".into(),
                    labels: BTreeMap::from([("app".into(), "echo".into())]),
                    annotations: BTreeMap::new(),
                    service_account: "default".into(),
                    named_ports: BTreeMap::from([("http".into(), 8080)]),
                    tcp_ports: vec![8080],
                    spec: Default::default(),
                    containers: vec![ContainerState {
                        name: "app".into(),
                        process: None,
                    }],
                },
            );
        }
        let id = ObjectId {
            group: "".into(),
            kind: "Namespace".into(),
            namespace: None,
            name: "demo".into(),
        };
        s.objects.insert(id.file_name(), (id, "x".into()));
        s
    }

    #[test]
    fn state_round_trips_through_disk() {
        let dir = std::env::temp_dir().join(format!("meshctl-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sd = StateDir::new(&dir);
        let s = sample();
        sd.save(&s).unwrap();
        assert_eq!(sd.load().unwrap(), s);
        let text = std::fs::read_to_string(sd.state_file()).unwrap();
        assert!(
            text.contains("\"demo/echo-0\""),
            "pods keyed by ns/name: {text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_without_ztunnel_ports_means_the_standard_set() {
        let old: NodeState = serde_json::from_str(
            r#"{"name":"node0","index":0,"netns":"msb-node0","ip":"172.30.0.10",
                "pod_subnet":"10.244.0.0","agent":null,"ztunnel":null}"#,
        )
        .unwrap();
        assert_eq!(old.ztunnel_ports, ZtunnelPorts::default());
    }

    #[test]
    fn missing_state_means_not_running() {
        let sd = StateDir::new("/nonexistent/meshctl-state");
        assert!(matches!(sd.load(), Err(StateError::NotRunning(_))));
    }

    #[test]
    fn deployment_name_resolves_to_its_lowest_replica() {
        let s = sample();
        let p = s.find_pod(&"demo/echo".parse().unwrap()).unwrap();
        assert_eq!(p.id.name, "echo-0");
        assert!(s.find_pod(&"other/echo".parse().unwrap()).is_none());
    }
}
