//! [`FastFields`]: the default plain field format, written without `fmt` machinery.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

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
