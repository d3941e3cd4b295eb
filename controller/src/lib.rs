//! The mesh control plane: turns Kubernetes and Istio configuration into the workload xDS
//! resources every ztunnel needs, and issues workload certificates.

pub mod ca;
pub mod config;
pub mod crd;
pub mod model;
pub mod source;
pub mod xds;
