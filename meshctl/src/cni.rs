//! The container runtime's CNI side: each node's network config list (bridge + host-local,
//! then mesh-cni) and running the chain as a runtime does — environment variables, the
//! plugin's config on stdin with `prevResult`, executed inside the node's namespace.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::netns;
use crate::network::POD_BRIDGE;
use crate::state::{NodeState, State, StateDir};

/// CNI spec version of the config list.
pub const CNI_VERSION: &str = "1.0.0";
/// Network name of the config list.
pub const NETWORK_NAME: &str = "msb-pods";

/// A CNI command failed.
#[derive(Debug, thiserror::Error)]
#[error("CNI {command} failed in plugin {plugin}: {output}")]
pub struct CniError {
    /// ADD or DEL.
    pub command: &'static str,
    /// The plugin type.
    pub plugin: String,
    /// The plugin's error output.
    pub output: String,
}

/// What the runtime knows about a pod sandbox.
#[derive(Clone, Debug)]
pub struct CniPod<'a> {
    /// Pod namespace.
    pub namespace: &'a str,
    /// Pod name.
    pub name: &'a str,
    /// Pod UID.
    pub uid: &'a str,
    /// Sandbox container id.
    pub container_id: &'a str,
    /// Network namespace name.
    pub netns: &'a str,
}

/// CNI_ARGS as kubelet/containerd pass them.
pub fn cni_args(pod: &CniPod<'_>) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace, pod.name, pod.container_id, pod.uid
    )
}

/// The network config list of `node`.
pub fn conflist(dir: &StateDir, node: &NodeState) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": true,
                // Pods need a default route via the bridge (Services, other nodes).
                "isDefaultGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{}/24", node.pod_subnet)}]],
                    "dataDir": dir.ipam_dir(&node.name),
                },
            },
            {
                "type": "mesh-cni",
                "agentSocket": dir.plugin_socket(&node.name),
                "configDir": dir.cluster_dir(),
                "logFile": dir.log(&format!("cni-{}", node.name)),
            },
        ],
    })
}

/// The first IPv4 address of a CNI result.
pub fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        ip["address"]
            .as_str()?
            .split('/')
            .next()?
            .parse::<Ipv4Addr>()
            .ok()
    })
}

/// Runs the plugin chain of one node.
pub struct Runtime {
    conflist: Value,
    search: Vec<PathBuf>,
    node_netns: String,
}

impl Runtime {
    /// The runtime of `node`, finding plugins in the CNI and mesh binary directories.
    pub fn new(dir: &StateDir, state: &State, node: &NodeState) -> Self {
        Self {
            conflist: conflist(dir, node),
            search: vec![state.cni_bin_dir.clone(), state.bin_dir.clone()],
            node_netns: node.netns.clone(),
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// ADD through the whole chain; the final result carries the pod's addresses.
    pub fn add(&self, pod: &CniPod<'_>) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let out = self.exec("ADD", pod, &plugin, prev.take())?;
            let parsed = serde_json::from_str(&out).map_err(|e| CniError {
                command: "ADD",
                plugin: plugin_type(&plugin),
                output: format!("unparsable result {out:?}: {e}"),
            })?;
            prev = Some(parsed);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL through the chain in reverse order; every plugin runs even if one fails.
    pub fn del(&self, pod: &CniPod<'_>) -> Result<(), CniError> {
        let mut first_err = None;
        for plugin in self.plugins().into_iter().rev() {
            if let Err(e) = self.exec("DEL", pod, &plugin, None) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn exec(
        &self,
        command: &'static str,
        pod: &CniPod<'_>,
        plugin: &Value,
        prev: Option<Value>,
    ) -> Result<String, CniError> {
        let kind = plugin_type(plugin);
        let fail = |output: String| CniError {
            command,
            plugin: kind.clone(),
            output,
        };
        let mut conf = plugin.clone();
        conf["cniVersion"] = json!(CNI_VERSION);
        conf["name"] = json!(NETWORK_NAME);
        if let Some(prev) = prev {
            conf["prevResult"] = prev;
        }
        let bin = self
            .search
            .iter()
            .map(|d| d.join(&kind))
            .find(|p| p.exists())
            .ok_or_else(|| {
                fail(format!(
                    "plugin binary {kind} not found in {:?}",
                    self.search
                ))
            })?;
        let cni_path = self
            .search
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let node = std::fs::File::open(netns::path(&self.node_netns))
            .map_err(|e| fail(format!("opening node netns {}: {e}", self.node_netns)))?;
        let fd = node.as_raw_fd();
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod.container_id)
            .env("CNI_NETNS", netns::path(pod.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", cni_args(pod))
            .env("CNI_PATH", cni_path)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: setns is async-signal-safe; the plugin runs in the node's namespace, where a
        // runtime on that node runs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", bin.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        drop(node);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(fail(format!(
                "{}{}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

/// Writes the node's config list next to its runtime files (for reference).
pub fn write_conflist(dir: &StateDir, node: &NodeState) -> std::io::Result<()> {
    let path = dir.conflist(&node.name);
    let text = serde_json::to_string_pretty(&conflist(dir, node)).unwrap_or_default();
    std::fs::write(path, text)
}

fn plugin_type(plugin: &Value) -> String {
    plugin["type"].as_str().unwrap_or("").to_string()
}

/// The standard plugins the chain needs (mesh-cni comes from the mesh binary directory).
pub fn standard_plugins(cni_bin_dir: &Path) -> Vec<PathBuf> {
    vec![cni_bin_dir.join("bridge"), cni_bin_dir.join("host-local")]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::plan_node;

    #[test]
    fn cni_args_carry_the_pod_identity() {
        let pod = CniPod {
            namespace: "demo",
            name: "echo-0",
            uid: "u-1",
            container_id: "c-1",
            netns: "msb-node0-1",
        };
        assert_eq!(
            cni_args(&pod),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=echo-0;K8S_POD_INFRA_CONTAINER_ID=c-1;K8S_POD_UID=u-1"
        );
    }

    #[test]
    fn conflist_chains_mesh_cni_after_bridge_with_node_subnet() {
        let dir = StateDir::new("/s");
        let c = conflist(&dir, &plan_node(3));
        let plugins = c["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["type"], "bridge");
        assert_eq!(plugins[0]["isDefaultGateway"], true);
        assert_eq!(
            plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        assert_eq!(plugins[0]["ipam"]["dataDir"], "/s/run/node3/ipam");
        assert_eq!(plugins[1]["type"], "mesh-cni");
        assert_eq!(plugins[1]["agentSocket"], "/s/run/node3/plugin.sock");
        assert_eq!(plugins[1]["configDir"], "/s/cluster");
    }

    #[test]
    fn first_ipv4_skips_ipv6() {
        let r = json!({"ips": [{"address": "fd00::2/64"}, {"address": "10.244.0.5/24"}]});
        assert_eq!(first_ipv4(&r), Some(Ipv4Addr::new(10, 244, 0, 5)));
        assert_eq!(first_ipv4(&json!({})), None);
    }
}
