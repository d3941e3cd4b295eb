//! A test "node" with a container runtime's CNI side: a node netns, pod netns created the way a
//! runtime creates them, and the plugin chain (Debian's bridge + host-local, then `mesh-cni`)
//! invoked exactly as a runtime invokes it (env vars + network config on stdin + netns path).

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::netns::sh;

/// Where Debian's containernetworking-plugins live.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";

/// A pod sandbox known to the runtime.
#[derive(Clone, Debug)]
pub struct PodSandbox {
    /// Namespace of the pod.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Sandbox (container) id.
    pub container_id: String,
    /// Netns name (`ip netns`), path `/var/run/netns/<netns>`.
    pub netns: String,
}

impl PodSandbox {
    /// The netns path handed to CNI plugins.
    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }
}

/// A CNI failure as the runtime sees it.
#[derive(Debug)]
pub struct CniFailure {
    /// Which plugin failed.
    pub plugin: String,
    /// Its stdout (the CNI error JSON) and stderr.
    pub output: String,
}

/// One node: its netns, a bridge network for its pods, and the plugin chain.
pub struct CniNode {
    /// Node netns name.
    pub ns: String,
    /// Test directory (IPAM state, logs).
    pub dir: PathBuf,
    /// Pod subnet.
    pub subnet: (Ipv4Addr, u8),
    /// Directories searched for plugin binaries (CNI_PATH).
    pub cni_path: String,
    /// The network config list.
    pub conflist: Value,
    pods: Vec<PodSandbox>,
    results: std::sync::Mutex<std::collections::HashMap<String, Value>>,
}

impl CniNode {
    /// Creates node netns `ns` whose pods get addresses from `subnet` via the bridge `cni0`,
    /// with `mesh` (our plugin's config entry) chained after the bridge if given.
    pub fn new(
        ns: &str,
        dir: &Path,
        subnet: (Ipv4Addr, u8),
        plugin_dir: &Path,
        mesh: Option<Value>,
    ) -> Self {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("{}/{}", subnet.0, subnet.1)}]],
                "dataDir": dir.join("ipam"),
            }
        })];
        plugins.extend(mesh);
        CniNode {
            ns: ns.to_string(),
            dir: dir.to_path_buf(),
            subnet,
            cni_path: format!("{DEBIAN_CNI_BIN}:{}", plugin_dir.display()),
            conflist: json!({
                "cniVersion": "1.0.0",
                "name": format!("{ns}-pods"),
                "plugins": plugins,
            }),
            pods: Vec::new(),
            results: Default::default(),
        }
    }

    /// Creates the sandbox netns of a pod (not yet wired).
    pub fn sandbox(&mut self, namespace: &str, name: &str) -> PodSandbox {
        let netns = format!("{}-{namespace}-{name}", self.ns);
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        sh(&["ip", "netns", "add", &netns]);
        // Runtimes bring loopback up (the loopback plugin) before the network plugins run.
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        let pod = PodSandbox {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{namespace}-{name}"),
            container_id: format!("ctr-{netns}"),
            netns,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Runs ADD through the chain; returns the final result (with the pod's IPs).
    pub fn add(&self, pod: &PodSandbox) -> Result<Value, CniFailure> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let out = self.exec("ADD", pod, &plugin, prev.take())?;
            prev = Some(serde_json::from_str(&out).map_err(|e| CniFailure {
                plugin: plugin_type(&plugin),
                output: format!("unparsable result {out:?}: {e}"),
            })?);
        }
        let result = prev.unwrap_or(Value::Null);
        if let Ok(mut r) = self.results.lock() {
            r.insert(pod.netns.clone(), result.clone());
        }
        Ok(result)
    }

    /// Runs DEL through the chain in reverse order.
    pub fn del(&self, pod: &PodSandbox) -> Result<(), CniFailure> {
        for plugin in self.plugins().into_iter().rev() {
            self.exec("DEL", pod, &plugin, None)?;
        }
        Ok(())
    }

    /// Runs CHECK through the chain with the pod's ADD result as prevResult.
    pub fn check(&self, pod: &PodSandbox) -> Result<(), CniFailure> {
        let result = self
            .results
            .lock()
            .ok()
            .and_then(|r| r.get(&pod.netns).cloned())
            .unwrap_or(Value::Null);
        for plugin in self.plugins() {
            self.exec("CHECK", pod, &plugin, Some(result.clone()))?;
        }
        Ok(())
    }

    /// The first IPv4 address in a CNI result.
    pub fn ip_of(result: &Value) -> Option<Ipv4Addr> {
        result["ips"].as_array()?.iter().find_map(|ip| {
            ip["address"]
                .as_str()?
                .split('/')
                .next()?
                .parse::<Ipv4Addr>()
                .ok()
        })
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs one plugin as the runtime does: in the node netns, config on stdin.
    fn exec(
        &self,
        command: &str,
        pod: &PodSandbox,
        plugin: &Value,
        prev: Option<Value>,
    ) -> Result<String, CniFailure> {
        let kind = plugin_type(plugin);
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev;
        }
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(&kind))
            .find(|p| p.exists())
            .ok_or_else(|| CniFailure {
                plugin: kind.clone(),
                output: format!("plugin binary not found in {}", self.cni_path),
            })?;
        let node_netns =
            std::fs::File::open(format!("/var/run/netns/{}", self.ns)).expect("node netns exists");
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.container_id, pod.uid
                ),
            )
            .env("CNI_PATH", &self.cni_path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let fd = std::os::fd::AsRawFd::as_raw_fd(&node_netns);
        // SAFETY: setns is async-signal-safe; the child enters the node netns before exec, as a
        // runtime running in the node's network namespace would.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| CniFailure {
            plugin: kind.clone(),
            output: format!("spawn {}: {e}", bin.display()),
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| CniFailure {
            plugin: kind.clone(),
            output: e.to_string(),
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(CniFailure {
                plugin: kind,
                output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
            })
        }
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn plugin_type(plugin: &Value) -> String {
    plugin["type"].as_str().unwrap_or("").to_string()
}
