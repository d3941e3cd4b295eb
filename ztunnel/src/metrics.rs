//! Prometheus metrics: Istio's standard TCP/xDS/build series plus our own bad-input counters.

use prometheus::core::Collector;
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Istio's label names for the `istio_tcp_*` series, in the order [`ConnectionLabels::values`] yields.
pub const CONNECTION_LABEL_NAMES: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "request_protocol",
    "connection_security_policy",
    "response_flags",
];

/// Istio's placeholder for a label value we do not know.
pub const UNKNOWN: &str = "unknown";

/// Content type of [`Metrics::encode`] output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which end of the connection records the metric (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The proxy on the client side (outbound).
    Source,
    /// The proxy on the server side (inbound).
    Destination,
}

impl Reporter {
    /// Istio's spelling of the reporter label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Labels describing one side (source or destination) of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabels {
    /// Workload name (deployment-ish name).
    pub workload: String,
    /// Workload namespace.
    pub namespace: String,
    /// SPIFFE principal, e.g. `spiffe://cluster.local/ns/a/sa/b`.
    pub principal: String,
    /// `app` label.
    pub app: String,
    /// `version` label.
    pub version: String,
    /// Canonical service name.
    pub canonical_service: String,
    /// Canonical revision.
    pub canonical_revision: String,
    /// Cluster id.
    pub cluster: String,
}

impl Default for PeerLabels {
    fn default() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }
}

/// Every label value of an `istio_tcp_*` series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLabels {
    /// `source` or `destination`.
    pub reporter: String,
    /// Source workload name.
    pub source_workload: String,
    /// Source workload namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE principal.
    pub source_principal: String,
    /// Source `app` label.
    pub source_app: String,
    /// Source `version` label.
    pub source_version: String,
    /// Source canonical service.
    pub source_canonical_service: String,
    /// Source canonical revision.
    pub source_canonical_revision: String,
    /// Source cluster id.
    pub source_cluster: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination workload namespace.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE principal.
    pub destination_principal: String,
    /// Destination `app` label.
    pub destination_app: String,
    /// Destination `version` label.
    pub destination_version: String,
    /// Destination canonical service.
    pub destination_canonical_service: String,
    /// Destination canonical revision.
    pub destination_canonical_revision: String,
    /// Destination cluster id.
    pub destination_cluster: String,
    /// Destination service hostname (e.g. `svc.ns.svc.cluster.local`).
    pub destination_service: String,
    /// Destination service namespace.
    pub destination_service_namespace: String,
    /// Destination service short name.
    pub destination_service_name: String,
    /// Always `tcp` for ztunnel.
    pub request_protocol: String,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: String,
    /// Envoy-style response flags; `-` when none.
    pub response_flags: String,
}

impl Default for ConnectionLabels {
    fn default() -> Self {
        reporter_labels(
            None,
            &PeerLabels::default(),
            &PeerLabels::default(),
            &ServiceLabels::default(),
        )
    }
}

impl ConnectionLabels {
    /// Label values in the order of [`CONNECTION_LABEL_NAMES`].
    pub fn values(&self) -> [&str; 23] {
        [
            &self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.source_app,
            &self.source_version,
            &self.source_canonical_service,
            &self.source_canonical_revision,
            &self.source_cluster,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_app,
            &self.destination_version,
            &self.destination_canonical_service,
            &self.destination_canonical_revision,
            &self.destination_cluster,
            &self.destination_service,
            &self.destination_service_namespace,
            &self.destination_service_name,
            &self.request_protocol,
            &self.connection_security_policy,
            &self.response_flags,
        ]
    }
}

/// The destination service a connection was addressed to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLabels {
    /// Service hostname.
    pub hostname: String,
    /// Service namespace.
    pub namespace: String,
    /// Service short name.
    pub name: String,
}

impl Default for ServiceLabels {
    fn default() -> Self {
        Self {
            hostname: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            name: UNKNOWN.into(),
        }
    }
}

/// Builds the full label set for a TCP connection seen by `reporter` (`None` = unknown).
///
/// `connection_security_policy` starts as `unknown`; set it to `mutual_tls` when HBONE was used.
pub fn reporter_labels(
    reporter: Option<Reporter>,
    source: &PeerLabels,
    destination: &PeerLabels,
    service: &ServiceLabels,
) -> ConnectionLabels {
    ConnectionLabels {
        reporter: reporter.map_or(UNKNOWN, Reporter::as_str).into(),
        source_workload: source.workload.clone(),
        source_workload_namespace: source.namespace.clone(),
        source_principal: source.principal.clone(),
        source_app: source.app.clone(),
        source_version: source.version.clone(),
        source_canonical_service: source.canonical_service.clone(),
        source_canonical_revision: source.canonical_revision.clone(),
        source_cluster: source.cluster.clone(),
        destination_workload: destination.workload.clone(),
        destination_workload_namespace: destination.namespace.clone(),
        destination_principal: destination.principal.clone(),
        destination_app: destination.app.clone(),
        destination_version: destination.version.clone(),
        destination_canonical_service: destination.canonical_service.clone(),
        destination_canonical_revision: destination.canonical_revision.clone(),
        destination_cluster: destination.cluster.clone(),
        destination_service: service.hostname.clone(),
        destination_service_namespace: service.namespace.clone(),
        destination_service_name: service.name.clone(),
        request_protocol: "tcp".into(),
        connection_security_policy: UNKNOWN.into(),
        response_flags: "-".into(),
    }
}

/// All of ztunnel's metrics, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_received_bytes: IntCounterVec,
    tcp_sent_bytes: IntCounterVec,
    tcp_failed: IntCounterVec,
    xds_messages: IntCounterVec,
    xds_terminations: IntCounterVec,
    xds_nacks: IntCounterVec,
    hbone_rejected: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    config_errors: IntCounterVec,
    certificate_rotations: IntCounter,
    closed_by_policy: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `metric`; names and labels are constants, so any failure is a programming error.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = metric.unwrap_or_else(|e| panic!("invalid metric definition: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric registered twice: {e}"));
    metric
}

impl Metrics {
    /// Creates a fresh registry with every metric registered and `istio_build` set to 1.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let vec = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let one = |name: &str, help: &str| register(r, IntCounter::new(name, help));
        let tcp = &CONNECTION_LABEL_NAMES[..];
        let build_opts = Opts::new("istio_build", "Istio component build info");
        let build = register(r, IntGaugeVec::new(build_opts, &["component", "tag"]));
        build
            .with_label_values(&["ztunnel", env!("CARGO_PKG_VERSION")])
            .set(1);
        Self {
            tcp_opened: vec(
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                tcp,
            ),
            tcp_closed: vec(
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                tcp,
            ),
            tcp_received_bytes: vec("istio_tcp_received_bytes_total", "TCP bytes received", tcp),
            tcp_sent_bytes: vec("istio_tcp_sent_bytes_total", "TCP bytes sent", tcp),
            tcp_failed: vec(
                "istio_tcp_connections_failed_total",
                "TCP connects failed",
                tcp,
            ),
            xds_messages: vec(
                "istio_xds_message_total",
                "xDS responses received",
                &["url"],
            ),
            xds_terminations: vec(
                "istio_xds_connection_terminations_total",
                "xDS stream terminations",
                &["reason"],
            ),
            xds_nacks: vec("istio_xds_nack_total", "xDS responses NACKed", &["url"]),
            hbone_rejected: vec(
                "ztunnel_hbone_rejected_total",
                "HBONE rejected",
                &["reason"],
            ),
            tls_handshake_failures: vec(
                "ztunnel_tls_handshake_failures_total",
                "Failed TLS handshakes",
                &["listener"],
            ),
            config_errors: vec(
                "ztunnel_config_errors_total",
                "Bad config ignored",
                &["source"],
            ),
            certificate_rotations: one(
                "ztunnel_certificate_rotations_total",
                "Workload certificates issued or rotated",
            ),
            closed_by_policy: one(
                "ztunnel_connections_closed_by_policy_total",
                "Connections closed after policy began denying them",
            ),
            registry,
        }
    }

    /// The underlying registry, for callers that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a connection as opened; the returned guard counts bytes and the close.
    pub fn open_connection(&self, labels: &ConnectionLabels) -> ConnectionMetrics {
        let values = labels.values();
        self.tcp_opened.with_label_values(&values).inc();
        ConnectionMetrics {
            closed_counter: self.tcp_closed.with_label_values(&values),
            received: self.tcp_received_bytes.with_label_values(&values),
            sent: self.tcp_sent_bytes.with_label_values(&values),
            closed: false,
        }
    }

    /// Counts a connection as opened on a series resolved earlier (see [`ConnectionSeries`]).
    pub fn open_series(&self, series: &ConnectionSeries) -> ConnectionMetrics {
        let h = series.handles.get_or_init(|| {
            let values = series.labels.values();
            SeriesHandles {
                opened: self.tcp_opened.with_label_values(&values),
                closed: self.tcp_closed.with_label_values(&values),
                received: self.tcp_received_bytes.with_label_values(&values),
                sent: self.tcp_sent_bytes.with_label_values(&values),
            }
        });
        h.opened.inc();
        ConnectionMetrics {
            closed_counter: h.closed.clone(),
            received: h.received.clone(),
            sent: h.sent.clone(),
            closed: false,
        }
    }

    /// Counts a connection that could not be established.
    pub fn connection_failed(&self, labels: &ConnectionLabels) {
        self.tcp_failed.with_label_values(&labels.values()).inc();
    }

    /// Counts one xDS response received for `type_url`.
    pub fn xds_message(&self, type_url: &str) {
        self.xds_messages.with_label_values(&[type_url]).inc();
    }

    /// Counts one xDS response we NACKed for `type_url`.
    pub fn xds_nack(&self, type_url: &str) {
        self.xds_nacks.with_label_values(&[type_url]).inc();
    }

    /// Counts one xDS stream ending, e.g. reason `error`, `reconnect`, `shutdown`.
    pub fn xds_connection_terminated(&self, reason: &str) {
        self.xds_terminations.with_label_values(&[reason]).inc();
    }

    /// Counts a rejected HBONE request (`bad_request`, `no_workload`, `rbac`, `upstream`, `tls`).
    pub fn hbone_rejected(&self, reason: &str) {
        self.hbone_rejected.with_label_values(&[reason]).inc();
    }

    /// Counts a failed TLS handshake on `listener`.
    pub fn tls_handshake_failure(&self, listener: &str) {
        self.tls_handshake_failures
            .with_label_values(&[listener])
            .inc();
    }

    /// Counts an invalid configuration item from `source` (e.g. `xds`, `zds`, `local`).
    pub fn config_error(&self, source: &str) {
        self.config_errors.with_label_values(&[source]).inc();
    }

    /// Counts one certificate issuance or rotation.
    pub fn certificate_rotated(&self) {
        self.certificate_rotations.inc();
    }

    /// Counts one established connection closed because policy now denies it.
    pub fn connection_closed_by_policy(&self) {
        self.closed_by_policy.inc();
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let families = self.registry.gather();
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::warn!(error = %e, "failed to encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// One label set of the `istio_tcp_*` series, with its counters looked up on first use and
/// kept, so connections sharing the labels skip hashing 23 label values four times each.
#[derive(Debug)]
pub struct ConnectionSeries {
    labels: ConnectionLabels,
    handles: std::sync::OnceLock<SeriesHandles>,
}

#[derive(Debug)]
struct SeriesHandles {
    opened: IntCounter,
    closed: IntCounter,
    received: IntCounter,
    sent: IntCounter,
}

impl ConnectionSeries {
    /// A series for `labels`; nothing is registered until a connection opens on it.
    pub fn new(labels: ConnectionLabels) -> Self {
        Self {
            labels,
            handles: std::sync::OnceLock::new(),
        }
    }

    /// The label values.
    pub fn labels(&self) -> &ConnectionLabels {
        &self.labels
    }
}

/// Per-connection guard: counts bytes as they are reported and the close exactly once.
#[derive(Debug)]
pub struct ConnectionMetrics {
    closed_counter: IntCounter,
    received: IntCounter,
    sent: IntCounter,
    closed: bool,
}

impl ConnectionMetrics {
    /// Adds byte counts (received from the downstream, sent back to it); may be called repeatedly.
    pub fn record_bytes(&self, received: u64, sent: u64) {
        self.received.inc_by(received);
        self.sent.inc_by(sent);
    }

    /// Counts the connection as closed; later calls and the drop do nothing.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.closed_counter.inc();
        }
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
