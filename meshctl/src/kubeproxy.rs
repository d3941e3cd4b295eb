//! A minimal kube-proxy for pods outside the mesh: in every node namespace an nft table
//! `ip msb-kubeproxy` DNATs Service VIP:port to a random ready endpoint. Ambient pods never hit
//! it (ztunnel resolves VIPs inside the pod). Same-node hairpin connections are masqueraded so
//! replies come back through the node and get un-DNATed.

use std::process::Command;

use crate::netns;
use crate::services::endpoints;
use crate::state::{NodeState, Protocol, State, StateDir};

/// The nft table (family ip).
pub const TABLE: &str = "msb-kubeproxy";

/// The nft script for `node`: replaces the whole table atomically.
pub fn render(node: &NodeState, state: &State) -> String {
    let mut rules = String::new();
    let mut chains = String::new();
    let mut next = 0usize;
    for svc in state.services.values() {
        let Some(vip) = svc.cluster_ip else {
            continue;
        };
        for port in &svc.ports {
            if port.protocol == Protocol::Sctp {
                continue;
            }
            let eps = endpoints(svc, port, state.pods.values());
            if eps.is_empty() {
                continue;
            }
            let mut targets = Vec::new();
            for (i, (ip, p)) in eps.iter().enumerate() {
                let chain = format!("ep{next}");
                next += 1;
                chains.push_str(&format!(
                    "\tchain {chain} {{\n\t\tmeta l4proto {} dnat to {ip}:{p}\n\t}}\n",
                    port.protocol.nft()
                ));
                targets.push(format!("{i} : jump {chain}"));
            }
            rules.push_str(&format!(
                "\t\tip daddr {vip} {} dport {} numgen random mod {} vmap {{ {} }} comment \"{}:{}\"\n",
                port.protocol.nft(),
                port.port,
                eps.len(),
                targets.join(", "),
                svc.id,
                port.port,
            ));
        }
    }
    let subnet = format!("{}/24", node.pod_subnet);
    format!(
        "# Written by meshctl sandbox: Service VIPs for pods outside the mesh.\n\
         table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         {rules}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tct status dnat ip saddr {subnet} ip daddr {subnet} masquerade\n\
         \t}}\n\
         {chains}\
         }}\n"
    )
}

/// Writes and loads the table in every node.
pub fn refresh_all(dir: &StateDir, state: &State) -> anyhow::Result<()> {
    for node in &state.nodes {
        let script = render(node, state);
        let path = dir.kubeproxy_script(&node.name);
        std::fs::write(&path, &script)?;
        netns::run(
            Command::new("ip")
                .args(["netns", "exec", &node.netns, "nft", "-f"])
                .arg(&path),
        )?;
    }
    Ok(())
}

/// The VIP a rule line is for (used by tests).
#[cfg(test)]
fn vips(script: &str) -> Vec<std::net::Ipv4Addr> {
    script
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("ip daddr ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::plan_node;
    use crate::state::{NsName, PodPhase, PodState, ServicePortState, ServiceState, TargetPort};
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    fn pod(name: &str, ip: Ipv4Addr) -> PodState {
        PodState {
            id: NsName::new("demo", name),
            uid: name.into(),
            node: "node0".into(),
            netns: "n".into(),
            container_id: "c".into(),
            ip: Some(ip),
            phase: PodPhase::Running,
            owner: None,
            spec_hash: String::new(),
            meta_hash: String::new(),
            labels: BTreeMap::from([("app".into(), "echo".into())]),
            annotations: BTreeMap::new(),
            service_account: "default".into(),
            named_ports: BTreeMap::from([("http".into(), 8080)]),
            tcp_ports: vec![],
            spec: Default::default(),
            containers: vec![],
        }
    }

    #[test]
    fn renders_random_dnat_over_ready_endpoints_and_hairpin_masquerade() {
        let mut state = State::new("/b".into(), "/c".into(), "info".into());
        for (n, ip) in [("a", [10, 244, 0, 2]), ("b", [10, 244, 1, 3])] {
            let p = pod(n, Ipv4Addr::from(ip));
            state.pods.insert(p.id.clone(), p);
        }
        let svc = ServiceState {
            id: NsName::new("demo", "echo"),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            selector: Some(BTreeMap::from([("app".into(), "echo".into())])),
            ports: vec![ServicePortState {
                name: None,
                protocol: Protocol::Tcp,
                port: 80,
                target: TargetPort::Name("http".into()),
            }],
            hash: String::new(),
        };
        state.services.insert(svc.id.clone(), svc);
        let empty = ServiceState {
            id: NsName::new("demo", "none"),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 11)),
            selector: Some(BTreeMap::from([("app".into(), "nobody".into())])),
            ports: vec![],
            hash: String::new(),
        };
        state.services.insert(empty.id.clone(), empty);
        let text = render(&plan_node(0), &state);
        assert!(
            text.contains(
                "ip daddr 10.96.0.10 tcp dport 80 numgen random mod 2 vmap { 0 : jump ep0, 1 : jump ep1 }"
            ),
            "{text}"
        );
        assert!(
            text.contains("chain ep0 {\n\t\tmeta l4proto tcp dnat to 10.244.0.2:8080\n"),
            "{text}"
        );
        assert!(
            text.contains("chain ep1 {\n\t\tmeta l4proto tcp dnat to 10.244.1.3:8080\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "ct status dnat ip saddr 10.244.0.0/24 ip daddr 10.244.0.0/24 masquerade"
            ),
            "{text}"
        );
        assert_eq!(vips(&text), vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert!(text.starts_with("# Written"));
        assert!(text.contains("delete table ip msb-kubeproxy\n"));
    }
}
