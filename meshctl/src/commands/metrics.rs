//! `meshctl sandbox metrics`: a component's Prometheus metrics, fetched from inside its network
//! namespace (ztunnel's from wherever the node's current ztunnel serves them).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{load_running, require_root};
use crate::cli::MetricsArgs;
use crate::components::{AGENT_MONITORING_PORT, CONTROLLER_MONITORING_PORT, ztunnel_get};
use crate::netns;
use crate::network::{CONTROL_PLANE_NETNS, CONTROLLER_IP};
use crate::state::{NodeState, State, StateDir};

/// Where one component's metrics come from.
#[derive(Debug, PartialEq)]
enum Source<'a> {
    Controller,
    Agent(&'a NodeState),
    Ztunnel(&'a NodeState),
}

/// Runs `metrics`.
pub fn run(dir: &StateDir, args: MetricsArgs) -> anyhow::Result<()> {
    require_root()?;
    let state = load_running(dir)?;
    let sources = resolve(&state, &args.component)?;
    let labelled = sources.len() > 1;
    for src in sources {
        let text = fetch(&src)?;
        if labelled && let Source::Agent(n) | Source::Ztunnel(n) = src {
            println!("# node {}", n.name);
        }
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

fn resolve<'a>(state: &'a State, component: &str) -> anyhow::Result<Vec<Source<'a>>> {
    let nodes = &state.nodes;
    let out = match component {
        "controller" => vec![Source::Controller],
        "agent" => nodes.iter().map(Source::Agent).collect(),
        "ztunnel" => nodes.iter().map(Source::Ztunnel).collect(),
        c => {
            let node = |prefix: &str| {
                c.strip_prefix(prefix)
                    .and_then(|n| nodes.iter().find(|x| x.name == n))
            };
            match (node("agent-"), node("ztunnel-")) {
                (Some(n), _) => vec![Source::Agent(n)],
                (_, Some(n)) => vec![Source::Ztunnel(n)],
                _ => {
                    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
                    bail!(
                        "unknown component {c:?}: use controller, agent[-<node>] or \
                         ztunnel[-<node>] (nodes: {})",
                        names.join(", ")
                    );
                }
            }
        }
    };
    Ok(out)
}

fn fetch(src: &Source<'_>) -> anyhow::Result<String> {
    let (ns, addr, what) = match src {
        Source::Ztunnel(n) => return ztunnel_get(n, "/metrics"),
        Source::Controller => (
            CONTROL_PLANE_NETNS.to_string(),
            SocketAddr::from((CONTROLLER_IP, CONTROLLER_MONITORING_PORT)),
            "controller".to_string(),
        ),
        Source::Agent(n) => (
            n.netns.clone(),
            SocketAddr::from(([127, 0, 0, 1], AGENT_MONITORING_PORT)),
            format!("agent on {}", n.name),
        ),
    };
    let (status, body) = netns::http_get(&ns, addr, "/metrics", Duration::from_secs(5))
        .with_context(|| format!("GET http://{addr}/metrics ({what}, in {ns})"))?;
    if status != 200 {
        bail!("{what} answered {status} for /metrics");
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::plan_node;

    #[test]
    fn components_resolve_per_node_or_for_all_nodes() {
        let mut state = State::new("/b".into(), "/c".into(), "info".into());
        state.nodes = vec![plan_node(0), plan_node(1)];
        assert_eq!(resolve(&state, "controller").unwrap(), [Source::Controller]);
        assert_eq!(
            resolve(&state, "ztunnel-node1").unwrap(),
            [Source::Ztunnel(&state.nodes[1])]
        );
        assert_eq!(resolve(&state, "agent").unwrap().len(), 2);
        assert!(resolve(&state, "ztunnel-node5").is_err());
        assert!(resolve(&state, "cni-node0").is_err());
    }
}
