//! Names of things in the sandbox cluster: `namespace/name` pairs and object identities (which
//! also name their files in the cluster directory).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A namespaced name, serialized as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct NsName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl NsName {
    /// Builds a name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for NsName {
    type Err = String;
    /// `ns/name`, or `name` meaning namespace `default`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ns, name) = s.split_once('/').unwrap_or(("default", s));
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return Err(format!("{s:?} is not <namespace>/<name>"));
        }
        Ok(Self::new(ns, name))
    }
}

impl From<NsName> for String {
    fn from(n: NsName) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for NsName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Identifies an object written to the cluster directory.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectId {
    /// API group ("" for core).
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace; None for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl ObjectId {
    /// The file this object is stored in: `<kind>[.<group>]_<namespace>_<name>.yaml`, or
    /// `<kind>[.<group>]_<name>.yaml` when cluster-scoped. `_` never occurs in Kubernetes
    /// names or namespaces, so names cannot collide.
    pub fn file_name(&self) -> String {
        let mut kind = self.kind.to_ascii_lowercase();
        if !self.group.is_empty() {
            kind = format!("{kind}.{}", self.group);
        }
        match &self.namespace {
            Some(ns) => format!("{kind}_{ns}_{}.yaml", self.name),
            None => format!("{kind}_{}.yaml", self.name),
        }
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.to_ascii_lowercase();
        match &self.namespace {
            Some(ns) => write!(f, "{kind} {ns}/{}", self.name),
            None => write!(f, "{kind} {}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_file_names_are_unambiguous() {
        let a = ObjectId {
            group: "gateway.networking.k8s.io".into(),
            kind: "Gateway".into(),
            namespace: Some("a-b".into()),
            name: "c".into(),
        };
        assert_eq!(
            a.file_name(),
            "gateway.gateway.networking.k8s.io_a-b_c.yaml"
        );
        let b = ObjectId {
            namespace: Some("a".into()),
            name: "b-c".into(),
            ..a.clone()
        };
        assert_ne!(a.file_name(), b.file_name());
    }

    #[test]
    fn ns_name_defaults_to_default_namespace() {
        assert_eq!(
            "web".parse::<NsName>().unwrap(),
            NsName::new("default", "web")
        );
        assert!("a/b/c".parse::<NsName>().is_err());
        assert!("/x".parse::<NsName>().is_err());
    }
}
