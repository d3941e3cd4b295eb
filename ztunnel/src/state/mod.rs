//! Workloads, services and policies known to this ztunnel.
