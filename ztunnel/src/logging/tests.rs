//! The log writer and field format, against captured output.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::accesslog;
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
