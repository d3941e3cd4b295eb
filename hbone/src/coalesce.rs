//! The transport under h2: the frames one poll of the connection task writes reach TLS as one
//! write, so they leave as one TLS record and one syscall.
//!
//! h2 flushes its writer after every DATA frame larger than a few hundred bytes (and again when
//! it has nothing more to send), and each flush of a TLS stream is a record and a `writev`.
//! With many streams on one connection (16 HTTP clients behind one HBONE connection) a single
//! wake-up of the connection task would otherwise cost one syscall, one TCP segment and one
//! receive on the peer per stream. Here the first flush of a poll goes out at once (a lone
//! frame, as in a request/response exchange, waits for nothing), and later flushes of the same
//! poll are postponed: the task is woken once more and the flush happens at the start of that
//! next poll (h2 reads first in every poll), after everything the current poll produced is in
//! the buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

/// HTTP/2 frames are gathered up to this size before they reach TLS.
const TLS_WRITE_BUFFER: usize = 64 * 1024;

/// What h2 runs over: `T` (the TLS stream) behind a gathering write buffer.
pub(crate) type H2Transport<T> = Coalesced<BufWriter<T>>;

/// `io` behind a [`TLS_WRITE_BUFFER`] write buffer whose flushes are gathered per poll.
pub(crate) fn h2_transport<T: AsyncWrite>(io: T) -> H2Transport<T> {
    Coalesced {
        inner: BufWriter::with_capacity(TLS_WRITE_BUFFER, io),
        written: false,
        flush_due: false,
        flushed_in_poll: false,
    }
}

/// An I/O object whose `poll_flush` right after writes only schedules the flush; see the module
/// docs.
pub(crate) struct Coalesced<T> {
    inner: T,
    /// Bytes were written since the last flush request.
    written: bool,
    /// A flush was postponed and must happen before anything else.
    flush_due: bool,
    /// Written bytes were flushed since the poll began (h2's read at its start resets this).
    flushed_in_poll: bool,
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Flushes a postponed flush; Pending keeps it due (the waker is registered by `inner`).
    fn poll_due_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.flush_due {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.flush_due = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A flush that cannot complete yet (socket full) must not stop reading: the peer's
        // WINDOW_UPDATEs arrive here. The inner writer has registered the waker.
        if let Poll::Ready(Err(e)) = this.poll_due_flush(cx) {
            return Poll::Ready(Err(e));
        }
        this.flushed_in_poll = false;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.written |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.written |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written && this.flushed_in_poll {
            this.written = false;
            if !this.flush_due {
                this.flush_due = true;
                cx.waker().wake_by_ref();
            }
            return Poll::Ready(Ok(()));
        }
        let wrote = std::mem::take(&mut this.written);
        this.flush_due = true;
        ready!(this.poll_due_flush(cx))?;
        this.flushed_in_poll |= wrote;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.written = false;
        this.flush_due = true;
        ready!(this.poll_due_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Records every write that reaches it and counts its flushes.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        flushes: Arc<Mutex<usize>>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            *self.flushes.lock().unwrap() += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes a frame and flushes it, as h2 does after each DATA frame.
    fn frame_and_flush(io: &mut H2Transport<Recorder>, frame: &[u8]) {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut *io).poll_write(&mut cx, frame),
            Poll::Ready(Ok(_))
        ));
        assert!(matches!(
            Pin::new(&mut *io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
    }

    #[test]
    fn a_polls_first_frame_leaves_at_once_and_the_rest_as_one_write() {
        let rec = Recorder::default();
        let mut io = h2_transport(rec.clone());
        for frame in [&b"frame-1"[..], b"frame-2", b"frame-3"] {
            frame_and_flush(&mut io, frame);
        }
        assert_eq!(*rec.writes.lock().unwrap(), vec![b"frame-1".to_vec()]);
        // The next poll: h2 reads first, which performs the postponed flush.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 16];
        let _ = Pin::new(&mut io).poll_read(&mut cx, &mut ReadBuf::new(&mut buf));
        assert_eq!(
            *rec.writes.lock().unwrap(),
            vec![b"frame-1".to_vec(), b"frame-2frame-3".to_vec()]
        );
        assert_eq!(*rec.flushes.lock().unwrap(), 2);
        // A new poll starts afresh: its first frame is not held back.
        frame_and_flush(&mut io, b"frame-4");
        assert_eq!(rec.writes.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_postponed_flush_wakes_the_task_once() {
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let waker = std::task::Waker::from(Arc::new(Count(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        let mut io = h2_transport(Recorder::default());
        for _ in 0..4 {
            let _ = Pin::new(&mut io).poll_write(&mut cx, b"x");
            let _ = Pin::new(&mut io).poll_flush(&mut cx);
        }
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_flush_with_nothing_new_written_sends_what_was_held_back() {
        let rec = Recorder::default();
        let mut io = h2_transport(rec.clone());
        frame_and_flush(&mut io, b"data");
        frame_and_flush(&mut io, b"ping");
        // h2's final flush, with nothing more to send.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(
            *rec.writes.lock().unwrap(),
            vec![b"data".to_vec(), b"ping".to_vec()]
        );
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_buffered_first() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut io = h2_transport(a);
        io.write_all(b"goaway").await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"goaway");
    }
}
