//! Configuration objects shared by every component that reads cluster state (controller, node
//! agent, sandbox): typed Kubernetes and Istio objects, and the `files` and `kube` sources that
//! produce them as batches of events.

pub mod config;
pub mod crd;
pub mod enrollment;
pub mod pod;
pub mod source;
