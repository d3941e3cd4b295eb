//! HBONE server: serves HTTP/2 CONNECT requests on an already accepted (m)TLS connection.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::coalesce::{H2Transport, h2_transport};
use crate::stream::{H2Stream, HboneError, clamp_frame_size, clamp_window, keepalive};

/// How long handler tasks may run on after their connection ended before being aborted.
const HANDLER_GRACE: Duration = Duration::from_secs(1);

/// HTTP/2 server tuning.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    pub max_concurrent_streams: u32,
    /// HTTP/2 initial stream receive window.
    pub stream_window: u32,
    /// HTTP/2 connection receive window.
    pub conn_window: u32,
    /// Largest HTTP/2 frame we accept.
    pub max_frame_size: u32,
    /// Largest request header block we accept.
    pub max_header_list_size: u32,
    /// Limit for the HTTP/2 preface and SETTINGS exchange.
    pub handshake_timeout: Duration,
    /// How often to PING the client.
    pub keepalive_interval: Duration,
    /// How long to wait for a PONG before dropping the connection.
    pub keepalive_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 200,
            stream_window: 4 * 1024 * 1024,
            conn_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// One incoming HBONE request, to be accepted (200) or rejected by the handler.
#[derive(Debug)]
pub struct InboundRequest {
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

impl InboundRequest {
    /// The request method (HBONE requires CONNECT).
    pub fn method(&self) -> &Method {
        self.request.method()
    }

    /// The raw `:authority`, or "" when absent.
    pub fn authority(&self) -> &str {
        self.request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .unwrap_or("")
    }

    /// The `:authority` as a socket address (`1.2.3.4:80` or `[::1]:80`), if it is one.
    pub fn parsed_authority(&self) -> Option<SocketAddr> {
        self.authority().parse().ok()
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        self.request.headers()
    }

    /// Answers with `status` and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let mut response = Response::new(());
        *response.status_mut() = status;
        if let Err(e) = self.respond.send_response(response, true) {
            tracing::debug!(error = %e, %status, "failed to send HBONE rejection");
        }
    }

    /// Answers 200 and returns the tunnel stream.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(H2Stream::new(send, self.request.into_body()))
    }
}

/// Serves HBONE on `io` until the connection ends, running `handler` for each request.
///
/// When `drain` is cancelled a GOAWAY is sent and existing streams run to completion.
/// Handler tasks are owned by this call: they are aborted shortly after the connection
/// ends, or at once if this future is dropped (which is how a drain deadline is enforced).
pub async fn serve<IO, F, Fut>(
    io: IO,
    settings: &ServerSettings,
    drain: CancellationToken,
    handler: F,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(InboundRequest) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_window_size(clamp_window(settings.stream_window))
        .initial_connection_window_size(clamp_window(settings.conn_window))
        .max_frame_size(clamp_frame_size(settings.max_frame_size))
        .max_header_list_size(settings.max_header_list_size)
        .handshake::<H2Transport<IO>, Bytes>(h2_transport(io));
    let mut conn = tokio::time::timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| HboneError::HandshakeTimeout)??;

    let pings = conn.ping_pong();
    let keepalive = keepalive(
        pings,
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    tokio::pin!(keepalive);
    let mut tasks = JoinSet::new();
    let mut draining = false;
    let result = loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    let handler = handler.clone();
                    tasks.spawn(handler(InboundRequest { request, respond }));
                }
                Some(Err(e)) => break Err(HboneError::H2(e)),
                None => break Ok(()),
            },
            _ = drain.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            err = &mut keepalive => break Err(err),
            // Reap finished handlers so the set does not grow with the connection's age.
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined
                    && e.is_panic()
                {
                    tracing::warn!("HBONE request handler panicked");
                }
            }
        }
    };
    drop(conn);
    // Streams are closed now, so handlers are finishing up (logging, metrics); give them a moment.
    let _ = tokio::time::timeout(HANDLER_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    result
}

#[cfg(test)]
pub(crate) mod testing {
    //! TLS fixtures and an echo HBONE server shared by the pool and server tests.

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::{InboundRequest, ServerSettings, serve};

    /// Client and server configs around one self-signed cert for 127.0.0.1.
    pub(crate) struct TestTls {
        pub(crate) client: Arc<rustls::ClientConfig>,
        pub(crate) server: Arc<rustls::ServerConfig>,
    }

    /// A CONNECT for `10.1.2.3:<port>` without extra headers (the echo server answers any).
    pub(crate) fn connect_request(port: u16) -> crate::pool::ConnectRequest {
        crate::pool::ConnectRequest {
            authority: SocketAddr::new([10, 1, 2, 3].into(), port),
            headers: http::HeaderMap::new(),
        }
    }

    pub(crate) fn test_tls() -> TestTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der.clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der], key_der)
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        TestTls {
            client: Arc::new(client),
            server: Arc::new(server),
        }
    }

    /// A running HBONE test server.
    pub(crate) struct TestServer {
        pub(crate) addr: SocketAddr,
        /// Drain token handed to connections accepted from now on.
        drain: Arc<Mutex<CancellationToken>>,
        /// TLS connections accepted so far.
        pub(crate) accepted: Arc<AtomicUsize>,
        /// Requests still to be reset with REFUSED_STREAM before echoing resumes.
        pub(crate) refuse: Arc<AtomicUsize>,
        /// Requests that reached the handler.
        pub(crate) requests: Arc<AtomicUsize>,
        _stop: tokio_util::sync::DropGuard,
    }

    impl TestServer {
        /// Sends GOAWAY on every connection accepted so far; later ones are unaffected.
        pub(crate) fn drain_existing(&self) {
            let mut current = self.drain.lock().unwrap();
            std::mem::replace(&mut *current, CancellationToken::new()).cancel();
        }
    }

    /// Serves HBONE on 127.0.0.1: CONNECT to port 1 is answered 403, everything else echoes.
    pub(crate) async fn echo_server(tls: &TestTls, settings: ServerSettings) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        let drain = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let accepted = Arc::new(AtomicUsize::new(0));
        let refuse = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (task_drain, task_stop, task_accepted) =
            (drain.clone(), stop.clone(), accepted.clone());
        let (task_refuse, task_requests) = (refuse.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    r = listener.accept() => r.unwrap().0,
                    _ = task_stop.cancelled() => return,
                };
                task_accepted.fetch_add(1, Ordering::SeqCst);
                let drain = task_drain.lock().unwrap().clone();
                let (acceptor, settings) = (acceptor.clone(), settings.clone());
                let stop = task_stop.clone();
                let (refuse, requests) = (task_refuse.clone(), task_requests.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(crate::tls_transport(tcp)).await else {
                        return;
                    };
                    let handler = move |req: InboundRequest| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let refused = refuse
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        echo_handler(req, refused)
                    };
                    tokio::select! {
                        _ = serve(tls, &settings, drain, handler) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        TestServer {
            addr,
            drain,
            accepted,
            refuse,
            requests,
            _stop: stop.drop_guard(),
        }
    }

    async fn echo_handler(mut req: InboundRequest, refuse: bool) {
        if refuse {
            // As a server does for a stream it will not process (safe for the client to retry).
            req.respond.send_reset(h2::Reason::REFUSED_STREAM);
            return;
        }
        match req.parsed_authority() {
            Some(a) if a.port() == 1 => req.reject(http::StatusCode::FORBIDDEN),
            // A peer that takes the request and never answers it.
            Some(a) if a.port() == 2 => {
                let _held = req;
                std::future::pending::<()>().await;
            }
            Some(_) if req.method() == http::Method::CONNECT => {
                let Ok(mut stream) = req.accept() else { return };
                let _ = copy_back(&mut stream).await;
            }
            _ => req.reject(http::StatusCode::BAD_REQUEST),
        }
    }

    /// Writes every byte read back to the peer, then half-closes.
    async fn copy_back(stream: &mut crate::stream::H2Stream) -> std::io::Result<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                stream.shutdown().await?;
                return Ok(total);
            }
            stream.write_all(&buf[..n]).await?;
            total += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::mpsc;

    use super::*;

    /// Raw h2 client over an in-memory pipe to a `serve` task; returns the client handle
    /// and the serve task.
    async fn raw_client<F, Fut>(
        drain: CancellationToken,
        handler: F,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), HboneError>>,
    )
    where
        F: Fn(InboundRequest) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            serve(server_io, &ServerSettings::default(), drain, handler).await
        });
        let (send, conn) = h2::client::handshake::<DuplexStream>(client_io)
            .await
            .unwrap();
        tokio::spawn(conn);
        (send, server)
    }

    fn connect_to(authority: &str, headers: &[(&str, String)]) -> Request<()> {
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = authority.parse().unwrap();
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            req.headers_mut()
                .insert(name, http::HeaderValue::from_str(value).unwrap());
        }
        req
    }

    async fn status_of(send: &mut h2::client::SendRequest<Bytes>, req: Request<()>) -> StatusCode {
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, _body) = ready.send_request(req, false).unwrap();
        resp.await.unwrap().status()
    }

    #[tokio::test]
    async fn garbage_bytes_make_serve_return_error() {
        let (mut client, server_io) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            serve(
                server_io,
                &ServerSettings::default(),
                CancellationToken::new(),
                |_req: InboundRequest| async {},
            )
            .await
        });
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\nmore garbage bytes here")
            .await
            .unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn authority_parses_ipv4_and_bracketed_ipv6() {
        let (tx, mut rx) = mpsc::channel(4);
        let handler = move |req: InboundRequest| {
            let tx = tx.clone();
            async move {
                let seen = (req.authority().to_string(), req.parsed_authority());
                req.reject(StatusCode::BAD_REQUEST);
                tx.send(seen).await.unwrap();
            }
        };
        let (mut send, _server) = raw_client(CancellationToken::new(), handler).await;
        for authority in ["1.2.3.4:80", "[::1]:8080", "example.com:80"] {
            let status = status_of(&mut send, connect_to(authority, &[])).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(rx.recv().await.unwrap());
        }
        assert_eq!(
            seen[0],
            ("1.2.3.4:80".into(), Some("1.2.3.4:80".parse().unwrap()))
        );
        assert_eq!(
            seen[1],
            ("[::1]:8080".into(), Some("[::1]:8080".parse().unwrap()))
        );
        assert_eq!(seen[2], ("example.com:80".into(), None));
    }

    #[tokio::test]
    async fn oversized_header_is_refused_but_connection_keeps_serving() {
        let handler = |req: InboundRequest| async move {
            let Ok(mut stream) = req.accept() else { return };
            let _ = stream.shutdown().await;
        };
        let (mut send, server) = raw_client(CancellationToken::new(), handler).await;
        let huge = "x".repeat(32 * 1024);
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, _body) = ready
            .send_request(connect_to("1.2.3.4:80", &[("big", huge)]), false)
            .unwrap();
        match resp.await {
            Ok(r) => assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            Err(e) => assert!(e.is_reset(), "unexpected error {e}"),
        }
        let status = status_of(&mut send, connect_to("1.2.3.4:80", &[])).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!server.is_finished());
    }

    #[tokio::test]
    async fn drain_sends_goaway_and_lets_open_streams_finish() {
        let drain = CancellationToken::new();
        let handler = |req: InboundRequest| async move {
            let Ok(mut stream) = req.accept() else { return };
            let mut buf = Vec::new();
            if stream.read_to_end(&mut buf).await.is_ok() {
                let _ = stream.write_all(&buf).await;
                let _ = stream.shutdown().await;
            }
        };
        let (send, server) = raw_client(drain.clone(), handler).await;
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, send_stream) = ready
            .send_request(connect_to("1.2.3.4:80", &[]), false)
            .unwrap();
        let resp = resp.await.unwrap();
        let mut stream = crate::stream::H2Stream::new(send_stream, resp.into_body());

        drain.cancel();
        // New streams are refused once the GOAWAY arrives.
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match send.clone().ready().await {
                    Err(e) => break e,
                    Ok(mut s) => match s.send_request(connect_to("1.2.3.4:80", &[]), false) {
                        Err(e) => break e,
                        Ok((resp, _)) => match resp.await {
                            Err(e) => break e,
                            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        },
                    },
                }
            }
        })
        .await
        .unwrap();
        assert!(refused.is_go_away() || refused.reason() == Some(h2::Reason::REFUSED_STREAM));
        assert!(!server.is_finished());

        stream.write_all(b"still here").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"still here");
        drop(stream);
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn handler_tasks_end_when_connection_ends() {
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let ended = Arc::new(AtomicBool::new(false));
        let (started_tx, mut started_rx) = mpsc::channel(1);
        let flag = ended.clone();
        let handler = move |req: InboundRequest| {
            let (flag, started_tx) = (flag.clone(), started_tx.clone());
            async move {
                let _guard = SetOnDrop(flag);
                let _req = req;
                started_tx.send(()).await.unwrap();
                std::future::pending::<()>().await;
            }
        };
        let (send, server) = raw_client(CancellationToken::new(), handler).await;
        let mut ready = send.clone().ready().await.unwrap();
        let (_resp, _stream) = ready
            .send_request(connect_to("1.2.3.4:80", &[]), false)
            .unwrap();
        started_rx.recv().await.unwrap();
        drop((_resp, _stream, ready, send));
        // With every client handle gone the client connection closes, ending serve.
        let _ = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(ended.load(Ordering::SeqCst));
    }
}
