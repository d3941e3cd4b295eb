//! Istio ztunnel's standalone YAML config (`LOCAL_XDS_PATH`, PROTOCOLS.md §9).
//!
//! Keys are camelCase and unknown keys are rejected so typos fail loudly instead of silently
//! producing a different mesh.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::rbac::{
    Authorization, Clause, IpNet, Match, PolicyAction, PolicyKey, PolicyScope, Rule,
    ServiceAccountMatch, StringMatch,
};
use crate::state::{
    DEFAULT_CLUSTER_ID, DEFAULT_HBONE_PORT, DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN,
    GatewayAddress, GatewayDestination, HealthStatus, InboundProtocol, Locality,
    NamespacedHostname, NetworkAddress, PortMapping, Service, Workload, WorkloadUid,
    validate_identity,
};

/// Why a local config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    /// The file could not be read.
    #[error("reading local config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or does not fit the schema (message includes path and line).
    #[error("parsing local config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// An entry parsed but is semantically invalid.
    #[error("local config {location}: {message}")]
    Invalid {
        /// Which entry, e.g. `workloads[2]`.
        location: String,
        /// What is wrong.
        message: String,
    },
}

// Deserializes a string through `FromStr`, so errors carry serde_yaml's path and line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Parsed<T>(T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(serde::de::Error::custom)
    }
}

/// What a local config yields: workloads, services and policies.
pub type LocalState = (Vec<Workload>, Vec<Service>, Vec<Authorization>);

/// A parsed standalone configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    services: Vec<LocalService>,
    #[serde(default)]
    policies: Vec<LocalPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct LocalWorkload {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    trust_domain: String,
    workload_ips: Vec<IpAddr>,
    protocol: InboundProtocol,
    node: String,
    network: String,
    hostname: String,
    waypoint: Option<LocalGateway>,
    network_gateway: Option<LocalGateway>,
    canonical_name: String,
    canonical_revision: String,
    workload_name: String,
    workload_type: String,
    status: HealthStatus,
    cluster_id: String,
    locality: Locality,
    authorization_policies: Vec<Parsed<PolicyKey>>,
    // Required (checked on conversion): a workload backing no service must say so with `{}`.
    services: Option<HashMap<Parsed<NamespacedHostname>, BTreeMap<u16, u16>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalGateway {
    destination: Parsed<GatewayDestination>,
    #[serde(default = "default_hbone_port")]
    hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    DEFAULT_HBONE_PORT
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    vips: Vec<Parsed<NetworkAddress>>,
    ports: BTreeMap<u16, u16>,
    subject_alt_names: Vec<String>,
    waypoint: Option<LocalGateway>,
    canonical: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalPolicy {
    name: String,
    namespace: String,
    scope: PolicyScope,
    action: PolicyAction,
    #[serde(default)]
    dry_run: bool,
    // rules -> clauses -> matches
    rules: Vec<Vec<Vec<LocalMatch>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct LocalMatch {
    namespaces: Vec<LocalStringMatch>,
    not_namespaces: Vec<LocalStringMatch>,
    principals: Vec<LocalStringMatch>,
    not_principals: Vec<LocalStringMatch>,
    source_ips: Vec<Parsed<IpNet>>,
    not_source_ips: Vec<Parsed<IpNet>>,
    destination_ips: Vec<Parsed<IpNet>>,
    not_destination_ips: Vec<Parsed<IpNet>>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
    service_accounts: Vec<LocalServiceAccount>,
    not_service_accounts: Vec<LocalServiceAccount>,
}

// `{Exact: s}` etc.; serde_yaml only maps enums from YAML tags, so the map form is decoded here.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawStringMatch")]
struct LocalStringMatch(StringMatch);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStringMatch {
    #[serde(rename = "Exact")]
    exact: Option<String>,
    #[serde(rename = "Prefix")]
    prefix: Option<String>,
    #[serde(rename = "Suffix")]
    suffix: Option<String>,
    #[serde(rename = "Presence")]
    presence: Option<Empty>,
}

impl TryFrom<RawStringMatch> for LocalStringMatch {
    type Error = &'static str;

    fn try_from(r: RawStringMatch) -> Result<Self, Self::Error> {
        let m = match (r.exact, r.prefix, r.suffix, r.presence) {
            (Some(s), None, None, None) => StringMatch::Exact(s),
            (None, Some(s), None, None) => StringMatch::Prefix(s),
            (None, None, Some(s), None) => StringMatch::Suffix(s),
            (None, None, None, Some(Empty {})) => StringMatch::Presence,
            _ => return Err("a string match needs exactly one of Exact, Prefix, Suffix, Presence"),
        };
        Ok(Self(m))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalServiceAccount {
    namespace: String,
    service_account: String,
}

fn invalid(location: impl Into<String>, message: impl Display) -> LocalConfigError {
    LocalConfigError::Invalid {
        location: location.into(),
        message: message.to_string(),
    }
}

fn or_default(s: String, default: &str) -> String {
    if s.is_empty() { default.to_string() } else { s }
}

fn port_mappings(
    location: &str,
    ports: BTreeMap<u16, u16>,
) -> Result<Vec<PortMapping>, LocalConfigError> {
    if ports.contains_key(&0) {
        return Err(invalid(location, "service port 0 is not a port"));
    }
    Ok(ports
        .into_iter()
        .map(|(svc, target)| PortMapping::new(svc, target))
        .collect())
}

fn gateway(g: Option<LocalGateway>) -> Option<GatewayAddress> {
    g.map(|g| GatewayAddress {
        destination: g.destination.0,
        hbone_mtls_port: g.hbone_mtls_port,
    })
}

fn string_matches(list: Vec<LocalStringMatch>) -> Vec<StringMatch> {
    list.into_iter().map(|m| m.0).collect()
}

fn nets(list: Vec<Parsed<IpNet>>) -> Vec<IpNet> {
    list.into_iter().map(|n| n.0).collect()
}

fn service_accounts(
    location: &str,
    list: Vec<LocalServiceAccount>,
) -> Result<Vec<ServiceAccountMatch>, LocalConfigError> {
    list.into_iter()
        .map(|m| {
            if m.namespace.is_empty() || m.service_account.is_empty() {
                return Err(invalid(
                    location,
                    "service account match needs namespace and serviceAccount",
                ));
            }
            Ok(ServiceAccountMatch {
                namespace: m.namespace,
                service_account: m.service_account,
            })
        })
        .collect()
}

impl LocalMatch {
    fn convert(self, location: &str) -> Result<Match, LocalConfigError> {
        Ok(Match {
            namespaces: string_matches(self.namespaces),
            not_namespaces: string_matches(self.not_namespaces),
            principals: string_matches(self.principals),
            not_principals: string_matches(self.not_principals),
            source_ips: nets(self.source_ips),
            not_source_ips: nets(self.not_source_ips),
            destination_ips: nets(self.destination_ips),
            not_destination_ips: nets(self.not_destination_ips),
            destination_ports: self.destination_ports,
            not_destination_ports: self.not_destination_ports,
            service_accounts: service_accounts(location, self.service_accounts)?,
            not_service_accounts: service_accounts(location, self.not_service_accounts)?,
        })
    }
}

impl LocalWorkload {
    fn convert(self, location: &str) -> Result<Workload, LocalConfigError> {
        let cluster_id = or_default(self.cluster_id, DEFAULT_CLUSTER_ID);
        let uid = if !self.uid.is_empty() {
            self.uid
        } else if !self.name.is_empty() {
            // Same shape the controller uses, so on-demand lookups by uid behave alike.
            format!("{cluster_id}//v1/Pod/{}/{}", self.namespace, self.name)
        } else {
            return Err(invalid(location, "a workload needs a uid or a name"));
        };
        let Some(declared) = self.services else {
            return Err(invalid(
                location,
                "missing field `services` (use `services: {}` for none)",
            ));
        };
        let mut services = HashMap::with_capacity(declared.len());
        for (key, ports) in declared {
            let ports = port_mappings(&format!("{location}.services[{}]", key.0), ports)?;
            services.insert(key.0, ports);
        }
        let workload = Workload {
            uid: WorkloadUid(uid),
            name: self.name,
            namespace: self.namespace,
            addresses: self.workload_ips,
            hostname: self.hostname,
            network: self.network,
            protocol: self.protocol,
            trust_domain: or_default(self.trust_domain, DEFAULT_TRUST_DOMAIN),
            service_account: or_default(self.service_account, DEFAULT_SERVICE_ACCOUNT),
            node: self.node,
            waypoint: gateway(self.waypoint),
            network_gateway: gateway(self.network_gateway),
            canonical_name: self.canonical_name,
            canonical_revision: self.canonical_revision,
            workload_name: self.workload_name,
            workload_type: self.workload_type,
            services,
            authorization_policies: self
                .authorization_policies
                .into_iter()
                .map(|k| k.0)
                .collect(),
            status: self.status,
            cluster_id,
            locality: self.locality,
            host_network: false,
        };
        validate_identity(&workload).map_err(|e| invalid(location, e))?;
        Ok(workload)
    }
}

impl LocalService {
    fn convert(self, location: &str) -> Result<Service, LocalConfigError> {
        if self.namespace.is_empty() || self.hostname.is_empty() {
            return Err(invalid(
                location,
                "a service needs a namespace and a hostname",
            ));
        }
        Ok(Service {
            name: self.name,
            namespace: self.namespace,
            hostname: self.hostname,
            vips: self.vips.into_iter().map(|v| v.0).collect(),
            ports: port_mappings(location, self.ports)?,
            subject_alt_names: self.subject_alt_names,
            waypoint: gateway(self.waypoint),
            canonical: self.canonical,
        })
    }
}

impl LocalPolicy {
    fn convert(self, location: &str) -> Result<Authorization, LocalConfigError> {
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err(invalid(location, "a policy needs a name and a namespace"));
        }
        let mut rules = Vec::with_capacity(self.rules.len());
        for (r, clauses) in self.rules.into_iter().enumerate() {
            let mut out = Vec::with_capacity(clauses.len());
            for (c, matches) in clauses.into_iter().enumerate() {
                let matches = matches
                    .into_iter()
                    .enumerate()
                    .map(|(m, x)| x.convert(&format!("{location}.rules[{r}][{c}][{m}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(Clause { matches });
            }
            rules.push(Rule { clauses: out });
        }
        Ok(Authorization {
            name: self.name,
            namespace: self.namespace,
            scope: self.scope,
            action: self.action,
            rules,
            dry_run: self.dry_run,
        })
    }
}

impl LocalConfig {
    /// Parses YAML text; errors name the offending key and line.
    pub fn parse(text: &str) -> Result<Self, LocalConfigError> {
        // An empty file is an empty mesh rather than a YAML error.
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        Ok(serde_yaml::from_str(text)?)
    }

    /// Reads and parses a file (blocking; call at startup or from a blocking task).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LocalConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Validates and converts into state, rejecting duplicate keys.
    pub fn into_state(self) -> Result<LocalState, LocalConfigError> {
        Ok((
            convert_all("workloads", self.workloads, LocalWorkload::convert, |w| {
                w.uid.clone()
            })?,
            convert_all(
                "services",
                self.services,
                LocalService::convert,
                Service::key,
            )?,
            convert_all(
                "policies",
                self.policies,
                LocalPolicy::convert,
                Authorization::key,
            )?,
        ))
    }
}

// Converts each entry (errors located as `kind[i]`) and rejects repeated keys.
fn convert_all<L, T, K: Eq + Hash + Display>(
    kind: &str,
    items: Vec<L>,
    convert: impl Fn(L, &str) -> Result<T, LocalConfigError>,
    key: impl Fn(&T) -> K,
) -> Result<Vec<T>, LocalConfigError> {
    let mut seen = HashSet::with_capacity(items.len());
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let location = format!("{kind}[{i}]");
        let item = convert(item, &location)?;
        let k = key(&item);
        if seen.contains(&k) {
            return Err(invalid(location, format!("duplicate key {k}")));
        }
        seen.insert(k);
        out.push(item);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
