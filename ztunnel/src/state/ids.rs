//! Small identifier and address types shared by workloads, services and xDS resource names.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// HBONE port used when a gateway address does not name one.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

/// Why a textual name or address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Expected `<namespace>/<hostname>` with both parts non-empty.
    #[error("{0:?} is not of the form <namespace>/<hostname>")]
    NamespacedHostname(String),
    /// Expected `<network>/<ip>` or a bare IP.
    #[error("{0:?} is not of the form <network>/<ip> or <ip>")]
    NetworkAddress(String),
    /// Expected `<namespace>/<name>` with both parts non-empty.
    #[error("{0:?} is not of the form <namespace>/<name>")]
    PolicyKey(String),
    /// Expected `<network>/<ip>` or `<namespace>/<hostname>`.
    #[error("{0:?} is neither <network>/<ip> nor <namespace>/<hostname>")]
    GatewayDestination(String),
}

/// A workload's unique id, also its xDS resource name (`<cluster>//v1/Pod/<ns>/<name>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct WorkloadUid(pub String);

impl WorkloadUid {
    /// Wraps a uid string.
    pub fn new(uid: impl Into<String>) -> Self {
        Self(uid.into())
    }

    /// The uid as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkloadUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for WorkloadUid {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// A service's key: namespace plus fully qualified hostname (`ns/host`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    /// Namespace of the service.
    pub namespace: String,
    /// Hostname, e.g. `reviews.default.svc.cluster.local`.
    pub hostname: String,
}

impl NamespacedHostname {
    /// Builds a key from its parts.
    pub fn new(namespace: impl Into<String>, hostname: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            hostname: hostname.into(),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

impl FromStr for NamespacedHostname {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() && !host.contains('/') => {
                Ok(Self::new(ns, host))
            }
            _ => Err(ParseError::NamespacedHostname(s.to_string())),
        }
    }
}

// Serialized as `ns/host` so it can be a JSON map key in config dumps.
impl Serialize for NamespacedHostname {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An IP address qualified by the network it is reachable on ("" = default network).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NetworkAddress {
    /// Network name; empty for the default network.
    pub network: String,
    /// The IP address.
    pub address: IpAddr,
}

impl NetworkAddress {
    /// Builds an address from its parts.
    pub fn new(network: impl Into<String>, address: IpAddr) -> Self {
        Self {
            network: network.into(),
            address,
        }
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl FromStr for NetworkAddress {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (network, ip) = s.split_once('/').unwrap_or(("", s));
        let address = ip
            .parse()
            .map_err(|_| ParseError::NetworkAddress(s.to_string()))?;
        Ok(Self::new(network, address))
    }
}

/// Where a gateway (waypoint or network gateway) lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    /// A concrete address.
    Address(NetworkAddress),
    /// A service, resolved through its endpoints.
    Hostname(NamespacedHostname),
}

impl FromStr for GatewayDestination {
    type Err = ParseError;

    /// Accepts `<net>/<ip>` (or a bare IP) as an address, otherwise `<ns>/<hostname>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<NetworkAddress>() {
            return Ok(Self::Address(addr));
        }
        s.parse::<NamespacedHostname>()
            .map(Self::Hostname)
            .map_err(|_| ParseError::GatewayDestination(s.to_string()))
    }
}

/// A waypoint or network gateway reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct GatewayAddress {
    /// The gateway's address or service.
    pub destination: GatewayDestination,
    /// Port on which the gateway accepts HBONE.
    pub hbone_mtls_port: u16,
}

impl GatewayAddress {
    /// A gateway at `destination` on the default HBONE port.
    pub fn new(destination: GatewayDestination) -> Self {
        Self {
            destination,
            hbone_mtls_port: DEFAULT_HBONE_PORT,
        }
    }
}

/// A service port and the workload port it forwards to (0 = same as the service port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortMapping {
    /// Port clients connect to on the service.
    pub service_port: u16,
    /// Port on the workload; 0 means "use the workload's mapping or the service port".
    pub target_port: u16,
}

impl PortMapping {
    /// Builds a mapping.
    pub fn new(service_port: u16, target_port: u16) -> Self {
        Self {
            service_port,
            target_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_hostname_round_trips_and_rejects_missing_parts() {
        let k: NamespacedHostname = "default/reviews.default.svc.cluster.local".parse().unwrap();
        assert_eq!(k.namespace, "default");
        assert_eq!(k.to_string(), "default/reviews.default.svc.cluster.local");
        for bad in ["nohost", "/host", "ns/", "a/b/c"] {
            assert!(bad.parse::<NamespacedHostname>().is_err(), "{bad}");
        }
    }

    #[test]
    fn network_address_accepts_bare_ip_as_default_network() {
        let a: NetworkAddress = "10.0.0.1".parse().unwrap();
        assert_eq!(a, NetworkAddress::new("", "10.0.0.1".parse().unwrap()));
        let b: NetworkAddress = "net1/fd00::1".parse().unwrap();
        assert_eq!(b.network, "net1");
        assert_eq!(b.address, "fd00::1".parse::<IpAddr>().unwrap());
        let c: NetworkAddress = "/10.0.0.2".parse().unwrap();
        assert_eq!(c.network, "");
        assert!("net/notanip".parse::<NetworkAddress>().is_err());
    }

    #[test]
    fn gateway_destination_distinguishes_address_from_hostname() {
        assert!(matches!(
            "/10.0.0.9".parse::<GatewayDestination>().unwrap(),
            GatewayDestination::Address(_)
        ));
        assert!(matches!(
            "istio-system/waypoint.istio-system.svc.cluster.local"
                .parse::<GatewayDestination>()
                .unwrap(),
            GatewayDestination::Hostname(_)
        ));
        assert!("garbage".parse::<GatewayDestination>().is_err());
    }

    #[test]
    fn namespaced_hostname_serializes_as_string() {
        let k = NamespacedHostname::new("ns", "h");
        assert_eq!(serde_json::to_value(&k).unwrap(), serde_json::json!("ns/h"));
    }
}
