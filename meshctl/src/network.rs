//! The sandbox's address plan and topology: an underlay bridge in its own namespace, the
//! control plane and every node attached to it by veth pairs, and routes between the nodes'
//! pod subnets. Everything lives inside `msb-*` namespaces; the host's network is untouched.

use std::net::Ipv4Addr;

use crate::ids::fnv64;
use crate::netns;
use crate::state::NodeState;

/// Namespace holding the underlay bridge.
pub const UNDERLAY_NETNS: &str = "msb-underlay";
/// The underlay bridge.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Namespace of the controller.
pub const CONTROL_PLANE_NETNS: &str = "msb-cp";
/// The controller's address.
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);
/// Prefix length of the underlay subnet 172.30.0.0/24.
pub const UNDERLAY_PREFIX: u8 = 24;
/// Interface name of the underlay link inside the control plane and node namespaces.
pub const UPLINK: &str = "eth0";
/// Bridge the CNI bridge plugin creates in every node for its pods.
pub const POD_BRIDGE: &str = "cni0";

/// Name of node `i`.
pub fn node_name(i: u8) -> String {
    format!("node{i}")
}

/// Namespace of node `i`.
pub fn node_netns(i: u8) -> String {
    format!("msb-node{i}")
}

/// Underlay address of node `i`.
pub fn node_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 10 + i)
}

/// Pod subnet (a /24) of node `i`.
pub fn pod_subnet(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 0)
}

/// The state of node `i` before anything runs on it.
pub fn plan_node(i: u8) -> NodeState {
    NodeState {
        name: node_name(i),
        index: i,
        netns: node_netns(i),
        ip: node_ip(i),
        pod_subnet: pod_subnet(i),
        agent: None,
        ztunnel: None,
        ztunnel_ports: Default::default(),
    }
}

/// Namespace of a pod: `msb-<node>-<8 hex digits of its uid>` (a recreated pod gets a new one).
pub fn pod_netns(node: &str, uid: &str) -> String {
    format!("msb-{node}-{:08x}", fnv64(uid.as_bytes()) as u32)
}

/// Creates the underlay namespace and its bridge.
pub fn create_underlay() -> anyhow::Result<()> {
    netns::add(UNDERLAY_NETNS)?;
    netns::ip(&[
        "-n",
        UNDERLAY_NETNS,
        "link",
        "add",
        UNDERLAY_BRIDGE,
        "type",
        "bridge",
    ])?;
    netns::ip(&["-n", UNDERLAY_NETNS, "link", "set", UNDERLAY_BRIDGE, "up"])
}

/// Connects namespace `ns` to the underlay bridge: a veth `port` on the bridge side and
/// [`UPLINK`] with `addr`/24 inside `ns`.
pub fn attach(ns: &str, port: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
    netns::ip(&[
        "-n",
        UNDERLAY_NETNS,
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        UPLINK,
        "netns",
        ns,
    ])?;
    netns::ip(&[
        "-n",
        UNDERLAY_NETNS,
        "link",
        "set",
        port,
        "master",
        UNDERLAY_BRIDGE,
        "up",
    ])?;
    let cidr = format!("{addr}/{UNDERLAY_PREFIX}");
    netns::ip(&["-n", ns, "addr", "add", &cidr, "dev", UPLINK])?;
    netns::ip(&["-n", ns, "link", "set", UPLINK, "up"])
}

/// Creates the control plane namespace on the underlay.
pub fn create_control_plane() -> anyhow::Result<()> {
    netns::add(CONTROL_PLANE_NETNS)?;
    attach(CONTROL_PLANE_NETNS, "veth-cp", CONTROLLER_IP)
}

/// Routes node `me` needs: every other node's pod subnet via that node.
pub fn node_routes(me: &NodeState, all: &[NodeState]) -> Vec<(String, Ipv4Addr)> {
    all.iter()
        .filter(|n| n.name != me.name)
        .map(|n| (format!("{}/24", n.pod_subnet), n.ip))
        .collect()
}

/// Creates a node namespace: underlay link, forwarding, routes to the other nodes' pods.
pub fn create_node(node: &NodeState, all: &[NodeState]) -> anyhow::Result<()> {
    netns::add(&node.netns)?;
    attach(&node.netns, &format!("veth-{}", node.name), node.ip)?;
    netns::sysctl(&node.netns, "net/ipv4/ip_forward", "1")?;
    for (dst, via) in node_routes(node, all) {
        netns::ip(&[
            "-n",
            &node.netns,
            "route",
            "add",
            &dst,
            "via",
            &via.to_string(),
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_route_to_every_other_pod_subnet() {
        let all: Vec<NodeState> = (0..3).map(plan_node).collect();
        let r = node_routes(&all[1], &all);
        assert_eq!(
            r,
            vec![
                ("10.244.0.0/24".to_string(), Ipv4Addr::new(172, 30, 0, 10)),
                ("10.244.2.0/24".to_string(), Ipv4Addr::new(172, 30, 0, 12)),
            ]
        );
    }

    #[test]
    fn pod_netns_names_are_short_and_per_uid() {
        let a = pod_netns("node0", "uid-a");
        assert!(a.starts_with("msb-node0-"));
        assert_eq!(a.len(), "msb-node0-".len() + 8);
        assert_ne!(a, pod_netns("node0", "uid-b"));
    }
}
