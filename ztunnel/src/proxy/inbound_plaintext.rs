//! Inbound plaintext (15006): TCP that reached the pod without HBONE (TPROXYed, so the accepted
//! socket's local address is the original destination). Allowed unless policy denies it, which is
//! how PeerAuthentication STRICT is expressed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::inbound::inbound_series;
use super::{ProxyInputs, accept_loop, deliver};
use crate::accesslog::{ConnectionLog, Direction};
use crate::rbac;
use crate::socket;
use crate::state::NetworkAddress;

/// Accepts captured plaintext connections until draining starts.
pub async fn serve(
    inputs: Arc<ProxyInputs>,
    listener: TcpListener,
    drain: CancellationToken,
    conns: TaskTracker,
) {
    accept_loop("inbound_plaintext", listener, drain, |stream, peer| {
        conns.spawn(handle(inputs.clone(), stream, peer));
    })
    .await
}

async fn handle(inputs: Arc<ProxyInputs>, mut client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let peer = socket::canonical(peer);
    let dst = match client.local_addr() {
        Ok(a) => socket::canonical(a),
        Err(_) => return,
    };
    let mut log = ConnectionLog::new(Direction::Inbound, peer, dst);
    // A direct connection to the listener itself would loop back into it.
    if super::is_proxy_port(dst.port()) {
        log.error = Some("refusing direct connection to the capture port".into());
        log.emit();
        return;
    }
    let Some(local) = inputs.local_workload() else {
        inputs.shared.metrics.hbone_rejected("no_workload");
        log.error = Some("local workload unknown".into());
        log.emit();
        return;
    };
    let src_workload = {
        let addr = NetworkAddress::new(inputs.shared.config.network.clone(), peer.ip());
        inputs.shared.state.read().workload_by_ip(&addr)
    };
    let labels = inbound_series(&inputs, src_workload.as_ref(), None, &local, false);
    log.src_workload = src_workload.as_ref().map(|w| w.name.clone());
    log.src_namespace = src_workload.as_ref().map(|w| w.namespace.clone());
    log.dst_workload = Some(local.name.clone());
    log.dst_namespace = Some(local.namespace.clone());
    let conn = rbac::Connection {
        src_identity: None,
        src_ip: peer.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let Some(tracked) = deliver::admit(&inputs, &local, conn, &labels, &mut log, started) else {
        return;
    };
    let mut upstream = match deliver::connect_app(&inputs, &local, peer.ip(), dst).await {
        Ok(s) => s,
        Err(e) => return deliver::fail(&inputs, &labels, &mut log, started, e),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    deliver::relay(&inputs, tracked, &labels, log, started, copy).await;
}
