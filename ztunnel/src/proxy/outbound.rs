//! Outbound (15001): recover where the app meant to connect, resolve it (service VIP ->
//! endpoint, waypoint, or plain pod), then tunnel over HBONE or pass through as plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hbone::early::TunnelError;
use hbone::pool::{ConnectRequest, PoolKey};
use hbone::{HboneError, Identity};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::telemetry::{SeriesKey, connect_headers, peer_labels, service_labels};
use super::{HBONE_PORT, OUTBOUND_PORT, ProxyInputs, accept_loop};
use crate::accesslog::{ConnectionLog, Direction};
use crate::metrics::{ConnectionSeries, Reporter, reporter_labels};
use crate::socket;
use crate::state::{GatewayAddress, GatewayDestination, NetworkAddress, Service, Workload};

/// Where an outbound connection goes.
#[derive(Debug)]
pub enum Upstream {
    /// Through an HBONE tunnel.
    Hbone {
        /// `ip:15008` of the destination pod or waypoint.
        hbone_addr: SocketAddr,
        /// The `:authority` of the CONNECT.
        authority: SocketAddr,
        /// Identities the peer may present.
        expected: Vec<Identity>,
        /// Destination workload (the pod, or the waypoint).
        workload: Option<Arc<Workload>>,
        /// Destination service, when a VIP was dialled.
        service: Option<Arc<Service>>,
    },
    /// Plain TCP (destination outside the mesh).
    Passthrough {
        /// Address to dial.
        addr: SocketAddr,
        /// Destination workload if known.
        workload: Option<Arc<Workload>>,
        /// Destination service, when a VIP was dialled.
        service: Option<Arc<Service>>,
    },
}

/// Why a destination cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A VIP without healthy endpoints for the port.
    #[error("service {0} has no healthy endpoint for port {1}")]
    NoEndpoint(String, u16),
    /// The destination workload has no address to dial.
    #[error("workload {0} has no address")]
    NoAddress(String),
    /// A connection aimed back at ztunnel's own capture ports (it would loop).
    #[error("destination {0} is one of ztunnel's own ports")]
    ProxyPort(SocketAddr),
    /// A waypoint reference that names nothing known.
    #[error("waypoint {0:?} not found")]
    NoWaypoint(GatewayAddress),
}

/// Accepts captured connections until draining starts.
pub async fn serve(
    inputs: Arc<ProxyInputs>,
    listener: TcpListener,
    drain: CancellationToken,
    conns: TaskTracker,
) {
    accept_loop("outbound", listener, drain, |stream, peer| {
        conns.spawn(handle(inputs.clone(), stream, peer));
    })
    .await
}

/// Resolves the original destination `dst` dialled by `src` (which may be `None` when unknown).
pub fn resolve(
    inputs: &ProxyInputs,
    src: Option<&Workload>,
    dst: SocketAddr,
) -> Result<Upstream, ResolveError> {
    if super::is_proxy_port(dst.port())
        && (dst.ip().is_loopback()
            || dst.ip().is_unspecified()
            || src.is_some_and(|w| w.addresses.contains(&dst.ip())))
    {
        return Err(ResolveError::ProxyPort(dst));
    }
    let network = inputs.shared.config.network.clone();
    let addr = NetworkAddress::new(network, dst.ip());
    let store = &inputs.shared.state;
    let (service, workload_by_ip) = {
        let state = store.read();
        (state.service_by_vip(&addr), state.workload_by_ip(&addr))
    };
    if let Some(svc) = service {
        if let Some(wp) = svc.waypoint.as_ref().filter(|wp| !is_self(src, wp, inputs)) {
            return waypoint_upstream(inputs, wp, dst, Some(svc.clone()));
        }
        let (w, target) = store
            .pick_endpoint(&svc, dst.port())
            .ok_or_else(|| ResolveError::NoEndpoint(svc.hostname.clone(), dst.port()))?;
        return workload_upstream(w, target, Some(svc));
    }
    match workload_by_ip {
        Some(w) => {
            if let Some(wp) = w.waypoint.as_ref().filter(|wp| !is_self(src, wp, inputs)) {
                return waypoint_upstream(inputs, wp, dst, None);
            }
            workload_upstream(w, dst.port(), None)
        }
        None => Ok(Upstream::Passthrough {
            addr: dst,
            workload: None,
            service: None,
        }),
    }
}

/// True when the source is the waypoint itself (its traffic must not loop back to it).
fn is_self(src: Option<&Workload>, wp: &GatewayAddress, inputs: &ProxyInputs) -> bool {
    let Some(src) = src else { return false };
    match &wp.destination {
        GatewayDestination::Address(a) => src.addresses.contains(&a.address),
        GatewayDestination::Hostname(h) => inputs
            .shared
            .state
            .read()
            .endpoints(h)
            .iter()
            .any(|w| w.uid == src.uid),
    }
}

fn workload_upstream(
    w: Arc<Workload>,
    port: u16,
    service: Option<Arc<Service>>,
) -> Result<Upstream, ResolveError> {
    let Some(ip) = w.addresses.first().copied() else {
        return Err(ResolveError::NoAddress(w.uid.to_string()));
    };
    if !w.is_hbone() {
        return Ok(Upstream::Passthrough {
            addr: SocketAddr::new(ip, port),
            workload: Some(w),
            service,
        });
    }
    let mut expected = vec![w.identity()];
    if let Some(s) = &service {
        expected.extend(parse_sans(&s.subject_alt_names));
    }
    Ok(Upstream::Hbone {
        hbone_addr: SocketAddr::new(ip, HBONE_PORT),
        authority: SocketAddr::new(ip, port),
        expected,
        workload: Some(w),
        service,
    })
}

fn parse_sans(sans: &[String]) -> impl Iterator<Item = Identity> + '_ {
    sans.iter().filter_map(|s| s.parse().ok())
}

fn waypoint_upstream(
    inputs: &ProxyInputs,
    wp: &GatewayAddress,
    original: SocketAddr,
    service: Option<Arc<Service>>,
) -> Result<Upstream, ResolveError> {
    let store = &inputs.shared.state;
    let (w, wp_service) = match &wp.destination {
        GatewayDestination::Address(a) => (store.read().workload_by_ip(a), None),
        GatewayDestination::Hostname(h) => {
            let svc = store.read().service_by_key(h);
            let w = svc
                .as_ref()
                .and_then(|s| store.pick_endpoint(s, wp.hbone_mtls_port))
                .map(|(w, _)| w);
            (w, svc)
        }
    };
    let w = w.ok_or_else(|| ResolveError::NoWaypoint(wp.clone()))?;
    let ip = *w
        .addresses
        .first()
        .ok_or_else(|| ResolveError::NoWaypoint(wp.clone()))?;
    let mut expected = vec![w.identity()];
    if let Some(s) = &wp_service {
        expected.extend(parse_sans(&s.subject_alt_names));
    }
    Ok(Upstream::Hbone {
        hbone_addr: SocketAddr::new(ip, wp.hbone_mtls_port),
        authority: original,
        expected,
        workload: Some(w),
        service,
    })
}

async fn handle(inputs: Arc<ProxyInputs>, mut client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let peer = socket::canonical(peer);
    let dst = match socket::original_destination(&client, OUTBOUND_PORT) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot recover original destination");
            return;
        }
    };
    let src_workload = {
        let addr = NetworkAddress::new(inputs.shared.config.network.clone(), peer.ip());
        // Release the read guard before local_workload() takes its own: std's RwLock blocks a
        // second read while a writer waits, which would deadlock this thread.
        let by_ip = inputs.shared.state.read().workload_by_ip(&addr);
        by_ip.or_else(|| inputs.local_workload())
    };
    let src_identity = inputs.identity();
    let mut log = ConnectionLog::new(Direction::Outbound, peer, dst);
    log.src_workload = src_workload.as_ref().map(|w| w.name.clone());
    log.src_namespace = Some(inputs.info.namespace.clone());
    log.src_identity = Some(src_identity.to_string());

    let upstream = match resolve(&inputs, src_workload.as_deref(), dst) {
        Ok(u) => u,
        Err(e) => {
            let labels = reporter_labels(
                Some(Reporter::Source),
                &peer_labels(src_workload.as_deref(), Some(src_identity.to_string())),
                &Default::default(),
                &Default::default(),
            );
            inputs.shared.metrics.connection_failed(&labels);
            log.error = Some(e.to_string());
            log.duration = started.elapsed();
            log.emit();
            return;
        }
    };
    let (workload, service, mtls) = match &upstream {
        Upstream::Hbone {
            workload, service, ..
        } => (workload.clone(), service.clone(), true),
        Upstream::Passthrough {
            workload, service, ..
        } => (workload.clone(), service.clone(), false),
    };
    let dst_principal = workload
        .as_ref()
        .filter(|_| mtls)
        .map(|w| w.identity().to_string());
    let key = SeriesKey::new(
        Reporter::Source,
        src_workload.as_ref(),
        None,
        workload.as_ref(),
        service.as_ref(),
        mtls,
    );
    let series = inputs.series.get(key, || {
        let mut labels = reporter_labels(
            Some(Reporter::Source),
            &peer_labels(src_workload.as_deref(), Some(src_identity.to_string())),
            &peer_labels(workload.as_deref(), dst_principal.clone()),
            &service_labels(service.as_deref()),
        );
        if mtls {
            labels.connection_security_policy = "mutual_tls".into();
        }
        labels
    });
    log.dst_workload = workload.as_ref().map(|w| w.name.clone());
    log.dst_namespace = workload.as_ref().map(|w| w.namespace.clone());
    log.dst_service = service.as_ref().map(|s| s.hostname.clone());
    log.dst_identity = dst_principal;

    let result = match upstream {
        Upstream::Hbone {
            hbone_addr,
            authority,
            expected,
            ..
        } => {
            log.dst_hbone_addr = Some(hbone_addr);
            log.dst_addr = authority;
            let headers = connect_headers(
                src_workload.as_deref(),
                &inputs.shared.config.cluster_id,
                peer,
                service.as_deref(),
            );
            tunnel(
                &inputs,
                &mut client,
                src_identity,
                expected,
                peer,
                hbone_addr,
                ConnectRequest { authority, headers },
                &series,
            )
            .await
        }
        Upstream::Passthrough { addr, .. } => {
            log.dst_addr = addr;
            passthrough(&inputs, &mut client, addr, &series).await
        }
    };
    match result {
        Ok((sent, recv)) => {
            log.bytes_sent = sent;
            log.bytes_recv = recv;
        }
        Err(e) => log.error = Some(e),
    }
    log.duration = started.elapsed();
    log.emit();
}

/// Opens (or reuses) an HBONE connection and copies bytes until both sides close.
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    inputs: &ProxyInputs,
    client: &mut TcpStream,
    src_identity: Identity,
    mut expected: Vec<Identity>,
    peer: SocketAddr,
    hbone_addr: SocketAddr,
    request: ConnectRequest,
    series: &ConnectionSeries,
) -> Result<(u64, u64), String> {
    let metrics = &inputs.shared.metrics;
    let fail = |e: String| {
        metrics.connection_failed(series.labels());
        e
    };
    let cert = inputs
        .shared
        .certs
        .get(&src_identity)
        .await
        .map_err(|e| fail(format!("no certificate for {src_identity}: {e}")))?;
    expected.sort();
    expected.dedup();
    let tls = inputs
        .client_tls(&cert, &expected)
        .map_err(|e| fail(format!("tls config: {e}")))?;
    let key = PoolKey {
        src_identity,
        dst_identities: expected,
        src_ip: peer.ip(),
        dst: hbone_addr,
    };
    // The tunnel is up once the peer answers 200, but the client's first bytes go out right
    // behind the CONNECT instead of waiting for that (hbone::early).
    let deadline = tokio::time::Instant::now() + inputs.shared.config.connect_timeout;
    let open = inputs.pool().open(key, tls, request);
    let opening = tokio::time::timeout_at(deadline, open)
        .await
        .map_err(|_| fail(format!("HBONE connect to {hbone_addr} timed out")))?
        .map_err(|e| fail(format!("HBONE connect to {hbone_addr}: {e}")))?;
    let mut guard = None;
    let relayed = tokio::select! {
        r = hbone::early::tunnel(client, opening, deadline, || {
            guard = Some(metrics.open_series(series));
        }) => r,
        _ = inputs.force_close.cancelled() => {
            Err(TunnelError::Io(std::io::Error::other("drain deadline")))
        }
    };
    let Some(mut guard) = guard else {
        // Never established: counted as a failed connection, like a failed connect.
        return Err(fail(match relayed {
            Err(TunnelError::Connect(HboneError::ConnectTimeout)) => {
                format!("HBONE connect to {hbone_addr} timed out")
            }
            Err(TunnelError::Connect(e)) => format!("HBONE connect to {hbone_addr}: {e}"),
            Err(TunnelError::Io(e)) => e.to_string(),
            Ok(_) => "tunnel ended before it was established".to_string(),
        }));
    };
    match relayed {
        Ok((sent, recv)) => {
            guard.record_bytes(sent, recv);
            guard.close();
            Ok((sent, recv))
        }
        Err(e) => {
            guard.close();
            Err(e.to_string())
        }
    }
}

/// Plain TCP to a destination outside the mesh, from the pod's netns.
async fn passthrough(
    inputs: &ProxyInputs,
    client: &mut TcpStream,
    addr: SocketAddr,
    series: &ConnectionSeries,
) -> Result<(u64, u64), String> {
    let connect = socket::connect(&inputs.netns, addr, None);
    let mut upstream =
        match tokio::time::timeout(inputs.shared.config.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                inputs.shared.metrics.connection_failed(series.labels());
                return Err(format!("connect {addr}: {e}"));
            }
            Err(_) => {
                inputs.shared.metrics.connection_failed(series.labels());
                return Err(format!("connect {addr}: timed out"));
            }
        };
    let mut guard = inputs.shared.metrics.open_series(series);
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(client, &mut upstream) => r,
        _ = inputs.force_close.cancelled() => Err(std::io::Error::other("drain deadline")),
    };
    let result = match copied {
        Ok((sent, recv)) => {
            guard.record_bytes(sent, recv);
            Ok((sent, recv))
        }
        Err(e) => Err(e.to_string()),
    };
    guard.close();
    result
}
