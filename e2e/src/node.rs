//! One mesh node for node-agent tests: a node netns running the real controller (files source),
//! node agent and ztunnel, with pods created and wired through the real CNI chain.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::cni::{CniFailure, CniNode, PodSandbox};
use crate::controller::{Controller, ControllerDirs};
use crate::process::NetnsProcess;
use crate::ztunnel::{Ztunnel, metric_sum};

/// Port of the agent's monitoring server inside the node netns (the controller has 15014).
pub const AGENT_MONITORING_PORT: u16 = 15114;

/// Paths of the binaries a node runs.
#[derive(Clone)]
pub struct Binaries {
    /// mesh-controller.
    pub controller: PathBuf,
    /// mesh-cni-agent (mesh-cni must sit next to it).
    pub agent: PathBuf,
    /// ztunnel.
    pub ztunnel: PathBuf,
}

impl Binaries {
    /// All binaries from the directory `dir` (cargo's target dir for the test profile).
    pub fn in_dir(dir: &Path) -> Self {
        let b = Binaries {
            controller: dir.join("mesh-controller"),
            agent: dir.join("mesh-cni-agent"),
            ztunnel: dir.join("ztunnel"),
        };
        for p in [&b.controller, &b.agent, &b.ztunnel, &dir.join("mesh-cni")] {
            assert!(
                p.exists(),
                "{} missing: build the workspace first",
                p.display()
            );
        }
        b
    }
}

/// A node with its processes; everything is stopped and removed on drop.
pub struct MeshNode {
    /// The node name pods are scheduled to.
    pub name: String,
    /// The CNI side (node netns, pod sandboxes).
    pub cni: CniNode,
    /// Test directory.
    pub dir: PathBuf,
    /// Controller inputs.
    pub dirs: ControllerDirs,
    bins: Binaries,
    /// The controller.
    pub controller: Controller,
    /// The node agent, while running.
    pub agent: Option<NetnsProcess>,
    /// ztunnel, while running.
    pub ztunnel: Option<Ztunnel>,
    /// The agent's `--reconcile-interval`.
    reconcile_interval: String,
    /// eBPF mode: the node's pin root (a directory of its own on the shared bpffs, so
    /// parallel tests never share pod keys); `None` runs the agent in nftables mode.
    pub bpf_pin_root: Option<PathBuf>,
}

impl MeshNode {
    /// Starts a node for test number `id`: netns `cn<id>`, pods in 10.78.`id`.0/24, controller,
    /// agent (reconciling every second) and ztunnel.
    pub fn start(bins: &Binaries, id: u8) -> Self {
        Self::start_with_reconcile(bins, id, "1s")
    }

    /// Like [`MeshNode::start`], with the agent verifying every pod's rules every `interval`
    /// (tests use 1 s so repairs show quickly; benchmarks use the agent's default).
    pub fn start_with_reconcile(bins: &Binaries, id: u8, interval: &str) -> Self {
        Self::start_in_mode(bins, id, interval, false)
    }

    /// Like [`MeshNode::start`], with the agent and ztunnel in eBPF redirection mode.
    pub fn start_ebpf(bins: &Binaries, id: u8) -> Self {
        Self::start_in_mode(bins, id, "1s", true)
    }

    fn start_in_mode(bins: &Binaries, id: u8, interval: &str, ebpf: bool) -> Self {
        let ns = format!("cn{id}");
        let dir = std::env::temp_dir().join(format!("mesh-node-test-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let name = format!("node-{id}");
        let dirs = ControllerDirs::create(&dir, &[(&name, "node-token")]);
        std::fs::write(dir.join("token"), "node-token").unwrap();
        let plugin_dir = bins.agent.parent().unwrap().to_path_buf();
        let mesh = json!({
            "type": "mesh-cni",
            "agentSocket": dir.join("plugin.sock"),
            "agentTimeoutSeconds": 20,
            "configDir": dirs.config,
        });
        let cni = CniNode::new(
            &ns,
            &dir,
            (Ipv4Addr::new(10, 78, id, 0), 24),
            &plugin_dir,
            Some(mesh),
        );
        let controller = Controller::start(&bins.controller, &ns, &dir, &dirs);
        let mut node = MeshNode {
            name,
            cni,
            dir,
            dirs,
            bins: bins.clone(),
            controller,
            agent: None,
            ztunnel: None,
            reconcile_interval: interval.to_string(),
            bpf_pin_root: ebpf.then(|| {
                let root = PathBuf::from(ebpf::DEFAULT_PIN_ROOT);
                // Mounted on the shared root first, so the node's directory is on that bpffs
                // instead of a mount of its own.
                ebpf::ensure_bpffs(&root).expect("mounting the bpffs pin root");
                let node_root = root.join(format!("node-{id}"));
                let _ = std::fs::remove_dir_all(&node_root);
                node_root
            }),
        };
        node.start_agent();
        node.start_ztunnel();
        node
    }

    /// Starts the node agent and waits until it is ready.
    pub fn start_agent(&mut self) {
        let (config, zds, plugin, state, mon) = (
            self.dirs.config.to_string_lossy().into_owned(),
            self.dir.join("zds.sock").to_string_lossy().into_owned(),
            self.dir.join("plugin.sock").to_string_lossy().into_owned(),
            self.dir.join("agent-state").to_string_lossy().into_owned(),
            format!("127.0.0.1:{AGENT_MONITORING_PORT}"),
        );
        let pin_root = self
            .bpf_pin_root
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        let mut args = vec![
            "--node-name",
            &self.name,
            "--config-source",
            "files",
            "--config-dir",
            &config,
            "--zds-socket",
            &zds,
            "--plugin-socket",
            &plugin,
            "--state-dir",
            &state,
            "--monitoring-addr",
            &mon,
            "--reconcile-interval",
            &self.reconcile_interval,
        ];
        if let Some(root) = &pin_root {
            args.extend(["--redirect-mode", "ebpf", "--bpf-pin-root", root]);
        }
        let mut p = NetnsProcess::start(
            "mesh-cni-agent",
            &self.bins.agent,
            &self.cni.ns,
            &self.dir,
            &args,
            &[("RUST_LOG", "info")],
        );
        p.wait_http_ok(AGENT_MONITORING_PORT, "/healthz/ready");
        self.agent = Some(p);
    }

    /// Stops the node agent (SIGTERM, then waits).
    pub fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.sigterm();
            a.wait_exit(std::time::Duration::from_secs(15));
        }
    }

    /// Starts ztunnel (xDS and certificates from the controller) and waits until it is ready.
    pub fn start_ztunnel(&mut self) {
        let root = self.dirs.root_cert().to_string_lossy().into_owned();
        let token = self.dir.join("token").to_string_lossy().into_owned();
        let env = [
            ("XDS_ADDRESS", "https://127.0.0.1:15012"),
            ("CA_ADDRESS", "https://127.0.0.1:15012"),
            ("XDS_ROOT_CA", root.as_str()),
            ("CA_ROOT_CA", root.as_str()),
            ("AUTH_TOKEN", token.as_str()),
            ("NODE_NAME", self.name.as_str()),
            ("LOCAL_XDS_PATH", ""),
            ("FAKE_CA", "false"),
        ];
        let pin_root = self
            .bpf_pin_root
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        let mut env = env.to_vec();
        if let Some(root) = &pin_root {
            env.push(("BPF_PIN_ROOT", root));
        }
        let mut z = Ztunnel::start(
            &self.bins.ztunnel,
            &self.cni.ns,
            &self.dir,
            &self.dir.join("unused-local-config.yaml"),
            &self.dir.join("zds.sock"),
            &env,
        );
        z.wait_ready();
        self.ztunnel = Some(z);
    }

    /// Stops ztunnel (SIGTERM, then waits).
    pub fn stop_ztunnel(&mut self) {
        if let Some(mut z) = self.ztunnel.take() {
            z.sigterm();
            z.wait_exit(std::time::Duration::from_secs(15));
        }
    }

    /// Writes (or replaces) a YAML file in the controller's/agent's config directory.
    pub fn write_yaml(&self, file: &str, yaml: &str) {
        let path = self.dirs.config.join(file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// Writes a Namespace, labelled ambient or not.
    pub fn namespace(&self, name: &str, ambient: bool) {
        let labels = if ambient {
            "\n  labels:\n    istio.io/dataplane-mode: ambient"
        } else {
            ""
        };
        self.write_yaml(
            &format!("ns-{name}.yaml"),
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n"),
        );
    }

    /// Creates a pod as kubelet would: the Pod object exists first, then its sandbox is wired
    /// through the CNI chain, then its IP is reported in status. Returns the sandbox and the
    /// ADD result.
    pub fn create_pod(
        &mut self,
        namespace: &str,
        name: &str,
        sa: &str,
        labels: &[(&str, &str)],
    ) -> (PodSandbox, Result<Ipv4Addr, CniFailure>) {
        let sandbox = self.cni.sandbox(namespace, name);
        self.write_pod(&sandbox, sa, labels, None);
        let res = self.cni.add(&sandbox).map(|r| {
            let ip = CniNode::ip_of(&r).expect("ADD result has an IPv4 address");
            self.write_pod(&sandbox, sa, labels, Some(ip));
            ip
        });
        (sandbox, res)
    }

    /// Writes the Pod object (with `ip` in status once known).
    pub fn write_pod(
        &self,
        pod: &PodSandbox,
        sa: &str,
        labels: &[(&str, &str)],
        ip: Option<Ipv4Addr>,
    ) {
        let mut doc = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "uid": pod.uid,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            },
            "spec": {
                "nodeName": self.name,
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "sandbox"}],
            },
        });
        if let Some(ip) = ip {
            doc["status"] = json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
        }
        self.write_yaml(
            &format!("pod-{}-{}.yaml", pod.namespace, pod.name),
            &doc.to_string(),
        );
    }

    /// The agent's metrics text.
    pub fn agent_metrics(&self) -> String {
        self.agent
            .as_ref()
            .and_then(|a| a.get(AGENT_MONITORING_PORT, "/metrics").ok())
            .map(|r| r.1)
            .unwrap_or_default()
    }

    /// One agent metric (sum over series matching `labels`).
    pub fn agent_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.agent_metrics(), name, labels)
    }

    /// True if ztunnel's config has a workload with this IP (so traffic to it goes over HBONE).
    pub fn ztunnel_knows(&self, ip: Ipv4Addr) -> bool {
        self.ztunnel
            .as_ref()
            .map(|z| z.config_dump().to_string().contains(&format!("\"{ip}\"")))
            .unwrap_or(false)
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(a) = &self.agent {
            out += &format!("--- agent ---\n{}\n", a.log());
        }
        if let Some(z) = &self.ztunnel {
            out += &format!("--- ztunnel ---\n{}\n", z.log());
        }
        out += &format!("--- controller ---\n{}\n", self.controller.log());
        out
    }
}

/// True if the nft redirection table exists in the pod's netns.
pub fn has_redirection(pod: &PodSandbox) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns, "nft", "list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("istio-ambient"))
        .unwrap_or(false)
}

/// True if the pod's netns has the 0x111 fwmark routing rule.
pub fn has_mark_rule(pod: &PodSandbox) -> bool {
    std::process::Command::new("ip")
        .args(["-n", &pod.netns, "rule", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("0x111"))
        .unwrap_or(false)
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        // Processes before namespaces (their Drop kills them); then the directory.
        self.agent.take();
        self.ztunnel.take();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(root) = &self.bpf_pin_root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
