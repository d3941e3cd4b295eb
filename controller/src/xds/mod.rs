//! Delta-ADS server for the workload xDS types (`istio.workload.Address`,
//! `istio.security.Authorization`): a shared [`ResourceStore`] that the model updates, and one
//! task per proxy stream that pushes only what that proxy is missing, debounced and coalesced.

mod conn;
mod metrics;
mod serve;
mod store;
mod subscription;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use xds::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use crate::ca::{Authenticator, Caller};
pub use conn::ConnectionInfo;
pub use metrics::XdsMetrics;
pub use serve::{ServeError, serve};
pub use store::{Entry, ResourceStore};

/// Tuning of the xDS server.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// Quiet time after a change before pushing; further changes restart it.
    pub debounce: Duration,
    /// Longest a push may be delayed by a continuous burst of changes.
    pub max_debounce: Duration,
    /// Responses buffered per connection; a slow proxy beyond this gets a coalesced push later.
    pub queue_depth: usize,
    /// Changes remembered per type for incremental pushes; older gaps get a full comparison.
    pub change_log: usize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(50),
            max_debounce: Duration::from_millis(500),
            queue_depth: 4,
            change_log: 100_000,
        }
    }
}

/// State shared by the server handle and every connection task.
pub(crate) struct Shared {
    store: RwLock<ResourceStore>,
    changes: watch::Sender<u64>,
    metrics: Arc<XdsMetrics>,
    auth: Option<Arc<dyn Authenticator>>,
    config: XdsConfig,
    conns: Mutex<BTreeMap<u64, Arc<conn::ConnectionStats>>>,
    next_id: AtomicU64,
    nonce_prefix: u32,
    /// Cancelled to end the streams open at that moment; replaced afterwards.
    streams: Mutex<CancellationToken>,
    closed: CancellationToken,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, ResourceStore> {
        // A panic while holding the lock cannot leave the store half-updated in a way that
        // matters more than stopping service would, so poisoning is ignored.
        self.store.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Cancels the connections when the last server handle goes away.
struct OwnerGuard(CancellationToken);

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The delta-ADS server. Clones share the same store and connections.
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
    _owner: Arc<OwnerGuard>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer")
            .field("generation", &self.shared.read().generation())
            .field("connections", &self.connection_count())
            .finish()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

impl XdsServer {
    /// A server with default tuning that accepts every caller.
    pub fn new(metrics: Arc<XdsMetrics>) -> Self {
        Self::with_config(metrics, XdsConfig::default(), None)
    }

    /// A server with explicit tuning; `auth` (when set) must accept a stream's metadata.
    pub fn with_config(
        metrics: Arc<XdsMetrics>,
        config: XdsConfig,
        auth: Option<Arc<dyn Authenticator>>,
    ) -> Self {
        let closed = CancellationToken::new();
        let shared = Shared {
            store: RwLock::new(ResourceStore::new(config.change_log)),
            changes: watch::Sender::new(0),
            metrics,
            auth,
            config,
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            nonce_prefix: rand::random(),
            streams: Mutex::new(closed.child_token()),
            closed: closed.clone(),
        };
        Self {
            shared: Arc::new(shared),
            _owner: Arc::new(OwnerGuard(closed)),
        }
    }

    /// Upserts and removes resources of one type; returns how many actually changed. Connected
    /// proxies get the changed names after the debounce delay.
    pub fn update(
        &self,
        type_url: &str,
        upserts: Vec<(String, prost_types::Any)>,
        removals: Vec<String>,
    ) -> usize {
        // Hashing and alias extraction happen before taking the lock.
        let entries: Vec<Entry> = upserts
            .into_iter()
            .map(|(name, any)| Entry::new(type_url, name, any))
            .collect();
        let now = Instant::now();
        let (changed, generation) = {
            let mut store = self.shared.store.write().unwrap_or_else(|p| p.into_inner());
            let changed = store.apply(type_url, entries, removals, now);
            (changed, store.generation())
        };
        if changed > 0 {
            self.shared.changes.send_replace(generation);
        }
        changed
    }

    /// Makes `resources` the complete set of a type: others are removed. Returns the changes.
    pub fn replace_all(&self, type_url: &str, resources: Vec<(String, prost_types::Any)>) -> usize {
        let keep: std::collections::HashSet<&str> =
            resources.iter().map(|(n, _)| n.as_str()).collect();
        let removals: Vec<String> = self
            .shared
            .read()
            .iter(type_url)
            .filter(|e| !keep.contains(e.name.as_str()))
            .map(|e| e.name.clone())
            .collect();
        self.update(type_url, resources, removals)
    }

    /// The current version and body of one resource.
    pub fn get(&self, type_url: &str, name: &str) -> Option<(String, prost_types::Any)> {
        self.shared
            .read()
            .get(type_url, name)
            .map(|e| (e.version.clone(), e.resource.clone()))
    }

    /// Name -> version of every resource of a type.
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.shared.read().versions(type_url)
    }

    /// Open streams.
    pub fn connection_count(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// A snapshot of every open stream (for debug endpoints and tests).
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| c.info())
            .collect()
    }

    /// Ends every stream open now (proxies reconnect and resume with their versions).
    pub fn disconnect_all(&self) {
        let mut guard = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        guard.cancel();
        *guard = self.shared.closed.child_token();
    }

    /// Ends every stream and refuses new ones (process shutdown).
    pub fn close(&self) {
        self.shared.closed.cancel();
    }

    /// The tonic service, with message limits suitable for large snapshots (a reconnecting
    /// proxy lists every version it holds in one request).
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<XdsServer> {
        AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024)
    }

    fn start(&self, caller: Caller, inbound: Streaming<DeltaDiscoveryRequest>) -> ResponseStream {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.shared.config.queue_depth.max(1));
        let stop = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let conn = conn::Connection::new(id, self.shared.clone(), caller);
        // The task ends with the stream: when the proxy goes away, on error, or on `stop`.
        tokio::spawn(conn.run(inbound, tx, stop));
        Box::pin(ReceiverStream::new(rx).flat_map(
            |batch: Result<Vec<DeltaDiscoveryResponse>, Status>| {
                let items: Vec<Result<DeltaDiscoveryResponse, Status>> = match batch {
                    Ok(responses) => responses.into_iter().map(Ok).collect(),
                    Err(status) => vec![Err(status)],
                };
                futures::stream::iter(items)
            },
        ))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        if self.shared.closed.is_cancelled() {
            return Err(Status::unavailable("xDS server is shutting down"));
        }
        let caller = match &self.shared.auth {
            Some(auth) => auth.authenticate(request.metadata()).await?,
            None => Caller::default(),
        };
        Ok(Response::new(self.start(caller, request.into_inner())))
    }
}

#[cfg(test)]
mod tests;
