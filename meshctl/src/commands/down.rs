//! `meshctl sandbox down`: stops every process and removes every namespace and file the
//! sandbox created — from state.json when it is there, and by sweeping `msb-*` namespaces and
//! the processes inside them, so it also cleans up after a crashed `up`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::bail;
use nix::fcntl::{Flock, FlockArg};

use super::require_root;
use crate::cli::DownArgs;
use crate::netns;
use crate::processes::{self, ProcessRecord};
use crate::state::{State, StateDir, StateError};

/// Entries of the state directory the sandbox creates (nothing else is removed).
const OWNED_ENTRIES: &[&str] = &[
    "state.json",
    ".state.json.tmp",
    "cluster",
    "ca",
    "node-tokens.yaml",
    "tokens",
    "run",
    "logs",
    "lock",
];

/// Removes eBPF pins the node agents left (eBPF mode; the agents are gone, so nobody else
/// would). Their programs detach as the pins go.
fn remove_bpf_pins() {
    let Ok(entries) = std::fs::read_dir(ebpf::DEFAULT_PIN_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let ours = entry
            .file_name()
            .to_string_lossy()
            .starts_with(crate::components::SANDBOX_PIN_PREFIX);
        if ours {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `down`.
pub fn run(dir: &StateDir, args: DownArgs) -> anyhow::Result<()> {
    require_root()?;
    // A hung command must not keep `down` from cleaning up: try the lock, don't wait for it.
    let _lock = std::fs::File::options()
        .write(true)
        .open(dir.lock_file())
        .ok()
        .and_then(|f| match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Some(l),
            Err(_) => {
                eprintln!(
                    "warning: another meshctl sandbox command is running; cleaning up anyway"
                );
                None
            }
        });
    let state = match dir.load() {
        Ok(s) => Some(s),
        Err(StateError::NotRunning(_)) => None,
        Err(e) => {
            eprintln!("warning: {e}; sweeping by namespace names instead");
            None
        }
    };
    let mut stopped = 0usize;
    if let Some(s) = &state {
        // Pods first (graceful), then the mesh components.
        let pods: Vec<ProcessRecord> = s
            .pods
            .values()
            .flat_map(|p| p.containers.iter().filter_map(|c| c.process))
            .filter(ProcessRecord::alive)
            .collect();
        stopped += pods.len();
        processes::terminate(&pods, Duration::from_secs(5));
        let comps: Vec<ProcessRecord> = s
            .nodes
            .iter()
            .flat_map(|n| [n.ztunnel, n.agent])
            .chain([s.controller])
            .flatten()
            .filter(ProcessRecord::alive)
            .collect();
        stopped += comps.len();
        processes::terminate(&comps, Duration::from_secs(5));
    }
    let names = namespaces(state.as_ref());
    stopped += sweep(&names);
    for n in names.iter().rev() {
        netns::delete(n);
    }
    for d in netns::our_etc_dirs() {
        let _ = std::fs::remove_dir_all(d);
    }
    // Only succeeds if empty, i.e. nothing but the sandbox used it.
    let _ = std::fs::remove_dir("/etc/netns");
    remove_bpf_pins();
    remove_files(dir, args.keep_logs);
    let left = netns::ours();
    println!(
        "Sandbox down: stopped {stopped} process(es), removed {} network namespace(s){}",
        names.len(),
        if args.keep_logs {
            format!("; logs kept in {}", dir.logs_dir().display())
        } else {
            format!("; removed {}", dir.root().display())
        }
    );
    if !left.is_empty() {
        bail!("could not remove network namespaces: {}", left.join(", "));
    }
    Ok(())
}

/// Every namespace to remove: recorded ones and any `msb-*` that exists.
fn namespaces(state: Option<&State>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    if let Some(s) = state {
        names.extend(s.netns.iter().cloned());
        names.extend(s.pods.values().map(|p| p.netns.clone()));
    }
    for n in netns::ours() {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    // Pods before nodes before the underlay: delete in reverse of this order.
    names.sort_by_key(|n| {
        (
            match n.as_str() {
                crate::network::UNDERLAY_NETNS => 0,
                crate::network::CONTROL_PLANE_NETNS => 1,
                n if n.matches('-').count() == 1 => 2,
                _ => 3,
            },
            n.clone(),
        )
    });
    names
}

/// Kills every process still inside one of the namespaces; returns how many.
fn sweep(names: &[String]) -> usize {
    let inodes: BTreeSet<u64> = names
        .iter()
        .filter_map(|n| processes::netns_inode(&netns::path(n)))
        .collect();
    if inodes.is_empty() {
        return 0;
    }
    let mut total = 0;
    // Processes may fork while being stopped; a few rounds catch them.
    for _ in 0..3 {
        let found = processes::processes_in_netns(&inodes);
        if found.is_empty() {
            break;
        }
        total += found.len();
        processes::terminate(&found, Duration::from_secs(3));
    }
    total
}

/// Removes what the sandbox put in its state directory, then the directory if empty.
fn remove_files(dir: &StateDir, keep_logs: bool) {
    for entry in OWNED_ENTRIES {
        if keep_logs && *entry == "logs" {
            continue;
        }
        let p = dir.root().join(entry);
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(&p);
        } else if p.exists() {
            let _ = std::fs::remove_file(&p);
        }
    }
    let _ = std::fs::remove_dir(dir.root());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_ordered_underlay_first_pods_last() {
        let mut s = State::new("/b".into(), "/c".into(), "info".into());
        for n in [
            "msb-node0-abcd1234",
            "msb-node1",
            "msb-underlay",
            "msb-cp",
            "msb-node0",
        ] {
            s.remember_netns(n);
        }
        let names = namespaces(Some(&s));
        let ours: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| s.netns.iter().any(|x| x == n))
            .collect();
        assert_eq!(
            ours,
            [
                "msb-underlay",
                "msb-cp",
                "msb-node0",
                "msb-node1",
                "msb-node0-abcd1234"
            ]
        );
    }
}
