//! One proxy's delta-ADS stream: subscriptions per type, what the proxy holds, nonces, and the
//! debounced, coalesced pushes computed from the shared store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::Shared;
use super::metrics::type_label;
use super::subscription::{Chunk, Next, Watch};
use crate::ca::Caller;

/// Nonces remembered per type while waiting for their ACK; older ones count as stale.
const MAX_OUTSTANDING: usize = 256;
/// Types one stream may watch (ztunnel uses two): bounds what a misbehaving client can make
/// the server hold.
const MAX_TYPES: usize = 16;
/// Explicit subscriptions per type on one stream (on-demand lookups are far fewer).
const MAX_NAMES: usize = 100_000;
/// Longest accepted resource name, type URL or nonce, in bytes.
const MAX_NAME_LEN: usize = 1024;

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
        tx: mpsc::Sender<Result<Vec<DeltaDiscoveryResponse>, Status>>,
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
                    Some(Ok(req)) => {
                        if let Err(status) = self.on_request(req) {
                            tracing::warn!(conn = self.id, node = %self.node_id, error = %status.message(), "xDS request refused; closing the stream");
                            self.shared.metrics.rejected.inc();
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    }
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
                        let Some(batch) = self.build(due) else {
                            // Dropping the stream makes the proxy reconnect and declare what
                            // it holds; that full comparison replaces the lost change log.
                            tracing::warn!(conn = self.id, node = %self.node_id, "proxy fell behind the change log; closing its stream so it resyncs");
                            self.shared.metrics.resyncs.inc();
                            break;
                        };
                        // A large push goes out a chunk per turn; the debounce that started it
                        // stays due until it is all out, so later changes follow it.
                        due = due && self.watches.values().any(Watch::busy);
                        if !batch.is_empty() {
                            permit.send(Ok(batch));
                        }
                    }
                    Err(_) => break,
                },
            }
        }
        tracing::debug!(conn = self.id, node = %self.node_id, "xDS stream closed");
    }

    /// Applies one request; `Err` when it breaks the stream's limits (the stream then ends).
    fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        check_limits(&req, self.watches.get(&req.type_url), self.watches.len())?;
        if self.node_id.is_empty()
            && let Some(node) = &req.node
        {
            self.node_id = node.id.clone();
            *self.stats.node.lock().unwrap_or_else(|p| p.into_inner()) = node.id.clone();
            tracing::info!(conn = self.id, node = %node.id, caller_node = ?self.stats.caller_node, "xDS proxy connected");
        }
        if req.type_url.is_empty() {
            tracing::warn!(conn = self.id, node = %self.node_id, "delta xDS request without type_url ignored");
            return Ok(());
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
            self.watches.insert(
                type_url,
                Watch::first(resource_names_subscribe, initial_resource_versions),
            );
            return Ok(());
        };
        w.subscribe(resource_names_subscribe);
        let store = self.shared.read();
        w.unsubscribe(resource_names_unsubscribe, &type_url, &store);
        Ok(())
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

    /// Builds the responses owed now, at most one chunk per type; `None` when the proxy
    /// must reconnect to resync.
    fn build(&mut self, due: bool) -> Option<Vec<DeltaDiscoveryResponse>> {
        let shared = self.shared.clone();
        let store = shared.read();
        let mut out = Vec::new();
        for (type_url, w) in self.watches.iter_mut() {
            if !w.has_work(due, &store, type_url) {
                continue;
            }
            let Chunk {
                resources,
                removed,
                oldest,
            } = match w.next(type_url, &store) {
                Next::Nothing => continue,
                Next::Resync => return None,
                Next::Send(chunk) => chunk,
            };
            let label = type_label(type_url);
            let m = &shared.metrics;
            if let Some(at) = oldest {
                m.push_latency
                    .with_label_values(&[label])
                    .observe(at.elapsed().as_secs_f64());
            }
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
        Some(out)
    }
}

/// Refuses requests that would make the server hold unbounded state for one stream.
fn check_limits(
    req: &DeltaDiscoveryRequest,
    watch: Option<&Watch>,
    watched_types: usize,
) -> Result<(), Status> {
    let too_long = |what: &str, s: &str| {
        (s.len() > MAX_NAME_LEN).then(|| {
            Status::invalid_argument(format!(
                "{what} of {} bytes exceeds the limit of {MAX_NAME_LEN}",
                s.len()
            ))
        })
    };
    if let Some(e) = too_long("type_url", &req.type_url)
        .or_else(|| too_long("response_nonce", &req.response_nonce))
    {
        return Err(e);
    }
    let names = req
        .resource_names_subscribe
        .iter()
        .chain(&req.resource_names_unsubscribe)
        .chain(req.initial_resource_versions.keys());
    for name in names {
        if let Some(e) = too_long("resource name", name) {
            return Err(e);
        }
    }
    if watch.is_none() && !req.type_url.is_empty() && watched_types >= MAX_TYPES {
        return Err(Status::invalid_argument(format!(
            "more than {MAX_TYPES} resource types on one stream"
        )));
    }
    let subscribed = watch.map_or(0, Watch::explicit_names);
    if subscribed + req.resource_names_subscribe.len() > MAX_NAMES {
        return Err(Status::invalid_argument(format!(
            "more than {MAX_NAMES} explicit subscriptions of {} on one stream",
            req.type_url
        )));
    }
    Ok(())
}
