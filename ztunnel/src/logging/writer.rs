//! [`LogWriter`]: access-log lines batched, every other line written at once, order kept.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

use crate::accesslog;

/// Buffered access-log lines are written out at least this often.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is written out at once, by the thread adding the line.
const FLUSH_BYTES: usize = 32 * 1024;

/// Where log lines go; stderr in the binary, a buffer in tests.
type Sink = Box<dyn Write + Send>;

struct Shared {
    state: Mutex<Pending>,
    /// Signalled when the buffer goes from empty to non-empty (wakes the flusher).
    filled: Condvar,
}

struct Pending {
    buf: Vec<u8>,
    sink: Sink,
}

impl Pending {
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        // Nowhere to report a failing stderr; the lines are dropped as an unbuffered write
        // would have dropped them.
        let _ = self.sink.write_all(&self.buf);
        let _ = self.sink.flush();
        self.buf.clear();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic mid-write leaves at worst a partial line; keep logging.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `MakeWriter` that batches access-log lines and writes everything else immediately (after
/// the batched lines, so order is kept). Lines are never dropped: a full batch is written by
/// the thread that fills it.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Flushes buffered lines when dropped (keep it alive for the life of the process).
pub struct FlushGuard {
    shared: Arc<Shared>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().flush();
    }
}

impl LogWriter {
    /// A writer to stderr with its background flusher (a thread that ends with the writer).
    pub fn stderr() -> io::Result<(Self, FlushGuard)> {
        Self::with_sink(Box::new(io::stderr()), FLUSH_INTERVAL)
    }

    /// A writer to `sink` whose batched lines are written at least every `interval`.
    pub fn with_sink(sink: Sink, interval: Duration) -> io::Result<(Self, FlushGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Pending {
                buf: Vec::with_capacity(FLUSH_BYTES),
                sink,
            }),
            filled: Condvar::new(),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("ztunnel-log".into())
            .spawn(move || flusher(weak, interval))?;
        Ok((
            Self {
                shared: shared.clone(),
            },
            FlushGuard { shared },
        ))
    }

    /// Writes every buffered line now.
    pub fn flush_now(&self) {
        self.shared.lock().flush();
    }
}

/// Waits for lines, lets a batch gather for `interval`, writes it; ends with the writer.
fn flusher(shared: Weak<Shared>, interval: Duration) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        {
            let guard = s.lock();
            // Wake up now and then even without lines, to notice the writer is gone.
            let (guard, _) = s
                .filled
                .wait_timeout_while(guard, Duration::from_secs(1), |p| p.buf.is_empty())
                .unwrap_or_else(|e| e.into_inner());
            if guard.buf.is_empty() {
                continue;
            }
        }
        drop(s);
        std::thread::sleep(interval);
        let Some(s) = shared.upgrade() else { return };
        s.lock().flush();
    }
}

/// One event's writer from [`LogWriter`].
pub struct EventWriter<'a> {
    shared: &'a Shared,
    batch: bool,
}

impl Write for EventWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut p = self.shared.lock();
        let was_empty = p.buf.is_empty();
        p.buf.extend_from_slice(data);
        if !self.batch || p.buf.len() >= FLUSH_BYTES {
            p.flush();
        } else if was_empty {
            self.shared.filled.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            shared: &self.shared,
            batch: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        EventWriter {
            shared: &self.shared,
            batch: meta.target() == accesslog::TARGET && *meta.level() >= tracing::Level::INFO,
        }
    }
}
