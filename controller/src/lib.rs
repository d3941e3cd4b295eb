//! The mesh control plane: turns Kubernetes and Istio configuration into the workload xDS
//! resources every ztunnel needs, and issues workload certificates.

pub mod app;
pub mod ca;
pub mod model;
pub mod readiness;
pub mod xds;

pub use meshconfig::{config, crd, source};
