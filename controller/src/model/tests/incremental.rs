//! Incremental behaviour: deltas contain exactly the resources whose content changed.

use std::sync::Arc;

use xds::istio::workload as wl;

use super::{applies, delta_names, model, objects};
use crate::config::{ConfigEvent, Kind, ObjectKey};
use crate::model::{EndpointMode, Model, ModelConfig};

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: a, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: a, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: a, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: b, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.1.1}
"#;

const UID_A1: &str = "Kubernetes//v1/Pod/a/web-1";
const UID_A2: &str = "Kubernetes//v1/Pod/a/web-2";
const UID_ADB: &str = "Kubernetes//v1/Pod/a/db-1";
const UID_B1: &str = "Kubernetes//v1/Pod/b/web-1";
const SVC: &str = "a/web.a.svc.cluster.local";

fn base() -> Model {
    let mut m = model();
    m.apply(applies(BASE));
    m
}

fn workload<'a>(m: &'a Model, uid: &str) -> &'a wl::Workload {
    match m.address(uid).and_then(|a| a.r#type.as_ref()) {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("{uid} is not a workload: {other:?}"),
    }
}

/// Owned, sorted (as `delta_names` sorts).
fn strs(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

#[test]
fn first_apply_publishes_everything_once() {
    let mut m = model();
    let (addrs, pols) = delta_names(&m.apply(applies(BASE)));
    assert_eq!(addrs, strs(&[UID_A1, UID_A2, UID_ADB, UID_B1, SVC]));
    assert_eq!(pols, strs(&["istio-system/istio_converted_static_strict"]));
    assert!(m.apply(Vec::new()).is_empty());
}

#[test]
fn reapplying_identical_objects_yields_empty_delta() {
    let mut m = base();
    assert!(m.apply(applies(BASE)).is_empty());
    assert!(m.apply(vec![ConfigEvent::Synced]).is_empty());
}

#[test]
fn namespace_label_change_updates_only_that_namespaces_pods() {
    let mut m = base();
    let d = m.apply(applies(
        "kind: Namespace\napiVersion: v1\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}",
    ));
    assert_eq!(delta_names(&d), (strs(&[UID_A1, UID_A2, UID_ADB]), vec![]));
    for uid in [UID_A1, UID_A2, UID_ADB] {
        assert_eq!(
            workload(&m, uid).tunnel_protocol,
            wl::TunnelProtocol::Hbone as i32
        );
    }
    assert_eq!(
        workload(&m, UID_B1).tunnel_protocol,
        wl::TunnelProtocol::None as i32
    );
    // A label that does not affect enrollment changes nothing visible.
    let d = m.apply(applies(
        "kind: Namespace\napiVersion: v1\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient, team: x}}",
    ));
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn deleting_service_removes_resource_and_updates_pod_services() {
    let mut m = base();
    assert!(workload(&m, UID_A1).services.contains_key(SVC));
    let d = m.apply(vec![ConfigEvent::Delete(ObjectKey::new(
        Kind::Service,
        "a",
        "web",
    ))]);
    assert_eq!(
        delta_names(&d),
        (strs(&[&format!("-{SVC}"), UID_A1, UID_A2]), vec![])
    );
    assert!(m.address(SVC).is_none());
    assert!(workload(&m, UID_A1).services.is_empty());
    assert!(workload(&m, UID_A2).services.is_empty());
}

#[test]
fn service_vip_change_touches_only_the_service() {
    let mut m = base();
    let d = m.apply(applies(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec:
  clusterIP: 10.96.0.99
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
    ));
    assert_eq!(delta_names(&d), (strs(&[SVC]), vec![]));
}

#[test]
fn service_selector_change_moves_membership() {
    let mut m = base();
    let d = m.apply(applies(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec:
  clusterIP: 10.96.0.1
  selector: {app: db}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
    ));
    // The service resource itself does not carry the selector: only the pods change.
    assert_eq!(delta_names(&d), (strs(&[UID_ADB, UID_A1, UID_A2]), vec![]));
    assert!(workload(&m, UID_ADB).services.contains_key(SVC));
    assert!(workload(&m, UID_A1).services.is_empty());
}

#[test]
fn pod_status_change_touches_only_that_pod() {
    let mut m = base();
    let d = m.apply(applies(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: a, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.1, conditions: [{type: Ready, status: "True"}]}
"#,
    ));
    assert_eq!(delta_names(&d), (strs(&[UID_A1]), vec![]));
    assert_eq!(
        workload(&m, UID_A1).status,
        wl::WorkloadStatus::Healthy as i32
    );
    let d = m.apply(vec![ConfigEvent::Delete(ObjectKey::new(
        Kind::Pod,
        "a",
        "web-1",
    ))]);
    assert_eq!(delta_names(&d), (strs(&[&format!("-{UID_A1}")]), vec![]));
}

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: a}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {namespaces: [evil]}}]}]
"#;

#[test]
fn policy_changes_update_only_selected_workloads() {
    let mut m = base();
    let d = m.apply(applies(POLICY));
    assert_eq!(delta_names(&d), (strs(&[UID_A1, UID_A2]), strs(&["a/p"])));
    assert_eq!(workload(&m, UID_A1).authorization_policies, strs(&["a/p"]));
    assert!(workload(&m, UID_B1).authorization_policies.is_empty());

    // Rule change with the same selector: only the policy resource changes.
    let d = m.apply(applies(&POLICY.replace("evil", "bad")));
    assert_eq!(delta_names(&d), (vec![], strs(&["a/p"])));

    // Selector change: old and new selections.
    let moved = POLICY.replace("bad", "x").replace("app: web", "app: db");
    let d = m.apply(applies(&moved));
    assert_eq!(
        delta_names(&d),
        (strs(&[UID_ADB, UID_A1, UID_A2]), strs(&["a/p"]))
    );

    let key = ObjectKey::new(Kind::AuthorizationPolicy, "a", "p");
    let d = m.apply(vec![ConfigEvent::Delete(key)]);
    assert_eq!(delta_names(&d), (strs(&[UID_ADB]), strs(&["-a/p"])));
}

#[test]
fn pod_label_change_updates_its_services_and_policies() {
    let mut m = base();
    m.apply(applies(POLICY));
    let d = m.apply(applies(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: a, labels: {app: other}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.1}
"#,
    ));
    assert_eq!(delta_names(&d), (strs(&[UID_A1]), vec![]));
    let w = workload(&m, UID_A1);
    assert!(w.services.is_empty());
    assert!(w.authorization_policies.is_empty());
}

#[test]
fn policy_status_follows_the_policy() {
    let mut m = base();
    m.apply(applies(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: a}
spec:
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#,
    ));
    let key = ObjectKey::new(Kind::AuthorizationPolicy, "a", "l7");
    let status = m.policy_status(&key).unwrap();
    assert!(status.contains("rule 0 dropped"), "{status}");
    assert!(m.authorization("a/l7").unwrap().rules.is_empty());
    m.apply(vec![ConfigEvent::Delete(key.clone())]);
    assert_eq!(m.policy_status(&key), None);
}

const MESH_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

#[test]
fn namespace_permissive_overrides_mesh_strict() {
    let strict = "istio-system/istio_converted_static_strict";
    let mut m = base();
    let d = m.apply(applies(MESH_STRICT));
    assert_eq!(
        delta_names(&d),
        (strs(&[UID_ADB, UID_A1, UID_A2, UID_B1]), vec![])
    );
    assert_eq!(workload(&m, UID_B1).authorization_policies, strs(&[strict]));

    let d = m.apply(applies(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: relax, namespace: b}
spec: {mtls: {mode: PERMISSIVE}}
"#,
    ));
    assert_eq!(delta_names(&d), (strs(&[UID_B1]), vec![]));
    assert!(workload(&m, UID_B1).authorization_policies.is_empty());
    assert_eq!(workload(&m, UID_A1).authorization_policies, strs(&[strict]));

    let key = ObjectKey::new(Kind::PeerAuthentication, "istio-system", "default");
    let d = m.apply(vec![ConfigEvent::Delete(key)]);
    assert_eq!(delta_names(&d), (strs(&[UID_ADB, UID_A1, UID_A2]), vec![]));
}

#[test]
fn port_level_policy_follows_inherited_mode() {
    let mut m = base();
    m.apply(applies(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ports, namespace: a}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
"#,
    ));
    // Mesh default is PERMISSIVE: a PERMISSIVE port needs no policy.
    assert!(
        m.authorization("a/converted_peer_authentication_ports")
            .is_none()
    );
    assert!(workload(&m, UID_A1).authorization_policies.is_empty());
    let d = m.apply(applies(MESH_STRICT));
    let name = "a/converted_peer_authentication_ports";
    let (addrs, pols) = delta_names(&d);
    assert_eq!(pols, strs(&[name]));
    assert_eq!(addrs, strs(&[UID_ADB, UID_A1, UID_A2, UID_B1]));
    assert_eq!(workload(&m, UID_A1).authorization_policies, strs(&[name]));
    let p = m.authorization(name).unwrap();
    assert_eq!(
        p.rules[0].clauses[0].matches[0].not_destination_ports,
        vec![8080]
    );
}

#[test]
fn identity_on_node_tracks_pod_scheduling() {
    let mut m = base();
    let web = hbone::Identity::new("cluster.local", "a", "web");
    assert!(m.identity_on_node("n1", &web));
    assert!(m.identity_on_node("n2", &web));
    assert!(!m.identity_on_node("n3", &web));
    assert!(!m.identity_on_node("n1", &hbone::Identity::new("other.domain", "a", "web")));
    assert!(m.identity_on_node("n1", &hbone::Identity::new("cluster.local", "a", "default")));
    m.apply(vec![ConfigEvent::Delete(ObjectKey::new(
        Kind::Pod,
        "a",
        "web-1",
    ))]);
    assert!(!m.identity_on_node("n1", &web));
    assert!(m.identity_on_node("n2", &web));
    // A finished pod no longer needs certificates.
    m.apply(applies(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: a, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web, containers: [{name: c, image: i}]}
status: {phase: Succeeded, podIP: 10.0.0.2}
"#,
    ));
    assert!(!m.identity_on_node("n2", &web));
}

#[test]
fn endpoint_slice_changes_update_listed_pods() {
    let cfg = ModelConfig {
        mode: EndpointMode::EndpointSlices,
        ..ModelConfig::default()
    };
    let mut m = Model::new(cfg);
    m.apply(applies(BASE));
    // Selectors are not used in this mode.
    assert!(workload(&m, UID_A1).services.is_empty());
    let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], targetRef: {kind: Pod, name: web-1}}
"#;
    let d = m.apply(applies(slice));
    assert_eq!(delta_names(&d), (strs(&[UID_A1]), vec![]));
    let ports = &workload(&m, UID_A1).services[SVC].ports;
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));

    let d = m.apply(applies(&slice.replace("web-1}", "web-2}")));
    assert_eq!(delta_names(&d), (strs(&[UID_A1, UID_A2]), vec![]));
    assert!(workload(&m, UID_A1).services.is_empty());

    let d = m.apply(applies(
        &slice.replace("web-1}", "web-2}").replace("8080", "9090"),
    ));
    assert_eq!(delta_names(&d), (strs(&[UID_A2]), vec![]));
    assert_eq!(
        workload(&m, UID_A2).services[SVC].ports[0].target_port,
        9090
    );

    let key = ObjectKey::new(Kind::EndpointSlice, "a", "web-x");
    let d = m.apply(vec![ConfigEvent::Delete(key)]);
    assert_eq!(delta_names(&d), (strs(&[UID_A2]), vec![]));
}

#[test]
fn service_entry_host_removal_removes_its_service() {
    let mut m = base();
    let se = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: a}
spec:
  hosts: [one.example.com, two.example.com]
  ports: [{number: 443, name: tls}]
  workloadSelector: {labels: {app: db}}
"#;
    let d = m.apply(applies(se));
    assert_eq!(
        delta_names(&d),
        (
            strs(&["a/one.example.com", "a/two.example.com", UID_ADB]),
            vec![]
        )
    );
    let d = m.apply(applies(&se.replace(", two.example.com", "")));
    assert_eq!(
        delta_names(&d),
        (strs(&["-a/two.example.com", UID_ADB]), vec![])
    );
    assert_eq!(workload(&m, UID_ADB).services.len(), 1);
}

#[test]
fn kubernetes_service_wins_over_service_entry_with_same_name() {
    let mut m = base();
    let se = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow, namespace: a}
spec:
  hosts: [web.a.svc.cluster.local]
  ports: [{number: 8000, name: http}]
"#;
    assert!(m.apply(applies(se)).is_empty());
    let svc = |m: &Model| match m.address(SVC).and_then(|a| a.r#type.clone()) {
        Some(wl::address::Type::Service(s)) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(svc(&m).name, "web");
    let d = m.apply(vec![ConfigEvent::Delete(ObjectKey::new(
        Kind::Service,
        "a",
        "web",
    ))]);
    assert!(d.addresses.iter().any(|(n, v)| n == SVC && v.is_some()));
    assert_eq!(svc(&m).name, "shadow");
}

#[test]
fn yaml_fixture_parses_every_object() {
    assert_eq!(objects(BASE).len(), 7);
    let events: Vec<ConfigEvent> = objects(BASE)
        .into_iter()
        .map(|o| ConfigEvent::Apply(Arc::new(o)))
        .collect();
    assert_eq!(events.len(), 7);
}
