//! ca (in progress)
