//! One HBONE tunnel: an HTTP/2 CONNECT stream exposed as a byte stream, plus the zero-copy
//! pump that joins it to a TCP connection.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Ping, PingPong, RecvStream, SendStream};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};

/// Largest DATA payload handed to h2 per write; bounds memory buffered per stream.
const MAX_WRITE_CHUNK: usize = 256 * 1024;
/// Bytes fetched from the socket per `recv` under TLS. rustls asks for at most one record
/// (~16 KiB) at a time; reading several records per syscall cuts receive syscalls and the
/// window-update ACKs each small read can trigger.
pub const TLS_READ_BUFFER: usize = 64 * 1024;
/// Size of each fresh read buffer in [`copy_bidirectional`].
const COPY_BUF: usize = 256 * 1024;
/// Below this much free space the copy buffer is re-reserved (reclaiming or reallocating).
const MIN_READ_SPACE: usize = 64 * 1024;

/// Errors from the HBONE client pool and server.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// A socket operation failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed.
    #[error("tls handshake: {0}")]
    Tls(io::Error),
    /// HTTP/2 protocol or connection error.
    #[error("http2: {0}")]
    H2(#[from] h2::Error),
    /// The peer answered the CONNECT with a status other than 200.
    #[error("CONNECT rejected with status {0}")]
    Status(StatusCode),
    /// Connecting (TCP + TLS + HTTP/2 handshake) took too long.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The HTTP/2 server handshake took too long.
    #[error("http2 handshake timed out")]
    HandshakeTimeout,
    /// The peer did not answer a keepalive PING in time.
    #[error("keepalive ping timed out")]
    KeepaliveTimeout,
    /// A connection attempt shared by several requests failed.
    #[error("shared connection attempt failed: {0}")]
    Dial(Arc<HboneError>),
    /// The CONNECT request could not be built (bad authority or headers).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The pool shut down while the request was waiting.
    #[error("connection pool closed")]
    PoolClosed,
}

/// A socket behind the read buffer HBONE runs TLS over.
pub type TlsTransport<T> = BufReader<T>;

/// The transport to run TLS over: the socket behind a [`TLS_READ_BUFFER`] read buffer
/// (writes pass straight through).
pub fn tls_transport<T: AsyncRead>(tcp: T) -> TlsTransport<T> {
    BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// Turns an h2 error into an io error, keeping the underlying io error when there is one.
pub(crate) fn h2_to_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        match err.into_io() {
            Some(e) => e,
            None => io::Error::other("h2 io error"),
        }
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, err)
    }
}

/// Error for writing to a stream whose send side is no longer open.
fn send_closed_error(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("stream reset by peer: {reason:?}"),
        ),
        Poll::Ready(Err(e)) => h2_to_io(e),
        Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "stream send side closed"),
    }
}

/// Waits until the stream may send at least one byte and returns how many (at most `want`).
pub(crate) fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    send.reserve_capacity(want);
    // Capacity may already be assigned from an earlier reservation; poll_capacity only
    // reports increases, so check it first.
    let available = send.capacity();
    if available > 0 {
        return Poll::Ready(Ok(available.min(want)));
    }
    loop {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
            Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            None => return Poll::Ready(Err(send_closed_error(send, cx))),
        }
    }
}

/// An HBONE tunnel stream (either side): DATA frames in, DATA frames out.
///
/// Reading returns 0 once the peer sent END_STREAM; shutting down sends END_STREAM.
/// Dropping it before both directions ended resets the stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet handed to the reader (flow-control capacity not yet released).
    read_buf: Bytes,
    recv_eof: bool,
    send_closed: bool,
    /// Held for its `Drop` (e.g. the pool's per-connection stream count).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("recv_eof", &self.recv_eof)
            .field("send_closed", &self.send_closed)
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    /// Wraps the two halves of an established CONNECT stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            read_buf: Bytes::new(),
            recv_eof: false,
            send_closed: false,
            _guard: None,
        }
    }

    /// Attaches a value dropped together with the stream.
    pub(crate) fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        loop {
            if !this.read_buf.is_empty() {
                let n = buf.remaining().min(this.read_buf.len());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                // Only now is the data consumed, so only now may the peer send more.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.recv_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.read_buf = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.recv_eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.send_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        let want = buf.len().min(MAX_WRITE_CHUNK);
        let n = ready!(poll_send_capacity(&mut this.send, cx, want))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.send_closed {
            return Poll::Ready(Ok(()));
        }
        this.send.reserve_capacity(0);
        if let Err(e) = this.send.send_data(Bytes::new(), true) {
            return Poll::Ready(Err(if e.is_io() {
                h2_to_io(e)
            } else {
                send_closed_error(&mut this.send, cx)
            }));
        }
        this.send_closed = true;
        Poll::Ready(Ok(()))
    }
}

/// State of the TCP -> HTTP/2 direction.
struct Upload {
    buf: BytesMut,
    pending: Bytes,
    eof: bool,
    done: bool,
    bytes: u64,
}

impl Upload {
    fn poll<A: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut A,
        send: &mut SendStream<Bytes>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = ready!(poll_send_capacity(send, cx, self.pending.len()))?;
                // Zero-copy: the frozen read buffer is handed to h2 as is.
                let chunk = self.pending.split_to(n);
                send.send_data(chunk, false).map_err(h2_to_io)?;
                self.bytes += n as u64;
                continue;
            }
            if self.eof {
                send.reserve_capacity(0);
                send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if self.buf.capacity() - self.buf.len() < MIN_READ_SPACE {
                // Reclaims the old allocation when h2 has released every chunk of it.
                self.buf.reserve(COPY_BUF);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *tcp),
                cx,
                &mut self.buf
            ))?;
            if n == 0 {
                self.eof = true;
            } else {
                self.pending = self.buf.split().freeze();
            }
        }
    }
}

/// State of the HTTP/2 -> TCP direction.
struct Download {
    pending: Bytes,
    eof: bool,
    needs_flush: bool,
    done: bool,
    bytes: u64,
}

impl Download {
    fn poll<A: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut A,
        recv: &mut RecvStream,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                self.bytes += n as u64;
                self.needs_flush = true;
                // Release only what the TCP side accepted, so a slow reader slows the sender.
                let _ = recv.flow_control().release_capacity(n);
                continue;
            }
            if self.eof {
                ready!(Pin::new(&mut *tcp).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if self.needs_flush {
                // Buffered writers (e.g. TLS) must not hold data while we wait for more.
                ready!(Pin::new(&mut *tcp).poll_flush(cx))?;
                self.needs_flush = false;
            }
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.eof = true,
            }
        }
    }
}

/// Copies both directions between `tcp` and an HBONE stream until both are finished.
///
/// TCP EOF becomes END_STREAM; END_STREAM from the peer becomes `shutdown(WR)` on `tcp`.
/// Returns the bytes moved (tcp -> h2, h2 -> tcp). An error in either direction ends both.
pub async fn copy_bidirectional<A>(tcp: &mut A, h2: H2Stream) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let H2Stream {
        send,
        recv,
        read_buf,
        recv_eof,
        send_closed,
        _guard,
    } = h2;
    let up = UploadStart {
        done: send_closed,
        ..UploadStart::default()
    };
    copy_parts(tcp, send, recv, up, read_buf, recv_eof, _guard).await
}

/// How far the TCP -> HTTP/2 direction got before [`copy_parts`] takes over.
#[derive(Debug, Default)]
pub(crate) struct UploadStart {
    /// Bytes read from TCP but not yet handed to h2.
    pub(crate) pending: Bytes,
    /// TCP reached EOF; END_STREAM still to send (after `pending`).
    pub(crate) eof: bool,
    /// END_STREAM already sent.
    pub(crate) done: bool,
    /// Bytes already handed to h2.
    pub(crate) bytes: u64,
}

/// The pump behind [`copy_bidirectional`], starting from a given upload state.
pub(crate) async fn copy_parts<A>(
    tcp: &mut A,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    start: UploadStart,
    read_buf: Bytes,
    recv_eof: bool,
    guard: Option<Box<dyn Send + Sync>>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Upload {
        buf: BytesMut::new(),
        pending: start.pending,
        eof: start.eof,
        done: start.done,
        bytes: start.bytes,
    };
    let mut down = Download {
        pending: read_buf,
        eof: recv_eof,
        needs_flush: false,
        done: false,
        bytes: 0,
    };
    poll_fn(|cx| {
        if !up.done
            && let Poll::Ready(Err(e)) = up.poll(cx, tcp, &mut send)
        {
            return Poll::Ready(Err(e));
        }
        if !down.done
            && let Poll::Ready(Err(e)) = down.poll(cx, tcp, &mut recv)
        {
            return Poll::Ready(Err(e));
        }
        if up.done && down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    drop(guard);
    Ok((up.bytes, down.bytes))
}

/// Keeps a configured window inside HTTP/2's legal range (h2 panics otherwise).
pub(crate) fn clamp_window(size: u32) -> u32 {
    size.min(0x7fff_ffff)
}

/// Keeps a configured frame size inside HTTP/2's legal range (h2 panics otherwise).
pub(crate) fn clamp_frame_size(size: u32) -> u32 {
    size.clamp(16_384, 16_777_215)
}

/// PINGs every `interval`; returns once a PONG fails to arrive within `timeout`.
pub(crate) async fn keepalive(
    ping_pong: Option<PingPong>,
    interval: Duration,
    timeout: Duration,
) -> HboneError {
    let Some(mut ping_pong) = ping_pong else {
        // Someone else owns the pinger; never report failure.
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return HboneError::H2(e),
            Err(_elapsed) => return HboneError::KeepaliveTimeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A client and server H2Stream joined by an in-memory HTTP/2 connection.
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let stream = H2Stream::new(send, req.into_body());
            // Keep driving the connection after handing the stream out.
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            stream
        });
        let (send_request, conn) = h2::client::handshake::<DuplexStream>(client_io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut send_request = send_request.ready().await.unwrap();
        let mut req = http::Request::new(());
        *req.method_mut() = http::Method::CONNECT;
        *req.uri_mut() = "10.0.0.1:80".parse().unwrap();
        let (response, send) = send_request.send_request(req, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let client = H2Stream::new(send, response.into_body());
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn half_close_reaches_peer_which_can_still_reply() {
        let (mut client, mut server) = stream_pair().await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();

        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();

        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"bye");
        assert!(client.write_all(b"late").await.is_err());
    }

    #[tokio::test]
    async fn large_transfer_respects_flow_control() {
        let (mut client, mut server) = stream_pair().await;
        // Far beyond the default 64 KiB windows, so capacity must be released as data is read.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "payload corrupted");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn peer_reset_is_an_io_error() {
        let (mut client, server) = stream_pair().await;
        // Dropping an unfinished stream sends RST_STREAM.
        drop(server);
        let mut buf = [0u8; 16];
        let err = client.read(&mut buf).await.unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn copy_bidirectional_pumps_both_ways_and_propagates_eof() {
        let (client, mut server) = stream_pair().await;
        let (mut app, mut proxy_side) = tokio::io::duplex(64 * 1024);
        let pump = tokio::spawn(async move { copy_bidirectional(&mut proxy_side, client).await });

        let upload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
        let download: Vec<u8> = (0..1_500_000u32).map(|i| (i % 241) as u8).collect();
        let (expect_up, to_send) = (upload.clone(), download.clone());
        let server_task = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(&mut server);
            let reading = async {
                let mut got = Vec::new();
                rd.read_to_end(&mut got).await.unwrap();
                got
            };
            let writing = async {
                wr.write_all(&to_send).await.unwrap();
                wr.shutdown().await.unwrap();
            };
            let (got, ()) = tokio::join!(reading, writing);
            assert!(got == expect_up, "upload corrupted");
        });

        let (mut app_rd, mut app_wr) = tokio::io::split(&mut app);
        let app_write = async {
            app_wr.write_all(&upload).await.unwrap();
            app_wr.shutdown().await.unwrap();
        };
        let app_read = async {
            let mut got = Vec::new();
            app_rd.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(app_write, app_read);
        assert!(got == download, "download corrupted");
        server_task.await.unwrap();
        let (up, down) = pump.await.unwrap().unwrap();
        assert_eq!((up, down), (upload.len() as u64, download.len() as u64));
    }

    #[tokio::test]
    async fn copy_bidirectional_keeps_reverse_direction_open_after_tcp_eof() {
        let (client, mut server) = stream_pair().await;
        let (mut app, mut proxy_side) = tokio::io::duplex(1024);
        let pump = tokio::spawn(async move { copy_bidirectional(&mut proxy_side, client).await });
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();

        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The pump must still be running: the h2 -> tcp direction is open.
        assert!(!pump.is_finished());
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();

        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"response");
        assert_eq!(pump.await.unwrap().unwrap(), (7, 8));
    }
}
