//! ztunnel: the mesh's node L4 proxy.

pub mod localconfig;
pub mod rbac;
pub mod state;
