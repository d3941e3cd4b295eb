//! Network namespaces: in shared (in-pod) mode every listener and upstream socket of a pod is
//! created inside that pod's netns, then used from any thread (a socket keeps its netns).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// Upstream sockets made per netns switch. Only `socket()` depends on the calling thread's
/// netns (bind, connect and options use the socket's own), so one switch can serve several
/// connections instead of two `setns` calls per connection.
const SPARE_BATCH: usize = 8;

/// Where sockets for one proxy are created: the process's own netns or a pod's.
#[derive(Clone, Debug)]
pub struct Netns {
    inner: Option<Arc<PodNetns>>,
}

#[derive(Debug)]
struct PodNetns {
    pod: OwnedFd,
    host: Arc<OwnedFd>,
    /// Unused TCP sockets already created in the pod netns, per address family.
    spare: Mutex<Spare>,
}

#[derive(Debug, Default)]
struct Spare {
    v4: Vec<Socket>,
    v6: Vec<Socket>,
}

/// A non-blocking, close-on-exec TCP socket in the calling thread's netns.
fn tcp_socket(ipv4: bool) -> io::Result<Socket> {
    let domain = if ipv4 { Domain::IPV4 } else { Domain::IPV6 };
    // socket2 sets SOCK_CLOEXEC on Linux at creation.
    Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

impl Netns {
    /// The netns this process runs in (dedicated mode).
    pub fn current() -> Self {
        Self { inner: None }
    }

    /// A pod's netns, given its fd (from ZDS) and the process's own netns to return to.
    pub fn pod(pod: OwnedFd, host: Arc<OwnedFd>) -> Self {
        Self {
            inner: Some(Arc::new(PodNetns {
                pod,
                host,
                spare: Mutex::new(Spare::default()),
            })),
        }
    }

    /// Opens the calling thread's netns so threads can switch back after entering a pod's.
    pub fn open_host() -> io::Result<Arc<OwnedFd>> {
        Ok(Arc::new(File::open("/proc/thread-self/ns/net")?.into()))
    }

    /// Runs `f` (which should only create sockets) inside this netns, on the calling thread.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let Some(ns) = &self.inner else {
            return f();
        };
        setns(ns.pod.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        // Failing to switch back would leave a runtime thread in a pod's netns: abort instead
        // of silently creating later sockets in the wrong place.
        if let Err(e) = setns(ns.host.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return to the host network namespace");
            std::process::abort();
        }
        result
    }

    /// A fresh non-blocking TCP socket (IPv4 or IPv6) that lives in this netns. In a pod netns
    /// sockets are made a few at a time so most calls need no netns switch.
    pub fn tcp_socket(&self, ipv4: bool) -> io::Result<Socket> {
        let Some(ns) = &self.inner else {
            return tcp_socket(ipv4);
        };
        let mut spare = ns.spare.lock().unwrap_or_else(|e| e.into_inner());
        let list = if ipv4 { &mut spare.v4 } else { &mut spare.v6 };
        if let Some(s) = list.pop() {
            return Ok(s);
        }
        let first = self.run(|| {
            let first = tcp_socket(ipv4)?;
            for _ in 1..SPARE_BATCH {
                match tcp_socket(ipv4) {
                    Ok(s) => list.push(s),
                    // Out of descriptors: hand out the one we have, keep no spares.
                    Err(_) => break,
                }
            }
            Ok(first)
        })?;
        Ok(first)
    }

    /// Spare sockets currently held (for tests).
    pub fn spare_sockets(&self) -> usize {
        self.inner.as_ref().map_or(0, |ns| {
            let spare = ns.spare.lock().unwrap_or_else(|e| e.into_inner());
            spare.v4.len() + spare.v6.len()
        })
    }

    /// True for a pod netns (shared mode).
    pub fn is_pod(&self) -> bool {
        self.inner.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::MetadataExt;

    /// Inode of the netns a socket belongs to (SIOCGSKNS hands out an fd for it).
    fn socket_netns(s: &Socket) -> u64 {
        // SAFETY: SIOCGSKNS takes no argument and returns a new fd, which we own.
        let fd = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGSKNS) };
        assert!(fd >= 0, "SIOCGSKNS: {}", io::Error::last_os_error());
        // SAFETY: the fd was just returned to us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.metadata().unwrap().ino()
    }

    fn inode(fd: &OwnedFd) -> u64 {
        File::from(fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .ino()
    }

    #[test]
    fn pod_sockets_live_in_the_pod_netns_and_are_made_in_batches() {
        if !nix::unistd::Uid::effective().is_root() {
            // CI runs as root: a skip there would hide a broken test.
            assert!(
                std::env::var_os("CI").is_none(),
                "needs root, and CI is set"
            );
            eprintln!("skipping: creating a netns needs root");
            return;
        }
        let host = Netns::open_host().unwrap();
        // A thread enters a fresh netns; its fd keeps the netns alive after the thread ends.
        let pod: OwnedFd = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            File::open("/proc/thread-self/ns/net").unwrap().into()
        })
        .join()
        .unwrap();
        let pod_inode = inode(&pod);
        let ns = Netns::pod(pod, host.clone());

        let first = ns.tcp_socket(true).unwrap();
        assert_eq!(socket_netns(&first), pod_inode);
        assert_eq!(ns.spare_sockets(), SPARE_BATCH - 1);
        let second = ns.tcp_socket(true).unwrap();
        assert_eq!(socket_netns(&second), pod_inode);
        assert_eq!(ns.spare_sockets(), SPARE_BATCH - 2);
        let v6 = ns.tcp_socket(false).unwrap();
        assert_eq!(socket_netns(&v6), pod_inode);
        // The calling thread is back in the host netns.
        let here: OwnedFd = File::open("/proc/thread-self/ns/net").unwrap().into();
        assert_eq!(inode(&here), inode(&host));
        assert_ne!(inode(&here), pod_inode);
    }

    #[test]
    fn current_netns_sockets_are_made_one_by_one() {
        let ns = Netns::current();
        let s = ns.tcp_socket(true).unwrap();
        let here: OwnedFd = File::open("/proc/thread-self/ns/net").unwrap().into();
        assert_eq!(socket_netns(&s), inode(&here));
        assert_eq!(ns.spare_sockets(), 0);
    }
}
