//! Workloads, services and policies known to this ztunnel.
//!
//! The model is our own (validated on the way in from xDS or local config), indexed in
//! [`ProxyState`] and shared through [`StateStore`].

mod convert;
mod ids;
mod proxy_state;
mod service;
mod store;
mod workload;

#[cfg(test)]
mod tests;

pub use convert::{AddressResource, ConversionError};
pub(crate) use convert::{ip_from_bytes, port_from_u32, validate_identity};
pub use ids::{
    DEFAULT_HBONE_PORT, GatewayAddress, GatewayDestination, NamespacedHostname, NetworkAddress,
    ParseError, PortMapping, WorkloadUid,
};
pub use proxy_state::ProxyState;
pub use service::Service;
pub use store::StateStore;
pub use workload::{
    DEFAULT_CLUSTER_ID, DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, HealthStatus,
    InboundProtocol, Locality, Workload,
};
