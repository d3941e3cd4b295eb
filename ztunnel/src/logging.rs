//! Log output on the data path's terms: access-log lines (two per proxied connection) are
//! formatted without the generic field machinery and written to stderr in batches, while every
//! other line is written at once. The text is byte-for-byte what `tracing_subscriber`'s default
//! plain format produces.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tracing::Metadata;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

use crate::accesslog;

/// Buffered access-log lines are written out at least this often.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is written out at once, by the thread adding the line.
const FLUSH_BYTES: usize = 32 * 1024;

/// Field formatter with the exact output of [`DefaultFields`] when ANSI colours are off, but
/// with plain strings, integers and `name=` written directly instead of through `fmt` padding,
/// styling and `str`'s escaping loop. With colours on, or for anything unusual (the message,
/// strings that need escaping, `r#` and `log.` names), it defers to [`DefaultVisitor`].
#[derive(Debug, Default, Clone, Copy)]
pub struct FastFields;

/// Visitor behind [`FastFields`]; see there.
pub struct FastVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
    /// Colours on: every field goes to the default visitor.
    ansi: bool,
}

impl<'a> MakeVisitor<Writer<'a>> for FastFields {
    type Visitor = FastVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> Self::Visitor {
        FastVisitor {
            ansi: writer.has_ansi_escapes(),
            writer,
            is_empty: true,
            result: Ok(()),
        }
    }
}

impl VisitOutput<fmt::Result> for FastVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for FastVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

impl FastVisitor<'_> {
    /// True for fields the default visitor should format (see [`FastFields`]).
    fn special(&self, name: &str) -> bool {
        self.ansi || name == "message" || name.starts_with("r#") || name.starts_with("log.")
    }

    /// Hands one field to the default visitor, keeping the separator state in step.
    fn defer(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut inner = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut inner);
        self.result = inner.finish();
        // The default visitor writes nothing for `log.` fields; everything else counts.
        self.is_empty = false;
    }

    /// Writes the separator and `name=`.
    fn start(&mut self, name: &str) -> fmt::Result {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.writer.write_char(' ')?;
        }
        self.writer.write_str(name)?;
        self.writer.write_char('=')
    }
}

/// Whether `s`'s `Debug` form is `s` in double quotes (nothing to escape).
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for FastVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if self.special(field.name()) || !plain(value) {
            return self.defer(|v| v.record_str(field, value));
        }
        self.result = self.start(field.name()).and_then(|()| {
            self.writer.write_char('"')?;
            self.writer.write_str(value)?;
            self.writer.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        if self.special(field.name()) {
            return self.defer(|v| v.record_u64(field, value));
        }
        self.result = self
            .start(field.name())
            .and_then(|()| write_u64(&mut self.writer, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_err() {
            return;
        }
        if self.special(field.name()) {
            return self.defer(|v| v.record_i64(field, value));
        }
        self.result = self.start(field.name()).and_then(|()| {
            if value < 0 {
                self.writer.write_char('-')?;
            }
            write_u64(&mut self.writer, value.unsigned_abs())
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_err() {
            return;
        }
        if self.special(field.name()) {
            return self.defer(|v| v.record_bool(field, value));
        }
        self.result = self
            .start(field.name())
            .and_then(|()| self.writer.write_str(if value { "true" } else { "false" }));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.defer(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        if self.special(field.name()) {
            return self.defer(|v| v.record_debug(field, value));
        }
        self.result = self
            .start(field.name())
            .and_then(|()| write!(self.writer, "{value:?}"));
    }
}

/// Decimal digits without going through `fmt`'s padding logic.
fn write_u64(w: &mut impl fmt::Write, mut n: u64) -> fmt::Result {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    w.write_str(std::str::from_utf8(&buf[i..]).map_err(|_| fmt::Error)?)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::FormatFields;
    use tracing_subscriber::fmt::format::{DefaultFields, FmtSpan};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn emit_samples() {
        let mut log = accesslog::ConnectionLog::new(
            accesslog::Direction::Outbound,
            "10.0.0.1:40000".parse().unwrap(),
            "[fd00::2]:8080".parse().unwrap(),
        );
        log.src_workload = Some("sleep".into());
        log.dst_identity = Some("spiffe://cluster.local/ns/default/sa/httpbin".into());
        log.dst_hbone_addr = Some("10.0.0.2:15008".parse().unwrap());
        log.bytes_sent = 1234567;
        log.emit();
        log.error = Some("connect: \"refused\"\nnewline\u{1b}[31m".into());
        log.emit();
        let span = tracing::info_span!("outer", id = 7u64, name = "x y");
        let _g = span.enter();
        tracing::warn!(
            r#type = "t",
            neg = -42i64,
            flag = true,
            f = 1.5f64,
            "with {} spans",
            1
        );
        tracing::info!(target: "access", quoted = "a\\b", err = &io::Error::other("boom") as &(dyn std::error::Error + 'static), "x");
    }

    /// Formats the samples with `fields` (timestamps off) and returns the text.
    fn render<N>(fields: N) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Capture::default();
        let w = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_span_events(FmtSpan::NONE)
            .fmt_fields(fields)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit_samples);
        out.text()
    }

    #[test]
    fn fast_fields_match_default_fields_byte_for_byte() {
        let fast = render(FastFields);
        let default = render(DefaultFields::new());
        assert_eq!(fast, default);
        // Guard against both being empty or trivially equal.
        assert!(fast.contains("src.workload=\"sleep\""), "{fast}");
        assert!(fast.contains("bytes_sent=1234567"), "{fast}");
        assert!(fast.contains("outer{id=7 name=\"x y\"}"), "{fast}");
        assert_eq!(fast.lines().count(), 4, "{fast}");
    }

    #[test]
    fn access_lines_are_batched_and_other_lines_flush_them_in_order() {
        let out = Capture::default();
        let (writer, guard) =
            LogWriter::with_sink(Box::new(out.clone()), Duration::from_secs(3600)).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_writer(writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "access", n = 1u64, "first");
            tracing::info!(target: "access", n = 2u64, "second");
        });
        assert_eq!(out.text(), "", "access lines must wait for a batch");
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .without_time()
                .with_ansi(false)
                .with_writer(writer.clone())
                .finish(),
            || tracing::warn!("urgent"),
        );
        let text = out.text();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("first") && lines[1].contains("second"));
        assert!(lines[2].contains("urgent"));
        drop(guard);
    }

    #[test]
    fn flusher_writes_batched_lines_after_the_interval() {
        let out = Capture::default();
        let (writer, _guard) =
            LogWriter::with_sink(Box::new(out.clone()), Duration::from_millis(20)).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "access", "line");
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(out.text().contains("access: line"), "{}", out.text());
    }

    #[test]
    fn guard_drop_writes_what_is_left() {
        let out = Capture::default();
        let (writer, guard) =
            LogWriter::with_sink(Box::new(out.clone()), Duration::from_secs(3600)).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "access", "last words");
        });
        assert_eq!(out.text(), "");
        drop(guard);
        assert!(out.text().contains("last words"));
    }
}
