//! ztunnel: the mesh's node L4 proxy.

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod config;
pub mod inpod;
pub mod localconfig;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod rbac;
pub mod readiness;
pub mod shards;
pub mod socket;
pub mod spin;
pub mod state;
pub mod xdshandler;
