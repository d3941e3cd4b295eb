//! Waiting for the mesh to catch up with what was applied: every pod's redirection matches its
//! enrollment (the node agent acted on labels), and every node's ztunnel knows every running
//! pod and Service address and exactly the AuthorizationPolicies it enforces (the controller
//! pushed them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::components::ztunnel_config_dump;
use crate::netns;
use crate::state::{PodPhase, PodState, State, StateDir};

/// The nft table the node agent installs in enrolled pods.
pub const AMBIENT_TABLE: (&str, &str) = ("inet", "istio-ambient");

/// True if the mesh should capture `pod`, by the rule the agent and controller share.
pub fn should_capture(state: &State, pod: &PodState) -> bool {
    let mut ns = Namespace::default();
    ns.metadata.labels = state.namespaces.get(&pod.id.namespace).cloned();
    let mut p = Pod::default();
    p.metadata.labels = Some(pod.labels.clone());
    p.metadata.annotations = Some(pod.annotations.clone());
    p.spec = Some(pod.spec.clone());
    meshconfig::enrollment::pod_captured(Some(&ns), &p)
}

/// True if the pod's redirection is installed: the ambient nft table in its netns, or (eBPF
/// mode) its programs pinned by its node's agent.
pub fn is_enrolled(pod: &PodState) -> bool {
    netns::has_nft_table(&pod.netns, AMBIENT_TABLE.0, AMBIENT_TABLE.1)
        || ebpf::PodRedirection::new(crate::components::node_pin_root(&pod.node), &pod.uid)
            .is_ok_and(|p| p.is_installed())
}

fn running(state: &State) -> impl Iterator<Item = &PodState> {
    state
        .pods
        .values()
        .filter(|p| p.phase == PodPhase::Running && p.ip.is_some())
}

/// Addresses every ztunnel should know: running pod IPs and cluster IPs.
fn expected_addresses(state: &State) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = running(state).filter_map(|p| p.ip).collect();
    out.extend(state.services.values().filter_map(|s| s.cluster_ip));
    out
}

/// Names of policy resources the controller derives from PeerAuthentications (not compared).
const CONVERTED_POLICY_PREFIXES: &[&str] = &["istio_converted_", "converted_peer_authentication_"];

/// AuthorizationPolicies ztunnel enforces: (namespace, name) of those without targetRef(s)
/// whose action is ALLOW or DENY (the controller leaves the others to waypoints).
fn expected_policies(dir: &StateDir, state: &State) -> BTreeSet<(String, String)> {
    state
        .objects
        .values()
        .filter(|(id, _)| id.group == "security.istio.io" && id.kind == "AuthorizationPolicy")
        .filter_map(|(id, _)| {
            let path = dir.cluster_dir().join(id.file_name());
            let v: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
            let spec = v.get("spec");
            let targeted =
                spec.is_some_and(|s| s.get("targetRef").is_some() || s.get("targetRefs").is_some());
            let action = spec
                .and_then(|s| s.get("action"))
                .and_then(serde_yaml::Value::as_str)
                .unwrap_or("ALLOW");
            (!targeted && (action == "ALLOW" || action == "DENY"))
                .then(|| (id.namespace.clone().unwrap_or_default(), id.name.clone()))
        })
        .collect()
}

/// (namespace, name) of the user policies in a ztunnel config_dump.
fn dumped_policies(dump: &serde_json::Value) -> BTreeSet<(String, String)> {
    dump["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            if CONVERTED_POLICY_PREFIXES
                .iter()
                .any(|c| name.starts_with(c))
            {
                return None;
            }
            Some((p["namespace"].as_str()?.to_string(), name.to_string()))
        })
        .collect()
}

/// Waits (up to `timeout`) for enrollment and ztunnel config to match the state; returns what
/// still differs when time runs out (empty when settled).
pub fn wait(dir: &StateDir, state: &State, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let policies = expected_policies(dir, state);
    loop {
        let pending = differences(state, &policies);
        if pending.is_empty() || Instant::now() >= deadline {
            return pending;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn differences(state: &State, policies: &BTreeSet<(String, String)>) -> Vec<String> {
    let mut out = Vec::new();
    for pod in running(state) {
        let want = should_capture(state, pod);
        if is_enrolled(pod) != want {
            out.push(format!(
                "pod {} is {}enrolled in ambient (redirection {})",
                pod.id,
                if want { "not yet " } else { "still " },
                if want { "missing" } else { "present" }
            ));
        }
    }
    let addrs = expected_addresses(state);
    let mut unknown: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for node in &state.nodes {
        match ztunnel_config_dump(node) {
            Ok(dump) => {
                let text = dump.to_string();
                for ip in &addrs {
                    if !text.contains(&format!("\"{ip}\"")) {
                        unknown.entry(node.name.clone()).or_default().push(*ip);
                    }
                }
                let have = dumped_policies(&dump);
                for (ns, name) in policies.difference(&have) {
                    out.push(format!(
                        "ztunnel on {} lacks policy {ns}/{name} yet",
                        node.name
                    ));
                }
                for (ns, name) in have.difference(policies) {
                    out.push(format!(
                        "ztunnel on {} still has policy {ns}/{name}",
                        node.name
                    ));
                }
            }
            Err(e) => out.push(e.to_string()),
        }
    }
    for (node, ips) in unknown {
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        out.push(format!(
            "ztunnel on {node} does not know {} yet",
            ips.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converted_peer_authentication_policies_are_not_compared() {
        let dump = serde_json::json!({"policies": [
            {"name": "deny-legacy", "namespace": "demo"},
            {"name": "istio_converted_static_strict", "namespace": "istio-system"},
            {"name": "converted_peer_authentication_x", "namespace": "demo"},
        ]});
        let got = dumped_policies(&dump);
        assert_eq!(
            got,
            BTreeSet::from([("demo".to_string(), "deny-legacy".to_string())])
        );
    }
}
