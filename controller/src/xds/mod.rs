//! xds (in progress)
