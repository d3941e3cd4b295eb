//! One proxy's delta-ADS stream: subscriptions per type, what the proxy holds, nonces, and the
//! debounced, coalesced pushes computed from the shared store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};

use super::Shared;
use super::metrics::type_label;
use super::store::{Changes, Entry, ResourceStore};
use crate::ca::Caller;

/// Nonces remembered per type while waiting for their ACK; older ones count as stale.
const MAX_OUTSTANDING: usize = 256;
/// Resources per response. Large pushes (a proxy's initial sync) are split so no single message
/// is megabytes: gRPC keeps each stream's encode buffer at its largest message for the stream's
/// whole life, which with many proxies dominated the controller's memory.
const MAX_RESOURCES_PER_RESPONSE: usize = 200;
/// The subscription name meaning "everything of this type".
const WILDCARD: &str = "*";

/// Counters of one connection, readable while it runs.
pub(crate) struct ConnectionStats {
    id: u64,
    connected_at: SystemTime,
    caller_node: Option<String>,
    node: Mutex<String>,
    responses: AtomicU64,
    resources_sent: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
}

/// A snapshot of one open stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Server-assigned connection number.
    pub id: u64,
    /// `Node.id` from the first request.
    pub node_id: String,
    /// Node name the caller authenticated as, if any.
    pub caller_node: Option<String>,
    /// When the stream opened.
    pub connected_at: SystemTime,
    /// Responses sent.
    pub responses: u64,
    /// Resources (updates plus removals) sent.
    pub resources_sent: u64,
    /// ACKs received.
    pub acks: u64,
    /// NACKs received.
    pub nacks: u64,
}

impl ConnectionStats {
    pub(crate) fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            id: self.id,
            node_id: self.node.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            caller_node: self.caller_node.clone(),
            connected_at: self.connected_at,
            responses: self.responses.load(Ordering::Relaxed),
            resources_sent: self.resources_sent.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
        }
    }
}

/// Subscription and delivery state of one type on one stream.
#[derive(Default)]
struct Watch {
    wildcard: bool,
    /// Explicit (on-demand) names, possibly aliases.
    names: HashSet<String>,
    /// What the proxy holds: name -> version (sent by us, or declared on reconnect).
    sent: HashMap<String, String>,
    /// Store generation this watch is up to date with.
    seen: u64,
    /// Compare the whole store instead of the change log.
    full: bool,
    /// The first response is owed even if empty (proxies wait for it to become ready).
    initial: bool,
    /// Explicitly requested names to answer (found -> resource, missing -> removed).
    requested: BTreeSet<String>,
    /// Nonces sent and not yet ACKed/NACKed, oldest first.
    outstanding: VecDeque<String>,
}

impl Watch {
    fn subscribed(&self, name: &str, e: &Entry) -> bool {
        self.wildcard
            || self.names.contains(name)
            || e.aliases.iter().any(|a| self.names.contains(a))
    }

    fn has_work(&self, due: bool, store: &ResourceStore, type_url: &str) -> bool {
        self.full
            || self.initial
            || !self.requested.is_empty()
            || (due && store.type_generation(type_url) > self.seen)
    }

    /// Computes the next response of this type; `None` when there is nothing to say.
    fn build(
        &mut self,
        type_url: &str,
        store: &ResourceStore,
    ) -> Option<(Vec<Resource>, Vec<String>, Option<Instant>)> {
        let mut updates: BTreeMap<String, Resource> = BTreeMap::new();
        let mut removed: BTreeSet<String> = BTreeSet::new();
        let mut oldest = None;
        let resource = |name: &str, e: &Entry, aliases: Vec<String>| Resource {
            name: name.to_string(),
            version: e.version.clone(),
            resource: Some(e.resource.clone()),
            aliases,
            ..Default::default()
        };
        let changes = if self.full {
            Changes::Truncated
        } else {
            store.changes_since(type_url, self.seen)
        };
        match changes {
            Changes::Truncated => {
                for (name, e) in store.iter(type_url) {
                    if self.subscribed(name, e) && self.sent.get(name) != Some(&e.version) {
                        updates.insert(name.to_string(), resource(name, e, self.aliases_of(e)));
                    }
                }
                for name in self.sent.keys() {
                    if store.get(type_url, name).is_none() {
                        removed.insert(name.clone());
                    }
                }
            }
            Changes::Names(names, at) => {
                oldest = at;
                for name in names {
                    match store.get(type_url, name) {
                        Some(e) => {
                            if self.subscribed(name, e) && self.sent.get(name) != Some(&e.version) {
                                updates.insert(
                                    name.to_string(),
                                    resource(name, e, self.aliases_of(e)),
                                );
                            }
                        }
                        None => {
                            if self.sent.contains_key(name) {
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
                Some((name, e)) => {
                    let r = updates
                        .entry(name.to_string())
                        .or_insert_with(|| resource(name, e, Vec::new()));
                    if key != name && !r.aliases.contains(&key) {
                        r.aliases.push(key);
                    }
                }
                None => {
                    removed.insert(key);
                }
            }
        }
        self.seen = store.generation();
        self.full = false;
        let initial = std::mem::take(&mut self.initial);
        if updates.is_empty() && removed.is_empty() && !initial {
            return None;
        }
        for r in updates.values() {
            self.sent.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            self.sent.remove(name);
        }
        Some((
            updates.into_values().collect(),
            removed.into_iter().collect(),
            oldest,
        ))
    }

    fn aliases_of(&self, e: &Entry) -> Vec<String> {
        e.aliases
            .iter()
            .filter(|a| self.names.contains(*a))
            .cloned()
            .collect()
    }
}

/// The state machine of one stream.
pub(crate) struct Connection {
    id: u64,
    shared: Arc<Shared>,
    watches: BTreeMap<String, Watch>,
    nonce: u64,
    stats: Arc<ConnectionStats>,
    node_id: String,
}

/// Unregisters the connection and fixes the gauge however the task ends.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.metrics.connected.dec();
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Connection {
    pub(crate) fn new(id: u64, shared: Arc<Shared>, caller: Caller) -> Self {
        let stats = Arc::new(ConnectionStats {
            id,
            connected_at: SystemTime::now(),
            caller_node: caller.node,
            node: Mutex::new(String::new()),
            responses: AtomicU64::new(0),
            resources_sent: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
        });
        Self {
            id,
            shared,
            watches: BTreeMap::new(),
            nonce: 0,
            stats,
            node_id: String::new(),
        }
    }

    /// Serves the stream until the proxy leaves, the stream fails, or `stop` is cancelled.
    pub(crate) async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Vec<DeltaDiscoveryResponse>>,
        stop: CancellationToken,
    ) {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id, self.stats.clone());
        self.shared.metrics.connected.inc();
        let _registration = Registration {
            shared: self.shared.clone(),
            id: self.id,
        };
        let mut changes = self.shared.changes.subscribe();
        let (debounce, max_debounce) =
            (self.shared.config.debounce, self.shared.config.max_debounce);
        let mut burst_start: Option<tokio::time::Instant> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut due = false;
        loop {
            let has_work = {
                let store = self.shared.read();
                self.watches.iter().any(|(t, w)| w.has_work(due, &store, t))
            };
            // A debounce that found nothing to send must not make the next change skip it.
            if due && !has_work {
                due = false;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => self.on_request(req),
                    Some(Err(e)) => {
                        tracing::debug!(conn = self.id, node = %self.node_id, error = %e, "xDS stream failed");
                        break;
                    }
                    None => break,
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = tokio::time::Instant::now();
                    let start = *burst_start.get_or_insert(now);
                    deadline = Some((now + debounce).min(start + max_debounce));
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if deadline.is_some() => {
                    deadline = None;
                    burst_start = None;
                    due = true;
                }
                // Responses are built only when the queue has room, so a slow proxy gets one
                // coalesced diff later instead of a growing backlog.
                permit = tx.reserve(), if has_work => match permit {
                    Ok(permit) => {
                        let batch = self.build(due);
                        due = false;
                        if !batch.is_empty() {
                            permit.send(batch);
                        }
                    }
                    Err(_) => break,
                },
            }
        }
        tracing::debug!(conn = self.id, node = %self.node_id, "xDS stream closed");
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest) {
        if self.node_id.is_empty()
            && let Some(node) = &req.node
        {
            self.node_id = node.id.clone();
            *self.stats.node.lock().unwrap_or_else(|p| p.into_inner()) = node.id.clone();
            tracing::info!(conn = self.id, node = %node.id, caller_node = ?self.stats.caller_node, "xDS proxy connected");
        }
        if req.type_url.is_empty() {
            tracing::warn!(conn = self.id, node = %self.node_id, "delta xDS request without type_url ignored");
            return;
        }
        if !req.response_nonce.is_empty() {
            self.on_ack(&req);
        }
        let DeltaDiscoveryRequest {
            type_url,
            resource_names_subscribe,
            resource_names_unsubscribe,
            initial_resource_versions,
            ..
        } = req;
        let Some(w) = self.watches.get_mut(&type_url) else {
            // First request of a type: empty list (or "*") means wildcard; the proxy's
            // current versions let us send only the differences.
            let wildcard = resource_names_subscribe.is_empty()
                || resource_names_subscribe.iter().any(|n| n == WILDCARD);
            let names: HashSet<String> = resource_names_subscribe
                .into_iter()
                .filter(|n| n != WILDCARD)
                .collect();
            let w = Watch {
                wildcard,
                requested: names.iter().cloned().collect(),
                names,
                sent: initial_resource_versions,
                full: true,
                initial: true,
                ..Default::default()
            };
            self.watches.insert(type_url, w);
            return;
        };
        for name in resource_names_subscribe {
            if name == WILDCARD {
                w.wildcard = true;
                w.full = true;
            } else {
                w.names.insert(name.clone());
                w.requested.insert(name);
            }
        }
        let store = self.shared.read();
        for name in resource_names_unsubscribe {
            if name == WILDCARD {
                w.wildcard = false;
                continue;
            }
            w.names.remove(&name);
            w.requested.remove(&name);
            if !w.wildcard {
                // Forget it so a later subscription sends it again.
                let real = store
                    .resolve(&type_url, &name)
                    .map(|(n, _)| n.to_string())
                    .unwrap_or(name);
                w.sent.remove(&real);
            }
        }
    }

    fn on_ack(&mut self, req: &DeltaDiscoveryRequest) {
        let nonce = &req.response_nonce;
        let Some(w) = self.watches.get_mut(&req.type_url) else {
            tracing::debug!(conn = self.id, %nonce, "ACK for a type never subscribed ignored");
            return;
        };
        let Some(pos) = w.outstanding.iter().position(|n| n == nonce) else {
            tracing::debug!(conn = self.id, node = %self.node_id, %nonce, "stale nonce ignored");
            return;
        };
        w.outstanding.drain(..=pos);
        match &req.error_detail {
            Some(status) => {
                self.stats.nacks.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .metrics
                    .nacks
                    .with_label_values(&[type_label(&req.type_url)])
                    .inc();
                tracing::warn!(
                    conn = self.id,
                    node = %self.node_id,
                    type_url = %req.type_url,
                    %nonce,
                    code = status.code,
                    message = %status.message,
                    "proxy rejected xDS resources (NACK)"
                );
            }
            None => {
                self.stats.acks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Builds the responses owed now, one per type with something to say.
    fn build(&mut self, due: bool) -> Vec<DeltaDiscoveryResponse> {
        let shared = self.shared.clone();
        let store = shared.read();
        let mut out = Vec::new();
        for (type_url, w) in self.watches.iter_mut() {
            if !w.has_work(due, &store, type_url) {
                continue;
            }
            let Some((resources, removed, oldest)) = w.build(type_url, &store) else {
                continue;
            };
            let label = type_label(type_url);
            let m = &shared.metrics;
            if let Some(at) = oldest {
                m.push_latency
                    .with_label_values(&[label])
                    .observe(at.elapsed().as_secs_f64());
            }
            // Removals ride on the last chunk; an empty response still answers an initial request.
            let mut chunks: Vec<Vec<Resource>> = Vec::new();
            let mut rest = resources.into_iter().peekable();
            while rest.peek().is_some() {
                chunks.push(rest.by_ref().take(MAX_RESOURCES_PER_RESPONSE).collect());
            }
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            let last = chunks.len() - 1;
            let mut removed = Some(removed);
            for (i, resources) in chunks.into_iter().enumerate() {
                let removed = if i == last {
                    removed.take().unwrap_or_default()
                } else {
                    Vec::new()
                };
                self.nonce += 1;
                let nonce = format!("{:08x}-{}-{}", shared.nonce_prefix, self.id, self.nonce);
                w.outstanding.push_back(nonce.clone());
                if w.outstanding.len() > MAX_OUTSTANDING {
                    w.outstanding.pop_front();
                }
                let count = (resources.len() + removed.len()) as u64;
                m.pushes.with_label_values(&[label]).inc();
                m.resources_sent.with_label_values(&[label]).inc_by(count);
                self.stats.responses.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .resources_sent
                    .fetch_add(count, Ordering::Relaxed);
                tracing::debug!(
                    conn = self.id,
                    node = %self.node_id,
                    type_url = %type_url,
                    %nonce,
                    updated = resources.len(),
                    removed = removed.len(),
                    "xDS push"
                );
                out.push(DeltaDiscoveryResponse {
                    system_version_info: store.generation().to_string(),
                    resources,
                    type_url: type_url.clone(),
                    removed_resources: removed,
                    nonce,
                });
            }
        }
        out
    }
}
