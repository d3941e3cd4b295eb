//! Readiness of the controller: the tasks that must finish (initial config load, first push)
//! before the monitoring port (15014, served by the `monitoring` crate) answers ready.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Tasks that must finish before the controller reports ready.
#[derive(Clone, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<Mutex<u64>>,
}

/// Marks its task done when dropped.
pub struct ReadyGuard {
    id: u64,
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&self.id);
        }
    }
}

impl Readiness {
    /// Registers a pending task.
    pub fn register(&self, name: &str) -> Option<ReadyGuard> {
        let id = {
            let mut n = self.next.lock().ok()?;
            *n += 1;
            *n
        };
        self.pending.lock().ok()?.insert(id, name.to_string());
        Some(ReadyGuard {
            id,
            pending: self.pending.clone(),
        })
    }

    /// The check the monitoring port asks: ready once nothing is pending.
    pub fn check(&self) -> monitoring::ReadyCheck {
        let this = self.clone();
        std::sync::Arc::new(move || {
            let pending = this.pending();
            if pending.is_empty() {
                Ok(())
            } else {
                Err(pending.join(", "))
            }
        })
    }

    /// Names of pending tasks.
    pub fn pending(&self) -> Vec<String> {
        self.pending
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }
}
