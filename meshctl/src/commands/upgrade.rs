//! `meshctl sandbox upgrade ztunnel`: a rolling upgrade with surge, node by node. A second
//! ztunnel starts beside the running one (admin/metrics/readiness on the other port set); the
//! node agent hands it every pod in a ZDS snapshot and it binds the in-pod listeners with
//! SO_REUSEPORT next to the old ones. Only once it is ready and listens in every enrolled pod
//! does the old one get SIGTERM, so new connections always find a listener; the old one drains
//! its open connections and exits.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use super::Session;
use super::restart::select_nodes;
use crate::cli::UpgradeArgs;
use crate::components::{self, Started};
use crate::netns;
use crate::processes::{self, ProcessRecord};
use crate::settle::is_enrolled;
use crate::state::{NodeState, NsName, PodPhase, PodState, StateDir};

/// The ports ztunnel listens on inside every enrolled pod (outbound, inbound plaintext, HBONE).
pub const INPOD_PORTS: [u16; 3] = [15001, 15006, 15008];

/// Runs `upgrade`.
pub fn run(dir: &StateDir, args: UpgradeArgs) -> anyhow::Result<()> {
    let mut s = Session::open(dir)?;
    // A rollout stops at the first node that fails; later nodes keep their ztunnel.
    for i in select_nodes(&s.state, &args.nodes)? {
        upgrade_one(&mut s, i, &args)?;
    }
    Ok(())
}

fn upgrade_one(s: &mut Session, i: usize, args: &UpgradeArgs) -> anyhow::Result<()> {
    let node = s.state.nodes[i].clone();
    let name = &node.name;
    let old = node.ztunnel.filter(ProcessRecord::alive).ok_or_else(|| {
        anyhow!(
            "ztunnel on {name} is not running; start it with `meshctl sandbox restart ztunnel --node {name}`"
        )
    })?;
    let mut next = node.clone();
    next.ztunnel_ports = node.ztunnel_ports.other();
    let p = next.ztunnel_ports;
    let busy: Vec<u16> = netns::listening_tcp_ports(&node.netns)
        .with_context(|| format!("reading listeners in {}", node.netns))?
        .into_iter()
        .filter(|l| [p.admin, p.stats, p.readiness].contains(l))
        .collect();
    if !busy.is_empty() {
        bail!(
            "ports {busy:?} in {} are taken (an earlier upgrade's ztunnel still running?)",
            node.netns
        );
    }
    let log = s.dir.log(&format!("ztunnel-{name}"));
    processes::note(
        &log,
        &format!("upgrade: starting a new ztunnel beside pid {}", old.pid),
    );
    let mut new = components::start_ztunnel(&s.dir, &s.state, &next)?;
    let took_over = take_over(&mut new, &s.state.pods, &node, args.timeout);
    let (ready, enrolled) = match took_over {
        Ok(r) => r,
        Err(e) => {
            // The old ztunnel keeps serving; the new one goes.
            processes::terminate(&[new.record], Duration::from_secs(5));
            return Err(e.context(format!(
                "new ztunnel on {name} did not take over; the old one (pid {}) keeps running",
                old.pid
            )));
        }
    };
    s.state.nodes[i].ztunnel = Some(new.record);
    s.state.nodes[i].ztunnel_ports = next.ztunnel_ports;
    s.dir.save(&s.state)?;
    println!(
        "{name}: new ztunnel pid {} ready in {:.1}s (admin :{}, metrics :{}, readiness :{}), \
         listening in {} pod(s)",
        new.record.pid,
        ready.as_secs_f64(),
        p.admin,
        p.stats,
        p.readiness,
        enrolled.len()
    );
    let unmigrated: Vec<String> = enrolled
        .iter()
        .filter(|pod| !migrates_requests(&pod.netns))
        .map(|pod| pod.id.to_string())
        .collect();
    if !unmigrated.is_empty() {
        eprintln!(
            "warning: net.ipv4.tcp_migrate_req is off in {}: connections still queued on the old \
             ztunnel's listeners when it closes them will be reset",
            unmigrated.join(", ")
        );
    }
    println!(
        "{name}: stopping old ztunnel pid {} (SIGTERM; drain timeout {:?})",
        old.pid, args.drain_timeout
    );
    processes::note(&log, &format!("upgrade: SIGTERM to old pid {}", old.pid));
    let (took, clean) = processes::stop(&old, args.drain_timeout);
    if !clean {
        bail!(
            "old ztunnel on {name} (pid {}) did not exit within {:?} of SIGTERM; killed it \
             (its open connections were cut)",
            old.pid,
            args.drain_timeout
        );
    }
    println!(
        "{name}: old ztunnel pid {} drained and exited in {:.1}s; upgraded",
        old.pid,
        took.as_secs_f64()
    );
    Ok(())
}

/// True if the kernel moves connections queued on a closing SO_REUSEPORT listener to another
/// listener of the group in this namespace (a per-namespace sysctl).
fn migrates_requests(ns: &str) -> bool {
    netns::in_netns(ns, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
    })
    .unwrap_or(false)
}

/// Waits until the new ztunnel is ready (xDS synced, ZDS snapshot received) and listens on every
/// in-pod port of every enrolled pod of the node; returns the readiness time and those pods.
fn take_over<'a>(
    new: &mut Started,
    pods: &'a BTreeMap<NsName, PodState>,
    node: &NodeState,
    timeout: Duration,
) -> anyhow::Result<(Duration, Vec<&'a PodState>)> {
    let t0 = Instant::now();
    let ready = components::wait_ready(new, timeout)?;
    let enrolled: Vec<&PodState> = pods
        .values()
        .filter(|p| p.node == node.name && p.phase == PodPhase::Running)
        .filter(|p| is_enrolled(p))
        .collect();
    loop {
        let missing = missing_listeners(new.record.pid, &enrolled);
        if missing.is_empty() {
            return Ok((ready, enrolled));
        }
        if t0.elapsed() > timeout {
            bail!(
                "new ztunnel (pid {}) is ready but does not listen in: {}",
                new.record.pid,
                missing.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `<pod> :<port>` for every in-pod port where process `pid` has no listener.
fn missing_listeners(pid: i32, pods: &[&PodState]) -> Vec<String> {
    let mine = processes::socket_inodes(pid);
    let mut out = Vec::new();
    for pod in pods {
        let listeners = netns::tcp_listeners(&pod.netns).unwrap_or_default();
        let have: BTreeSet<u16> = listeners
            .iter()
            .filter(|(_, inode)| mine.contains(inode))
            .map(|(port, _)| *port)
            .collect();
        for port in INPOD_PORTS {
            if !have.contains(&port) {
                out.push(format!("{} :{port}", pod.id));
            }
        }
    }
    out
}
