//! The client side, run as a child process so the proxies' memory does not count as the
//! controller's: N delta-ADS clients subscribed by wildcard to both types. It reports on stdout,
//! one line per event, with wall-clock nanoseconds:
//!
//! - `START <ns>` before the clients connect;
//! - `SYNCED <client> <ns>` when a client holds the full state;
//! - `RECV <change> <client> <ns>` when a client's handler gets a workload whose canonical
//!   revision is `chg-<change>`;
//! - `DROPPED <n>` at exit if report lines were lost (the parent stopped reading).
//!
//! It runs until its stdin closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use xds::client::{ClientConfig, DeltaClient, Handler, Rejected, TokenSource};
use xds::istio::workload::{Address, address};
use xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, Node, Resource};

use super::stats::now_ns;

/// Report lines buffered between the handlers and the stdout writer.
const REPORT_BUFFER: usize = 65_536;

/// Settings of the client process.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// xDS server address (`host:port`).
    #[arg(long)]
    pub connect: String,
    /// Clients to run.
    #[arg(long)]
    pub clients: usize,
    /// Address resources in the full state.
    #[arg(long)]
    pub expect_addresses: usize,
    /// Authorization resources in the full state.
    #[arg(long)]
    pub expect_authorizations: usize,
    /// Spread the client starts evenly over this many milliseconds (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub spread_ms: u64,
}

/// Counts the initial state, then reports the benchmark's pod changes.
struct Probe {
    id: usize,
    expect_addresses: usize,
    expect_authorizations: usize,
    addresses: usize,
    authorizations: usize,
    synced: bool,
    report: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

impl Probe {
    fn send(&self, line: String) {
        if self.report.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Handler for Probe {
    fn handle(
        &mut self,
        type_url: &str,
        updates: Vec<Resource>,
        _removed: Vec<String>,
    ) -> Vec<Rejected> {
        // Stamped first: decoding is part of the client's work, not of the delivery.
        let at = now_ns();
        if !self.synced {
            // The initial response of a wildcard type carries every resource at once; decoding
            // it in every client would only measure this process.
            match type_url {
                ADDRESS_TYPE => self.addresses += updates.len(),
                AUTHORIZATION_TYPE => self.authorizations += updates.len(),
                _ => {}
            }
            if self.addresses >= self.expect_addresses
                && self.authorizations >= self.expect_authorizations
            {
                self.synced = true;
                self.send(format!("SYNCED {} {at}", self.id));
            }
            return Vec::new();
        }
        if type_url != ADDRESS_TYPE {
            return Vec::new();
        }
        for r in &updates {
            let Some(any) = &r.resource else { continue };
            let Ok(a) = Address::decode(any.value.as_slice()) else {
                continue;
            };
            let Some(address::Type::Workload(w)) = a.r#type else {
                continue;
            };
            if let Some(k) = w
                .canonical_revision
                .strip_prefix("chg-")
                .and_then(|k| k.parse::<u64>().ok())
            {
                self.send(format!("RECV {k} {} {at}", self.id));
            }
        }
        Vec::new()
    }
}

/// Writes report lines to stdout, flushing whenever the queue runs dry.
async fn write_reports(mut rx: mpsc::Receiver<String>) {
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    while let Some(line) = rx.recv().await {
        let mut batch = line;
        batch.push('\n');
        while let Ok(more) = rx.try_recv() {
            batch.push_str(&more);
            batch.push('\n');
        }
        if out.write_all(batch.as_bytes()).await.is_err() || out.flush().await.is_err() {
            return;
        }
    }
}

/// Runs the clients until stdin closes.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let (report, rx) = mpsc::channel(REPORT_BUFFER);
    let writer = tokio::spawn(write_reports(rx));
    let dropped = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let _ = report.send(format!("START {}", now_ns())).await;
    let clients = tokio_util::task::TaskTracker::new();
    for id in 0..args.clients {
        let node_ip = format!("10.{}.{}.{}", 200 + id / 65_536, (id / 256) % 256, id % 256);
        let config = ClientConfig {
            address: format!("http://{}", args.connect),
            root_ca_pem: None,
            tls_server_name: None,
            token: TokenSource::None,
            cluster_id: "Kubernetes".into(),
            node: Node {
                id: format!(
                    "ztunnel~{node_ip}~ztunnel-{id}.istio-system~istio-system.svc.cluster.local"
                ),
                ..Node::default()
            },
            wildcard_types: vec![ADDRESS_TYPE.to_string(), AUTHORIZATION_TYPE.to_string()],
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
        };
        let (client, _subscriptions) = DeltaClient::new(config);
        let probe = Probe {
            id,
            expect_addresses: args.expect_addresses,
            expect_authorizations: args.expect_authorizations,
            addresses: 0,
            authorizations: 0,
            synced: false,
            report: report.clone(),
            dropped: dropped.clone(),
        };
        let delay = Duration::from_millis(args.spread_ms * id as u64 / args.clients.max(1) as u64);
        let stop = stop.clone();
        clients.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => client.run(probe, stop).await,
                _ = stop.cancelled() => {}
            }
        });
    }
    clients.close();
    // The parent closes our stdin to end the run (or dies, which closes it too).
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    stop.cancel();
    clients.wait().await;
    let lost = dropped.load(Ordering::Relaxed);
    if lost > 0 {
        let _ = report.send(format!("DROPPED {lost}")).await;
    }
    drop(report);
    let _ = writer.await;
    Ok(())
}
