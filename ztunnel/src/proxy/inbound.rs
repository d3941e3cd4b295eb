//! Inbound HBONE (15008): terminate mTLS with the local workload's certificate, check the
//! CONNECT, authorize the peer identity, then connect to the app from inside the pod netns with
//! the client's IP as source.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::Identity;
use hbone::server::InboundRequest;
use http::{Method, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::telemetry::{SeriesKey, peer_labels, service_labels};
use super::{ProxyInputs, accept_loop, deliver};
use crate::accesslog::{ConnectionLog, Direction};
use crate::metrics::{ConnectionLabels, ConnectionSeries, Reporter, reporter_labels};
use crate::rbac;
use crate::socket;
use crate::state::{NetworkAddress, Workload};

/// CONNECT headers are a few hundred bytes; larger blocks are refused and counted here. (The
/// HTTP/2 layer enforces a higher hard limit that bounds memory.)
pub const MAX_CONNECT_HEADER_BYTES: usize = 16 * 1024;

/// Bound on the TLS handshake so a silent client cannot hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts HBONE connections until draining starts; live connections get GOAWAY on drain.
pub async fn serve(
    inputs: Arc<ProxyInputs>,
    listener: TcpListener,
    drain: CancellationToken,
    conns: TaskTracker,
) {
    let tracker = conns.clone();
    accept_loop("hbone", listener, drain.clone(), |stream, peer| {
        tracker.spawn(handle_connection(
            inputs.clone(),
            stream,
            peer,
            drain.clone(),
        ));
    })
    .await
}

async fn handle_connection(
    inputs: Arc<ProxyInputs>,
    tcp: TcpStream,
    peer: SocketAddr,
    drain: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let peer = socket::canonical(peer);
    let metrics = inputs.shared.metrics.clone();
    let config = match inputs.server_tls().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "no certificate to terminate HBONE");
            metrics.hbone_rejected("no_certificate");
            return;
        }
    };
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(config).accept(hbone::tls_transport(tcp)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "HBONE TLS handshake failed");
            metrics.tls_handshake_failure("hbone");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "HBONE TLS handshake timed out");
            metrics.tls_handshake_failure("hbone");
            return;
        }
    };
    // Clients that did not negotiate h2 are not HBONE clients.
    if tls.get_ref().1.alpn_protocol() != Some(hbone::tls::ALPN_H2) {
        tracing::info!(%peer, "HBONE client did not negotiate ALPN h2");
        metrics.tls_handshake_failure("hbone");
        return;
    }
    let peer_identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(hbone::tls::peer_identity);
    let settings = inputs.shared.config.server.clone();
    let handler_inputs = inputs.clone();
    let serve = hbone::server::serve(tls, &settings, drain, move |req| {
        handle_request(handler_inputs.clone(), req, peer, peer_identity.clone())
    });
    let result = tokio::select! {
        r = serve => r,
        _ = inputs.force_close.cancelled() => Ok(()),
    };
    if let Err(e) = result {
        tracing::info!(%peer, error = %e, "HBONE connection ended with an error");
        metrics.hbone_rejected("bad_request");
    }
}

fn reject(inputs: &ProxyInputs, req: InboundRequest, status: StatusCode, reason: &str) {
    tracing::info!(authority = req.authority(), %status, reason, "rejecting HBONE request");
    inputs.shared.metrics.hbone_rejected(reason);
    req.reject(status);
}

async fn handle_request(
    inputs: Arc<ProxyInputs>,
    req: InboundRequest,
    peer: SocketAddr,
    peer_identity: Option<Identity>,
) {
    let started = Instant::now();
    if req.method() != Method::CONNECT {
        return reject(&inputs, req, StatusCode::BAD_REQUEST, "bad_request");
    }
    let Some(authority) = req.parsed_authority() else {
        return reject(&inputs, req, StatusCode::BAD_REQUEST, "bad_request");
    };
    // Tunnelling to our own capture ports would loop back into ztunnel.
    if super::is_proxy_port(authority.port()) {
        return reject(&inputs, req, StatusCode::BAD_REQUEST, "bad_request");
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if header_bytes > MAX_CONNECT_HEADER_BYTES {
        return reject(
            &inputs,
            req,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
        );
    }
    let Some(local) = inputs.local_workload() else {
        return reject(&inputs, req, StatusCode::SERVICE_UNAVAILABLE, "no_workload");
    };
    if !local.addresses.contains(&authority.ip()) {
        return reject(&inputs, req, StatusCode::BAD_REQUEST, "wrong_destination");
    }
    let src_workload = {
        let addr = NetworkAddress::new(inputs.shared.config.network.clone(), peer.ip());
        inputs.shared.state.read().workload_by_ip(&addr)
    };
    let labels = inbound_series(
        &inputs,
        src_workload.as_ref(),
        peer_identity.as_ref(),
        &local,
        true,
    );
    let mut log = ConnectionLog::new(Direction::Inbound, peer, authority);
    log.src_workload = src_workload.as_ref().map(|w| w.name.clone());
    log.src_namespace = src_workload.as_ref().map(|w| w.namespace.clone());
    log.src_identity = peer_identity.as_ref().map(|i| i.to_string());
    log.dst_workload = Some(local.name.clone());
    log.dst_namespace = Some(local.namespace.clone());
    log.dst_identity = Some(local.identity().to_string());

    let conn = rbac::Connection {
        src_identity: peer_identity,
        src_ip: peer.ip(),
        dst_ip: authority.ip(),
        dst_port: authority.port(),
    };
    let Some(tracked) = deliver::admit(&inputs, &local, conn, &labels, &mut log, started) else {
        return reject(&inputs, req, StatusCode::UNAUTHORIZED, "rbac");
    };
    let mut upstream = match deliver::connect_app(&inputs, &local, peer.ip(), authority).await {
        Ok(s) => s,
        Err(e) => {
            deliver::fail(&inputs, &labels, &mut log, started, e);
            return reject(&inputs, req, StatusCode::SERVICE_UNAVAILABLE, "upstream");
        }
    };
    let stream = match req.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, "HBONE stream closed before it was accepted");
            return;
        }
    };
    let copy = async {
        let (to_client, from_client) =
            hbone::stream::copy_bidirectional(&mut upstream, stream).await?;
        Ok((from_client, to_client))
    };
    deliver::relay(&inputs, tracked, &labels, log, started, copy).await;
}

/// The cached metric series for a connection reported by the destination side.
pub fn inbound_series(
    inputs: &ProxyInputs,
    src: Option<&Arc<Workload>>,
    src_identity: Option<&Identity>,
    dst: &Arc<Workload>,
    mtls: bool,
) -> Arc<ConnectionSeries> {
    let key = SeriesKey::new(
        Reporter::Destination,
        src,
        src_identity,
        Some(dst),
        None,
        mtls,
    );
    inputs.series.get(key, || {
        inbound_labels(src.map(|w| &**w), src_identity, dst, mtls)
    })
}

/// Labels for a connection reported by the destination side.
pub fn inbound_labels(
    src: Option<&Workload>,
    src_identity: Option<&Identity>,
    dst: &Workload,
    mtls: bool,
) -> ConnectionLabels {
    let mut labels = reporter_labels(
        Some(Reporter::Destination),
        &peer_labels(src, src_identity.map(|i| i.to_string())),
        &peer_labels(Some(dst), Some(dst.identity().to_string())),
        &service_labels(None),
    );
    if mtls {
        labels.connection_security_policy = "mutual_tls".into();
    }
    labels
}
