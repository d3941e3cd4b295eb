//! The workload model (a pod or VM known to the mesh).

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::ids::{GatewayAddress, NamespacedHostname, NetworkAddress, PortMapping, WorkloadUid};
use crate::rbac::PolicyKey;

/// Trust domain used when a workload does not name one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Service account used when a workload does not name one.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Cluster id used when a workload does not name one.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// How a workload accepts inbound traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum InboundProtocol {
    /// Plain TCP (not captured by the mesh).
    #[default]
    Tcp,
    /// HBONE on port 15008.
    Hbone,
}

/// Whether a workload may receive new connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Ready to serve.
    #[default]
    Healthy,
    /// Not ready; skipped by load balancing.
    Unhealthy,
}

/// Topology location of a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Locality {
    /// Cloud region.
    pub region: String,
    /// Zone within the region.
    pub zone: String,
    /// Sub-zone within the zone.
    pub subzone: String,
}

/// A pod or VM: its addresses, identity, services and policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Unique id, also the xDS resource name.
    pub uid: WorkloadUid,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The workload's IPs on `network`.
    pub addresses: Vec<IpAddr>,
    /// DNS hostname for workloads addressed by name (usually empty).
    pub hostname: String,
    /// Network the addresses belong to ("" = default).
    pub network: String,
    /// How the workload accepts inbound traffic.
    pub protocol: InboundProtocol,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Kubernetes service account.
    pub service_account: String,
    /// Node the workload runs on.
    pub node: String,
    /// Waypoint that must see traffic addressed to this workload.
    pub waypoint: Option<GatewayAddress>,
    /// Gateway to reach this workload from another network.
    pub network_gateway: Option<GatewayAddress>,
    /// `service.istio.io/canonical-name`.
    pub canonical_name: String,
    /// `service.istio.io/canonical-revision`.
    pub canonical_revision: String,
    /// Name of the owning controller (deployment, job, ...).
    pub workload_name: String,
    /// Kind of the owning controller, lower case (`deployment`, `pod`, `job`, `cronjob`).
    pub workload_type: String,
    /// Services this workload backs, with per-service port mappings.
    pub services: HashMap<NamespacedHostname, Vec<PortMapping>>,
    /// Workload-selector policies that apply to this workload.
    pub authorization_policies: Vec<PolicyKey>,
    /// Health.
    pub status: HealthStatus,
    /// Cluster the workload lives in.
    pub cluster_id: String,
    /// Topology location.
    pub locality: Locality,
    /// Host-network pods share the node's IP: they are never looked up by address.
    pub host_network: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            uid: WorkloadUid::default(),
            name: String::new(),
            namespace: String::new(),
            addresses: Vec::new(),
            hostname: String::new(),
            network: String::new(),
            protocol: InboundProtocol::Tcp,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            service_account: DEFAULT_SERVICE_ACCOUNT.to_string(),
            node: String::new(),
            waypoint: None,
            network_gateway: None,
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_name: String::new(),
            workload_type: String::new(),
            services: HashMap::new(),
            authorization_policies: Vec::new(),
            status: HealthStatus::Healthy,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            locality: Locality::default(),
            host_network: false,
        }
    }
}

impl Workload {
    /// The workload's SPIFFE identity.
    pub fn identity(&self) -> hbone::Identity {
        hbone::Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// The workload's addresses qualified by its network (the keys it is indexed under).
    pub fn network_addresses(&self) -> impl Iterator<Item = NetworkAddress> + '_ {
        self.addresses
            .iter()
            .map(|ip| NetworkAddress::new(self.network.clone(), *ip))
    }

    /// Whether inbound traffic to this workload goes over HBONE.
    pub fn is_hbone(&self) -> bool {
        self.protocol == InboundProtocol::Hbone
    }

    /// Whether the workload is healthy.
    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }

    /// The workload's own mapping for `service_port` of service `svc`, if it has one.
    pub fn port_mapping(&self, svc: &NamespacedHostname, service_port: u16) -> Option<PortMapping> {
        self.services
            .get(svc)?
            .iter()
            .find(|p| p.service_port == service_port)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uses_trust_domain_namespace_and_service_account() {
        let w = Workload {
            namespace: "ns1".into(),
            service_account: "sa1".into(),
            ..Default::default()
        };
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/ns1/sa/sa1"
        );
    }

    #[test]
    fn port_mapping_finds_only_the_requested_service_port() {
        let key = NamespacedHostname::new("ns", "svc");
        let mut w = Workload::default();
        w.services
            .insert(key.clone(), vec![PortMapping::new(80, 8080)]);
        assert_eq!(w.port_mapping(&key, 80), Some(PortMapping::new(80, 8080)));
        assert_eq!(w.port_mapping(&key, 81), None);
        assert_eq!(
            w.port_mapping(&NamespacedHostname::new("ns", "x"), 80),
            None
        );
    }
}
