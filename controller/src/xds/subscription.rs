//! One type on one stream: what the proxy subscribed to, what it holds, and the responses owed
//! to it, produced a chunk at a time as the stream drains.
//!
//! Memory per stream is what keeps a controller with hundreds of proxies small, so a wildcard
//! watch keeps nothing per resource: the proxy holds the store as of generation `seen`, and the
//! store's change log says what differs since. Only explicit (on-demand) subscriptions track
//! name -> version. A full comparison (the initial sync) is a cursor over the store in name
//! order, turned into one chunk at a time as the stream drains, so no stream ever holds a copy,
//! or even a list, of the whole state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use xds::Resource;

use super::store::{Changes, Entry, ResourceStore};

/// Resources per response: a proxy's initial sync goes out as many small responses, so neither
/// gRPC's per-stream encode buffer nor the queue of a stream ever grows to the full state.
pub(crate) const MAX_RESOURCES_PER_RESPONSE: usize = 100;
/// The subscription name meaning "everything of this type".
pub(crate) const WILDCARD: &str = "*";

/// A resource owed to the proxy, with the subscription keys it answers.
struct Owed {
    entry: Arc<Entry>,
    aliases: Vec<String>,
}

/// A full comparison in progress: store entries after `after` still have to be looked at.
struct Scan {
    after: Option<String>,
    /// What the proxy declared or held when the comparison started, name -> version.
    holds: HashMap<String, String>,
}

/// The content of one response.
pub(crate) struct Chunk {
    /// Updated resources.
    pub resources: Vec<Resource>,
    /// Names (or subscription keys) the proxy must drop.
    pub removed: Vec<String>,
    /// When the oldest change this push carries happened (for the latency metric).
    pub oldest: Option<Instant>,
}

/// What a watch has to say next.
pub(crate) enum Next {
    /// Nothing: the proxy is up to date.
    Nothing,
    /// One response.
    Send(Chunk),
    /// The change log no longer reaches back to what this wildcard proxy holds; it must
    /// reconnect and declare its versions so removals can be computed.
    Resync,
}

/// Subscription and delivery state of one type on one stream.
#[derive(Default)]
pub(crate) struct Watch {
    wildcard: bool,
    /// Explicit (on-demand) names, possibly aliases.
    names: HashSet<String>,
    /// Without wildcard: what the proxy holds, name -> version. Empty under wildcard.
    held: HashMap<String, String>,
    /// Versions the proxy declared when it subscribed; consumed by the first comparison.
    declared: HashMap<String, String>,
    /// Store generation the proxy is (or, once `owed` drains, will be) up to date with.
    seen: u64,
    /// Compare the whole store instead of the change log.
    full: bool,
    /// The first response is owed even if empty (proxies wait for it to become ready).
    initial: bool,
    /// Explicitly requested names to answer (found -> resource, missing -> removed).
    requested: BTreeSet<String>,
    /// Nonces sent and not yet ACKed/NACKed, oldest first.
    pub(crate) outstanding: VecDeque<String>,
    /// Computed but not yet sent, in name order.
    owed: VecDeque<Owed>,
    /// A full comparison still being sent.
    scan: Option<Scan>,
    owed_removed: Vec<String>,
    owed_oldest: Option<Instant>,
}

impl Watch {
    /// The watch created by a proxy's first request of a type.
    pub(crate) fn first(subscribe: Vec<String>, declared: HashMap<String, String>) -> Self {
        // An empty list (or "*") means wildcard.
        let wildcard = subscribe.is_empty() || subscribe.iter().any(|n| n == WILDCARD);
        let names: HashSet<String> = subscribe.into_iter().filter(|n| n != WILDCARD).collect();
        Self {
            wildcard,
            requested: names.iter().cloned().collect(),
            names,
            declared,
            full: true,
            initial: true,
            ..Default::default()
        }
    }

    /// Adds subscriptions from a later request.
    pub(crate) fn subscribe(&mut self, names: Vec<String>) {
        for name in names {
            if name == WILDCARD {
                if !self.wildcard {
                    self.wildcard = true;
                    self.full = true;
                }
            } else {
                self.names.insert(name.clone());
                self.requested.insert(name);
            }
        }
    }

    /// Drops subscriptions; the proxy forgets those resources, so a later subscription
    /// sends them again.
    pub(crate) fn unsubscribe(
        &mut self,
        names: Vec<String>,
        type_url: &str,
        store: &ResourceStore,
    ) {
        for name in names {
            if name == WILDCARD {
                if self.wildcard {
                    self.wildcard = false;
                    // From now on only explicit names are delivered; the proxy holds those.
                    self.held = self
                        .names
                        .iter()
                        .filter_map(|n| store.resolve(type_url, n))
                        .map(|e| (e.name.clone(), e.version.clone()))
                        .collect();
                }
                continue;
            }
            self.names.remove(&name);
            self.requested.remove(&name);
            if !self.wildcard {
                let real = store
                    .resolve(type_url, &name)
                    .map(|e| e.name.clone())
                    .unwrap_or(name);
                self.held.remove(&real);
            }
        }
    }

    /// Number of explicit (on-demand) subscriptions.
    pub(crate) fn explicit_names(&self) -> usize {
        self.names.len()
    }

    /// Whether chunks of an earlier push are still waiting to be sent.
    pub(crate) fn busy(&self) -> bool {
        !self.owed.is_empty() || self.scan.is_some() || !self.owed_removed.is_empty()
    }

    /// Whether `next` has something to do; `due` means the debounce after a change elapsed.
    pub(crate) fn has_work(&self, due: bool, store: &ResourceStore, type_url: &str) -> bool {
        self.busy()
            || self.full
            || self.initial
            || !self.requested.is_empty()
            || (due && store.type_generation(type_url) > self.seen)
    }

    fn subscribed(&self, e: &Entry) -> bool {
        self.wildcard
            || self.names.contains(&e.name)
            || e.aliases.iter().any(|a| self.names.contains(a))
    }

    /// The next response of this type. Only called when `has_work` said so.
    pub(crate) fn next(&mut self, type_url: &str, store: &ResourceStore) -> Next {
        if !self.busy() && self.compute(type_url, store).is_err() {
            return Next::Resync;
        }
        let initial = std::mem::take(&mut self.initial);
        let mut resources = Vec::new();
        while resources.len() < MAX_RESOURCES_PER_RESPONSE {
            let Some(o) = self.owed.pop_front() else {
                break;
            };
            resources.push(to_resource(&o.entry, o.aliases));
        }
        if resources.len() < MAX_RESOURCES_PER_RESPONSE {
            self.continue_scan(type_url, store, &mut resources);
        }
        // Removals ride on the last chunk.
        let removed = if !self.owed.is_empty() || self.scan.is_some() {
            Vec::new()
        } else {
            std::mem::take(&mut self.owed_removed)
        };
        if resources.is_empty() && removed.is_empty() && !initial {
            if !self.busy() {
                self.owed_oldest = None;
            }
            return Next::Nothing;
        }
        Next::Send(Chunk {
            resources,
            removed,
            oldest: self.owed_oldest.take(),
        })
    }

    /// Adds entries from the full comparison in progress until the chunk is full.
    fn continue_scan(&mut self, type_url: &str, store: &ResourceStore, out: &mut Vec<Resource>) {
        let Some(scan) = self.scan.as_mut() else {
            return;
        };
        let mut last = None;
        let mut finished = true;
        for e in store.iter_after(type_url, scan.after.as_deref()) {
            if out.len() >= MAX_RESOURCES_PER_RESPONSE {
                finished = false;
                break;
            }
            last = Some(e);
            // Content stored after the comparison started reaches the proxy through the change
            // log instead, which also knows whether a later removal concerns the proxy.
            let subscribed = self.wildcard
                || self.names.contains(&e.name)
                || e.aliases.iter().any(|a| self.names.contains(a));
            if e.generation > self.seen
                || !subscribed
                || scan.holds.get(&e.name) == Some(&e.version)
            {
                continue;
            }
            let aliases = e
                .aliases
                .iter()
                .filter(|a| self.names.contains(*a))
                .cloned()
                .collect();
            out.push(to_resource(e, aliases));
            if !self.wildcard {
                self.held.insert(e.name.clone(), e.version.clone());
            }
        }
        if finished {
            self.scan = None;
        } else if let Some(e) = last {
            scan.after = Some(e.name.clone());
        }
    }

    /// Works out what the proxy lacks; `Err` when a wildcard proxy must resync.
    fn compute(&mut self, type_url: &str, store: &ResourceStore) -> Result<(), ()> {
        let mut updates: BTreeMap<&str, Owed> = BTreeMap::new();
        let mut removed: BTreeSet<String> = BTreeSet::new();
        let owe = |e: &Arc<Entry>, aliases: Vec<String>| Owed {
            entry: e.clone(),
            aliases,
        };
        let changes = if std::mem::take(&mut self.full) {
            Changes::Truncated
        } else {
            match store.changes_since(type_url, self.seen) {
                Changes::Truncated if self.wildcard => return Err(()),
                c => c,
            }
        };
        match changes {
            Changes::Truncated => {
                // Compare everything with what the proxy declared or holds, a chunk at a time.
                let mut holds = std::mem::take(&mut self.declared);
                holds.extend(std::mem::take(&mut self.held));
                for (name, version) in &holds {
                    if store.get(type_url, name).is_none() {
                        removed.insert(name.clone());
                    } else if !self.wildcard {
                        self.held.insert(name.clone(), version.clone());
                    }
                }
                self.scan = Some(Scan { after: None, holds });
            }
            Changes::Names(names, at) => {
                self.owed_oldest = at;
                for (name, existed) in names {
                    match store.get(type_url, name) {
                        Some(e) => {
                            let fresh = self.wildcard || self.held.get(name) != Some(&e.version);
                            if self.subscribed(e) && fresh {
                                updates.insert(&e.name, owe(e, self.aliases_of(e)));
                            }
                        }
                        None => {
                            // A wildcard proxy holds what existed when it was last up to date.
                            let held = if self.wildcard {
                                existed
                            } else {
                                self.held.remove(name).is_some()
                            };
                            if held {
                                removed.insert(name.to_string());
                            }
                        }
                    }
                }
            }
        }
        // Explicit requests are always answered, even when the proxy already holds the
        // resource, so an on-demand lookup never waits for a change that will not come.
        for key in std::mem::take(&mut self.requested) {
            match store.resolve(type_url, &key) {
                Some(e) => {
                    // Answered here, so the full comparison must not send it again.
                    if let Some(scan) = self.scan.as_mut() {
                        scan.holds.insert(e.name.clone(), e.version.clone());
                    }
                    let o = updates.entry(&e.name).or_insert_with(|| owe(e, Vec::new()));
                    if key != e.name && !o.aliases.contains(&key) {
                        o.aliases.push(key);
                    }
                }
                None => {
                    removed.insert(key);
                }
            }
        }
        self.seen = store.generation();
        if !self.wildcard {
            for o in updates.values() {
                self.held
                    .insert(o.entry.name.clone(), o.entry.version.clone());
            }
        }
        self.owed = updates.into_values().collect();
        self.owed_removed = removed.into_iter().collect();
        Ok(())
    }

    fn aliases_of(&self, e: &Entry) -> Vec<String> {
        e.aliases
            .iter()
            .filter(|a| self.names.contains(*a))
            .cloned()
            .collect()
    }
}

fn to_resource(e: &Entry, aliases: Vec<String>) -> Resource {
    Resource {
        name: e.name.clone(),
        version: e.version.clone(),
        resource: Some(e.resource.clone()),
        aliases,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "t";

    fn put(store: &mut ResourceStore, name: &str, body: &str) {
        let any = prost_types::Any {
            type_url: T.into(),
            value: body.as_bytes().to_vec(),
        };
        store.apply(
            T,
            vec![Entry::new(T, name.into(), any)],
            vec![],
            Instant::now(),
        );
    }

    fn sent(next: Next) -> (Vec<String>, Vec<String>) {
        match next {
            Next::Send(c) => (c.resources.into_iter().map(|r| r.name).collect(), c.removed),
            Next::Nothing => (Vec::new(), Vec::new()),
            Next::Resync => panic!("unexpected resync"),
        }
    }

    #[test]
    fn changes_during_a_chunked_sync_reach_the_proxy_exactly_once_through_the_log() {
        let mut store = ResourceStore::new(1000);
        for i in 0..150 {
            put(&mut store, &format!("p{i:03}"), "1");
        }
        let mut w = Watch::first(Vec::new(), HashMap::new());
        let (first, _) = sent(w.next(T, &store));
        assert_eq!(first.len(), MAX_RESOURCES_PER_RESPONSE);
        assert!(w.busy());

        // While the rest of the sync is pending: one entry appears and disappears, one
        // ahead of the cursor changes, one ahead of the cursor is removed.
        put(&mut store, "p120x", "1");
        store.apply(T, vec![], vec!["p120x".into()], Instant::now());
        put(&mut store, "p130", "2");
        store.apply(T, vec![], vec!["p140".into()], Instant::now());

        let (second, removed) = sent(w.next(T, &store));
        assert!(!w.busy());
        assert!(removed.is_empty());
        assert!(!second.contains(&"p120x".to_string()));
        assert!(
            !second.contains(&"p130".to_string()),
            "new content waits for the log"
        );
        assert!(!second.contains(&"p140".to_string()));
        assert_eq!(second.len(), 150 - MAX_RESOURCES_PER_RESPONSE - 2);

        assert!(w.has_work(true, &store, T));
        let (updates, removed) = sent(w.next(T, &store));
        assert_eq!(updates, vec!["p130"]);
        // p140 existed when the sync started (the proxy may hold it); p120x never reached it.
        assert_eq!(removed, vec!["p140"]);
        assert!(!w.has_work(true, &store, T));
    }

    #[test]
    fn reconnecting_proxy_gets_only_what_differs_from_its_declared_versions() {
        let mut store = ResourceStore::new(1000);
        put(&mut store, "a", "1");
        put(&mut store, "b", "1");
        let declared = HashMap::from([
            ("a".to_string(), store.get(T, "a").unwrap().version.clone()),
            ("b".to_string(), "stale".to_string()),
            ("gone".to_string(), "x".to_string()),
        ]);
        let mut w = Watch::first(Vec::new(), declared);
        assert_eq!(
            sent(w.next(T, &store)),
            (vec!["b".to_string()], vec!["gone".to_string()])
        );
        assert!(!w.busy());
    }
}
