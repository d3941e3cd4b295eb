//! Decoding multi-document Kubernetes YAML into typed [`Object`]s, one document at a time, so a
//! bad document is reported and skipped without affecting its neighbours.

use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::files::FileError;
use crate::config::{Kind, Object, ObjectKey};
use crate::crd::{
    AuthorizationPolicy, NETWORKING_GROUP, NETWORKING_VERSIONS, PeerAuthentication, SECURITY_GROUP,
    SECURITY_VERSIONS, ServiceEntry, WorkloadEntry,
};

/// One object decoded from a file, with where it was defined.
#[derive(Clone, Debug)]
pub(crate) struct Located {
    /// The object (namespace already defaulted).
    pub object: Arc<Object>,
    /// 1-based index of the document in its file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
}

/// Everything decoded from one file.
#[derive(Clone, Debug, Default)]
pub(crate) struct ParsedFile {
    /// Objects in document order.
    pub objects: Vec<Located>,
    /// Problems, one per bad document (or list item).
    pub errors: Vec<FileError>,
    /// Objects whose definition was rejected; their previous version should stay in force.
    pub rejected: Vec<ObjectKey>,
    /// Some error hid which objects a document defined (for example broken YAML).
    pub unidentified: bool,
}

/// Kinds that are valid Kubernetes/Istio/Gateway API configuration but not used by the
/// controller (yet): skipped quietly rather than reported as unknown.
const KNOWN_UNUSED: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "ConfigMap",
            "Secret",
            "Endpoints",
            "Node",
            "PersistentVolume",
            "PersistentVolumeClaim",
            "ReplicationController",
            "ResourceQuota",
            "LimitRange",
            "Event",
            "PodTemplate",
        ],
    ),
    (
        "apps",
        &[
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "ControllerRevision",
        ],
    ),
    ("batch", &["Job", "CronJob"]),
    ("autoscaling", &["HorizontalPodAutoscaler"]),
    ("policy", &["PodDisruptionBudget"]),
    (
        "rbac.authorization.k8s.io",
        &["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"],
    ),
    (
        "networking.k8s.io",
        &["NetworkPolicy", "Ingress", "IngressClass"],
    ),
    ("apiextensions.k8s.io", &["CustomResourceDefinition"]),
    (
        "admissionregistration.k8s.io",
        &[
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ],
    ),
    ("scheduling.k8s.io", &["PriorityClass"]),
    ("storage.k8s.io", &["StorageClass"]),
    ("coordination.k8s.io", &["Lease"]),
    (
        "gateway.networking.k8s.io",
        &[
            "GatewayClass",
            "Gateway",
            "HTTPRoute",
            "GRPCRoute",
            "TCPRoute",
            "TLSRoute",
            "UDPRoute",
            "ReferenceGrant",
            "BackendTLSPolicy",
        ],
    ),
    (
        NETWORKING_GROUP,
        &[
            "VirtualService",
            "DestinationRule",
            "Gateway",
            "Sidecar",
            "EnvoyFilter",
            "WorkloadGroup",
            "ProxyConfig",
        ],
    ),
    (SECURITY_GROUP, &["RequestAuthentication"]),
    ("telemetry.istio.io", &["Telemetry"]),
    ("extensions.istio.io", &["WasmPlugin"]),
    ("install.istio.io", &["IstioOperator"]),
];

/// Top-level fields a custom resource may carry in a file.
const CRD_ROOT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

/// How the loader treats an apiVersion/kind pair.
enum Class {
    /// A kind we decode.
    Supported(Kind),
    /// A kind we decode, but not in this version.
    BadVersion(Kind, &'static [&'static str]),
    /// A known kind the controller does not use.
    Unused,
    /// Not a kind we know of.
    Unknown,
}

fn classify(api_version: &str, kind: &str) -> Class {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    const CORE: &[&str] = &["v1"];
    let supported: Option<(Kind, &'static [&'static str])> = match (group, kind) {
        ("", "Namespace") => Some((Kind::Namespace, CORE)),
        ("", "Pod") => Some((Kind::Pod, CORE)),
        ("", "Service") => Some((Kind::Service, CORE)),
        ("", "ServiceAccount") => Some((Kind::ServiceAccount, CORE)),
        ("discovery.k8s.io", "EndpointSlice") => Some((Kind::EndpointSlice, CORE)),
        (SECURITY_GROUP, "AuthorizationPolicy") => {
            Some((Kind::AuthorizationPolicy, SECURITY_VERSIONS))
        }
        (SECURITY_GROUP, "PeerAuthentication") => {
            Some((Kind::PeerAuthentication, SECURITY_VERSIONS))
        }
        (NETWORKING_GROUP, "ServiceEntry") => Some((Kind::ServiceEntry, NETWORKING_VERSIONS)),
        (NETWORKING_GROUP, "WorkloadEntry") => Some((Kind::WorkloadEntry, NETWORKING_VERSIONS)),
        _ => None,
    };
    match supported {
        Some((k, versions)) if versions.contains(&version) => Class::Supported(k),
        Some((k, versions)) => Class::BadVersion(k, versions),
        None if KNOWN_UNUSED
            .iter()
            .any(|(g, kinds)| *g == group && kinds.contains(&kind)) =>
        {
            Class::Unused
        }
        None => Class::Unknown,
    }
}

/// A document's text as written, with blank lines in front so parser line numbers match the file.
struct RawDoc {
    index: usize,
    line: usize,
    text: String,
}

/// `Some(rest)` when `line` is a `---` document separator (possibly followed by content).
fn separator_rest(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("---")?;
    (rest.is_empty() || rest.starts_with([' ', '\t'])).then_some(rest)
}

fn has_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// Splits a file into documents on `---` / `...` lines, dropping blank or comment-only ones.
fn split_documents(text: &str) -> Vec<RawDoc> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    // (first line number, lines) of the document being collected.
    let mut current: Option<(usize, Vec<String>)> = None;
    let mut flush = |current: &mut Option<(usize, Vec<String>)>| {
        if let Some((first, lines)) = current.take()
            && let Some(offset) = lines.iter().position(|l| has_content(l))
        {
            let mut doc = "\n".repeat(first - 1);
            for l in &lines {
                doc.push_str(l);
                doc.push('\n');
            }
            docs.push(RawDoc {
                index: docs.len() + 1,
                line: first + offset,
                text: doc,
            });
        }
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(rest) = separator_rest(line) {
            flush(&mut current);
            // Keep columns stable for content on the separator line (`--- {a: 1}`).
            current = Some((n, vec![format!("   {rest}")]));
        } else if line.trim_end() == "..." {
            flush(&mut current);
        } else if line.starts_with('%') && current.is_none() {
            // A YAML directive; it only applies to the document after the next `---`.
        } else {
            current
                .get_or_insert_with(|| (n, Vec::new()))
                .1
                .push(line.to_string());
        }
    }
    flush(&mut current);
    docs
}

/// Where to deserialize a typed object from.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// The document text: errors carry the field path and file line/column.
    Text(&'a str),
    /// An already-parsed value (a list item): errors carry the field path only.
    Value(&'a Value),
}

/// serde_yaml's message without its " at line L column C" suffix (meaningless for list items).
fn without_location(err: &serde_yaml::Error) -> String {
    let msg = err.to_string();
    match err.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            msg.strip_suffix(&suffix).unwrap_or(&msg).to_string()
        }
        None => msg,
    }
}

fn deserialize<T: DeserializeOwned>(input: Input<'_>) -> Result<T, String> {
    match input {
        Input::Text(text) => serde_yaml::from_str(text).map_err(|e| e.to_string()),
        Input::Value(value) => {
            // Re-serializing lets serde_yaml track the field path of errors.
            let text = serde_yaml::to_string(value).map_err(|e| e.to_string())?;
            serde_yaml::from_str(&text).map_err(|e| without_location(&e))
        }
    }
}

/// Deserializes a typed object and applies the metadata rules: a name is required and
/// namespaced kinds default to namespace `default`.
fn decode<T>(input: Input<'_>, namespaced: bool) -> Result<T, String>
where
    T: DeserializeOwned + kube::Resource,
{
    let mut obj: T = deserialize(input)?;
    let meta = obj.meta_mut();
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        return Err("metadata.name is required".into());
    }
    if namespaced && meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some("default".into());
    }
    Ok(obj)
}

/// Decodes a custom resource, rejecting unknown top-level fields and treating a missing
/// `spec` as empty (an AuthorizationPolicy with `spec: {}` is meaningful).
fn decode_crd<T>(map: &Mapping, input: Input<'_>) -> Result<T, String>
where
    T: DeserializeOwned + kube::Resource,
{
    for key in map.keys() {
        if !key.as_str().is_some_and(|k| CRD_ROOT_FIELDS.contains(&k)) {
            let shown = key
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{key:?}"));
            return Err(format!(
                "unknown field `{shown}`, expected one of `apiVersion`, `kind`, `metadata`, `spec`, `status`"
            ));
        }
    }
    match map.get("spec") {
        None | Some(Value::Null) => {
            let mut filled = map.clone();
            filled.insert("spec".into(), Value::Mapping(Mapping::new()));
            decode(Input::Value(&Value::Mapping(filled)), true)
        }
        Some(_) => decode(input, true),
    }
}

fn build(kind: Kind, map: &Mapping, input: Input<'_>) -> Result<Object, String> {
    Ok(match kind {
        Kind::Namespace => Object::Namespace(decode::<Namespace>(input, false)?),
        Kind::Pod => Object::Pod(decode::<Pod>(input, true)?),
        Kind::Service => Object::Service(decode::<Service>(input, true)?),
        Kind::EndpointSlice => Object::EndpointSlice(decode::<EndpointSlice>(input, true)?),
        Kind::ServiceAccount => Object::ServiceAccount(decode::<ServiceAccount>(input, true)?),
        Kind::ServiceEntry => Object::ServiceEntry(decode_crd::<ServiceEntry>(map, input)?),
        Kind::WorkloadEntry => Object::WorkloadEntry(decode_crd::<WorkloadEntry>(map, input)?),
        Kind::AuthorizationPolicy => {
            Object::AuthorizationPolicy(decode_crd::<AuthorizationPolicy>(map, input)?)
        }
        Kind::PeerAuthentication => {
            Object::PeerAuthentication(decode_crd::<PeerAuthentication>(map, input)?)
        }
    })
}

/// The key an object would have, read leniently from its raw value (for error messages and
/// keeping the previous version of a rejected object).
fn raw_key(kind: Kind, map: &Mapping) -> Option<ObjectKey> {
    let meta = map.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = match kind {
        Kind::Namespace => "",
        _ => meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default"),
    };
    Some(ObjectKey::new(kind, namespace, name))
}

/// What became of one object definition.
enum Outcome {
    Decoded(Box<Object>),
    Unused,
    Failed {
        message: String,
        key: Option<ObjectKey>,
    },
}

fn failed(message: impl Into<String>) -> Outcome {
    Outcome::Failed {
        message: message.into(),
        key: None,
    }
}

/// Decodes one object definition (a document, or an item of a List).
fn decode_object(value: &Value, input: Input<'_>) -> Outcome {
    let Value::Mapping(map) = value else {
        return failed("expected a Kubernetes object (a mapping with apiVersion and kind)");
    };
    let Some(api_version) = map.get("apiVersion").and_then(Value::as_str) else {
        return failed("missing or non-string apiVersion");
    };
    let Some(kind_name) = map.get("kind").and_then(Value::as_str) else {
        return failed("missing or non-string kind");
    };
    match classify(api_version, kind_name) {
        Class::Unused => Outcome::Unused,
        Class::Unknown => failed(format!(
            "unknown kind `{kind_name}` in apiVersion `{api_version}`"
        )),
        Class::BadVersion(kind, versions) => {
            let key = raw_key(kind, map);
            let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            let supported: Vec<String> = versions
                .iter()
                .map(|v| match group {
                    "" => v.to_string(),
                    g => format!("{g}/{v}"),
                })
                .collect();
            Outcome::Failed {
                message: format!(
                    "{kind_name}: unsupported apiVersion `{api_version}` (supported: {})",
                    supported.join(", ")
                ),
                key,
            }
        }
        Class::Supported(kind) => match build(kind, map, input) {
            Ok(obj) => Outcome::Decoded(Box::new(obj)),
            Err(message) => {
                let key = raw_key(kind, map);
                let message = match &key {
                    Some(k) => format!("{k}: {message}"),
                    None => format!("{kind}: {message}"),
                };
                Outcome::Failed { message, key }
            }
        },
    }
}

/// Decodes every document of one file.
pub(crate) fn parse_file(file: &Path, text: &str) -> ParsedFile {
    let mut out = ParsedFile::default();
    for doc in split_documents(text) {
        let record = |outcome: Outcome, prefix: &str, out: &mut ParsedFile| match outcome {
            Outcome::Decoded(object) => out.objects.push(Located {
                object: Arc::new(*object),
                document: doc.index,
                line: doc.line,
            }),
            Outcome::Unused => tracing::debug!(
                file = %file.display(),
                document = doc.index,
                "skipping a kind the controller does not use"
            ),
            Outcome::Failed { message, key } => {
                match key {
                    Some(k) => out.rejected.push(k),
                    None => out.unidentified = true,
                }
                out.errors.push(FileError {
                    file: file.to_path_buf(),
                    document: doc.index,
                    line: doc.line,
                    message: format!("{prefix}{message}"),
                });
            }
        };
        let value: Value = match serde_yaml::from_str(&doc.text) {
            Ok(v) => v,
            Err(e) => {
                record(failed(format!("invalid YAML: {e}")), "", &mut out);
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let is_list = value.get("kind").and_then(Value::as_str) == Some("List")
            && value.get("apiVersion").and_then(Value::as_str) == Some("v1");
        if !is_list {
            record(decode_object(&value, Input::Text(&doc.text)), "", &mut out);
            continue;
        }
        match value.get("items") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let outcome = if item.get("kind").and_then(Value::as_str) == Some("List") {
                        failed("nested List is not supported")
                    } else {
                        decode_object(item, Input::Value(item))
                    };
                    record(outcome, &format!("items[{i}]: "), &mut out);
                }
            }
            Some(_) => record(failed("List items must be a sequence"), "", &mut out),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_line_numbers_and_drops_empty_documents() {
        let text = "# header\n---\na: 1\n---\n# only a comment\n---\n\nb: 2\n...\n---\nc: 3\n";
        let docs = split_documents(text);
        let got: Vec<(usize, usize)> = docs.iter().map(|d| (d.index, d.line)).collect();
        assert_eq!(got, vec![(1, 3), (2, 8), (3, 11)]);
        // Padding makes parser line numbers absolute.
        assert_eq!(docs[1].text.lines().nth(7), Some("b: 2"));
    }

    #[test]
    fn separator_requires_whitespace_or_end() {
        assert_eq!(separator_rest("---"), Some(""));
        assert_eq!(separator_rest("--- # c"), Some(" # c"));
        assert_eq!(separator_rest("----"), None);
        assert_eq!(separator_rest(" ---"), None);
    }

    #[test]
    fn classify_distinguishes_supported_unused_and_unknown() {
        assert!(matches!(
            classify("security.istio.io/v1beta1", "AuthorizationPolicy"),
            Class::Supported(Kind::AuthorizationPolicy)
        ));
        assert!(matches!(
            classify("networking.istio.io/v1alpha3", "WorkloadEntry"),
            Class::Supported(Kind::WorkloadEntry)
        ));
        assert!(matches!(
            classify("security.istio.io/v2", "AuthorizationPolicy"),
            Class::BadVersion(Kind::AuthorizationPolicy, _)
        ));
        assert!(matches!(classify("apps/v1", "Deployment"), Class::Unused));
        assert!(matches!(
            classify("networking.istio.io/v1", "VirtualService"),
            Class::Unused
        ));
        assert!(matches!(classify("v1", "Poddd"), Class::Unknown));
    }
}
