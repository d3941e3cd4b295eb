//! HBONE client connection pool: HTTP/2 connections over mTLS, shared by CONNECT streams with
//! the same (source identity, expected peer identities, source IP, destination) key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

mod types;

pub use types::{
    ConnectFuture, ConnectRequest, Connector, PoolConfig, PoolKey, PoolStats, TcpConnector,
};

use crate::coalesce::{H2Transport, h2_transport};
use crate::early::{Opening, ReadyStream};
use crate::stream::{
    H2Stream, HboneError, TlsTransport, clamp_frame_size, clamp_window, keepalive, tls_transport,
};

#[derive(Default)]
struct Counters {
    open_connections: AtomicUsize,
    active_streams: AtomicUsize,
    connections_opened: AtomicU64,
    connect_failures: AtomicU64,
}

/// What a connection's driver has published about it.
#[derive(Clone)]
enum ConnState {
    Dialing,
    Ready(SendRequest<Bytes>),
    Failed(Arc<HboneError>),
    Closed,
}

/// A pooled connection as the map sees it.
struct Conn {
    id: u64,
    /// Streams in use or reserved; only incremented under the pool lock.
    streams: watch::Sender<u32>,
    state: watch::Receiver<ConnState>,
    counters: Arc<Counters>,
}

impl Conn {
    /// Stream limit for this connection, also honouring the server's advertised maximum.
    fn limit(&self, configured: u32) -> u32 {
        match &*self.state.borrow() {
            ConnState::Ready(send) => {
                let server = u32::try_from(send.current_max_send_streams()).unwrap_or(u32::MAX);
                configured.min(server.max(1))
            }
            _ => configured,
        }
    }

    /// False once the connection got GOAWAY, failed, or closed.
    fn usable(&self) -> bool {
        match &*self.state.borrow() {
            ConnState::Dialing => true,
            ConnState::Ready(send) => {
                // A fresh clone has no pending stream, so poll_ready only reports
                // connection-level errors, which includes a received GOAWAY.
                let mut probe = send.clone();
                let mut cx = Context::from_waker(Waker::noop());
                !matches!(probe.poll_ready(&mut cx), Poll::Ready(Err(_)))
            }
            ConnState::Failed(_) | ConnState::Closed => false,
        }
    }
}

/// A reserved stream slot on a connection; released on drop.
pub(crate) struct StreamSlot {
    conn: Arc<Conn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.conn.streams.send_modify(|n| *n = n.saturating_sub(1));
        self.conn
            .counters
            .active_streams
            .fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shared {
    config: PoolConfig,
    connector: Arc<dyn Connector>,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    counters: Arc<Counters>,
    next_id: AtomicU64,
    /// Cancelled when the last `Pool` handle goes; connection drivers then wind down.
    shutdown: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Vec<Arc<Conn>>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes connection `id` from the pool so no new stream picks it.
    fn remove(&self, key: &PoolKey, id: u64) {
        let mut map = self.lock();
        if let Some(list) = map.get_mut(key) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Removes connection `id` if it has no streams; returns whether it is now out of the pool.
    fn retire_if_idle(&self, key: &PoolKey, id: u64) -> bool {
        let mut map = self.lock();
        let Some(list) = map.get_mut(key) else {
            return true;
        };
        let Some(pos) = list.iter().position(|c| c.id == id) else {
            return true;
        };
        if *list[pos].streams.borrow() != 0 {
            return false;
        }
        list.remove(pos);
        if list.is_empty() {
            map.remove(key);
        }
        true
    }
}

/// HBONE client connection pool. Cloning shares the pool.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    _shutdown: Arc<DropGuard>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Creates an empty pool that dials through `connector`.
    pub fn new(config: PoolConfig, connector: Arc<dyn Connector>) -> Self {
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            config,
            connector,
            conns: Mutex::new(HashMap::new()),
            counters: Arc::new(Counters::default()),
            next_id: AtomicU64::new(1),
            shutdown: shutdown.clone(),
        });
        Self {
            shared,
            _shutdown: Arc::new(shutdown.drop_guard()),
        }
    }

    /// Established connections still running (including ones draining after GOAWAY).
    pub fn connection_count(&self) -> usize {
        self.shared
            .counters
            .open_connections
            .load(Ordering::Relaxed)
    }

    /// Snapshot of the pool counters.
    pub fn stats(&self) -> PoolStats {
        let pooled_connections = self
            .shared
            .lock()
            .values()
            .flatten()
            .filter(|c| c.usable())
            .count();
        let c = &self.shared.counters;
        PoolStats {
            open_connections: c.open_connections.load(Ordering::Relaxed),
            pooled_connections,
            active_streams: c.active_streams.load(Ordering::Relaxed),
            connections_opened: c.connections_opened.load(Ordering::Relaxed),
            connect_failures: c.connect_failures.load(Ordering::Relaxed),
        }
    }

    /// Opens a CONNECT tunnel to `request.authority` over a pooled connection for `key`.
    ///
    /// `tls` is used only if a new connection must be dialed. Anything but a 200 response
    /// is an error.
    pub async fn connect(
        &self,
        key: PoolKey,
        tls: Arc<rustls::ClientConfig>,
        request: ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let uri = authority_uri(&request)?;
        let mut retried = false;
        loop {
            let slot = self.reserve(&key, &tls);
            match self.open_stream(&slot, &uri, &request.headers).await {
                Ok(Opened::Stream(send, recv)) => {
                    return Ok(H2Stream::new(send, recv).with_guard(slot));
                }
                Ok(Opened::Refused(err)) if !retried => {
                    // The connection went away before taking our stream: safe to retry once.
                    tracing::debug!(dst = %key.dst, error = %err, "retrying CONNECT on a new connection");
                    self.shared.remove(&key, slot.conn.id);
                    retried = true;
                }
                Ok(Opened::Refused(err)) => return Err(err),
                Err(e) => return Err(e),
            }
        }
    }

    /// Picks (or starts dialing) a connection with a free stream slot and reserves it.
    fn reserve(&self, key: &PoolKey, tls: &Arc<rustls::ClientConfig>) -> StreamSlot {
        let shared = &self.shared;
        let max = shared.config.max_streams_per_conn.max(1);
        let mut map = shared.lock();
        let list = map.entry(key.clone()).or_default();
        list.retain(|c| c.usable());
        let found = list
            .iter()
            .find(|c| *c.streams.borrow() < c.limit(max))
            .cloned();
        let conn = match found {
            Some(conn) => conn,
            None => {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let (streams, streams_rx) = watch::channel(0u32);
                let (state_tx, state) = watch::channel(ConnState::Dialing);
                let conn = Arc::new(Conn {
                    id,
                    streams,
                    state,
                    counters: shared.counters.clone(),
                });
                list.push(conn.clone());
                let driver = Driver {
                    shared: shared.clone(),
                    key: key.clone(),
                    id,
                    state: state_tx,
                    streams: streams_rx,
                };
                tokio::spawn(driver.run(tls.clone()));
                conn
            }
        };
        conn.streams.send_modify(|n| *n += 1);
        shared
            .counters
            .active_streams
            .fetch_add(1, Ordering::Relaxed);
        StreamSlot { conn }
    }

    /// Sends the CONNECT on the slot's connection and waits for the response.
    async fn open_stream(
        &self,
        slot: &StreamSlot,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Opened, HboneError> {
        let (response, send_stream) = match self.send_connect(slot, uri, headers).await? {
            Sent::Request(response, send) => (response, send),
            Sent::Refused(err) => return Ok(Opened::Refused(err)),
        };
        let response = match response.await {
            Ok(r) => r,
            Err(e) if refused(&e) => return Ok(Opened::Refused(e.into())),
            Err(e) => return Err(e.into()),
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status(response.status()));
        }
        Ok(Opened::Stream(send_stream, response.into_body()))
    }

    /// Sends the CONNECT headers on the slot's connection once it is ready.
    async fn send_connect(
        &self,
        slot: &StreamSlot,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Sent, HboneError> {
        match self.ready_sender(slot).await? {
            Ready::Sender(mut send) => send_request(&mut send, uri, headers),
            Ready::Refused(err) => Ok(Sent::Refused(err)),
        }
    }

    /// Waits until the slot's connection can take a new stream.
    async fn ready_sender(&self, slot: &StreamSlot) -> Result<Ready, HboneError> {
        let mut state = slot.conn.state.clone();
        let ready = state
            .wait_for(|s| !matches!(s, ConnState::Dialing))
            .await
            .map_err(|_| HboneError::PoolClosed)?
            .clone();
        let send = match ready {
            ConnState::Ready(send) => send,
            ConnState::Failed(err) => return Err(HboneError::Dial(err)),
            ConnState::Closed | ConnState::Dialing => {
                return Ok(Ready::Refused(HboneError::PoolClosed));
            }
        };
        match send.ready().await {
            Ok(send) => Ok(Ready::Sender(send)),
            Err(e) => Ok(Ready::Refused(e.into())),
        }
    }

    /// Reserves a stream on a ready connection for a CONNECT the caller sends itself, together
    /// with the first bytes (see [`crate::early`]). Falls back to [`Pool::connect`] (which
    /// waits for the 200) when the chosen connection went away before taking the stream.
    pub async fn open(
        &self,
        key: PoolKey,
        tls: Arc<rustls::ClientConfig>,
        request: ConnectRequest,
    ) -> Result<Opening, HboneError> {
        let uri = authority_uri(&request)?;
        let slot = self.reserve(&key, &tls);
        match self.ready_sender(&slot).await? {
            Ready::Sender(sender) => Ok(Opening::Ready(Box::new(ReadyStream {
                pool: self.clone(),
                key,
                tls,
                request,
                uri,
                conn_id: slot.conn.id,
                slot: Box::new(slot),
                sender,
            }))),
            Ready::Refused(err) => {
                tracing::debug!(dst = %key.dst, error = %err, "retrying CONNECT on a new connection");
                self.shared.remove(&key, slot.conn.id);
                drop(slot);
                Ok(Opening::Established(self.connect(key, tls, request).await?))
            }
        }
    }

    /// Takes connection `id` out of the pool so the next request dials a new one.
    pub(crate) fn forget(&self, key: &PoolKey, id: u64) {
        self.shared.remove(key, id);
    }
}

/// The `:authority` of a CONNECT as a URI (IPv6 rendered as `[a]:p`).
fn authority_uri(request: &ConnectRequest) -> Result<Uri, HboneError> {
    request
        .authority
        .to_string()
        .parse()
        .map_err(|e: http::uri::InvalidUri| HboneError::InvalidRequest(e.to_string()))
}

/// A connection that can take a stream now, or why it cannot.
enum Ready {
    Sender(SendRequest<Bytes>),
    Refused(HboneError),
}

/// Sends a CONNECT for `uri` on a ready connection.
pub(crate) fn send_request(
    send: &mut SendRequest<Bytes>,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Sent, HboneError> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    match send.send_request(req, false) {
        Ok((response, send_stream)) => Ok(Sent::Request(response, send_stream)),
        // Neither a protocol reason nor io: h2 refused our headers (a caller bug).
        Err(e) if e.reason().is_none() && !e.is_io() => {
            Err(HboneError::InvalidRequest(e.to_string()))
        }
        Err(e) => Ok(Sent::Refused(e.into())),
    }
}

/// Outcome of sending the CONNECT headers.
pub(crate) enum Sent {
    Request(h2::client::ResponseFuture, h2::SendStream<Bytes>),
    /// The connection went away before taking the request.
    Refused(HboneError),
}

enum Opened {
    Stream(h2::SendStream<Bytes>, h2::RecvStream),
    /// The server never processed the request; another connection may succeed.
    Refused(HboneError),
}

/// Whether the server guarantees it did not process the stream.
pub(crate) fn refused(err: &h2::Error) -> bool {
    err.reason() == Some(h2::Reason::REFUSED_STREAM) || (err.is_go_away() && err.is_remote())
}

/// Owns one connection: dials it, publishes it, keeps it alive and closes it when idle.
struct Driver {
    shared: Arc<Shared>,
    key: PoolKey,
    id: u64,
    state: watch::Sender<ConnState>,
    streams: watch::Receiver<u32>,
}

impl Driver {
    async fn run(self, tls: Arc<rustls::ClientConfig>) {
        let cfg = &self.shared.config;
        let dialed = tokio::select! {
            r = tokio::time::timeout(cfg.connect_timeout, self.dial(tls)) => r,
            _ = self.shared.shutdown.cancelled() => Ok(Err(HboneError::PoolClosed)),
        };
        let (send, connection) = match dialed {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return self.fail(e),
            Err(_elapsed) => return self.fail(HboneError::ConnectTimeout),
        };
        let counters = self.shared.counters.clone();
        counters.connections_opened.fetch_add(1, Ordering::Relaxed);
        counters.open_connections.fetch_add(1, Ordering::Relaxed);
        self.state.send_replace(ConnState::Ready(send));
        self.drive(connection).await;
        counters.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn fail(&self, err: HboneError) {
        tracing::debug!(dst = %self.key.dst, error = %err, "HBONE connect failed");
        self.shared
            .counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        self.shared.remove(&self.key, self.id);
        self.state.send_replace(ConnState::Failed(Arc::new(err)));
    }

    async fn dial(
        &self,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<(SendRequest<Bytes>, ClientConnection), HboneError> {
        let cfg = &self.shared.config;
        let dst = self.key.dst;
        let tcp = self.shared.connector.connect(dst).await?;
        let server_name = ServerName::IpAddress(dst.ip().into());
        let tls_stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tls_transport(tcp))
            .await
            .map_err(HboneError::Tls)?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(clamp_window(cfg.stream_window))
            .initial_connection_window_size(clamp_window(cfg.conn_window))
            .max_frame_size(clamp_frame_size(cfg.max_frame_size))
            .enable_push(false)
            .handshake(h2_transport(tls_stream))
            .await?;
        Ok((send, connection))
    }

    async fn drive(&self, mut connection: ClientConnection) {
        let cfg = &self.shared.config;
        let pings = connection.ping_pong();
        let keepalive = keepalive(pings, cfg.keepalive_interval, cfg.keepalive_timeout);
        tokio::pin!(keepalive);
        let idle = idle_for(self.streams.clone(), cfg.idle_timeout);
        tokio::pin!(idle);
        let mut pooled = true;
        loop {
            tokio::select! {
                res = &mut connection => {
                    if let Err(e) = res {
                        tracing::debug!(dst = %self.key.dst, error = %e, "HBONE connection error");
                    }
                    break;
                }
                err = &mut keepalive => {
                    tracing::debug!(dst = %self.key.dst, error = %err, "HBONE keepalive failed");
                    break;
                }
                _ = &mut idle, if pooled => {
                    if self.shared.retire_if_idle(&self.key, self.id) {
                        pooled = false;
                        self.unpublish();
                    } else {
                        idle.set(idle_for(self.streams.clone(), cfg.idle_timeout));
                    }
                }
                _ = self.shared.shutdown.cancelled(), if pooled => {
                    pooled = false;
                    self.shared.remove(&self.key, self.id);
                    self.unpublish();
                }
            }
        }
        // Dropping `connection` here closes the socket; streams still open see an error.
        self.shared.remove(&self.key, self.id);
        self.state.send_replace(ConnState::Closed);
    }

    /// Drops our request handle so h2 closes the connection once its streams are done.
    fn unpublish(&self) {
        self.state.send_replace(ConnState::Closed);
    }
}

type ClientConnection = h2::client::Connection<
    H2Transport<tokio_rustls::client::TlsStream<TlsTransport<TcpStream>>>,
    Bytes,
>;

/// Completes once the stream count has stayed at zero for `timeout` (or the count is gone).
async fn idle_for(mut streams: watch::Receiver<u32>, timeout: Duration) {
    loop {
        if streams.wait_for(|n| *n == 0).await.is_err() {
            return;
        }
        match tokio::time::timeout(timeout, streams.wait_for(|n| *n != 0)).await {
            Ok(Ok(_)) => continue,
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
