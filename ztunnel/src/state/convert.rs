//! Validated conversion from xDS protobufs to the state model.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xds::istio::workload as pb;

use super::ids::{
    DEFAULT_HBONE_PORT, GatewayAddress, GatewayDestination, NamespacedHostname, NetworkAddress,
    ParseError, PortMapping, WorkloadUid,
};
use super::service::Service;
use super::workload::{
    DEFAULT_CLUSTER_ID, DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, HealthStatus,
    InboundProtocol, Locality, Workload,
};
use crate::rbac::PolicyKey;

/// Why an xDS resource (or local config entry) cannot be turned into state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// A required field is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
    /// IP bytes of the wrong length.
    #[error("{field}: IP address must be 4 or 16 bytes, got {len}")]
    IpLength {
        /// Which field.
        field: &'static str,
        /// Length received.
        len: usize,
    },
    /// A port outside 0..=65535 (or 0 where a real port is needed).
    #[error("{field}: port {value} is out of range")]
    PortRange {
        /// Which field.
        field: &'static str,
        /// Value received.
        value: u32,
    },
    /// A CIDR prefix longer than the address.
    #[error("{field}: prefix length {len} is too long for {addr}")]
    PrefixLength {
        /// Which field.
        field: &'static str,
        /// The address.
        addr: IpAddr,
        /// Prefix length received.
        len: u32,
    },
    /// An enum number this build does not know.
    #[error("{field}: unknown enum value {value}")]
    UnknownEnum {
        /// Which field.
        field: &'static str,
        /// Value received.
        value: i32,
    },
    /// Trust domain, namespace and service account do not form a SPIFFE identity.
    #[error("invalid workload identity: {0}")]
    Identity(#[from] hbone::IdentityError),
    /// A structured string (name, address) failed to parse.
    #[error("{field}: {error}")]
    Parse {
        /// Which field.
        field: &'static str,
        /// What was wrong.
        error: ParseError,
    },
    /// A gateway address without a destination.
    #[error("{field}: gateway address has no destination")]
    NoGatewayDestination {
        /// Which field.
        field: &'static str,
    },
    /// A string match with no match type set.
    #[error("{field}: string match has no match type")]
    EmptyStringMatch {
        /// Which field.
        field: &'static str,
    },
    /// An xDS Address with neither a workload nor a service.
    #[error("address resource has neither a workload nor a service")]
    EmptyAddress,
    /// An error inside a named resource.
    #[error("resource {resource:?}: {error}")]
    Resource {
        /// Resource name or index.
        resource: String,
        /// The underlying problem.
        error: Box<ConversionError>,
    },
}

impl ConversionError {
    /// Wraps this error with the name of the resource it occurred in.
    pub fn in_resource(self, resource: impl Into<String>) -> Self {
        Self::Resource {
            resource: resource.into(),
            error: Box::new(self),
        }
    }
}

/// Decodes 4 or 16 raw bytes into an IP address.
pub(crate) fn ip_from_bytes(field: &'static str, b: &[u8]) -> Result<IpAddr, ConversionError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(ConversionError::IpLength {
        field,
        len: b.len(),
    })
}

/// Narrows a protobuf u32 to a port.
pub(crate) fn port_from_u32(field: &'static str, value: u32) -> Result<u16, ConversionError> {
    u16::try_from(value).map_err(|_| ConversionError::PortRange { field, value })
}

/// Narrows a protobuf u32 to a non-zero port.
fn nonzero_port(field: &'static str, value: u32) -> Result<u16, ConversionError> {
    match port_from_u32(field, value)? {
        0 => Err(ConversionError::PortRange { field, value }),
        p => Ok(p),
    }
}

/// Rejects trust domain / namespace / service account values that cannot form an identity.
pub(crate) fn validate_identity(w: &Workload) -> Result<(), ConversionError> {
    let principal = w.identity().principal();
    hbone::Identity::from_principal(&principal)?;
    Ok(())
}

fn or_default(s: String, default: &str) -> String {
    if s.is_empty() { default.to_string() } else { s }
}

fn network_address(
    field: &'static str,
    a: pb::NetworkAddress,
) -> Result<NetworkAddress, ConversionError> {
    Ok(NetworkAddress::new(
        a.network,
        ip_from_bytes(field, &a.address)?,
    ))
}

fn port_mapping(p: &pb::Port) -> Result<PortMapping, ConversionError> {
    Ok(PortMapping::new(
        nonzero_port("service port", p.service_port)?,
        port_from_u32("target port", p.target_port)?,
    ))
}

fn gateway(
    field: &'static str,
    g: Option<pb::GatewayAddress>,
) -> Result<Option<GatewayAddress>, ConversionError> {
    let Some(g) = g else { return Ok(None) };
    let destination = match g.destination {
        None => return Err(ConversionError::NoGatewayDestination { field }),
        Some(pb::gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(network_address(field, a)?)
        }
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                return Err(ConversionError::Empty { field });
            }
            GatewayDestination::Hostname(NamespacedHostname::new(h.namespace, h.hostname))
        }
    };
    // Istio's controller always sets the port; 0 only comes from hand-written resources.
    let hbone_mtls_port = match port_from_u32(field, g.hbone_mtls_port)? {
        0 => DEFAULT_HBONE_PORT,
        p => p,
    };
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port,
    }))
}

fn enum_value<E: TryFrom<i32>>(field: &'static str, value: i32) -> Result<E, ConversionError> {
    E::try_from(value).map_err(|_| ConversionError::UnknownEnum { field, value })
}

impl TryFrom<pb::Workload> for Workload {
    type Error = ConversionError;

    fn try_from(w: pb::Workload) -> Result<Self, Self::Error> {
        if w.uid.is_empty() {
            return Err(ConversionError::Empty {
                field: "workload uid",
            });
        }
        let addresses = w
            .addresses
            .iter()
            .map(|b| ip_from_bytes("workload address", b))
            .collect::<Result<Vec<_>, _>>()?;
        let protocol = match enum_value("tunnel_protocol", w.tunnel_protocol)? {
            pb::TunnelProtocol::None => InboundProtocol::Tcp,
            pb::TunnelProtocol::Hbone => InboundProtocol::Hbone,
        };
        let status = match enum_value("status", w.status)? {
            pb::WorkloadStatus::Healthy => HealthStatus::Healthy,
            pb::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
        };
        let workload_type = enum_value::<pb::WorkloadType>("workload_type", w.workload_type)?
            .as_str_name()
            .to_ascii_lowercase();
        let mut services = HashMap::with_capacity(w.services.len());
        for (key, list) in &w.services {
            let key: NamespacedHostname = key.parse().map_err(|error| ConversionError::Parse {
                field: "workload services key",
                error,
            })?;
            let ports = list
                .ports
                .iter()
                .map(port_mapping)
                .collect::<Result<Vec<_>, _>>()?;
            services.insert(key, ports);
        }
        let authorization_policies = w
            .authorization_policies
            .iter()
            .map(|p| {
                p.parse::<PolicyKey>()
                    .map_err(|error| ConversionError::Parse {
                        field: "authorization_policies",
                        error,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let locality = w
            .locality
            .map(|l| Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            })
            .unwrap_or_default();
        let workload = Workload {
            uid: WorkloadUid(w.uid),
            name: w.name,
            namespace: w.namespace,
            addresses,
            hostname: w.hostname,
            network: w.network,
            protocol,
            trust_domain: or_default(w.trust_domain, DEFAULT_TRUST_DOMAIN),
            service_account: or_default(w.service_account, DEFAULT_SERVICE_ACCOUNT),
            node: w.node,
            waypoint: gateway("workload waypoint", w.waypoint)?,
            network_gateway: gateway("workload network_gateway", w.network_gateway)?,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            workload_type,
            services,
            authorization_policies,
            status,
            cluster_id: or_default(w.cluster_id, DEFAULT_CLUSTER_ID),
            locality,
            host_network: w.network_mode == pb::NetworkMode::HostNetwork as i32,
        };
        validate_identity(&workload)?;
        Ok(workload)
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = ConversionError;

    fn try_from(s: pb::Service) -> Result<Self, Self::Error> {
        if s.namespace.is_empty() {
            return Err(ConversionError::Empty {
                field: "service namespace",
            });
        }
        if s.hostname.is_empty() {
            return Err(ConversionError::Empty {
                field: "service hostname",
            });
        }
        let vips = s
            .addresses
            .into_iter()
            .map(|a| network_address("service address", a))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = s
            .ports
            .iter()
            .map(port_mapping)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Service {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports,
            subject_alt_names: s.subject_alt_names,
            waypoint: gateway("service waypoint", s.waypoint)?,
            canonical: s.canonical,
        })
    }
}

/// A decoded `istio.workload.Address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressResource {
    /// A workload (boxed, like the service, to keep the enum small).
    Workload(Box<Workload>),
    /// A service.
    Service(Box<Service>),
}

impl TryFrom<pb::Address> for AddressResource {
    type Error = ConversionError;

    fn try_from(a: pb::Address) -> Result<Self, Self::Error> {
        match a.r#type {
            Some(pb::address::Type::Workload(w)) => Ok(Self::Workload(Box::new(w.try_into()?))),
            Some(pb::address::Type::Service(s)) => Ok(Self::Service(Box::new(s.try_into()?))),
            None => Err(ConversionError::EmptyAddress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_workload() -> pb::Workload {
        pb::Workload {
            uid: "Kubernetes//v1/Pod/default/a".into(),
            name: "a".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            ..Default::default()
        }
    }

    #[test]
    fn workload_converts_with_defaults() {
        let mut p = pb_workload();
        p.services.insert(
            "default/svc.default.svc.cluster.local".into(),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        );
        p.authorization_policies = vec!["default/pol".into()];
        p.waypoint = Some(pb::GatewayAddress {
            hbone_mtls_port: 0,
            destination: Some(pb::gateway_address::Destination::Address(
                pb::NetworkAddress {
                    network: "".into(),
                    address: vec![0; 16],
                    length: None,
                },
            )),
        });
        let w = Workload::try_from(p).unwrap();
        assert_eq!(w.protocol, InboundProtocol::Hbone);
        assert_eq!(w.trust_domain, "cluster.local");
        assert_eq!(w.service_account, "default");
        assert_eq!(w.cluster_id, "Kubernetes");
        assert_eq!(w.workload_type, "deployment");
        assert_eq!(w.addresses, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        let key = NamespacedHostname::new("default", "svc.default.svc.cluster.local");
        assert_eq!(w.services[&key], vec![PortMapping::new(80, 8080)]);
        assert_eq!(w.authorization_policies[0].to_string(), "default/pol");
        let wp = w.waypoint.unwrap();
        assert_eq!(wp.hbone_mtls_port, 15008);
        assert!(matches!(wp.destination, GatewayDestination::Address(a) if a.address.is_ipv6()));
    }

    #[test]
    fn workload_rejects_bad_input() {
        type Case = (fn(&mut pb::Workload), &'static str);
        let cases: Vec<Case> = vec![
            (|w| w.uid.clear(), "workload uid must not be empty"),
            (
                |w| w.addresses = vec![vec![1, 2, 3]],
                "4 or 16 bytes, got 3",
            ),
            (
                |w| w.tunnel_protocol = 7,
                "tunnel_protocol: unknown enum value 7",
            ),
            (|w| w.status = 9, "status: unknown enum value 9"),
            (
                |w| w.workload_type = 42,
                "workload_type: unknown enum value 42",
            ),
            (|w| w.namespace.clear(), "invalid workload identity"),
            (
                |w| w.service_account = "a/b".into(),
                "invalid workload identity",
            ),
            (
                |w| w.authorization_policies = vec!["nonamespace".into()],
                "authorization_policies",
            ),
            (
                |w| {
                    w.services.insert("bad".into(), pb::PortList::default());
                },
                "workload services key",
            ),
            (
                |w| {
                    w.services.insert(
                        "ns/h".into(),
                        pb::PortList {
                            ports: vec![pb::Port {
                                service_port: 80,
                                target_port: 70000,
                                app_protocol: 0,
                            }],
                        },
                    );
                },
                "port 70000 is out of range",
            ),
            (
                |w| w.waypoint = Some(pb::GatewayAddress::default()),
                "has no destination",
            ),
        ];
        for (mutate, want) in cases {
            let mut p = pb_workload();
            mutate(&mut p);
            let err = Workload::try_from(p).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn service_converts_and_validates() {
        let p = pb::Service {
            name: "svc".into(),
            namespace: "default".into(),
            hostname: "svc.default.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                network: "n1".into(),
                address: vec![10, 96, 0, 1],
                length: None,
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 0,
                app_protocol: 0,
            }],
            subject_alt_names: vec!["spiffe://td/ns/a/sa/b".into()],
            ..Default::default()
        };
        let s = Service::try_from(p.clone()).unwrap();
        assert_eq!(s.vips[0].to_string(), "n1/10.96.0.1");
        assert_eq!(s.ports, vec![PortMapping::new(80, 0)]);
        assert_eq!(s.key().to_string(), "default/svc.default.svc.cluster.local");

        let mut bad = p.clone();
        bad.hostname.clear();
        assert!(
            Service::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("hostname")
        );
        let mut bad = p.clone();
        bad.ports[0].service_port = 0;
        assert!(
            Service::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("port 0")
        );
        let mut bad = p;
        bad.addresses[0].address = vec![];
        assert!(
            Service::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("got 0")
        );
    }

    #[test]
    fn empty_address_is_rejected() {
        assert_eq!(
            AddressResource::try_from(pb::Address { r#type: None }),
            Err(ConversionError::EmptyAddress)
        );
    }
}
