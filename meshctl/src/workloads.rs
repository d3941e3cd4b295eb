//! Pods as the sandbox will run them: Pods taken as written, Deployments expanded into
//! `<deployment>-<i>` pods, validated for what the sandbox can run (host commands), hashed so
//! re-applying an unchanged pod is a no-op, and scheduled onto nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use serde::Serialize;

use crate::ids::content_hash;
use crate::state::{NodeState, NsName};

/// Node selector label naming a node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// A pod the user wants, before it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredPod {
    /// Namespace and name.
    pub id: NsName,
    /// Owning Deployment.
    pub owner: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// The spec as written (nodeName as given by the user, if any).
    pub spec: PodSpec,
    /// Hash of the spec.
    pub spec_hash: String,
    /// Hash of labels and annotations.
    pub meta_hash: String,
}

/// A pod the sandbox cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("pod {pod}: {message}")]
pub struct WorkloadError {
    /// The pod (or `<deployment>-*`).
    pub pod: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Serialize)]
struct Meta<'a> {
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
}

fn desired(
    id: NsName,
    owner: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    spec: PodSpec,
) -> Result<DesiredPod, WorkloadError> {
    validate_spec(&id.to_string(), &spec)?;
    let meta_hash = content_hash(&Meta {
        labels: &labels,
        annotations: &annotations,
    });
    Ok(DesiredPod {
        spec_hash: content_hash(&spec),
        meta_hash,
        id,
        owner,
        labels,
        annotations,
        spec,
    })
}

/// Checks that every container is something the sandbox can run.
fn validate_spec(pod: &str, spec: &PodSpec) -> Result<(), WorkloadError> {
    let err = |message: String| WorkloadError {
        pod: pod.to_string(),
        message,
    };
    if spec.host_network == Some(true) {
        return Err(err(
            "hostNetwork pods are not supported by the sandbox".into()
        ));
    }
    if spec.containers.is_empty() {
        return Err(err("spec.containers is empty".into()));
    }
    for c in &spec.containers {
        if c.command.as_ref().is_none_or(|c| c.is_empty()) {
            return Err(err(format!(
                "container {}: no `command`; the sandbox runs command + args as a host command \
                 (images are not run), e.g. command: [mesh-testapp, serve]",
                c.name
            )));
        }
    }
    Ok(())
}

/// The pod of a Pod manifest (namespace already defaulted).
pub fn from_pod(pod: &Pod) -> Result<DesiredPod, WorkloadError> {
    let meta = &pod.metadata;
    let id = NsName::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    );
    let spec = pod.spec.clone().ok_or_else(|| WorkloadError {
        pod: id.to_string(),
        message: "spec is required".into(),
    })?;
    desired(
        id,
        None,
        meta.labels.clone().unwrap_or_default(),
        meta.annotations.clone().unwrap_or_default(),
        spec,
    )
}

/// The pods of a Deployment: `<name>-0` .. `<name>-<replicas-1>` with the template's labels
/// and spec. Returns the replica count too.
pub fn expand_deployment(d: &Deployment) -> Result<(u32, Vec<DesiredPod>), WorkloadError> {
    let namespace = d
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = d.metadata.name.clone().unwrap_or_default();
    let err = |message: &str| WorkloadError {
        pod: format!("{namespace}/{name}-*"),
        message: message.to_string(),
    };
    let spec = d
        .spec
        .as_ref()
        .ok_or_else(|| err("Deployment spec is required"))?;
    let replicas = u32::try_from(spec.replicas.unwrap_or(1))
        .map_err(|_| err("spec.replicas must not be negative"))?;
    let template_spec = spec
        .template
        .spec
        .clone()
        .ok_or_else(|| err("spec.template.spec is required"))?;
    let tmeta = spec.template.metadata.clone().unwrap_or_default();
    let labels = tmeta.labels.unwrap_or_default();
    if let Some(sel) = spec.selector.match_labels.as_ref()
        && sel.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return Err(err(
            "spec.selector.matchLabels does not match spec.template.metadata.labels",
        ));
    }
    let pods = (0..replicas)
        .map(|i| {
            desired(
                NsName::new(&namespace, format!("{name}-{i}")),
                Some(name.clone()),
                labels.clone(),
                tmeta.annotations.clone().unwrap_or_default(),
                template_spec.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((replicas, pods))
}

/// The service account a pod runs as.
pub fn service_account(spec: &PodSpec) -> String {
    spec.service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// Named container ports.
pub fn named_ports(spec: &PodSpec) -> BTreeMap<String, u16> {
    let mut out = BTreeMap::new();
    for c in &spec.containers {
        for p in c.ports.iter().flatten() {
            if let (Some(n), Ok(port)) = (&p.name, u16::try_from(p.container_port)) {
                out.entry(n.clone()).or_insert(port);
            }
        }
    }
    out
}

/// TCP container ports (readiness waits until they listen).
pub fn tcp_ports(spec: &PodSpec) -> Vec<u16> {
    let mut out: Vec<u16> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Picks the node for a pod: spec.nodeName, else nodeSelector `kubernetes.io/hostname`, else
/// the node with the fewest pods (`load`), lowest index first.
pub fn schedule(
    pod: &DesiredPod,
    nodes: &[NodeState],
    load: &BTreeMap<String, usize>,
) -> Result<String, WorkloadError> {
    let wanted = pod.spec.node_name.clone().or_else(|| {
        pod.spec
            .node_selector
            .as_ref()
            .and_then(|s| s.get(HOSTNAME_LABEL).cloned())
    });
    if let Some(name) = wanted {
        if nodes.iter().any(|n| n.name == name) {
            return Ok(name);
        }
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        return Err(WorkloadError {
            pod: pod.id.to_string(),
            message: format!("node {name:?} does not exist (nodes: {})", names.join(", ")),
        });
    }
    nodes
        .iter()
        .min_by_key(|n| (load.get(&n.name).copied().unwrap_or(0), n.index))
        .map(|n| n.name.clone())
        .ok_or_else(|| WorkloadError {
            pod: pod.id.to_string(),
            message: "the sandbox has no nodes".into(),
        })
}

/// `$(VAR)` references in a command, argument or env value replaced by earlier variables, as
/// Kubernetes does; `$$` escapes a `$`, unknown references stay as written.
pub fn expand_vars(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::plan_node;

    fn deployment(yaml: &str) -> Deployment {
        serde_yaml::from_str(yaml).unwrap()
    }

    const ECHO: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: demo}
spec:
  replicas: 3
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo, version: v1}}
    spec:
      serviceAccountName: echo
      containers:
      - name: app
        command: [mesh-testapp, serve]
        ports: [{name: http, containerPort: 8080}]
";

    #[test]
    fn deployment_expands_into_numbered_pods_with_template_labels() {
        let (replicas, pods) = expand_deployment(&deployment(ECHO)).unwrap();
        assert_eq!(replicas, 3);
        let names: Vec<String> = pods.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(names, ["demo/echo-0", "demo/echo-1", "demo/echo-2"]);
        assert!(pods.iter().all(|p| p.owner.as_deref() == Some("echo")));
        assert_eq!(
            pods[1].labels.get("version").map(String::as_str),
            Some("v1")
        );
        assert_eq!(service_account(&pods[0].spec), "echo");
        assert_eq!(named_ports(&pods[0].spec).get("http"), Some(&8080));
        assert_eq!(tcp_ports(&pods[0].spec), vec![8080]);
        // Same template, same hash: re-applying is a no-op.
        assert_eq!(pods[0].spec_hash, pods[2].spec_hash);
    }

    #[test]
    fn deployment_defaults_to_one_replica_and_rejects_bad_selector() {
        let one = ECHO.replace("  replicas: 3\n", "");
        assert_eq!(expand_deployment(&deployment(&one)).unwrap().1.len(), 1);
        let bad = ECHO.replace("matchLabels: {app: echo}", "matchLabels: {app: other}");
        assert!(expand_deployment(&deployment(&bad)).is_err());
    }

    #[test]
    fn changed_template_changes_spec_hash_but_labels_only_change_meta_hash() {
        let (_, a) = expand_deployment(&deployment(ECHO)).unwrap();
        let (_, b) =
            expand_deployment(&deployment(&ECHO.replace("serve]", "serve, --tcp-banner]")))
                .unwrap();
        assert_ne!(a[0].spec_hash, b[0].spec_hash);
        let (_, c) =
            expand_deployment(&deployment(&ECHO.replace("version: v1", "version: v2"))).unwrap();
        assert_eq!(a[0].spec_hash, c[0].spec_hash);
        assert_ne!(a[0].meta_hash, c[0].meta_hash);
    }

    #[test]
    fn containers_without_command_are_rejected() {
        let img = ECHO.replace("command: [mesh-testapp, serve]", "image: nginx");
        let e = expand_deployment(&deployment(&img)).unwrap_err();
        assert!(e.message.contains("no `command`"), "{e}");
    }

    #[test]
    fn scheduling_honours_node_name_and_spreads_otherwise() {
        let nodes: Vec<NodeState> = (0..2).map(plan_node).collect();
        let (_, mut pods) = expand_deployment(&deployment(ECHO)).unwrap();
        let load = BTreeMap::from([("node0".to_string(), 2)]);
        assert_eq!(schedule(&pods[0], &nodes, &load).unwrap(), "node1");
        assert_eq!(
            schedule(&pods[0], &nodes, &BTreeMap::new()).unwrap(),
            "node0"
        );
        pods[0].spec.node_name = Some("node0".into());
        assert_eq!(schedule(&pods[0], &nodes, &load).unwrap(), "node0");
        pods[0].spec.node_name = Some("node7".into());
        assert!(schedule(&pods[0], &nodes, &load).is_err());
        pods[0].spec.node_name = None;
        pods[0].spec.node_selector =
            Some(BTreeMap::from([(HOSTNAME_LABEL.into(), "node1".into())]));
        assert_eq!(
            schedule(&pods[0], &nodes, &BTreeMap::new()).unwrap(),
            "node1"
        );
    }

    #[test]
    fn var_references_expand_like_kubernetes() {
        let env = vec![
            ("POD_IP".to_string(), "10.0.0.1".to_string()),
            ("NAME".to_string(), "x".to_string()),
        ];
        assert_eq!(expand_vars("--bind=$(POD_IP)", &env), "--bind=10.0.0.1");
        assert_eq!(
            expand_vars("$$(POD_IP) $(NOPE) $(NAME)$", &env),
            "$(POD_IP) $(NOPE) x$"
        );
        assert_eq!(expand_vars("plain", &env), "plain");
    }
}
