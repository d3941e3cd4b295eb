//! Log output on the data path's terms: access-log lines (two per proxied connection) are
//! formatted without the generic field machinery ([`fields`]) and written to stderr in batches
//! ([`writer`]), while every other line is written at once. The text is byte-for-byte what
//! `tracing_subscriber`'s default plain format produces.

pub mod fields;
pub mod writer;

pub use fields::FastFields;
pub use writer::{EventWriter, FLUSH_INTERVAL, FlushGuard, LogWriter};

#[cfg(test)]
mod tests;
