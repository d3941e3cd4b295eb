//! Finding pod network namespaces.
//!
//! The CNI plugin tells the agent each pod's netns path at ADD. For pods that were running
//! before the agent learned of them (agent installed later, label added later, state lost), the
//! agent scans candidate namespaces (`/var/run/netns/*`, `/proc/*/ns/net`) for one holding the
//! pod's IP, as a container runtime's own namespace would.

use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Directories where runtimes (and `ip netns`) bind-mount named namespaces.
const NAMED_NETNS_DIRS: &[&str] = &["/var/run/netns", "/run/netns"];

/// An open pod netns and the path it was opened from.
#[derive(Debug)]
pub struct PodNetns {
    /// Path (CNI_NETNS or the scanned path).
    pub path: PathBuf,
    /// The open namespace; holding it keeps the namespace alive.
    pub file: File,
}

/// Opens `path` and checks it is a network namespace.
pub fn open(path: &Path) -> std::io::Result<PodNetns> {
    let file = File::open(path)?;
    // A netns file lives on nsfs; opening something else (a stale plain file) is a mistake.
    let own = File::open("/proc/self/ns/net")?;
    if file.metadata()?.dev() != own.metadata()?.dev() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a network namespace", path.display()),
        ));
    }
    Ok(PodNetns {
        path: path.to_path_buf(),
        file,
    })
}

/// Searches the node for the network namespace that holds one of `ips` on a non-loopback
/// interface. Blocking (enters namespaces on a throw-away thread); call via `spawn_blocking`.
pub fn find_by_ip(ips: &[IpAddr]) -> Option<PodNetns> {
    if ips.is_empty() {
        return None;
    }
    let own_ino = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
    let candidates = candidates(own_ino);
    let wanted: HashSet<IpAddr> = ips.iter().copied().collect();
    // setns changes the calling thread's namespace; do it on a thread that dies afterwards.
    let found = std::thread::spawn(move || {
        for path in candidates {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if setns(file.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                continue;
            }
            if holds_any(&wanted) {
                return Some(path);
            }
        }
        None
    })
    .join()
    .ok()
    .flatten()?;
    open(&found).ok()
}

/// Named namespaces first (what runtimes use), then every process's, deduplicated by inode and
/// skipping the agent's own.
fn candidates(own_ino: u64) -> Vec<PathBuf> {
    let mut seen = HashSet::from([own_ino]);
    let mut out = Vec::new();
    let mut consider = |p: PathBuf| {
        if let Ok(m) = std::fs::metadata(&p)
            && seen.insert(m.ino())
        {
            out.push(p);
        }
    };
    for dir in NAMED_NETNS_DIRS {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                consider(e.path());
            }
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for e in procs.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                consider(e.path().join("ns/net"));
            }
        }
    }
    out
}

/// True if the current thread's netns has one of `ips` on an interface.
fn holds_any(ips: &HashSet<IpAddr>) -> bool {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs.into_iter().any(|a| {
        let Some(addr) = a.address else {
            return false;
        };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            return false;
        };
        ips.contains(&ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_regular_file_as_netns_is_refused() {
        let err = open(Path::new("/etc/hostname")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn own_namespace_is_never_a_scan_candidate() {
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let cands = candidates(own);
        assert!(
            cands
                .iter()
                .all(|p| std::fs::metadata(p).map(|m| m.ino()).ok() != Some(own))
        );
        assert!(find_by_ip(&[]).is_none());
    }
}
