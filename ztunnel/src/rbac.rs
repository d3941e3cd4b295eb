//! L4 authorization: Istio's `istio.security.Authorization` model and its evaluation.
//!
//! Semantics (PROTOCOLS.md §3): any matching DENY denies; with no ALLOW policy the connection is
//! allowed; otherwise some ALLOW must match. A policy matches if any rule matches; a rule if all
//! of its clauses match (no clauses = everything); a clause if any match holds (no matches =
//! everything); a match holds if each populated category has a positive hit and no negative hit.
//! A policy with no rules matches nothing, so an ALLOW without rules is "allow nothing".

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};

use crate::state::ParseError;

mod convert;
#[cfg(test)]
mod tests;

/// A policy's key and xDS resource name: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Namespace of the policy.
    pub namespace: String,
    /// Name of the policy.
    pub name: String,
}

impl PolicyKey {
    /// Builds a key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PolicyKey {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(ns, name))
            }
            _ => Err(ParseError::PolicyKey(s.to_string())),
        }
    }
}

impl Serialize for PolicyKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyScope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads naming the policy in `authorization_policies`.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyAction {
    /// Allows matching connections (and, if any ALLOW applies, denies the rest).
    Allow,
    /// Denies matching connections.
    Deny,
}

/// An L4 authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Authorization {
    /// Policy name.
    pub name: String,
    /// Policy namespace.
    pub namespace: String,
    /// Which workloads it applies to.
    pub scope: PolicyScope,
    /// Allow or deny.
    pub action: PolicyAction,
    /// Rules; the policy matches if any rule matches.
    pub rules: Vec<Rule>,
    /// Evaluated and logged but never enforced.
    pub dry_run: bool,
}

/// A rule: matches if all of its clauses match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Clauses, all of which must match.
    pub clauses: Vec<Clause>,
}

/// A clause: matches if any of its matches holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    /// Alternatives, one of which must hold.
    pub matches: Vec<Match>,
}

/// Conditions on one connection; empty categories are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    /// Source identity namespace must match one of these.
    pub namespaces: Vec<StringMatch>,
    /// Source identity namespace must match none of these.
    pub not_namespaces: Vec<StringMatch>,
    /// Source principal (identity without `spiffe://`) must match one of these.
    pub principals: Vec<StringMatch>,
    /// Source principal must match none of these.
    pub not_principals: Vec<StringMatch>,
    /// Source IP must be in one of these ranges.
    pub source_ips: Vec<IpNet>,
    /// Source IP must be in none of these ranges.
    pub not_source_ips: Vec<IpNet>,
    /// Destination IP must be in one of these ranges.
    pub destination_ips: Vec<IpNet>,
    /// Destination IP must be in none of these ranges.
    pub not_destination_ips: Vec<IpNet>,
    /// Destination port must be one of these.
    pub destination_ports: Vec<u16>,
    /// Destination port must be none of these.
    pub not_destination_ports: Vec<u16>,
    /// Source identity must be one of these service accounts.
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Source identity must be none of these service accounts.
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// A string condition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum StringMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Whether `value` satisfies this condition.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }
}

/// A service account condition on the source identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServiceAccountMatch {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
}

impl ServiceAccountMatch {
    /// Whether `id` is this service account.
    pub fn matches(&self, id: &hbone::Identity) -> bool {
        id.namespace == self.namespace && id.service_account == self.service_account
    }
}

/// Why an IP range is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    /// Not `<ip>` or `<ip>/<len>`.
    #[error("{0:?} is not an IP address or CIDR range")]
    Syntax(String),
    /// Prefix longer than the address.
    #[error("prefix length {len} is too long for {addr}")]
    PrefixLength {
        /// The address.
        addr: IpAddr,
        /// The prefix length.
        len: u32,
    },
}

/// An IP range: address plus prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// Builds a range, rejecting prefixes longer than the address.
    pub fn new(addr: IpAddr, prefix_len: u32) -> Result<Self, IpNetError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        match u8::try_from(prefix_len) {
            Ok(p) if prefix_len <= max => Ok(Self {
                addr,
                prefix_len: p,
            }),
            _ => Err(IpNetError::PrefixLength {
                addr,
                len: prefix_len,
            }),
        }
    }

    /// A range holding exactly `addr`.
    pub fn single(addr: IpAddr) -> Self {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix_len }
    }

    /// The range's address as given.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is inside the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

// Compares the first `bits` bits of two equally long byte strings.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rem = bits % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    (a[full] & mask) == (b[full] & mask)
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    /// Parses `<ip>/<len>` or a bare `<ip>` (a single address).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || IpNetError::Syntax(s.to_string());
        match s.split_once('/') {
            None => s.parse().map(Self::single).map_err(|_| syntax()),
            Some((ip, len)) => {
                let addr: IpAddr = ip.parse().map_err(|_| syntax())?;
                let len: u32 = len.parse().map_err(|_| syntax())?;
                Self::new(addr, len)
            }
        }
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The facts about a connection that L4 policy can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Peer identity from mTLS; `None` for plaintext.
    pub src_identity: Option<hbone::Identity>,
    /// Client IP.
    pub src_ip: IpAddr,
    /// Destination IP (the workload's address).
    pub dst_ip: IpAddr,
    /// Destination port (the workload's port).
    pub dst_port: u16,
}

/// Outcome of authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The connection may proceed.
    Allow,
    /// The connection must be refused.
    Deny {
        /// The DENY policy that matched; `None` when no ALLOW policy matched.
        policy: Option<PolicyKey>,
        /// Human-readable reason for logs.
        reason: String,
    },
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow)
    }
}

// A category holds if its positive list is empty or hit, and its negative list is not hit.
fn category<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

impl Match {
    /// Whether every populated category holds for `conn`.
    pub fn holds(&self, conn: &Connection) -> bool {
        let id = conn.src_identity.as_ref();
        // Without an identity the identity-based conditions can neither hit nor exclude.
        let principal = id.map(|i| i.principal());
        category(&self.namespaces, &self.not_namespaces, |m| {
            id.is_some_and(|i| m.matches(&i.namespace))
        }) && category(&self.principals, &self.not_principals, |m| {
            principal.as_deref().is_some_and(|p| m.matches(p))
        }) && category(&self.service_accounts, &self.not_service_accounts, |m| {
            id.is_some_and(|i| m.matches(i))
        }) && category(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(conn.src_ip)
        }) && category(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(conn.dst_ip)
        }) && category(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == conn.dst_port
        })
    }
}

impl Clause {
    /// Whether any match holds (an empty clause constrains nothing).
    pub fn matches(&self, conn: &Connection) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.holds(conn))
    }
}

impl Rule {
    /// Whether all clauses match (an empty rule matches everything).
    pub fn matches(&self, conn: &Connection) -> bool {
        self.clauses.iter().all(|c| c.matches(conn))
    }
}

impl Authorization {
    /// The policy's key.
    pub fn key(&self) -> PolicyKey {
        PolicyKey::new(&self.namespace, &self.name)
    }

    /// Whether any rule matches `conn` (a policy without rules matches nothing).
    pub fn matches(&self, conn: &Connection) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
}

/// Decides whether `conn` may proceed under `policies` (those applicable to the destination).
pub fn authorize(policies: &[Arc<Authorization>], conn: &Connection) -> Decision {
    let mut denied_by: Option<PolicyKey> = None;
    let (mut allows, mut allow_matched) = (false, false);
    let (mut dry_allows, mut dry_allow_matched) = (false, false);
    for policy in policies {
        let matched = policy.matches(conn);
        match (policy.action, policy.dry_run) {
            (PolicyAction::Deny, false) => {
                if matched && denied_by.is_none() {
                    denied_by = Some(policy.key());
                }
            }
            (PolicyAction::Allow, false) => {
                allows = true;
                allow_matched |= matched;
            }
            (PolicyAction::Deny, true) => {
                if matched {
                    tracing::info!(policy = %policy.key(), src = %conn.src_ip, dst = %conn.dst_ip,
                        port = conn.dst_port, "dry-run DENY policy would deny the connection");
                }
            }
            (PolicyAction::Allow, true) => {
                dry_allows = true;
                dry_allow_matched |= matched;
            }
        }
    }
    if dry_allows && !dry_allow_matched {
        tracing::info!(src = %conn.src_ip, dst = %conn.dst_ip, port = conn.dst_port,
            "dry-run ALLOW policies would deny the connection: none matched");
    }
    if let Some(key) = denied_by {
        let reason = format!("denied by DENY policy {key}");
        return Decision::Deny {
            policy: Some(key),
            reason,
        };
    }
    if allows && !allow_matched {
        return Decision::Deny {
            policy: None,
            reason: "no ALLOW policy matched".to_string(),
        };
    }
    Decision::Allow
}
