//! The pool's public vocabulary: connection keys, tuning, socket connectors, requests, stats.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use http::HeaderMap;
use tokio::net::TcpStream;

use crate::identity::Identity;

/// What identifies a reusable HBONE connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Our workload identity (the client certificate presented).
    pub src_identity: Identity,
    /// Identities the server may prove; sorted and deduplicated.
    pub dst_identities: Vec<Identity>,
    /// Downstream client IP the connection is made on behalf of.
    pub src_ip: IpAddr,
    /// HBONE endpoint dialed (usually `ip:15008`).
    pub dst: SocketAddr,
}

impl PoolKey {
    /// Builds a key, normalising the order of the expected identities.
    pub fn new(
        src_identity: Identity,
        mut dst_identities: Vec<Identity>,
        src_ip: IpAddr,
        dst: SocketAddr,
    ) -> Self {
        dst_identities.sort();
        dst_identities.dedup();
        Self {
            src_identity,
            dst_identities,
            src_ip,
            dst,
        }
    }
}

/// Pool tuning.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Streams allowed on one connection before another is opened.
    pub max_streams_per_conn: u32,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// How often to PING each connection.
    pub keepalive_interval: Duration,
    /// How long to wait for a PONG before dropping the connection.
    pub keepalive_timeout: Duration,
    /// HTTP/2 initial stream receive window.
    pub stream_window: u32,
    /// HTTP/2 connection receive window.
    pub conn_window: u32,
    /// Largest HTTP/2 frame we accept.
    pub max_frame_size: u32,
    /// Limit for TCP connect + TLS + HTTP/2 handshake.
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            stream_window: 4 * 1024 * 1024,
            conn_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Boxed future returned by [`Connector::connect`].
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Makes the TCP sockets the pool dials (e.g. inside a pod netns, with SO_MARK).
pub trait Connector: Send + Sync + 'static {
    /// Opens a TCP connection to `dst`.
    fn connect(&self, dst: SocketAddr) -> ConnectFuture;
}

/// Plain `TcpStream::connect` with TCP_NODELAY.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(&self, dst: SocketAddr) -> ConnectFuture {
        Box::pin(async move {
            let stream = TcpStream::connect(dst).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

/// One CONNECT to send over the pool.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// Target carried in `:authority` (IPv6 rendered as `[a]:p`).
    pub authority: SocketAddr,
    /// Extra request headers (baggage, forwarded, traceparent, ...).
    pub headers: HeaderMap,
}

/// Pool counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Established connections whose driver is still running (pooled or draining).
    pub open_connections: usize,
    /// Connections (established or dialing) that new streams may still use (no GOAWAY).
    pub pooled_connections: usize,
    /// Streams currently open or being opened through the pool.
    pub active_streams: usize,
    /// Connections successfully established since the pool was made.
    pub connections_opened: u64,
    /// Failed connection attempts since the pool was made.
    pub connect_failures: u64,
}
