//! Reading manifests: files, directories or stdin of (multi-document) Kubernetes YAML or JSON,
//! `kind: List` included, classified into what the sandbox does with each kind and validated
//! up front — the mesh kinds with the same decoder the controller uses — so an invalid
//! document fails the whole command before anything changes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::state::ObjectId;
use crate::workloads::{self, DesiredPod};

/// Istio API groups whose kinds are written verbatim.
const ISTIO_GROUPS: &[&str] = &[
    "security.istio.io",
    "networking.istio.io",
    "telemetry.istio.io",
    "extensions.istio.io",
];
/// The Gateway API group.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Cluster-scoped Gateway API kinds.
const GATEWAY_CLUSTER_KINDS: &[&str] = &["GatewayClass"];

/// One problem in the input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ManifestError {
    /// `file`, `file: document N` or `file: document N items[i]`.
    pub origin: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid manifests (nothing was applied):\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct ManifestErrors(pub Vec<ManifestError>);

/// A Deployment being applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// spec.replicas.
    pub replicas: u32,
}

/// What the sandbox does with an object.
#[derive(Clone, Debug)]
pub enum Manifest {
    /// A Namespace (written verbatim; its labels drive enrollment).
    Namespace {
        /// The object.
        object: Value,
        /// Its labels.
        labels: BTreeMap<String, String>,
    },
    /// A Service (a cluster IP is allocated).
    Service(Box<Service>),
    /// Pods to run: a Pod, or a Deployment's replicas.
    Workload {
        /// The Deployment, for Deployments.
        deployment: Option<DeploymentRef>,
        /// The pods.
        pods: Vec<DesiredPod>,
    },
    /// Anything else accepted (ServiceAccount, Istio, Gateway API): written verbatim.
    Verbatim(Value),
}

/// A decoded document and where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    /// File and document number.
    pub origin: String,
    /// The object identity.
    pub id: ObjectId,
    /// What to do with it.
    pub manifest: Manifest,
}

/// Reads and validates every document under `paths`.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Document>, ManifestErrors> {
    let mut errors = Vec::new();
    let mut raw = Vec::new();
    for path in paths {
        match read_sources(path) {
            Ok(files) => {
                for (name, text) in files {
                    split(&name, &text, &mut raw, &mut errors);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    let mut docs = Vec::new();
    for (origin, value) in raw {
        match classify(&origin, value) {
            Ok(d) => docs.push(d),
            Err(message) => errors.push(ManifestError { origin, message }),
        }
    }
    errors.extend(validate_with_mesh_decoder(&docs));
    errors.sort_by_key(|e| origin_order(&e.origin));
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// Sort key of an origin: file, then document number, then list item.
fn origin_order(origin: &str) -> (String, usize, String) {
    match origin.split_once(": document ") {
        Some((file, rest)) => {
            let (n, item) = rest.split_once(' ').unwrap_or((rest, ""));
            (file.to_string(), n.parse().unwrap_or(0), item.to_string())
        }
        None => (origin.to_string(), 0, String::new()),
    }
}

/// (display name, text) of every manifest file under `path`.
fn read_sources(path: &Path) -> Result<Vec<(String, String)>, ManifestError> {
    let shown = path.display().to_string();
    let err = |message: String| ManifestError {
        origin: shown.clone(),
        message,
    };
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| err(format!("reading stdin: {e}")))?;
        return Ok(vec![("<stdin>".into(), text)]);
    }
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        return Ok(vec![(shown, text)]);
    }
    let mut files = Vec::new();
    collect_dir(path, &mut files, 0).map_err(|e| err(e.to_string()))?;
    files.sort();
    if files.is_empty() {
        return Err(err(
            "no *.yaml, *.yml or *.json files in this directory".into()
        ));
    }
    files
        .into_iter()
        .map(|f| {
            std::fs::read_to_string(&f)
                .map(|t| (f.display().to_string(), t))
                .map_err(|e| ManifestError {
                    origin: f.display().to_string(),
                    message: e.to_string(),
                })
        })
        .collect()
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> std::io::Result<()> {
    if depth > 16 {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            collect_dir(&p, out, depth + 1)?;
        } else if p
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Splits a file into documents (expanding `kind: List`), skipping empty ones.
fn split(name: &str, text: &str, out: &mut Vec<(String, Value)>, errors: &mut Vec<ManifestError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = format!("{name}: document {}", i + 1);
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // The parser cannot resynchronize after a syntax error.
                errors.push(ManifestError {
                    origin,
                    message: format!("invalid YAML: {e}"),
                });
                return;
            }
        };
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            match value.get("items") {
                Some(Value::Sequence(items)) => {
                    for (j, item) in items.iter().enumerate() {
                        out.push((format!("{origin} items[{j}]"), item.clone()));
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => errors.push(ManifestError {
                    origin,
                    message: "List items must be a sequence".into(),
                }),
            }
            continue;
        }
        out.push((origin, value));
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Identifies and decodes one object.
fn classify(origin: &str, mut value: Value) -> Result<Document, String> {
    if !value.is_mapping() {
        return Err("expected a Kubernetes object (a mapping with apiVersion and kind)".into());
    }
    let api_version = str_field(&value, "apiVersion")
        .ok_or("missing apiVersion")?
        .to_string();
    let kind = str_field(&value, "kind").ok_or("missing kind")?.to_string();
    let (group, _version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let group = group.to_string();
    let name = value
        .get("metadata")
        .and_then(|m| str_field(m, "name"))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{kind}: metadata.name is required"))?
        .to_string();
    let cluster_scoped = (group.is_empty() && kind == "Namespace")
        || (group == GATEWAY_GROUP && GATEWAY_CLUSTER_KINDS.contains(&kind.as_str()));
    let namespace = if cluster_scoped {
        None
    } else {
        let ns = value
            .get("metadata")
            .and_then(|m| str_field(m, "namespace"))
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_string();
        set_namespace(&mut value, &ns);
        Some(ns)
    };
    let id = ObjectId {
        group: group.clone(),
        kind: kind.clone(),
        namespace,
        name,
    };
    let decode_err = |e: serde_yaml::Error| format!("{id}: {e}");
    let manifest = match (group.as_str(), kind.as_str()) {
        ("", "Namespace") => {
            let ns: Namespace = serde_yaml::from_value(value.clone()).map_err(decode_err)?;
            Manifest::Namespace {
                labels: ns.metadata.labels.unwrap_or_default(),
                object: value,
            }
        }
        ("", "Service") => {
            Manifest::Service(Box::new(serde_yaml::from_value(value).map_err(decode_err)?))
        }
        ("", "Pod") => {
            let pod: Pod = serde_yaml::from_value(value).map_err(decode_err)?;
            let p = workloads::from_pod(&pod).map_err(|e| e.to_string())?;
            Manifest::Workload {
                deployment: None,
                pods: vec![p],
            }
        }
        ("apps", "Deployment") => {
            let d: Deployment = serde_yaml::from_value(value).map_err(decode_err)?;
            let (replicas, pods) = workloads::expand_deployment(&d).map_err(|e| e.to_string())?;
            Manifest::Workload {
                deployment: Some(DeploymentRef {
                    namespace: id.namespace.clone().unwrap_or_default(),
                    name: id.name.clone(),
                    replicas,
                }),
                pods,
            }
        }
        ("", "ServiceAccount") => Manifest::Verbatim(value),
        (g, _) if ISTIO_GROUPS.contains(&g) || g == GATEWAY_GROUP => Manifest::Verbatim(value),
        _ => {
            return Err(format!(
                "unsupported kind `{kind}` (apiVersion `{api_version}`): the sandbox accepts \
                 Namespace, Pod, Deployment, Service, ServiceAccount, Istio and Gateway API kinds"
            ));
        }
    };
    Ok(Document {
        origin: origin.to_string(),
        id,
        manifest,
    })
}

fn set_namespace(value: &mut Value, ns: &str) {
    if let Some(Value::Mapping(meta)) = value.get_mut("metadata") {
        meta.insert("namespace".into(), Value::String(ns.to_string()));
    }
}

/// Decodes the verbatim and Service/Namespace documents with meshconfig's file loader (what
/// the controller and agents run), so objects they would reject are rejected here.
fn validate_with_mesh_decoder(docs: &[Document]) -> Vec<ManifestError> {
    let mut dir = std::env::temp_dir();
    dir.push(format!(
        "meshctl-validate-{}-{}",
        std::process::id(),
        crate::ids::fnv64(format!("{:?}", std::time::SystemTime::now()).as_bytes())
    ));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return vec![ManifestError {
            origin: dir.display().to_string(),
            message: format!("creating a validation directory: {e}"),
        }];
    }
    let mut by_file = BTreeMap::new();
    for (i, d) in docs.iter().enumerate() {
        let value = match &d.manifest {
            Manifest::Namespace { object, .. } | Manifest::Verbatim(object) => object.clone(),
            Manifest::Service(s) => match serde_yaml::to_value(s.as_ref()) {
                Ok(v) => with_type_meta(v, "v1", "Service"),
                Err(_) => continue,
            },
            Manifest::Workload { .. } => continue,
        };
        let file = dir.join(format!("{i:05}.yaml"));
        if serde_yaml::to_string(&value)
            .ok()
            .and_then(|t| std::fs::write(&file, t).ok())
            .is_some()
        {
            by_file.insert(file, d.origin.clone());
        }
    }
    let (_, errors) = meshconfig::source::files::load_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    errors
        .into_iter()
        .map(|e| ManifestError {
            origin: by_file
                .get(&e.file)
                .cloned()
                .unwrap_or_else(|| e.file.display().to_string()),
            message: e.message,
        })
        .collect()
}

/// Adds apiVersion/kind to a re-serialized typed object (k8s-openapi omits them).
pub fn with_type_meta(mut v: Value, api_version: &str, kind: &str) -> Value {
    if let Value::Mapping(m) = &mut v {
        let mut out = Mapping::new();
        out.insert("apiVersion".into(), api_version.into());
        out.insert("kind".into(), kind.into());
        for (k, val) in std::mem::take(m) {
            if k.as_str() != Some("apiVersion") && k.as_str() != Some("kind") {
                out.insert(k, val);
            }
        }
        *m = out;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Vec<Document>, ManifestErrors> {
        let dir = std::env::temp_dir().join(format!(
            "meshctl-manifest-test-{}-{}",
            std::process::id(),
            crate::ids::fnv64(text.as_bytes())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.yaml");
        std::fs::write(&f, text).unwrap();
        let r = load(std::slice::from_ref(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    #[test]
    fn reads_every_supported_kind_and_defaults_namespaces() {
        let docs = load_text(include_str!("../testdata/demo.yaml")).unwrap();
        let kinds: Vec<&str> = docs.iter().map(|d| d.id.kind.as_str()).collect();
        assert!(kinds.contains(&"Namespace"));
        assert!(kinds.contains(&"Deployment"));
        assert!(kinds.contains(&"Service"));
        let ns = docs.iter().find(|d| d.id.kind == "Namespace").unwrap();
        assert_eq!(ns.id.namespace, None);
        let sa = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n";
        let d = load_text(sa).unwrap();
        assert_eq!(d[0].id.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn unknown_kind_is_a_clear_error() {
        let e = load_text("apiVersion: v1\nkind: Poddd\nmetadata: {name: x}\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("unsupported kind `Poddd`"), "{msg}");
        assert!(msg.contains("document 1"), "{msg}");
    }

    #[test]
    fn bad_yaml_and_bad_policy_are_reported_together() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {name: p, namespace: demo}\nspec: {action: MAYBE}\n---\nfoo: [\n";
        let e = load_text(text).unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(
            e.0[0].origin.ends_with("document 1"),
            "sorted by document: {e}"
        );
        assert!(
            e.0.iter().any(|x| x.message.contains("invalid YAML")),
            "{e}"
        );
    }

    #[test]
    fn list_items_and_gateway_kinds_are_accepted() {
        let text = "apiVersion: v1\nkind: List\nitems:\n\
            - {apiVersion: v1, kind: ServiceAccount, metadata: {name: a, namespace: n}}\n\
            - {apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: w, namespace: n}, spec: {gatewayClassName: istio-waypoint}}\n";
        let docs = load_text(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[1].id.file_name(),
            "gateway.gateway.networking.k8s.io_n_w.yaml"
        );
    }

    #[test]
    fn missing_path_is_an_error() {
        let e = load(&[PathBuf::from("/nonexistent/x.yaml")]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.yaml"));
    }
}
