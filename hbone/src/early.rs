//! Client tunnels that do not wait for the CONNECT response before sending: the first bytes
//! the application wrote travel with (or right behind) the request headers, which saves a
//! round trip between the two proxies on every new connection.
//!
//! Bytes the client sent before the tunnel is opened go out with the request headers, in one
//! TLS record. Only the first chunk read from TCP is sent early; reading stops until the response arrives,
//! so at most one chunk is outstanding. The server still authorizes the request and connects
//! upstream before it reads any data (the data waits in the stream's flow-control window), so
//! nothing reaches the destination unless the tunnel is accepted. If the server turns the
//! request away unprocessed (REFUSED_STREAM, or a GOAWAY that excludes the stream), the chunk
//! is replayed on a fresh connection, just like [`Pool::connect`] retries.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::SendStream;
use h2::client::SendRequest;
use http::{StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::pool::{ConnectRequest, Pool, PoolKey, Sent, StreamSlot, send_request};
use crate::stream::{H2Stream, HboneError, UploadStart, copy_bidirectional, copy_parts};

/// Size of the buffer the first chunk is read into.
const FIRST_READ: usize = 64 * 1024;

/// A CONNECT about to be sent: established already (after a retry), or a stream reserved on a
/// ready connection.
pub enum Opening {
    /// The server answered 200.
    Established(H2Stream),
    /// A connection ready for the request; [`tunnel`] sends it.
    Ready(Box<ReadyStream>),
}

impl std::fmt::Debug for Opening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opening::Established(s) => f.debug_tuple("Established").field(s).finish(),
            Opening::Ready(_) => f.write_str("Ready"),
        }
    }
}

/// A reserved stream on a ready connection, with what is needed to retry elsewhere.
pub struct ReadyStream {
    pub(crate) pool: Pool,
    pub(crate) key: PoolKey,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) request: ConnectRequest,
    pub(crate) uri: Uri,
    pub(crate) conn_id: u64,
    pub(crate) slot: Box<StreamSlot>,
    pub(crate) sender: SendRequest<Bytes>,
}

/// Why a tunnel ended badly.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The tunnel was never established (error response, refused twice, timeout, ...).
    #[error("{0}")]
    Connect(HboneError),
    /// The tunnel was established and then failed.
    #[error("{0}")]
    Io(io::Error),
}

/// What happened to the first chunk while the response was outstanding.
#[derive(Default)]
struct Early {
    /// First chunk read from TCP (kept whole for a replay).
    first: Option<Bytes>,
    /// How much of `first` h2 has taken.
    sent: usize,
    /// TCP reached EOF before or with the first chunk.
    eof: bool,
    /// END_STREAM sent.
    eof_sent: bool,
    /// Reading TCP failed; reported once the tunnel is up (as a plain copy would).
    read_error: Option<io::Error>,
}

impl Early {
    /// Reads the first chunk from TCP unless it was read (or TCP ended) already.
    fn poll_read_first<A: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut A,
        buf: &mut BytesMut,
    ) {
        if self.first.is_none() && !self.eof && self.read_error.is_none() {
            match tokio_util::io::poll_read_buf(Pin::new(&mut *tcp), cx, buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => self.first = Some(buf.split().freeze()),
                Poll::Ready(Err(e)) => self.read_error = Some(e),
                Poll::Pending => {}
            }
        }
    }

    /// Reads the first chunk (once) and hands all of it to h2 at once.
    ///
    /// Not waiting for flow-control capacity is what lets the DATA leave with the HEADERS: a
    /// new stream gets capacity only when the connection task opens it, so waiting would cost
    /// a second TLS record, syscall and wake-up on the peer. The chunk is in memory anyway (kept
    /// for a replay) and bounded by [`FIRST_READ`]; h2 sends it as the window allows.
    fn poll_upload<A: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut A,
        buf: &mut BytesMut,
        send: &mut SendStream<Bytes>,
    ) {
        self.poll_read_first(cx, tcp, buf);
        if let Some(first) = &self.first
            && self.sent == 0
        {
            if send.send_data(first.clone(), false).is_err() {
                // An error that surfaces through the response.
                return;
            }
            self.sent = first.len();
        }
        if self.eof && !self.eof_sent {
            send.reserve_capacity(0);
            if send.send_data(Bytes::new(), true).is_ok() {
                self.eof_sent = true;
            }
        }
    }

    /// The upload state for the pump once the tunnel is up on the original stream.
    fn upload_start(&mut self) -> UploadStart {
        let first = self.first.take().unwrap_or_default();
        UploadStart {
            pending: first.slice(self.sent..),
            eof: self.eof && !self.eof_sent,
            done: self.eof_sent,
            bytes: self.sent as u64,
        }
    }
}

/// Relays `tcp` through `opening` until both directions end, sending the first bytes before
/// the response arrives. `on_established` runs once the server accepted the tunnel (200);
/// `deadline` bounds the wait for that. Returns bytes moved (tcp -> h2, h2 -> tcp).
pub async fn tunnel<A>(
    tcp: &mut A,
    opening: Opening,
    deadline: Instant,
    on_established: impl FnOnce(),
) -> Result<(u64, u64), TunnelError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ready = match opening {
        Opening::Established(stream) => {
            on_established();
            return copy_bidirectional(tcp, stream)
                .await
                .map_err(TunnelError::Io);
        }
        Opening::Ready(r) => r,
    };
    let mut early = Early::default();
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    // Bytes the client sent already are picked up first, so that the headers and the data are
    // queued before the connection task runs and leave in one TLS record.
    poll_fn(|cx| {
        early.poll_read_first(cx, tcp, &mut buf);
        Poll::Ready(())
    })
    .await;
    let sent = send_request(&mut ready.sender, &ready.uri, &ready.request.headers);
    let (mut response, mut send) = match sent {
        Ok(Sent::Request(response, send)) => (response, send),
        Ok(Sent::Refused(err)) => {
            tracing::debug!(dst = %ready.key.dst, error = %err, "retrying CONNECT on a new connection");
            return replay(tcp, ready, early, deadline, on_established).await;
        }
        Err(e) => return Err(TunnelError::Connect(e)),
    };
    let wait = poll_fn(|cx| {
        early.poll_upload(cx, tcp, &mut buf, &mut send);
        if early.read_error.is_some() {
            // The client went away: abandon the request (dropping `send` resets the stream)
            // rather than have the server connect to the app for nobody.
            return Poll::Ready(None);
        }
        Pin::new(&mut response).poll(cx).map(Some)
    });
    let response = match tokio::time::timeout_at(deadline, wait).await {
        Err(_elapsed) => return Err(TunnelError::Connect(HboneError::ConnectTimeout)),
        Ok(None) => {
            drop(send);
            let e = early.read_error.take();
            return Err(TunnelError::Io(
                e.unwrap_or_else(|| io::Error::other("client gone")),
            ));
        }
        Ok(Some(Ok(r))) if r.status() == StatusCode::OK => r,
        Ok(Some(Ok(r))) => return Err(TunnelError::Connect(HboneError::Status(r.status()))),
        Ok(Some(Err(e))) if crate::pool::refused(&e) => {
            tracing::debug!(dst = %ready.key.dst, error = %e, "replaying early CONNECT on a new connection");
            drop(send);
            return replay(tcp, ready, early, deadline, on_established).await;
        }
        Ok(Some(Err(e))) => return Err(TunnelError::Connect(e.into())),
    };
    on_established();
    if let Some(e) = early.read_error.take() {
        return Err(TunnelError::Io(e));
    }
    let start = early.upload_start();
    copy_parts(
        tcp,
        send,
        response.into_body(),
        start,
        Bytes::new(),
        false,
        Some(ready.slot as Box<dyn Send + Sync>),
    )
    .await
    .map_err(TunnelError::Io)
}

/// The server turned the stream away unprocessed: open another on a new connection (waiting
/// for its 200 this time), send it what the first one carried, then relay as usual.
async fn replay<A>(
    tcp: &mut A,
    ready: Box<ReadyStream>,
    mut early: Early,
    deadline: Instant,
    on_established: impl FnOnce(),
) -> Result<(u64, u64), TunnelError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let ReadyStream {
        pool,
        key,
        tls,
        request,
        conn_id,
        slot,
        sender,
        ..
    } = *ready;
    drop((sender, slot));
    pool.forget(&key, conn_id);
    // The same deadline as the first attempt: a peer that refused once and then never
    // answers must not hold the client forever.
    let mut stream = tokio::time::timeout_at(deadline, pool.connect(key, tls, request))
        .await
        .map_err(|_| TunnelError::Connect(HboneError::ConnectTimeout))?
        .map_err(TunnelError::Connect)?;
    on_established();
    if let Some(e) = early.read_error.take() {
        return Err(TunnelError::Io(e));
    }
    let first = early.first.take().unwrap_or_default();
    stream.write_all(&first).await.map_err(TunnelError::Io)?;
    if early.eof {
        stream.shutdown().await.map_err(TunnelError::Io)?;
    }
    let (up, down) = copy_bidirectional(tcp, stream)
        .await
        .map_err(TunnelError::Io)?;
    Ok((up + first.len() as u64, down))
}

#[cfg(test)]
mod tests;
