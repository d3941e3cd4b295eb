//! Command-line flags, each also readable from the environment variable Istio's ztunnel uses,
//! so our binary drops into Istio's chart and dev scripts unchanged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How workloads are attached to this ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    /// One ztunnel per node, proxying every ambient pod inside its netns (handed over by ZDS).
    Shared,
    /// One ztunnel for one workload, listening in its own netns (like a sidecar).
    Dedicated,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// ztunnel: the ambient mesh's node proxy.
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Control plane delta-xDS address (http:// or https://). Empty disables xDS (use
    /// --local-config instead).
    #[arg(
        long,
        env = "XDS_ADDRESS",
        default_value = "https://istiod.istio-system.svc:15012"
    )]
    pub xds_address: String,

    /// PEM file with the root(s) that verify the xDS server.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_ca: PathBuf,

    /// Name expected in the xDS server's certificate (default: the host of --xds-address).
    #[arg(long, env = "XDS_SERVER_NAME")]
    pub xds_server_name: Option<String>,

    /// Certificate authority address (Istio CreateCertificate gRPC). Defaults to --xds-address.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,

    /// PEM file with the root(s) that verify the CA server.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_ca: PathBuf,

    /// File holding the bearer token (projected service account token, audience istio-ca).
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub auth_token: PathBuf,

    /// Cluster id sent to the control plane and reported in telemetry.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Network of this node's workloads (matches Workload.network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    /// Trust domain of workload identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Node this ztunnel runs on; only workloads on this node are proxied.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// This ztunnel's pod name (xDS node id).
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,

    /// This ztunnel's pod namespace (xDS node id).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,

    /// This ztunnel's pod IP (xDS node id).
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub instance_ip: String,

    /// shared: proxy every ambient pod on the node via ZDS; dedicated: proxy one workload.
    #[arg(long, env = "PROXY_MODE", value_enum, default_value = "shared")]
    pub proxy_mode: ProxyMode,

    /// Node agent's ZDS socket (shared mode).
    #[arg(
        long,
        env = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub inpod_uds: PathBuf,

    /// bpffs directory where the node agent pins each pod's eBPF redirection (eBPF mode):
    /// when `<dir>/<pod uid>/` exists, the pod's 15001 and 15006 listeners are registered
    /// there. Pods the agent redirects with nftables have no directory and need nothing.
    #[arg(long, env = "BPF_PIN_ROOT", default_value = ebpf::DEFAULT_PIN_ROOT)]
    pub bpf_pin_root: PathBuf,

    /// The workload served in dedicated mode, as `namespace/name/service-account`.
    #[arg(long, env = "PROXY_WORKLOAD_INFO")]
    pub proxy_workload_info: Option<String>,

    /// Standalone config file (Istio ztunnel's LOCAL_XDS_PATH YAML format); reloaded on change.
    #[arg(long = "local-config", env = "LOCAL_XDS_PATH", value_parser = parse_path)]
    pub local_config: Option<PathBuf>,

    /// Development only: sign workload certificates with an in-process self-signed CA.
    #[arg(long, env = "FAKE_CA", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub fake_ca: bool,

    /// Lifetime requested for workload certificates (e.g. 24h, 90s).
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = parse_duration)]
    pub secret_ttl: Duration,

    /// After SIGTERM, how long existing connections may run before they are closed.
    #[arg(long, env = "DRAIN_DURATION", default_value = "5s", value_parser = parse_duration)]
    pub drain_duration: Duration,

    /// Timeout for upstream TCP and HBONE connects.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Admin API address (config_dump, logging, quitquitquit); keep it on localhost.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics address.
    #[arg(long, env = "STATS_ADDR", default_value = "[::]:15020")]
    pub stats_addr: SocketAddr,

    /// Readiness probe address (GET /healthz/ready).
    #[arg(long, env = "READINESS_ADDR", default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// Log filter (tracing syntax, e.g. `info,access=debug`); changeable at runtime via /logging.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    /// Data-path worker threads. Each runs its own single-threaded runtime with its own
    /// listeners (SO_REUSEPORT) and HBONE pool; a connection stays on the worker that accepted it.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// Pinning of data-path workers to CPUs. `auto` pins worker i to the i-th allowed CPU when
    /// there is exactly one worker per CPU, and sets SO_INCOMING_CPU on its listeners so the
    /// kernel hands each new connection to the worker on the client's CPU (fewer cross-CPU
    /// wake-ups); `off` never pins and lets the reuseport hash spread connections.
    #[arg(
        long,
        env = "ZTUNNEL_WORKER_AFFINITY",
        value_enum,
        default_value = "auto"
    )]
    pub worker_affinity: crate::shards::Affinity,

    /// How long a data-path worker keeps polling its sockets without sleeping after it last
    /// did work (`0` turns busy-polling off). A sleeping worker must be woken by an
    /// interrupt, which costs tens of microseconds per hop on VMs; polling trades that for CPU
    /// time while traffic flows. An idle worker still sleeps, and each empty poll yields the
    /// CPU to any runnable thread.
    #[arg(long, env = "ZTUNNEL_WORKER_BUSY_POLL", default_value = "50us", value_parser = parse_duration)]
    pub worker_busy_poll: Duration,
}

/// Accepts any path, including an empty one (Istio scripts set `LOCAL_XDS_PATH=""` to unset it).
fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// Parses durations like `500ms`, `90s`, `5m`, `24h` or `1h30m` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn flags_accept_istio_environment_names() {
        let args = Args::try_parse_from([
            "ztunnel",
            "--xds-address",
            "",
            "--fake-ca",
            "--proxy-mode",
            "dedicated",
            "--proxy-workload-info",
            "ns/pod/sa",
        ])
        .unwrap();
        assert!(args.fake_ca);
        assert_eq!(args.proxy_mode, ProxyMode::Dedicated);
        assert!(args.xds_address.is_empty());
        let args = Args::try_parse_from(["ztunnel", "--local-config", ""]).unwrap();
        assert_eq!(args.local_config, Some(PathBuf::new()));
    }
}
