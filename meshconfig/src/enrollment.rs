//! Ambient enrollment: which pods the mesh captures. The controller (HBONE or not) and the node
//! agent (redirect or not) must agree, so the rule lives here once.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};

/// Namespace/pod label that enrolls workloads in ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Annotation an injected sidecar leaves on its pod; such pods are never captured by ambient.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// True if a workload with these labels in a namespace with these labels is ambient: pod label
/// `none` opts out, `ambient` opts in, otherwise the namespace label decides.
pub fn ambient_enrolled(
    ns_labels: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => ns_labels
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .is_some_and(|v| v == "ambient"),
    }
}

/// True if the node agent must capture this pod's traffic: enrolled by labels, not sharing the
/// node's network, and not carrying an injected sidecar.
pub fn pod_captured(namespace: Option<&Namespace>, pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let sidecar = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let ns_labels = namespace.and_then(|n| n.metadata.labels.as_ref());
    !host_network && !sidecar && ambient_enrolled(ns_labels, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(pod_labels: &[(&str, &str)], host_network: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.labels = Some(labels(pod_labels));
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            host_network: Some(host_network),
            ..Default::default()
        });
        p
    }

    fn ns(ns_labels: &[(&str, &str)]) -> Namespace {
        let mut n = Namespace::default();
        n.metadata.labels = Some(labels(ns_labels));
        n
    }

    #[test]
    fn namespace_label_enrolls_pods_and_pod_label_overrides() {
        let amb = ns(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        let plain = ns(&[]);
        assert!(pod_captured(Some(&amb), &pod(&[], false)));
        assert!(!pod_captured(
            Some(&amb),
            &pod(&[(DATAPLANE_MODE_LABEL, "none")], false)
        ));
        assert!(pod_captured(
            Some(&plain),
            &pod(&[(DATAPLANE_MODE_LABEL, "ambient")], false)
        ));
        assert!(!pod_captured(Some(&plain), &pod(&[], false)));
        assert!(!pod_captured(None, &pod(&[], false)));
    }

    #[test]
    fn host_network_and_sidecar_pods_are_never_captured() {
        let amb = ns(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        assert!(!pod_captured(Some(&amb), &pod(&[], true)));
        let mut injected = pod(&[], false);
        injected.metadata.annotations = Some(labels(&[(SIDECAR_STATUS_ANNOTATION, "{}")]));
        assert!(!pod_captured(Some(&amb), &injected));
    }
}
