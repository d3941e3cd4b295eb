//! The `serve` side: binds HTTP/h2c/gRPC and TCP echo listeners and runs them until shutdown,
//! draining HTTP connections gracefully.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::Identity;
use super::client::{Target, TargetError};
use super::handler::{ConnInfo, HandlerState, handle};

/// Cap on simultaneously open connections per listener; beyond it, accepting pauses.
const MAX_CONNS_PER_LISTENER: usize = 4096;
/// Cap on request header bytes (HTTP/1 read buffer and HTTP/2 header list).
const MAX_HEADER_BYTES: usize = 64 << 10;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Identity reported in replies and banners.
    pub identity: Identity,
    /// Address to bind every listener on.
    pub bind: IpAddr,
    /// Ports answering HTTP/1.1, h2c and gRPC (0 picks a free port).
    pub http_ports: Vec<u16>,
    /// Ports answering raw TCP echo.
    pub tcp_ports: Vec<u16>,
    /// Write `<pod> <version> <peer>\n` to each TCP connection first.
    pub tcp_banner: bool,
    /// Upstream URLs called on every HTTP/gRPC request.
    pub upstreams: Vec<String>,
    /// Deadline for each upstream call.
    pub upstream_timeout: Duration,
    /// Use h2c for http:// upstreams.
    pub upstream_http2: bool,
    /// Reply 502 if any upstream failed.
    pub fail_on_upstream_error: bool,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// How long in-flight HTTP connections may finish after a shutdown signal.
    pub drain_timeout: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address that failed.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// An upstream URL is unusable.
    #[error(transparent)]
    Upstream(#[from] TargetError),
}

/// A bound, not yet running server.
pub struct Server {
    http: Vec<TcpListener>,
    tcp: Vec<TcpListener>,
    state: Arc<HandlerState>,
    tcp_banner: bool,
    drain_timeout: Duration,
}

impl Server {
    /// Validates the config and binds every listener.
    pub async fn bind(cfg: ServeConfig) -> Result<Self, ServeError> {
        let upstreams = cfg
            .upstreams
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        let mut http = Vec::new();
        for p in &cfg.http_ports {
            http.push(bind(SocketAddr::new(cfg.bind, *p)).await?);
        }
        let mut tcp = Vec::new();
        for p in &cfg.tcp_ports {
            tcp.push(bind(SocketAddr::new(cfg.bind, *p)).await?);
        }
        let state = Arc::new(HandlerState {
            identity: cfg.identity,
            upstreams,
            upstream_timeout: cfg.upstream_timeout,
            upstream_http2: cfg.upstream_http2,
            fail_on_upstream_error: cfg.fail_on_upstream_error,
            max_body: cfg.max_body,
        });
        Ok(Self {
            http,
            tcp,
            state,
            tcp_banner: cfg.tcp_banner,
            drain_timeout: cfg.drain_timeout,
        })
    }

    /// Bound HTTP/gRPC addresses, in flag order.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Bound TCP echo addresses, in flag order.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` resolves, then drains HTTP connections for up to the drain
    /// timeout and closes everything else.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut loops = JoinSet::new();
        for l in self.http {
            loops.spawn(http_loop(
                l,
                self.state.clone(),
                stop_rx.clone(),
                self.drain_timeout,
            ));
        }
        for l in self.tcp {
            let banner = self.tcp_banner.then(|| self.state.identity.clone());
            loops.spawn(tcp_loop(l, banner, stop_rx.clone()));
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        while loops.join_next().await.is_some() {}
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Resolves once shutdown is signalled (or the signaller is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The borrow guard is dropped here so callers' futures stay Send.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Accepts under a connection cap; None once shutdown is signalled.
async fn accept(
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.ok()?,
            _ = stopped(stop) => return None,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(stop) => return None,
        };
        match accepted {
            Ok((s, peer)) => return Some((s, peer, permit)),
            Err(e) => {
                // Typically EMFILE or a connection reset before accept; back off briefly.
                eprintln!("mesh-testapp: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn http_loop(
    listener: TcpListener,
    state: Arc<HandlerState>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(1000);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNS_PER_LISTENER));
    let mut conns = JoinSet::new();
    while let Some((stream, peer, permit)) = accept(&listener, &limit, &mut stop).await {
        while conns.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let info = ConnInfo { peer, local };
        let state = state.clone();
        let svc = service_fn(move |req| handle(state.clone(), info, req));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        conns.spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            // Client-side errors (resets, garbage) only end this connection.
            let _ = watcher.watch(conn).await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "mesh-testapp: drain timeout, closing {} connections",
            conns.len()
        );
    }
    conns.shutdown().await;
}

async fn tcp_loop(
    listener: TcpListener,
    banner: Option<Identity>,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNS_PER_LISTENER));
    let mut conns = JoinSet::new();
    while let Some((stream, peer, permit)) = accept(&listener, &limit, &mut stop).await {
        while conns.try_join_next().is_some() {}
        let banner = banner
            .as_ref()
            .map(|id| format!("{} {} {peer}\n", id.pod, id.version));
        conns.spawn(async move {
            let _ = echo(stream, banner).await;
            drop(permit);
        });
    }
    // Echo connections have no request boundary to drain at; dropping the set closes them.
    conns.shutdown().await;
}

async fn echo(mut stream: TcpStream, banner: Option<String>) -> std::io::Result<()> {
    if let Some(b) = banner {
        stream.write_all(b.as_bytes()).await?;
    }
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the peer is done sending; finish our side too.
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}
