//! `meshctl sandbox restart ztunnel|agent`: SIGTERM a node component, wait for it to exit, start
//! it again with the same flags and environment and wait until it is ready, node by node.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Session;
use crate::cli::{NodeComponent, RestartArgs};
use crate::components::{self, Started};
use crate::netns;
use crate::processes::{self, ProcessRecord};
use crate::state::{NodeState, State, StateDir};

/// Runs `restart`.
pub fn run(dir: &StateDir, args: RestartArgs) -> anyhow::Result<()> {
    let mut s = Session::open(dir)?;
    for i in select_nodes(&s.state, &args.nodes)? {
        restart_one(&mut s, i, &args)?;
    }
    Ok(())
}

/// Indices of the named nodes (every node when `names` is empty), in the order given.
pub fn select_nodes(state: &State, names: &[String]) -> anyhow::Result<Vec<usize>> {
    if names.is_empty() {
        return Ok((0..state.nodes.len()).collect());
    }
    let mut out: Vec<usize> = Vec::new();
    for n in names {
        let Some(i) = state.nodes.iter().position(|x| &x.name == n) else {
            let known: Vec<&str> = state.nodes.iter().map(|x| x.name.as_str()).collect();
            bail!("unknown node {n:?} (nodes: {})", known.join(", "));
        };
        if !out.contains(&i) {
            out.push(i);
        }
    }
    Ok(out)
}

/// Starts `what` on `node` (the node's recorded ports for ztunnel).
pub fn start(
    what: NodeComponent,
    dir: &StateDir,
    state: &State,
    node: &NodeState,
) -> anyhow::Result<Started> {
    match what {
        NodeComponent::Ztunnel => components::start_ztunnel(dir, state, node),
        NodeComponent::Agent => components::start_agent(dir, state, node),
    }
}

fn record_mut(node: &mut NodeState, what: NodeComponent) -> &mut Option<ProcessRecord> {
    match what {
        NodeComponent::Ztunnel => &mut node.ztunnel,
        NodeComponent::Agent => &mut node.agent,
    }
}

fn restart_one(s: &mut Session, i: usize, args: &RestartArgs) -> anyhow::Result<()> {
    let what = args.component;
    let mut node = s.state.nodes[i].clone();
    let name = format!("{}-{}", what.name(), node.name);
    let log = s.dir.log(&name);
    let t0 = Instant::now();
    let old = record_mut(&mut node, what).filter(ProcessRecord::alive);
    let stopped = match old {
        Some(r) => {
            processes::note(&log, &format!("restart: SIGTERM to pid {}", r.pid));
            let (took, clean) = processes::stop(&r, args.drain_timeout);
            if !clean {
                eprintln!(
                    "warning: {name} (pid {}) did not exit within {:?} of SIGTERM; killed it",
                    r.pid, args.drain_timeout
                );
            }
            format!("pid {} stopped in {:.1}s", r.pid, took.as_secs_f64())
        }
        None => "was not running".to_string(),
    };
    processes::note(&log, "restart: starting again");
    let mut started = start(what, &s.dir, &s.state, &node)?;
    *record_mut(&mut s.state.nodes[i], what) = Some(started.record);
    s.dir.save(&s.state)?;
    let ready = components::wait_ready(&mut started, args.timeout)
        .with_context(|| format!("restarting {name}"))?;
    if what == NodeComponent::Agent && node.ztunnel.is_some_and(|z| z.alive()) {
        let left = args.timeout.saturating_sub(t0.elapsed());
        wait_zds_connection(&s.dir, &node, left)?;
    }
    println!(
        "{}: {} restarted: {stopped}; pid {} ready in {:.1}s (down for {:.1}s)",
        node.name,
        what.name(),
        started.record.pid,
        ready.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until ztunnel has (re)connected to the node agent's ZDS socket (ztunnel retries with
/// a backoff of up to 5s), so the node can enroll pods again when this returns.
fn wait_zds_connection(dir: &StateDir, node: &NodeState, timeout: Duration) -> anyhow::Result<()> {
    let sock = dir.ztunnel_socket(&node.name);
    let deadline = Instant::now() + timeout;
    loop {
        if netns::unix_connections(&node.netns, &sock).unwrap_or(0) > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "ztunnel on {} did not reconnect to the node agent ({}) within {timeout:?}",
                node.name,
                sock.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::plan_node;

    #[test]
    fn nodes_are_selected_by_name_or_all() {
        let mut state = State::new("/b".into(), "/c".into(), "info".into());
        state.nodes = vec![plan_node(0), plan_node(1), plan_node(2)];
        assert_eq!(select_nodes(&state, &[]).unwrap(), [0, 1, 2]);
        let names = ["node2".to_string(), "node0".into(), "node2".into()];
        assert_eq!(select_nodes(&state, &names).unwrap(), [2, 0]);
        let err = select_nodes(&state, &["node7".to_string()]).unwrap_err();
        assert!(err.to_string().contains("node0, node1, node2"), "{err}");
    }
}
