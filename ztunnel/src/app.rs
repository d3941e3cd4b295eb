//! Wires the process together: config source (xDS or local file), certificates, admin servers,
//! proxies (shared or dedicated mode) and the drain sequence on SIGTERM or /quitquitquit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use hbone::ca::{CaClientConfig, CertificateProvider, FakeCa, IstioCaClient, TokenSource};
use hbone::pool::PoolConfig;
use hbone::server::ServerSettings;
use hbone::store::{CertStore, RotationConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use xds::client::{ClientConfig, DeltaClient};

use crate::admin::{self, AdminHandlers, SetLogLevel};
use crate::config::{Args, ProxyMode};
use crate::inpod::InpodManager;
use crate::localconfig::LocalConfig;
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::proxy::{Proxy, ProxyConfig, Shared, WorkloadInfo};
use crate::readiness::Readiness;
use crate::shards::Shards;
use crate::state::{ProxyState, StateStore};
use crate::xdshandler::StateHandler;

/// How often the local config file is checked for changes.
const LOCAL_CONFIG_POLL: Duration = Duration::from_millis(500);

/// Hooks into the logging setup that the admin API needs.
pub struct LogControl {
    /// Current filter.
    pub current: Arc<dyn Fn() -> String + Send + Sync>,
    /// Replaces the filter.
    pub set: SetLogLevel,
}

/// Runs ztunnel until it is told to stop and has drained.
pub async fn run(mut args: Args, logs: LogControl) -> anyhow::Result<()> {
    // LOCAL_XDS_PATH="" means unset, as in Istio's ztunnel.
    args.local_config = args.local_config.filter(|p| !p.as_os_str().is_empty());
    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::new();
    let shutdown = CancellationToken::new();
    let drain = CancellationToken::new();

    let state = StateStore::new(ProxyState::new());
    let state_ready = readiness.register("config");
    if let Some(path) = &args.local_config {
        let (applied, mtime) = load_local_config(path, &state)
            .with_context(|| format!("local config {}", path.display()))?;
        tracing::info!(path = %path.display(), workloads = applied.0, services = applied.1, policies = applied.2, "loaded local config");
        tokio::spawn(watch_local_config(
            path.clone(),
            mtime,
            state.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    // In-pod proxies start only once the state is complete: before that, destinations would be
    // unknown and traffic meant for HBONE would pass through in plaintext.
    let (synced_tx, synced) = tokio::sync::oneshot::channel();
    if args.xds_address.is_empty() {
        if args.local_config.is_none() {
            bail!("no configuration source: set XDS_ADDRESS or LOCAL_XDS_PATH");
        }
        state_ready.ready();
        let _ = synced_tx.send(());
    } else {
        start_xds(
            &args,
            state.clone(),
            metrics.clone(),
            &readiness,
            synced_tx,
            shutdown.clone(),
        )?;
        drop(state_ready);
    }

    let provider = certificate_provider(&args)?;
    let certs = CertStore::new(provider, RotationConfig::default());
    spawn_rotation_metrics(&certs, metrics.clone(), shutdown.clone());

    let shards = Shards::start(
        args.worker_threads,
        args.worker_affinity,
        args.worker_busy_poll,
    )
    .context("starting data-path workers")?;
    let pinned: Vec<_> = shards.iter().filter_map(|s| s.cpu).collect();
    tracing::info!(workers = shards.len(), ?pinned, "data-path workers started");
    let shared = Shared {
        shards,
        state: state.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        config: Arc::new(ProxyConfig {
            cluster_id: args.cluster_id.clone(),
            trust_domain: args.trust_domain.clone(),
            network: args.network.clone(),
            drain_deadline: args.drain_duration,
            pool: PoolConfig::default(),
            server: ServerSettings {
                max_header_list_size: 64 * 1024,
                ..ServerSettings::default()
            },
            connect_timeout: args.connect_timeout,
        }),
    };

    let quit = drain.clone();
    let dump_state = state.clone();
    let dump_certs = certs.clone();
    let handlers = AdminHandlers {
        config_dump: Arc::new(move || {
            let mut dump = dump_state.dump();
            let certs: Vec<_> = dump_certs
                .dump()
                .into_iter()
                .map(|c| {
                    serde_json::json!({
                        "identity": c.identity,
                        "serial": c.serial,
                        "notBefore": c.not_before,
                        "notAfter": c.not_after,
                        "refreshAt": c.refresh_at,
                        "chain": c.chain_subjects,
                        "roots": c.root_subjects,
                    })
                })
                .collect();
            dump["certificates"] = serde_json::Value::Array(certs);
            dump
        }),
        log_level: logs.current,
        set_log_level: logs.set,
        quit: Arc::new(move || quit.cancel()),
    };
    let admin = bind(args.admin_addr, "admin").await?;
    let stats = bind(args.stats_addr, "metrics").await?;
    let ready = bind(args.readiness_addr, "readiness").await?;
    let servers = tokio_util::task::TaskTracker::new();
    servers.spawn(admin::serve_admin(admin, handlers, shutdown.clone()));
    servers.spawn(admin::serve_metrics(
        stats,
        metrics.clone(),
        shutdown.clone(),
    ));
    servers.spawn(admin::serve_readiness(
        ready,
        readiness.clone(),
        shutdown.clone(),
    ));

    let proxies = tokio_util::task::TaskTracker::new();
    match args.proxy_mode {
        ProxyMode::Dedicated => {
            let info = args
                .proxy_workload_info
                .as_deref()
                .and_then(WorkloadInfo::parse)
                .context(
                    "dedicated mode needs PROXY_WORKLOAD_INFO=namespace/name/service-account",
                )?;
            let proxy = Proxy::bind(shared, info, Netns::current())
                .context("binding proxy listeners (15001, 15006, 15008)")?;
            let d = drain.clone();
            proxies.spawn(async move {
                // Listeners are bound (connections queue) but served only with complete state.
                tokio::select! {
                    _ = synced => {}
                    _ = d.cancelled() => return,
                }
                proxy.run(d).await
            });
        }
        ProxyMode::Shared => {
            let host = Netns::open_host().context("opening own network namespace")?;
            let manager = InpodManager::new(
                shared,
                args.inpod_uds.clone(),
                args.bpf_pin_root.clone(),
                host,
            );
            let zds_ready = readiness.register("zds snapshot");
            let d = drain.clone();
            proxies.spawn(async move {
                tokio::select! {
                    _ = synced => {}
                    _ = d.cancelled() => return,
                }
                manager.run(d, Some(zds_ready)).await
            });
        }
    }
    proxies.close();

    wait_for_stop(&drain).await;
    tracing::info!(deadline = ?args.drain_duration, "draining");
    drain.cancel();
    // Proxies stop accepting at once and finish connections within the drain deadline.
    proxies.wait().await;
    shutdown.cancel();
    servers.close();
    servers.wait().await;
    tracing::info!("shut down");
    Ok(())
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} listener on {addr}"))
}

/// Waits for SIGTERM, SIGINT or a /quitquitquit (which cancels `drain`).
async fn wait_for_stop(drain: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        drain.cancelled().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
        _ = drain.cancelled() => tracing::info!("quitquitquit requested"),
    }
}

fn certificate_provider(args: &Args) -> anyhow::Result<Arc<dyn CertificateProvider>> {
    if args.fake_ca {
        tracing::warn!(
            "FAKE_CA is set: workload certificates come from an in-process self-signed CA (development only)"
        );
        let ca = FakeCa::new(&args.trust_domain)
            .context("creating the development CA")?
            .with_ttl(args.secret_ttl);
        return Ok(Arc::new(ca));
    }
    let address = args
        .ca_address
        .clone()
        .unwrap_or_else(|| args.xds_address.clone());
    if address.is_empty() {
        bail!("no certificate authority: set CA_ADDRESS (or FAKE_CA=true for development)");
    }
    let root_ca_pem = read_root(&address, &args.ca_root_ca)?;
    let client = IstioCaClient::new(CaClientConfig {
        address,
        root_ca_pem,
        token: token_source(&args.auth_token),
        cluster_id: args.cluster_id.clone(),
        impersonate: args.proxy_mode == ProxyMode::Shared,
        ttl: args.secret_ttl,
    })
    .context("certificate authority client")?;
    Ok(Arc::new(client))
}

fn token_source(path: &Path) -> TokenSource {
    if path.exists() {
        TokenSource::File(path.to_path_buf())
    } else {
        TokenSource::None
    }
}

fn read_root(address: &str, path: &Path) -> anyhow::Result<Option<String>> {
    if !address.starts_with("https://") {
        return Ok(None);
    }
    std::fs::read_to_string(path)
        .map(Some)
        .with_context(|| format!("reading root certificate {} for {address}", path.display()))
}

fn start_xds(
    args: &Args,
    state: StateStore,
    metrics: Arc<Metrics>,
    readiness: &Readiness,
    synced: tokio::sync::oneshot::Sender<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let root_ca_pem = read_root(&args.xds_address, &args.xds_root_ca)?;
    let mut metadata = prost_types::Struct::default();
    let mut put = |k: &str, v: &str| {
        metadata.fields.insert(
            k.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(v.to_string())),
            },
        );
    };
    put("NAME", &args.pod_name);
    put("NAMESPACE", &args.pod_namespace);
    put("INSTANCE_IPS", &args.instance_ip);
    put("NODE_NAME", &args.node_name);
    put("CLUSTER_ID", &args.cluster_id);
    let node = xds::Node {
        id: format!(
            "ztunnel~{}~{}.{}~{}.svc.cluster.local",
            args.instance_ip, args.pod_name, args.pod_namespace, args.pod_namespace
        ),
        metadata: Some(metadata),
        user_agent_name: "ztunnel".into(),
        user_agent_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let types = vec![
        xds::ADDRESS_TYPE.to_string(),
        xds::AUTHORIZATION_TYPE.to_string(),
    ];
    let ready = types
        .iter()
        .map(|t| (t.clone(), readiness.register(&format!("xds {t}"))))
        .collect();
    let (client, _subscriptions) = DeltaClient::new(ClientConfig {
        address: args.xds_address.clone(),
        root_ca_pem,
        tls_server_name: args.xds_server_name.clone(),
        token: token_source(&args.auth_token),
        cluster_id: args.cluster_id.clone(),
        node,
        wildcard_types: types,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(15),
    });
    let handler = StateHandler::new(state, metrics, ready).notify_synced(synced);
    tokio::spawn(client.run(handler, shutdown));
    Ok(())
}

type Counts = (usize, usize, usize);

/// Parses the file and replaces the state's contents with it (all or nothing).
fn load_local_config(path: &Path, state: &StateStore) -> anyhow::Result<(Counts, SystemTime)> {
    let mtime = std::fs::metadata(path)?.modified()?;
    let config = LocalConfig::load(path)?;
    let (workloads, services, policies) = config.into_state()?;
    let counts = (workloads.len(), services.len(), policies.len());
    state.update(|s| {
        *s = ProxyState::new();
        workloads.into_iter().for_each(|w| s.upsert_workload(w));
        services.into_iter().for_each(|v| s.upsert_service(v));
        policies.into_iter().for_each(|p| s.upsert_policy(p));
    });
    Ok((counts, mtime))
}

/// Reloads the local config when it changes; a bad file is reported and the old state kept.
async fn watch_local_config(
    path: PathBuf,
    mut mtime: SystemTime,
    state: StateStore,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOCAL_CONFIG_POLL) => {}
            _ = shutdown.cancelled() => return,
        }
        let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
            continue;
        };
        if modified == mtime {
            continue;
        }
        mtime = modified;
        match load_local_config(&path, &state) {
            Ok((c, _)) => {
                tracing::info!(path = %path.display(), workloads = c.0, services = c.1, policies = c.2, "reloaded local config")
            }
            Err(e) => {
                metrics.config_error("local");
                tracing::error!(path = %path.display(), error = format!("{e:#}"), "rejected local config; keeping the previous one");
            }
        }
    }
}

fn spawn_rotation_metrics(certs: &CertStore, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut rotations = certs.subscribe();
    tokio::spawn(async move {
        // The watch carries the total rotation count; several rotations may arrive as one wake-up.
        let mut counted = *rotations.borrow_and_update();
        loop {
            tokio::select! {
                r = rotations.changed() => if r.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            let total = *rotations.borrow_and_update();
            for _ in counted..total {
                metrics.certificate_rotated();
            }
            counted = counted.max(total);
        }
    });
}
