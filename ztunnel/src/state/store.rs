//! Shared, versioned access to the proxy state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use serde_json::json;
use tokio::sync::watch;

use super::ids::NamespacedHostname;
use super::proxy_state::ProxyState;
use super::service::Service;
use super::workload::Workload;
use crate::rbac::Authorization;

/// Cloneable handle to the state shared by xDS, the proxies and the admin server.
///
/// Locks are synchronous and short; never hold a guard across an `.await`.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: RwLock<ProxyState>,
    version: watch::Sender<u64>,
    // Per-service round-robin cursors; kept outside ProxyState so picking needs only a read lock.
    cursors: Mutex<HashMap<NamespacedHostname, usize>>,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::new(ProxyState::new())
    }
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// Wraps an initial state (version 0).
    pub fn new(state: ProxyState) -> Self {
        let (version, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                version,
                cursors: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Read access to the state. Drop the guard before awaiting.
    pub fn read(&self) -> RwLockReadGuard<'_, ProxyState> {
        // A panic while writing leaves the maps consistent enough to keep serving.
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Mutates the state and bumps the version so watchers re-evaluate (e.g. RBAC re-checks).
    pub fn update<R>(&self, f: impl FnOnce(&mut ProxyState) -> R) -> R {
        let (out, services) = {
            let mut guard = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
            let out = f(&mut guard);
            (out, guard.counts().1)
        };
        self.prune_cursors(services);
        self.inner.version.send_modify(|v| *v = v.wrapping_add(1));
        out
    }

    /// Current version (incremented by every `update`).
    pub fn version(&self) -> u64 {
        *self.inner.version.borrow()
    }

    /// A receiver that sees the version change after every `update`.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Picks a healthy endpoint of `svc` for `service_port`, round robin, and the port to dial.
    ///
    /// An endpoint qualifies if it has its own mapping for the port or the service declares the
    /// port. The target port is the workload's mapping, else the service's, else `service_port`
    /// (a 0 at either level means "not specified").
    pub fn pick_endpoint(&self, svc: &Service, service_port: u16) -> Option<(Arc<Workload>, u16)> {
        let key = svc.key();
        let svc_mapping = svc.port(service_port);
        let candidates: Vec<(Arc<Workload>, u16)> = self
            .read()
            .endpoints(&key)
            .into_iter()
            .filter(|w| w.is_healthy())
            .filter_map(|w| {
                let own = w.port_mapping(&key, service_port);
                if own.is_none() && svc_mapping.is_none() {
                    return None;
                }
                let target = [own, svc_mapping]
                    .into_iter()
                    .flatten()
                    .map(|m| m.target_port)
                    .find(|p| *p != 0)
                    .unwrap_or(service_port);
                Some((w, target))
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let idx = {
            let mut cursors = self.inner.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let cursor = cursors.entry(key).or_insert(0);
            let idx = *cursor % candidates.len();
            *cursor = cursor.wrapping_add(1);
            idx
        };
        candidates.into_iter().nth(idx)
    }

    /// JSON snapshot `{workloads, services, policies}` for the admin `/config_dump`, sorted by key.
    pub fn dump(&self) -> serde_json::Value {
        let state = self.read();
        let mut workloads: Vec<&Workload> = state.workloads().map(|w| &**w).collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<&Service> = state.services().map(|s| &**s).collect();
        services.sort_by_key(|s| s.key());
        let mut policies: Vec<&Authorization> = state.policies().map(|p| &**p).collect();
        policies.sort_by_key(|p| p.key());
        json!({
            "workloads": workloads,
            "services": services,
            "policies": policies,
        })
    }

    // Cursors of removed services would otherwise accumulate; prune lazily so a busy xDS stream
    // does not pay a full scan on every update.
    fn prune_cursors(&self, services: usize) {
        let mut cursors = self.inner.cursors.lock().unwrap_or_else(|e| e.into_inner());
        if cursors.len() <= 2 * services + 64 {
            return;
        }
        let state = self.read();
        cursors.retain(|k, _| state.service_by_key(k).is_some());
    }
}
