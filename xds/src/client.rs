//! Delta-ADS client: one bidirectional stream to the control plane carrying every subscribed type,
//! with ACK/NACK per response, on-demand subscriptions and reconnects that resend the versions
//! it already holds (`initial_resource_versions`) so the server sends only what changed.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::google::rpc::Status;
use crate::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};

/// Outgoing requests buffered per stream: subscriptions plus one ACK/NACK per response.
const REQUEST_BUFFER: usize = 64;

/// Errors of the delta client that end one stream (the client then reconnects).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address or TLS settings are unusable.
    #[error("invalid xDS endpoint {address:?}: {reason}")]
    Endpoint {
        /// The configured address.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting failed.
    #[error("connecting to xDS server: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The stream failed.
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
    /// The server closed the stream.
    #[error("xDS server closed the stream")]
    Closed,
}

/// Where the bearer token comes from; re-read on every connect so rotated tokens are used.
#[derive(Clone, Debug, Default)]
pub enum TokenSource {
    /// No `authorization` header.
    #[default]
    None,
    /// A fixed token.
    Static(String),
    /// A file holding the token (e.g. a projected service account token).
    File(std::path::PathBuf),
}

impl TokenSource {
    /// The current token (trimmed; an empty token counts as none). Files are re-read each time
    /// because projected service account tokens rotate.
    pub async fn token(&self) -> std::io::Result<Option<String>> {
        let token = match self {
            TokenSource::None => return Ok(None),
            TokenSource::Static(t) => t.trim().to_string(),
            TokenSource::File(p) => tokio::fs::read_to_string(p).await?.trim().to_string(),
        };
        Ok((!token.is_empty()).then_some(token))
    }
}

/// Settings of a delta-ADS client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` (plaintext) or `https://host:port` (TLS).
    pub address: String,
    /// PEM roots that verify the server; required for `https`.
    pub root_ca_pem: Option<String>,
    /// Name to verify in the server certificate (defaults to the address host).
    pub tls_server_name: Option<String>,
    /// Bearer token for the `authorization` metadata.
    pub token: TokenSource,
    /// Sent as `clusterid` metadata.
    pub cluster_id: String,
    /// Identifies this proxy.
    pub node: Node,
    /// Type URLs subscribed as wildcards when the stream opens.
    pub wildcard_types: Vec<String>,
    /// First reconnect delay; doubles up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    /// Largest reconnect delay.
    pub max_backoff: Duration,
}

/// A resource the handler refused, reported to the server in a NACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Resource name.
    pub name: String,
    /// Why it was refused.
    pub error: String,
}

/// Receives the resources of one response. Accepted resources are applied even when others in
/// the same response are rejected, so one bad resource never blocks the rest.
pub trait Handler: Send + 'static {
    /// Applies updates and removals of one type; returns the resources it refused.
    fn handle(
        &mut self,
        type_url: &str,
        updates: Vec<Resource>,
        removed: Vec<String>,
    ) -> Vec<Rejected>;

    /// Called when a stream is established (before any response).
    fn connected(&mut self) {}

    /// Called when a stream ends, with the reason.
    fn disconnected(&mut self, _reason: &ClientError) {}

    /// Called after each response is ACKed (`rejected` empty) or NACKed.
    fn responded(&mut self, _type_url: &str, _rejected: &[Rejected]) {}
}

/// Asks a running client to add on-demand subscriptions.
#[derive(Clone, Debug)]
pub struct SubscriptionHandle {
    tx: mpsc::Sender<(String, Vec<String>)>,
}

impl SubscriptionHandle {
    /// Subscribes to `names` of `type_url` (e.g. `<network>/<ip>` for an Address).
    pub async fn subscribe(&self, type_url: &str, names: Vec<String>) -> bool {
        self.tx.send((type_url.to_string(), names)).await.is_ok()
    }
}

/// Per-type state that survives reconnects.
#[derive(Default)]
struct TypeState {
    /// Accepted resource versions, resent as `initial_resource_versions`.
    versions: HashMap<String, String>,
    /// Explicit (non-wildcard) subscriptions.
    names: BTreeSet<String>,
}

/// The delta-ADS client.
pub struct DeltaClient {
    config: ClientConfig,
    types: HashMap<String, TypeState>,
    subscriptions: mpsc::Receiver<(String, Vec<String>)>,
}

impl DeltaClient {
    /// Creates a client and the handle for on-demand subscriptions.
    pub fn new(config: ClientConfig) -> (Self, SubscriptionHandle) {
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        let types = config
            .wildcard_types
            .iter()
            .map(|t| (t.clone(), TypeState::default()))
            .collect();
        (
            Self {
                config,
                types,
                subscriptions: rx,
            },
            SubscriptionHandle { tx },
        )
    }

    fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let bad = |reason: String| ClientError::Endpoint {
            address: self.config.address.clone(),
            reason,
        };
        let mut ep = Endpoint::from_shared(self.config.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if self.config.address.starts_with("https://") {
            let pem = self
                .config
                .root_ca_pem
                .as_ref()
                .ok_or_else(|| bad("https needs a root CA (XDS_ROOT_CA)".into()))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(name) = &self.config.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        Ok(ep)
    }

    /// Runs until `shutdown` is cancelled, reconnecting with jittered exponential backoff.
    pub async fn run<H: Handler>(mut self, mut handler: H, shutdown: CancellationToken) {
        let mut backoff = self.config.initial_backoff;
        loop {
            let result = tokio::select! {
                r = self.run_stream(&mut handler, &mut backoff) => r,
                _ = shutdown.cancelled() => return,
            };
            let err = match result {
                Ok(()) => ClientError::Closed,
                Err(e) => e,
            };
            tracing::warn!(error = %err, address = %self.config.address, "xDS stream ended; reconnecting");
            handler.disconnected(&err);
            let delay = jitter(backoff);
            backoff = (backoff * 2).min(self.config.max_backoff);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        let mut types: Vec<_> = self.types.iter().collect();
        types.sort_by(|a, b| a.0.cmp(b.0));
        types
            .into_iter()
            .enumerate()
            .map(|(i, (type_url, st))| DeltaDiscoveryRequest {
                // Envoy sends the node only on the first request of a stream.
                node: (i == 0).then(|| self.config.node.clone()),
                type_url: type_url.clone(),
                // A wildcard type that also has on-demand names must say "*" explicitly, or
                // the server would treat the stream as names-only.
                resource_names_subscribe: if st.names.is_empty() {
                    Vec::new()
                } else if self.config.wildcard_types.contains(type_url) {
                    std::iter::once("*".to_string())
                        .chain(st.names.iter().cloned())
                        .collect()
                } else {
                    st.names.iter().cloned().collect()
                },
                initial_resource_versions: st.versions.clone(),
                ..Default::default()
            })
            .collect()
    }

    async fn run_stream<H: Handler>(
        &mut self,
        handler: &mut H,
        backoff: &mut Duration,
    ) -> Result<(), ClientError> {
        let channel: Channel = self.endpoint()?.connect().await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        for req in self.initial_requests() {
            // The buffer is larger than the number of types we subscribe to.
            tx.try_send(req).map_err(|_| ClientError::Closed)?;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let md = request.metadata_mut();
        match self.config.token.token().await {
            Ok(Some(token)) => match MetadataValue::try_from(format!("Bearer {token}")) {
                Ok(v) => {
                    md.insert("authorization", v);
                }
                Err(_) => tracing::warn!("xDS token is not a valid header value; sending none"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read xDS token; sending none"),
        }
        if let Ok(v) = MetadataValue::try_from(self.config.cluster_id.as_str()) {
            md.insert("clusterid", v);
        }
        let mut responses = client
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        handler.connected();
        *backoff = self.config.initial_backoff;
        loop {
            tokio::select! {
                msg = responses.next() => {
                    let Some(msg) = msg else { return Ok(()) };
                    let ack = self.on_response(handler, msg?);
                    tx.send(ack).await.map_err(|_| ClientError::Closed)?;
                }
                Some((type_url, names)) = self.subscriptions.recv() => {
                    let st = self.types.entry(type_url.clone()).or_default();
                    let new: Vec<String> =
                        names.into_iter().filter(|n| st.names.insert(n.clone())).collect();
                    if !new.is_empty() {
                        let req = DeltaDiscoveryRequest {
                            type_url,
                            resource_names_subscribe: new,
                            ..Default::default()
                        };
                        tx.send(req).await.map_err(|_| ClientError::Closed)?;
                    }
                }
            }
        }
    }

    /// Hands a response to the handler and builds its ACK (or NACK).
    fn on_response<H: Handler>(
        &mut self,
        handler: &mut H,
        resp: DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse {
            type_url,
            nonce,
            resources,
            removed_resources,
            ..
        } = resp;
        let versions: Vec<(String, String)> = resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        let rejected = handler.handle(&type_url, resources, removed_resources.clone());
        let st = self.types.entry(type_url.clone()).or_default();
        for name in &removed_resources {
            st.versions.remove(name);
        }
        for (name, version) in versions {
            if !rejected.iter().any(|r| r.name == name) {
                st.versions.insert(name, version);
            }
        }
        handler.responded(&type_url, &rejected);
        let error_detail = (!rejected.is_empty()).then(|| {
            let message = rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.error))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(%type_url, %message, "rejecting xDS resources (NACK)");
            Status {
                // INVALID_ARGUMENT
                code: 3,
                message,
                details: vec![],
            }
        });
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        }
    }
}

/// Spreads reconnects of many proxies: a random delay in [d/2, d].
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests;
