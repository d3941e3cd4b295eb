//! Live inbound connections and their policy inputs, so a policy change can close the ones it
//! now denies (Istio re-checks established connections the same way).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::ProxyInputs;
use crate::rbac::{self, Decision};

/// Inbound connections of one proxy.
#[derive(Default)]
pub struct ConnectionTracker {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

struct Tracked {
    conn: rbac::Connection,
    close: CancellationToken,
}

/// Removes the connection from the tracker when it ends; `closed()` fires on a policy denial.
pub struct TrackedConnection<'a> {
    tracker: &'a ConnectionTracker,
    id: u64,
    close: CancellationToken,
}

impl TrackedConnection<'_> {
    /// Resolves when policy no longer allows this connection.
    pub async fn denied(&self) {
        self.close.cancelled().await
    }
}

impl Drop for TrackedConnection<'_> {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.tracker.conns.lock() {
            conns.remove(&self.id);
        }
    }
}

impl ConnectionTracker {
    /// Starts tracking an authorized connection.
    pub fn track(&self, conn: rbac::Connection) -> TrackedConnection<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                id,
                Tracked {
                    conn,
                    close: close.clone(),
                },
            );
        }
        TrackedConnection {
            tracker: self,
            id,
            close,
        }
    }

    /// Number of live tracked connections.
    pub fn len(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-evaluates every connection with `decide`; closes and returns the count of denied ones.
    fn recheck(&self, decide: impl Fn(&rbac::Connection) -> Decision) -> usize {
        let Ok(conns) = self.conns.lock() else {
            return 0;
        };
        let mut closed = 0;
        for t in conns.values() {
            if !t.close.is_cancelled()
                && let Decision::Deny { reason, .. } = decide(&t.conn)
            {
                tracing::info!(src = %t.conn.src_ip, dst = %t.conn.dst_ip, port = t.conn.dst_port, %reason, "closing connection denied by updated policy");
                t.close.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Re-checks live connections whenever the state changes, until draining starts.
pub async fn recheck_on_policy_change(inputs: Arc<ProxyInputs>, drain: CancellationToken) {
    let mut changes = inputs.shared.state.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = drain.cancelled() => return,
        }
        if inputs.conns.is_empty() {
            continue;
        }
        let policies = match inputs.local_workload() {
            Some(w) => inputs.shared.state.read().policies_for(&w),
            // The workload vanished: nothing authorizes its connections any more.
            None => {
                let closed = inputs.conns.recheck(|_| Decision::Deny {
                    policy: None,
                    reason: "destination workload removed".into(),
                });
                for _ in 0..closed {
                    inputs.shared.metrics.connection_closed_by_policy();
                }
                continue;
            }
        };
        let closed = inputs.conns.recheck(|c| rbac::authorize(&policies, c));
        for _ in 0..closed {
            inputs.shared.metrics.connection_closed_by_policy();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(port: u16) -> rbac::Connection {
        rbac::Connection {
            src_identity: None,
            src_ip: "10.0.0.1".parse().unwrap(),
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: port,
        }
    }

    #[tokio::test]
    async fn recheck_closes_only_denied_connections() {
        let tracker = ConnectionTracker::default();
        let a = tracker.track(conn(80));
        let b = tracker.track(conn(443));
        let closed = tracker.recheck(|c| {
            if c.dst_port == 80 {
                Decision::Deny {
                    policy: None,
                    reason: "test".into(),
                }
            } else {
                Decision::Allow
            }
        });
        assert_eq!(closed, 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), a.denied())
            .await
            .expect("denied connection is signalled");
        assert!(!b.close.is_cancelled());
        drop(a);
        assert_eq!(tracker.len(), 1);
    }
}
