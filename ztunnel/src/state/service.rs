//! The service model (a set of VIPs load-balanced across workloads).

use serde::Serialize;

use super::ids::{GatewayAddress, NamespacedHostname, NetworkAddress, PortMapping};

/// A Kubernetes Service (or ServiceEntry) as ztunnel sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Fully qualified hostname.
    pub hostname: String,
    /// Virtual IPs, each on a network.
    pub vips: Vec<NetworkAddress>,
    /// Exposed ports; `target_port` 0 means "same as the service port / the workload's mapping".
    pub ports: Vec<PortMapping>,
    /// Extra identities accepted for the service's endpoints.
    pub subject_alt_names: Vec<String>,
    /// Waypoint that must see traffic addressed to this service.
    pub waypoint: Option<GatewayAddress>,
    /// Whether this is the canonical definition of the hostname.
    pub canonical: bool,
}

impl Service {
    /// The service's key (`namespace/hostname`), also its xDS resource name.
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname::new(&self.namespace, &self.hostname)
    }

    /// The service's declared mapping for `service_port`, if it exposes that port.
    pub fn port(&self, service_port: u16) -> Option<PortMapping> {
        self.ports
            .iter()
            .find(|p| p.service_port == service_port)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_combines_namespace_and_hostname() {
        let s = Service {
            namespace: "default".into(),
            hostname: "a.default.svc.cluster.local".into(),
            ports: vec![PortMapping::new(80, 0)],
            ..Default::default()
        };
        assert_eq!(s.key().to_string(), "default/a.default.svc.cluster.local");
        assert_eq!(s.port(80), Some(PortMapping::new(80, 0)));
        assert_eq!(s.port(443), None);
    }
}
