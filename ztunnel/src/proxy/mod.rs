//! The per-workload proxy: three listeners (outbound 15001, inbound plaintext 15006, HBONE
//! 15008) created in the workload's netns, sharing the process-wide state, certificates and
//! metrics.

pub mod conntrack;
pub mod deliver;
pub mod inbound;
pub mod inbound_plaintext;
pub mod outbound;
pub mod telemetry;

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::Identity;
use hbone::certificate::WorkloadCertificate;
use hbone::pool::{Connector, Pool, PoolConfig};
use hbone::server::ServerSettings;
use hbone::store::CertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::shards::{self, Shard, Shards};
use crate::socket::{self, ListenOptions};
use crate::state::{StateStore, Workload};

/// Port of the outbound capture listener.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the inbound plaintext capture listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Port of the HBONE (mTLS) listener.
pub const HBONE_PORT: u16 = 15008;

/// ztunnel's own capture ports: traffic addressed to them on a local address would loop.
pub fn is_proxy_port(port: u16) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | HBONE_PORT)
}

/// Settings shared by every proxy in the process.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Cluster reported in metrics and baggage.
    pub cluster_id: String,
    /// Trust domain of local identities.
    pub trust_domain: String,
    /// Network of local workloads (for IP lookups).
    pub network: String,
    /// How long draining connections may continue before they are cut.
    pub drain_deadline: Duration,
    /// HBONE client pool settings.
    pub pool: PoolConfig,
    /// HBONE server settings.
    pub server: ServerSettings,
    /// Timeout for upstream TCP connects.
    pub connect_timeout: Duration,
}

/// Process-wide inputs every proxy uses.
#[derive(Clone)]
pub struct Shared {
    /// Workloads, services and policies.
    pub state: StateStore,
    /// Certificates of local identities.
    pub certs: CertStore,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub config: Arc<ProxyConfig>,
    /// Data-path workers: each serves its own listeners and connections.
    pub shards: Shards,
}

/// The workload a proxy serves, as the node agent (ZDS) or `PROXY_WORKLOAD_INFO` names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct WorkloadInfo {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod service account.
    pub service_account: String,
}

impl WorkloadInfo {
    /// Parses `namespace/name/service-account` (PROXY_WORKLOAD_INFO).
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('/');
        let (namespace, name, sa) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || [namespace, name, sa].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(Self {
            name: name.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
        })
    }
}

/// What one proxy knows about itself.
pub struct ProxyInputs {
    /// Shared state.
    pub shared: Shared,
    /// The workload served.
    pub info: WorkloadInfo,
    /// Where its sockets live.
    pub netns: Netns,
    /// HBONE connections opened on behalf of this workload, one pool per data-path worker so
    /// a connection's HBONE stream is driven on the worker that serves it.
    pools: Vec<Pool>,
    /// Inbound connections subject to policy re-checks.
    pub conns: conntrack::ConnectionTracker,
    /// Cancelled when the drain deadline passes: every remaining connection is cut.
    pub force_close: CancellationToken,
    /// TLS server config for the current certificate, rebuilt only when the cert rotates.
    server_tls: std::sync::Mutex<Option<(Arc<WorkloadCertificate>, Arc<rustls::ServerConfig>)>>,
    /// TLS client configs per expected peer identities, for the current certificate.
    client_tls: std::sync::Mutex<HashMap<Vec<Identity>, ClientTls>>,
    /// Metric series of recent connections, by the workloads involved.
    pub series: telemetry::SeriesCache,
    /// The served workload's identity (fixed for the proxy's life).
    own_identity: Identity,
}

type ClientTls = (Arc<WorkloadCertificate>, Arc<rustls::ClientConfig>);

/// Upper bound on cached client configs per proxy (distinct destination identity sets).
const CLIENT_TLS_CACHE: usize = 1024;

impl ProxyInputs {
    /// The SPIFFE identity of the served workload.
    pub fn identity(&self) -> Identity {
        self.own_identity.clone()
    }

    /// The TLS server config presenting the workload's current certificate.
    pub async fn server_tls(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let cert = self
            .shared
            .certs
            .get(&self.identity())
            .await
            .map_err(|e| e.to_string())?;
        let mut cached = self.server_tls.lock().map_err(|e| e.to_string())?;
        if let Some((c, cfg)) = cached.as_ref()
            && Arc::ptr_eq(c, &cert)
        {
            return Ok(cfg.clone());
        }
        let cfg = hbone::tls::server_config(&cert).map_err(|e| e.to_string())?;
        *cached = Some((cert, cfg.clone()));
        Ok(cfg)
    }

    /// A TLS client config presenting `cert` and accepting only `expected` (sorted) peers.
    pub fn client_tls(
        &self,
        cert: &Arc<WorkloadCertificate>,
        expected: &[Identity],
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut cache = self.client_tls.lock().map_err(|e| e.to_string())?;
        if let Some((c, cfg)) = cache.get(expected)
            && Arc::ptr_eq(c, cert)
        {
            return Ok(cfg.clone());
        }
        let cfg = hbone::tls::client_config(cert, expected).map_err(|e| e.to_string())?;
        if cache.len() >= CLIENT_TLS_CACHE {
            cache.clear();
        }
        cache.insert(expected.to_vec(), (cert.clone(), cfg.clone()));
        Ok(cfg)
    }

    /// The HBONE pool of the calling data-path worker.
    pub fn pool(&self) -> &Pool {
        let i = shards::current().unwrap_or(0);
        &self.pools[i % self.pools.len()]
    }

    /// The served workload's entry in the state, found by name and namespace.
    pub fn local_workload(&self) -> Option<Arc<Workload>> {
        self.shared
            .state
            .read()
            .workload_by_name(&self.info.namespace, &self.info.name)
    }
}

/// Makes HBONE client sockets inside the workload's netns, marked so redirection skips them.
struct NetnsConnector {
    netns: Netns,
}

impl Connector for NetnsConnector {
    fn connect(
        &self,
        dst: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>> {
        let netns = self.netns.clone();
        Box::pin(async move { socket::connect(&netns, dst, None).await })
    }
}

/// A proxy whose listeners are bound and which is ready to run.
pub struct Proxy {
    inputs: Arc<ProxyInputs>,
    outbound: Vec<(Shard, TcpListener)>,
    inbound_plaintext: Vec<(Shard, TcpListener)>,
    hbone: Vec<(Shard, TcpListener)>,
}

/// Binds `port` on 0.0.0.0 (required) and on [::] (when the netns has IPv6) for every
/// data-path worker, each listener registered with its worker's runtime. IPv4 listeners come
/// first, in worker order.
fn bind_dual(
    netns: &Netns,
    shards: &Shards,
    port: u16,
    opts: ListenOptions,
) -> std::io::Result<Vec<(Shard, TcpListener)>> {
    let mut v4 = Vec::with_capacity(shards.len());
    let mut v6 = Vec::new();
    for shard in shards.iter() {
        let _in_worker = shard.handle.enter();
        let opts = ListenOptions {
            incoming_cpu: shard.cpu,
            ..opts
        };
        let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        v4.push((shard.clone(), socket::listen(netns, any4, opts)?));
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match socket::listen(netns, any6, opts) {
            Ok(l) => v6.push((shard.clone(), l)),
            Err(e) => tracing::debug!(port, error = %e, "no IPv6 listener"),
        }
    }
    v4.extend(v6);
    Ok(v4)
}

/// Stops a running proxy.
#[derive(Clone)]
pub struct ProxyHandle {
    /// Cancel to start draining (stop accepting, GOAWAY); connections then run until the
    /// drain deadline.
    pub drain: CancellationToken,
}

impl Proxy {
    /// Binds the three listeners inside `netns` (all addresses, SO_REUSEPORT, transparent).
    pub fn bind(shared: Shared, info: WorkloadInfo, netns: Netns) -> std::io::Result<Self> {
        let opts = ListenOptions {
            transparent: true,
            mark: true,
            incoming_cpu: None,
        };
        let shards = &shared.shards;
        let outbound = bind_dual(&netns, shards, OUTBOUND_PORT, opts)?;
        let inbound_plaintext = bind_dual(&netns, shards, INBOUND_PLAINTEXT_PORT, opts)?;
        let hbone = bind_dual(&netns, shards, HBONE_PORT, opts)?;
        let connector = Arc::new(NetnsConnector {
            netns: netns.clone(),
        });
        let pools = (0..shards.len())
            .map(|_| Pool::new(shared.config.pool.clone(), connector.clone()))
            .collect();
        let conns = conntrack::ConnectionTracker::default();
        let own_identity = Identity::new(
            shared.config.trust_domain.clone(),
            info.namespace.clone(),
            info.service_account.clone(),
        );
        let inputs = Arc::new(ProxyInputs {
            shared,
            info,
            netns,
            pools,
            conns,
            force_close: CancellationToken::new(),
            server_tls: std::sync::Mutex::new(None),
            client_tls: std::sync::Mutex::new(HashMap::new()),
            series: telemetry::SeriesCache::default(),
            own_identity,
        });
        Ok(Self {
            inputs,
            outbound,
            inbound_plaintext,
            hbone,
        })
    }

    /// Registers the IPv4 15001 and 15006 listeners with the pod's eBPF redirection, which
    /// then steers the pod's new connections to them (the newest registration wins). One
    /// member of each reuseport group is enough: the kernel picks the worker's listener within
    /// the group.
    pub fn register_redirection(&self, pins: &ebpf::PodRedirection) -> Result<(), ebpf::EbpfError> {
        if let Some((_, l)) = self.outbound.first() {
            pins.register(ebpf::Listener::Outbound, l)?;
        }
        if let Some((_, l)) = self.inbound_plaintext.first() {
            pins.register(ebpf::Listener::Inbound, l)?;
        }
        Ok(())
    }

    /// Runs until `drain` is cancelled and the connections finish (or the deadline cuts them).
    pub async fn run(self, drain: CancellationToken) {
        let inputs = self.inputs;
        let started = Instant::now();
        tracing::info!(workload = ?inputs.info, "proxy started");
        let mut tasks = JoinSet::new();
        let connections = tokio_util::task::TaskTracker::new();
        for (shard, l) in self.outbound {
            let serve = outbound::serve(inputs.clone(), l, drain.clone(), connections.clone());
            tasks.spawn_on(serve, &shard.handle);
        }
        for (shard, l) in self.inbound_plaintext {
            let serve =
                inbound_plaintext::serve(inputs.clone(), l, drain.clone(), connections.clone());
            tasks.spawn_on(serve, &shard.handle);
        }
        for (shard, l) in self.hbone {
            let serve = inbound::serve(inputs.clone(), l, drain.clone(), connections.clone());
            tasks.spawn_on(serve, &shard.handle);
        }
        tasks.spawn(conntrack::recheck_on_policy_change(
            inputs.clone(),
            drain.clone(),
        ));
        // Listeners return once draining starts; their sockets close as they return.
        while tasks.join_next().await.is_some() {}
        connections.close();
        let deadline = inputs.shared.config.drain_deadline;
        if tokio::time::timeout(deadline, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(workload = ?inputs.info, "drain deadline passed; closing remaining connections");
            inputs.force_close.cancel();
            connections.wait().await;
        }
        tracing::info!(workload = ?inputs.info, uptime = ?started.elapsed(), "proxy stopped");
    }
}

/// Accepts connections until `drain` is cancelled, handing each to `on_conn`.
pub(crate) async fn accept_loop(
    name: &'static str,
    listener: TcpListener,
    drain: CancellationToken,
    mut on_conn: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        tokio::select! {
            biased;
            _ = drain.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => on_conn(stream, peer),
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
