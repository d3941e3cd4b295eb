//! L4 authorization.
