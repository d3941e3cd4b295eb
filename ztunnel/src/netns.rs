//! Network namespaces: in shared (in-pod) mode every listener and upstream socket of a pod is
//! created inside that pod's netns, then used from any thread (a socket keeps its netns).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sched::{CloneFlags, setns};

/// Where sockets for one proxy are created: the process's own netns or a pod's.
#[derive(Clone, Debug)]
pub struct Netns {
    inner: Option<Arc<PodNetns>>,
}

#[derive(Debug)]
struct PodNetns {
    pod: OwnedFd,
    host: Arc<OwnedFd>,
}

impl Netns {
    /// The netns this process runs in (dedicated mode).
    pub fn current() -> Self {
        Self { inner: None }
    }

    /// A pod's netns, given its fd (from ZDS) and the process's own netns to return to.
    pub fn pod(pod: OwnedFd, host: Arc<OwnedFd>) -> Self {
        Self {
            inner: Some(Arc::new(PodNetns { pod, host })),
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

    /// True for a pod netns (shared mode).
    pub fn is_pod(&self) -> bool {
        self.inner.is_some()
    }
}
