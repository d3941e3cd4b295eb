//! SPIFFE workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";

/// A workload's SPIFFE identity, as carried in the first URI SAN of its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

/// Why a string is not a SPIFFE workload identity.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The string does not start with `spiffe://`.
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    /// The path is not exactly `<td>/ns/<ns>/sa/<sa>` with non-empty parts.
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<ns>/sa/<sa>")]
    Shape(String),
}

impl Identity {
    /// Builds an identity from its three parts.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The principal as Istio's authorization compares it: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// Parses a principal (an identity without the `spiffe://` scheme).
    pub fn from_principal(principal: &str) -> Result<Self, IdentityError> {
        parse_parts(principal).ok_or_else(|| IdentityError::Shape(principal.to_string()))
    }
}

fn parse_parts(rest: &str) -> Option<Identity> {
    let mut parts = rest.split('/');
    let (td, ns_kw, ns, sa_kw, sa) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if parts.next().is_some() || ns_kw != "ns" || sa_kw != "sa" {
        return None;
    }
    if td.is_empty() || ns.is_empty() || sa.is_empty() {
        return None;
    }
    Some(Identity::new(td, ns, sa))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        parse_parts(rest).ok_or_else(|| IdentityError::Shape(s.to_string()))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.principal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo"
            .parse()
            .unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "bookinfo"));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo"
        );
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo");
    }

    #[test]
    fn rejects_other_schemes() {
        assert!(matches!(
            "http://cluster.local/ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::Scheme(_))
        ));
    }

    #[test]
    fn rejects_wrong_shapes() {
        for bad in [
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/namespace/a/sa/b",
            "spiffe://cluster.local/ns/a/serviceaccount/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/",
            "spiffe://",
        ] {
            assert!(
                matches!(bad.parse::<Identity>(), Err(IdentityError::Shape(_))),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn principal_parses_without_scheme() {
        let id = Identity::from_principal("td/ns/a/sa/b").unwrap();
        assert_eq!(id, Identity::new("td", "a", "b"));
        assert!(Identity::from_principal("spiffe://td/ns/a/sa/b").is_err());
    }
}
