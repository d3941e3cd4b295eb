//! Shared (in-pod) mode: the node agent hands us each ambient pod's netns over ZDS and we run a
//! proxy inside it. Proxies outlive the ZDS connection: if the agent restarts, traffic keeps
//! flowing and the new snapshot reconciles what runs.

pub mod zds;

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xds::istio::workload::zds::{
    Ack, WorkloadRequest, WorkloadResponse, workload_request::Payload, workload_response,
};

use crate::netns::Netns;
use crate::proxy::{Proxy, Shared, WorkloadInfo};
use crate::readiness::ReadyGuard;
use zds::{ZdsConnection, ZdsError};

/// A running per-pod proxy.
struct Running {
    info: WorkloadInfo,
    /// Which network namespace it serves.
    netns: Option<NetnsId>,
    drain: CancellationToken,
}

/// Identity of a network namespace: the (device, inode) of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NetnsId(u64, u64);

impl NetnsId {
    fn of(fd: &OwnedFd) -> Option<Self> {
        nix::sys::stat::fstat(fd)
            .ok()
            .map(|st| Self(st.st_dev, st.st_ino))
    }
}

/// Starts and stops per-pod proxies as the node agent asks.
pub struct InpodManager {
    shared: Shared,
    uds: PathBuf,
    /// Where the node agent pins pods' eBPF redirection.
    bpf_pin_root: PathBuf,
    host_netns: Arc<OwnedFd>,
    proxies: HashMap<String, Running>,
    tasks: TaskTracker,
}

impl InpodManager {
    /// A manager connecting to the node agent at `uds`.
    pub fn new(
        shared: Shared,
        uds: PathBuf,
        bpf_pin_root: PathBuf,
        host_netns: Arc<OwnedFd>,
    ) -> Self {
        Self {
            shared,
            uds,
            bpf_pin_root,
            host_netns,
            proxies: HashMap::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Serves ZDS until `drain` is cancelled, then drains every proxy and waits for them.
    pub async fn run(mut self, drain: CancellationToken, mut ready: Option<ReadyGuard>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = tokio::select! {
                r = self.serve_connection(&mut ready, &mut backoff) => r,
                _ = drain.cancelled() => break,
            };
            match result {
                Err(ZdsError::Closed) => tracing::info!("node agent closed the ZDS connection"),
                Err(e) => {
                    tracing::warn!(error = %e, uds = %self.uds.display(), "ZDS connection failed")
                }
                Ok(()) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = drain.cancelled() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        tracing::info!(proxies = self.proxies.len(), "draining in-pod proxies");
        for (_, p) in self.proxies.drain() {
            p.drain.cancel();
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn serve_connection(
        &mut self,
        ready: &mut Option<ReadyGuard>,
        backoff: &mut Duration,
    ) -> Result<(), ZdsError> {
        let conn = ZdsConnection::connect(&self.uds).await?;
        conn.send_hello().await?;
        *backoff = Duration::from_millis(100);
        tracing::info!(uds = %self.uds.display(), "connected to node agent");
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            let (req, fd) = conn.recv().await?;
            let error = self.apply(req, fd, &mut seen, ready);
            if let Some(e) = &error {
                tracing::warn!(error = %e, "ZDS request failed");
            }
            let resp = WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(Ack {
                    error: error.unwrap_or_default(),
                })),
            };
            conn.send_response(&resp).await?;
        }
    }

    /// Applies one request; returns the error to report in the ack.
    fn apply(
        &mut self,
        req: WorkloadRequest,
        fd: Option<OwnedFd>,
        seen: &mut HashSet<String>,
        ready: &mut Option<ReadyGuard>,
    ) -> Option<String> {
        match req.payload {
            Some(Payload::Add(add)) => {
                let Some(fd) = fd else {
                    return Some(format!("add {}: no netns fd attached", add.uid));
                };
                let Some(info) = add.workload_info.filter(|i| !i.name.is_empty()) else {
                    return Some(format!("add {}: missing workload_info", add.uid));
                };
                seen.insert(add.uid.clone());
                let info = WorkloadInfo {
                    name: info.name,
                    namespace: info.namespace,
                    service_account: if info.service_account.is_empty() {
                        "default".into()
                    } else {
                        info.service_account
                    },
                };
                if let Some(running) = self.proxies.get(&add.uid) {
                    if running.info == info && running.netns == NetnsId::of(&fd) {
                        // Already serving it (the agent restarted): keep the existing listeners.
                        return None;
                    }
                    // Different workload info, or a new sandbox for the same pod (the runtime
                    // recreated its netns): serve the netns we were just given.
                    tracing::info!(uid = %add.uid, "pod changed or got a new netns; restarting its proxy");
                    self.stop(&add.uid);
                }
                self.start(add.uid, info, fd).err()
            }
            Some(Payload::Keep(keep)) => {
                seen.insert(keep.uid.clone());
                (!self.proxies.contains_key(&keep.uid))
                    .then(|| format!("keep {}: not running here", keep.uid))
            }
            Some(Payload::Del(del)) => {
                seen.remove(&del.uid);
                self.stop(&del.uid);
                None
            }
            Some(Payload::SnapshotSent(_)) => {
                let stale: Vec<String> = self
                    .proxies
                    .keys()
                    .filter(|uid| !seen.contains(*uid))
                    .cloned()
                    .collect();
                for uid in stale {
                    tracing::info!(%uid, "pod not in the node agent's snapshot; stopping its proxy");
                    self.stop(&uid);
                }
                if let Some(r) = ready.take() {
                    r.ready();
                }
                None
            }
            None => Some("empty request".into()),
        }
    }

    fn start(&mut self, uid: String, info: WorkloadInfo, fd: OwnedFd) -> Result<(), String> {
        let netns_id = NetnsId::of(&fd);
        let netns = Netns::pod(fd, self.host_netns.clone());
        let proxy = Proxy::bind(self.shared.clone(), info.clone(), netns)
            .map_err(|e| format!("add {uid}: binding listeners in the pod netns: {e}"))?;
        // eBPF mode: the pod's programs steer to whatever listeners are registered, so a pod
        // whose registration fails must not be reported as enrolled.
        if let Ok(pins) = ebpf::PodRedirection::new(&self.bpf_pin_root, &uid)
            && pins.is_installed()
        {
            proxy.register_redirection(&pins).map_err(|e| {
                format!("add {uid}: registering listeners for eBPF redirection: {e}")
            })?;
            tracing::info!(%uid, "listeners registered for eBPF redirection");
        }
        let drain = CancellationToken::new();
        self.tasks.spawn(proxy.run(drain.clone()));
        tracing::info!(%uid, workload = ?info, "pod enrolled");
        self.proxies.insert(
            uid,
            Running {
                info,
                netns: netns_id,
                drain,
            },
        );
        Ok(())
    }

    fn stop(&mut self, uid: &str) {
        if let Some(p) = self.proxies.remove(uid) {
            tracing::info!(%uid, workload = ?p.info, "pod removed; draining its proxy");
            p.drain.cancel();
            // Stop rotating a certificate no pod on this node uses any more (the CA would
            // refuse it anyway once the pod is gone).
            let same_identity = |i: &WorkloadInfo| {
                i.namespace == p.info.namespace && i.service_account == p.info.service_account
            };
            if !self.proxies.values().any(|r| same_identity(&r.info)) {
                let id = hbone::Identity::new(
                    self.shared.config.trust_domain.clone(),
                    p.info.namespace.clone(),
                    p.info.service_account.clone(),
                );
                self.shared.certs.forget(&id);
            }
        }
    }
}
