//! Wires the control plane together: a config source feeds the model, the model's deltas
//! become xDS pushes, the CA signs with impersonation checked against the model, and the
//! monitoring port serves metrics and readiness.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ca::kube::{KubeRootStore, ROOT_CONFIGMAP, TokenReviewAuthenticator, TokenReviewConfig};
use crate::ca::{
    Authenticator, CaConfig, CaService, CertificateAuthority, FileRootStore, NodeAuthorizer,
    NodeTokens, ServingConfig,
};
use crate::config::{ConfigEvent, Object};
use crate::model::{EndpointMode, Model, ModelConfig, ModelDelta};
use crate::readiness::{Readiness, ReadyGuard};
use crate::source::files::FileSource;
use crate::source::kube::KubeSource;
use crate::xds::{XdsConfig, XdsMetrics, XdsServer};

/// Where configuration comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A directory of Kubernetes YAML, watched for changes.
    Files,
    /// The Kubernetes API (in-cluster or kubeconfig credentials).
    Kube,
}

/// mesh-controller: turns Kubernetes and Istio configuration into workload xDS for every
/// ztunnel, and issues workload certificates.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Config source: `files` (a directory of YAML) or `kube` (the API server).
    #[arg(long, env = "CONFIG_SOURCE", value_enum, default_value = "kube")]
    pub config_source: SourceKind,

    /// Directory of Kubernetes YAML for the files source (watched; subdirectories included).
    #[arg(long, env = "CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// CA directory: a root is generated and kept here on first start unless Istio-style
    /// `cacerts` (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem) are already present;
    /// the root bundle is published as root-cert.pem.
    #[arg(long, env = "CA_DIR", default_value = "./var/lib/mesh/ca")]
    pub ca_dir: PathBuf,

    /// Namespace of the controller (kube mode: CA Secret `istio-ca-secret` / `cacerts` live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub ca_namespace: String,

    /// YAML file `{nodes: {<node>: <token>}}`: bearer tokens of node proxies. Required with the
    /// files source; in kube mode callers are authenticated with TokenReview unless this is set.
    #[arg(long, env = "NODE_TOKENS")]
    pub node_tokens: Option<PathBuf>,

    /// Plaintext xDS address (for local use).
    #[arg(long, env = "XDS_ADDR", default_value = "0.0.0.0:15010")]
    pub xds_addr: SocketAddr,

    /// TLS address serving xDS and the CA.
    #[arg(long, env = "SECURE_ADDR", default_value = "0.0.0.0:15012")]
    pub secure_addr: SocketAddr,

    /// Monitoring address: GET /metrics and /ready.
    #[arg(long, env = "MONITORING_ADDR", default_value = "0.0.0.0:15014")]
    pub monitoring_addr: SocketAddr,

    /// IP SANs of the controller's serving certificate (repeatable).
    #[arg(long = "serving-ip", env = "SERVING_IPS", value_delimiter = ',')]
    pub serving_ips: Vec<IpAddr>,

    /// Cluster id in workload uids and telemetry.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Trust domain of workload identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// DNS suffix of service hostnames.
    #[arg(long, env = "DOMAIN_SUFFIX", default_value = "cluster.local")]
    pub domain_suffix: String,

    /// Network of this cluster's workloads.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    /// Longest workload certificate lifetime granted (e.g. 24h).
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub max_cert_ttl: Duration,

    /// Quiet time before pushing a burst of config changes.
    #[arg(long, env = "PILOT_DEBOUNCE_AFTER", default_value = "50ms", value_parser = parse_duration)]
    pub debounce: Duration,

    /// Log filter (tracing syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    /// Log as JSON lines.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// Parses durations like `500ms`, `90s`, `5m`, `24h` or `1h30m` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Controller-level metrics (the xDS server registers its own).
struct ControllerMetrics {
    config_errors: IntCounterVec,
    model_updates: IntCounter,
    model_seconds: Histogram,
}

impl ControllerMetrics {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        let config_errors = IntCounterVec::new(
            Opts::new(
                "mesh_controller_config_errors_total",
                "Configuration documents or watch events rejected, by source",
            ),
            &["source"],
        )?;
        let model_updates = IntCounter::new(
            "mesh_controller_model_updates_total",
            "Batches of config events applied to the model",
        )?;
        let model_seconds = Histogram::with_opts(HistogramOpts::new(
            "mesh_controller_model_update_seconds",
            "Time to apply one batch of config events and compute the xDS delta",
        ))?;
        registry.register(Box::new(config_errors.clone()))?;
        registry.register(Box::new(model_updates.clone()))?;
        registry.register(Box::new(model_seconds.clone()))?;
        Ok(Self {
            config_errors,
            model_updates,
            model_seconds,
        })
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = Arc::new(ControllerMetrics::new(&registry)?);
    let xds_metrics = Arc::new(XdsMetrics::new(&registry)?);
    let shutdown = CancellationToken::new();
    let ready = Readiness::default();

    let kube_client = match args.config_source {
        SourceKind::Kube => Some(
            kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?,
        ),
        SourceKind::Files => None,
    };
    // CA: load or create the root, publish it, and issue our own serving certificate.
    let ca_config = CaConfig {
        trust_domain: args.trust_domain.clone(),
        max_ttl: args.max_cert_ttl,
        ..CaConfig::default()
    };
    let (authority, roots_at, kube_store) = match &kube_client {
        Some(client) => {
            let store = KubeRootStore::new(client.clone(), args.ca_namespace.clone());
            let authority = store
                .load_or_create_authority(ca_config)
                .await
                .with_context(|| {
                    format!("certificate authority in namespace {}", args.ca_namespace)
                })?;
            (
                authority,
                format!("ConfigMap {ROOT_CONFIGMAP} in every namespace"),
                Some(store),
            )
        }
        None => {
            let store = FileRootStore::new(&args.ca_dir);
            let authority = CertificateAuthority::load_or_create(&store, ca_config)
                .await
                .with_context(|| format!("certificate authority in {}", args.ca_dir.display()))?;
            (
                authority,
                store.published_roots().display().to_string(),
                None,
            )
        }
    };
    let authority = Arc::new(authority);
    let serving = authority
        .issue_serving_cert(&ServingConfig {
            ips: args.serving_ips.clone(),
            ..ServingConfig::default()
        })
        .context("issuing the controller's serving certificate")?;
    let auth: Arc<dyn Authenticator> = match (&args.node_tokens, &kube_client) {
        (Some(path), _) => Arc::new(
            NodeTokens::load(path)
                .await
                .with_context(|| format!("node tokens {}", path.display()))?,
        ),
        (None, Some(client)) => Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            TokenReviewConfig {
                trust_domain: args.trust_domain.clone(),
                ..TokenReviewConfig::default()
            },
        )),
        (None, None) => bail!("the files source needs --node-tokens to authenticate node proxies"),
    };

    // Model, shared read-only with the CA for impersonation checks.
    let model = Arc::new(RwLock::new(Model::new(ModelConfig {
        cluster_id: args.cluster_id.clone(),
        trust_domain: args.trust_domain.clone(),
        domain_suffix: args.domain_suffix.clone(),
        network: args.network.clone(),
        mode: match args.config_source {
            SourceKind::Files => EndpointMode::Selector,
            SourceKind::Kube => EndpointMode::EndpointSlices,
        },
        ..ModelConfig::default()
    })));
    let m = model.clone();
    let node_authorizer: NodeAuthorizer = Arc::new(move |node, id| {
        m.read()
            .map(|m| m.identity_on_node(node, id))
            .unwrap_or(false)
    });
    let ca = CaService::new(authority.clone(), auth.clone(), Some(node_authorizer));
    let xds = XdsServer::with_config(
        xds_metrics,
        XdsConfig {
            debounce: args.debounce,
            ..XdsConfig::default()
        },
        Some(auth),
    );

    // Source -> model -> xDS.
    let (tx, rx) = mpsc::channel(64);
    let synced = ready.register("config");
    let tasks = tokio_util::task::TaskTracker::new();
    match args.config_source {
        SourceKind::Files => {
            let dir = args
                .config_dir
                .clone()
                .context("the files source needs --config-dir")?;
            let errors = metrics.config_errors.clone();
            let source = FileSource::new(
                dir,
                tx,
                Arc::new(move |e| {
                    errors.with_label_values(&["files"]).inc();
                    tracing::error!(error = %e, "rejected configuration document");
                }),
            );
            tasks.spawn(source.run(shutdown.clone()));
        }
        SourceKind::Kube => {
            let client = kube_client.clone().context("kube client")?;
            let errors = metrics.config_errors.clone();
            let source = KubeSource::new(
                client,
                tx,
                Arc::new(move |kind, e| {
                    errors.with_label_values(&["kube"]).inc();
                    tracing::warn!(%kind, error = e, "watch error");
                }),
            );
            tasks.spawn(source.run(shutdown.clone()));
        }
    }
    tasks.spawn(apply_loop(
        rx,
        model.clone(),
        xds.clone(),
        metrics.clone(),
        synced,
        kube_store,
    ));

    let plain = bind(args.xds_addr, "xDS").await?;
    let secure = bind(args.secure_addr, "xDS/CA (TLS)").await?;
    let mon = bind(args.monitoring_addr, "monitoring").await?;
    tracing::info!(xds = %args.xds_addr, secure = %args.secure_addr, monitoring = %args.monitoring_addr, roots = %roots_at, "serving");
    let servers = tokio_util::task::TaskTracker::new();
    let s = shutdown.clone();
    let x = xds.clone();
    servers.spawn(async move {
        if let Err(e) = crate::xds::serve(plain, x, None, None, s).await {
            tracing::error!(error = %e, "plaintext xDS server failed");
        }
    });
    let s = shutdown.clone();
    let x = xds.clone();
    let tls = serving.tls_config();
    servers.spawn(async move {
        if let Err(e) = crate::xds::serve(secure, x, Some(ca), Some(tls), s).await {
            tracing::error!(error = %e, "TLS xDS/CA server failed");
        }
    });
    servers.spawn(monitoring::serve_with_debug(
        mon,
        registry,
        ready.check(),
        debug_routes(&xds, &model),
        shutdown.clone(),
    ));

    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    xds.close();
    servers.close();
    servers.wait().await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    Ok(())
}

/// The monitoring port's debug endpoints. `/debug/connections` lists every connected proxy
/// with its own counters (Istio's istiod serves the same path), which would be too many series
/// for Prometheus in a large cluster.
/// `/debug/policy-status` lists the policies whose conversion for ztunnel changed or skipped
/// something (L7 attributes, AUDIT/CUSTOM actions, targetRefs, invalid values) and why.
fn debug_routes(xds: &XdsServer, model: &Arc<RwLock<Model>>) -> monitoring::DebugRoutes {
    let xds = xds.clone();
    let connections: monitoring::DebugHandler =
        Arc::new(move || connections_json(&xds.connections()).to_string());
    let model = model.clone();
    let statuses: monitoring::DebugHandler = Arc::new(move || {
        let list = model
            .read()
            .map(|m| m.policy_statuses())
            .unwrap_or_default();
        let policies: Vec<_> = list
            .iter()
            .map(|(k, status)| {
                serde_json::json!({
                    "kind": k.kind.to_string(),
                    "namespace": k.namespace,
                    "name": k.name,
                    "status": status,
                })
            })
            .collect();
        serde_json::json!({ "policies": policies }).to_string()
    });
    Arc::new(vec![
        ("/debug/connections", connections),
        ("/debug/policy-status", statuses),
    ])
}

/// `{"totalClients": N, "clients": [...]}`, one entry per xDS stream, oldest first.
fn connections_json(conns: &[crate::xds::ConnectionInfo]) -> serde_json::Value {
    let mut clients: Vec<_> = conns
        .iter()
        .map(|c| {
            let since = c
                .connected_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            serde_json::json!({
                "connectionId": c.id,
                "proxyId": c.node_id,
                "callerNode": c.caller_node,
                "connectedAt": humantime::format_rfc3339_seconds(c.connected_at).to_string(),
                "connectedAtUnix": since,
                "responses": c.responses,
                "resourcesSent": c.resources_sent,
                "acks": c.acks,
                "nacks": c.nacks,
            })
        })
        .collect();
    clients.sort_by_key(|c| c["connectionId"].as_u64());
    serde_json::json!({ "totalClients": clients.len(), "clients": clients })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} listener on {addr}"))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// Applies source batches to the model and pushes what changed.
async fn apply_loop(
    mut rx: mpsc::Receiver<Vec<ConfigEvent>>,
    model: Arc<RwLock<Model>>,
    xds: XdsServer,
    metrics: Arc<ControllerMetrics>,
    mut synced: Option<ReadyGuard>,
    roots: Option<KubeRootStore>,
) {
    while let Some(batch) = rx.recv().await {
        let is_synced = batch.iter().any(|e| matches!(e, ConfigEvent::Synced));
        if let Some(store) = &roots {
            publish_roots_to_new_namespaces(store, &batch);
        }
        let started = Instant::now();
        let delta = match model.write() {
            Ok(mut m) => m.apply(batch),
            Err(_) => {
                tracing::error!("model lock poisoned; stopping");
                return;
            }
        };
        push(&xds, delta);
        metrics.model_updates.inc();
        metrics
            .model_seconds
            .observe(started.elapsed().as_secs_f64());
        if is_synced && let Some(g) = synced.take() {
            tracing::info!(elapsed = ?started.elapsed(), "initial configuration loaded");
            drop(g);
        }
    }
}

/// Publishes the root ConfigMap into namespaces that appear (kube mode); a no-op where present.
fn publish_roots_to_new_namespaces(store: &KubeRootStore, batch: &[ConfigEvent]) {
    for event in batch {
        if let ConfigEvent::Apply(obj) = event
            && let Object::Namespace(ns) = obj.as_ref()
            && let Some(name) = ns.metadata.name.clone()
        {
            let store = store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.publish_to_namespace(&name).await {
                    tracing::warn!(namespace = %name, error = %e, "publishing the root certificate failed");
                }
            });
        }
    }
}

/// Hands a model delta to the xDS server, encoded as `Any`.
pub fn push(xds: &XdsServer, delta: ModelDelta) {
    fn split<M: Message>(
        type_url: &str,
        items: Vec<(String, Option<M>)>,
    ) -> (Vec<(String, prost_types::Any)>, Vec<String>) {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for (name, item) in items {
            match item {
                Some(m) => upserts.push((
                    name,
                    prost_types::Any {
                        type_url: type_url.to_string(),
                        value: m.encode_to_vec(),
                    },
                )),
                None => removals.push(name),
            }
        }
        (upserts, removals)
    }
    let (up, rm) = split(::xds::ADDRESS_TYPE, delta.addresses);
    if !up.is_empty() || !rm.is_empty() {
        xds.update(::xds::ADDRESS_TYPE, up, rm);
    }
    let (up, rm) = split(::xds::AUTHORIZATION_TYPE, delta.authorizations);
    if !up.is_empty() || !rm.is_empty() {
        xds.update(::xds::AUTHORIZATION_TYPE, up, rm);
    }
}
