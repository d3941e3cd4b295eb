//! Readiness tracking: the proxy is ready once every registered startup task has finished.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    pending: BTreeMap<u64, String>,
}

/// Shared set of startup tasks still pending; cloning shares the same set.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    state: Arc<Mutex<State>>,
}

impl Readiness {
    /// Creates an empty (hence ready) tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lock never guards partially-updated data, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a pending task named `name`; it is done when the guard is dropped or `ready()`.
    pub fn register(&self, name: &str) -> ReadyGuard {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.pending.insert(id, name.to_owned());
        ReadyGuard {
            readiness: self.clone(),
            id,
        }
    }

    /// True when no registered task is pending.
    pub fn is_ready(&self) -> bool {
        self.lock().pending.is_empty()
    }

    /// Names of the pending tasks, sorted and de-duplicated.
    pub fn pending(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().pending.values().cloned().collect();
        names.sort();
        names.dedup();
        names
    }
}

/// A registered startup task; marks itself done when dropped.
#[derive(Debug)]
#[must_use = "dropping the guard marks the task ready immediately"]
pub struct ReadyGuard {
    readiness: Readiness,
    id: u64,
}

impl ReadyGuard {
    /// Marks the task done.
    pub fn ready(self) {
        drop(self);
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.readiness.lock().pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_every_guard_is_released() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let a = r.register("workloads");
        let b = r.register("certificates");
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["certificates", "workloads"]);
        a.ready();
        assert_eq!(r.pending(), vec!["certificates"]);
        drop(b);
        assert!(r.is_ready());
        assert!(r.pending().is_empty());
    }

    #[test]
    fn same_name_registered_twice_needs_both_guards() {
        let r = Readiness::new();
        let a = r.register("proxy");
        let b = r.clone().register("proxy");
        drop(a);
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["proxy"]);
        drop(b);
        assert!(r.is_ready());
    }
}
