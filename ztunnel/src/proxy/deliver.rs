//! The last hop of every inbound connection, shared by HBONE (15008) and plaintext (15006):
//! connect to the app from inside the pod netns as the client, then relay under policy
//! re-checks and the drain deadline, with metrics and the access log.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::net::TcpStream;

use super::ProxyInputs;
use super::conntrack::TrackedConnection;
use crate::accesslog::ConnectionLog;
use crate::metrics::ConnectionSeries;
use crate::rbac;
use crate::socket;
use crate::state::Workload;

/// Connects to `dst` in the pod netns, bound to the client's address so the app sees it (unless
/// the client is the pod itself). The error is ready for the access log.
pub async fn connect_app(
    inputs: &ProxyInputs,
    local: &Workload,
    client: IpAddr,
    dst: SocketAddr,
) -> Result<TcpStream, String> {
    let spoof = (!local.addresses.contains(&client)).then_some(client);
    let connect = socket::connect(&inputs.netns, dst, spoof);
    match tokio::time::timeout(inputs.shared.config.connect_timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connect to app {dst}: {e}")),
        Err(_) => Err(format!("connect to app {dst}: timed out")),
    }
}

/// Authorizes `conn` for the local workload. The connection is tracked before the check, so a
/// policy change in between still re-checks it; a denial is counted and logged.
pub fn admit<'a>(
    inputs: &'a ProxyInputs,
    local: &Workload,
    conn: rbac::Connection,
    labels: &ConnectionSeries,
    log: &mut ConnectionLog,
    started: Instant,
) -> Option<TrackedConnection<'a>> {
    let tracked = inputs.conns.track(conn.clone());
    let policies = inputs.shared.state.read().policies_for(local);
    match rbac::authorize(&policies, &conn) {
        rbac::Decision::Allow => Some(tracked),
        rbac::Decision::Deny { reason, .. } => {
            fail(
                inputs,
                labels,
                log,
                started,
                format!("denied by policy: {reason}"),
            );
            None
        }
    }
}

/// Counts a failed connection and writes its access-log line.
pub fn fail(
    inputs: &ProxyInputs,
    labels: &ConnectionSeries,
    log: &mut ConnectionLog,
    started: Instant,
    error: String,
) {
    inputs.shared.metrics.connection_failed(labels.labels());
    log.error = Some(error);
    log.duration = started.elapsed();
    log.emit();
}

/// Relays an authorized connection (tracked since before its policy check, so a policy change
/// in between is never missed) until `copy` finishes, policy stops allowing it, or the drain
/// deadline passes. `copy` yields (client-to-app, app-to-client) bytes.
pub async fn relay(
    inputs: &ProxyInputs,
    tracked: TrackedConnection<'_>,
    labels: &ConnectionSeries,
    mut log: ConnectionLog,
    started: Instant,
    copy: impl Future<Output = std::io::Result<(u64, u64)>>,
) {
    let mut guard = inputs.shared.metrics.open_series(labels);
    let copied = tokio::select! {
        r = copy => r.map_err(|e| e.to_string()),
        _ = tracked.denied() => Err("closed: denied by updated policy".to_string()),
        _ = inputs.force_close.cancelled() => Err("closed: drain deadline".to_string()),
    };
    // Like Istio, "received" counts client-to-server bytes and "sent" the replies.
    match copied {
        Ok((from_client, to_client)) => {
            guard.record_bytes(from_client, to_client);
            log.bytes_sent = from_client;
            log.bytes_recv = to_client;
        }
        Err(e) => log.error = Some(e),
    }
    guard.close();
    log.duration = started.elapsed();
    log.emit();
}
