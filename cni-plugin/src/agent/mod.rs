//! The node agent: decides enrollment, programs in-pod redirection, serves ZDS to ztunnel.

pub mod app;
pub mod cluster;
pub mod ebpf_mode;
pub mod enroll;
pub mod metrics;
pub mod netns;
mod nftgen;
mod nsexec;
pub mod redirect;
pub mod routing;
pub mod rules;
pub mod server;
pub mod zds;
