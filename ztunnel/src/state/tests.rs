use std::net::IpAddr;
use std::sync::Arc;

use xds::istio::security as sec;
use xds::istio::workload as pb;

use super::*;
use crate::rbac::{Authorization, PolicyAction, PolicyKey, PolicyScope};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc_key() -> NamespacedHostname {
    NamespacedHostname::new("default", "svc.default.svc.cluster.local")
}

fn workload(name: &str, addr: &str, ports: Vec<PortMapping>) -> Workload {
    let mut w = Workload {
        uid: WorkloadUid::new(format!("Kubernetes//v1/Pod/default/{name}")),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip(addr)],
        protocol: InboundProtocol::Hbone,
        ..Default::default()
    };
    w.services.insert(svc_key(), ports);
    w
}

fn service(ports: Vec<PortMapping>) -> Service {
    Service {
        name: "svc".into(),
        namespace: "default".into(),
        hostname: "svc.default.svc.cluster.local".into(),
        vips: vec!["/10.96.0.1".parse().unwrap()],
        ports,
        ..Default::default()
    }
}

fn auth(ns: &str, name: &str, scope: PolicyScope) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action: PolicyAction::Allow,
        rules: vec![],
        dry_run: false,
    }
}

#[test]
fn workloads_are_indexed_by_uid_and_network_address() {
    let mut s = ProxyState::new();
    let mut w = workload("a", "10.0.0.1", vec![]);
    w.network = "net1".into();
    s.upsert_workload(w.clone());
    assert!(s.workload_by_uid(&w.uid).is_some());
    assert!(
        s.workload_by_ip(&NetworkAddress::new("net1", ip("10.0.0.1")))
            .is_some()
    );
    assert!(
        s.workload_by_ip(&NetworkAddress::new("", ip("10.0.0.1")))
            .is_none()
    );

    // Re-upsert with a new address drops the old index entry.
    w.addresses = vec![ip("10.0.0.2")];
    s.upsert_workload(w.clone());
    assert!(
        s.workload_by_ip(&NetworkAddress::new("net1", ip("10.0.0.1")))
            .is_none()
    );
    assert!(
        s.workload_by_ip(&NetworkAddress::new("net1", ip("10.0.0.2")))
            .is_some()
    );

    assert!(s.remove_workload(&w.uid));
    assert!(!s.remove_workload(&w.uid));
    assert!(
        s.workload_by_ip(&NetworkAddress::new("net1", ip("10.0.0.2")))
            .is_none()
    );
    assert_eq!(s.endpoints(&svc_key()).len(), 0);
}

#[test]
fn shared_address_falls_back_to_remaining_workload() {
    let mut s = ProxyState::new();
    let a = workload("a", "10.0.0.1", vec![]);
    let b = workload("b", "10.0.0.1", vec![]);
    s.upsert_workload(a.clone());
    s.upsert_workload(b.clone());
    let addr = NetworkAddress::new("", ip("10.0.0.1"));
    assert_eq!(s.workload_by_ip(&addr).unwrap().name, "b");
    s.remove_workload(&b.uid);
    assert_eq!(s.workload_by_ip(&addr).unwrap().name, "a");
}

#[test]
fn services_are_indexed_by_key_and_vip() {
    let mut s = ProxyState::new();
    s.upsert_service(service(vec![PortMapping::new(80, 8080)]));
    let vip: NetworkAddress = "/10.96.0.1".parse().unwrap();
    assert_eq!(s.service_by_vip(&vip).unwrap().key(), svc_key());
    assert!(s.service_by_key(&svc_key()).is_some());
    assert!(s.remove_service(&svc_key()));
    assert!(s.service_by_vip(&vip).is_none());
    assert!(!s.remove_service(&svc_key()));
}

#[test]
fn endpoints_follow_workload_service_membership() {
    let mut s = ProxyState::new();
    s.upsert_workload(workload("a", "10.0.0.1", vec![]));
    let mut b = workload("b", "10.0.0.2", vec![]);
    s.upsert_workload(b.clone());
    assert_eq!(s.endpoints(&svc_key()).len(), 2);
    b.services.clear();
    s.upsert_workload(b);
    let eps = s.endpoints(&svc_key());
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].name, "a");
}

#[test]
fn policies_for_selects_global_namespace_and_named() {
    let mut s = ProxyState::new();
    s.upsert_policy(auth("istio-system", "global", PolicyScope::Global));
    s.upsert_policy(auth("default", "ns-wide", PolicyScope::Namespace));
    s.upsert_policy(auth("other", "other-ns", PolicyScope::Namespace));
    s.upsert_policy(auth("default", "selected", PolicyScope::WorkloadSelector));
    s.upsert_policy(auth("default", "unselected", PolicyScope::WorkloadSelector));
    let mut w = workload("a", "10.0.0.1", vec![]);
    w.authorization_policies = vec![
        PolicyKey::new("default", "selected"),
        PolicyKey::new("default", "ns-wide"),
        PolicyKey::new("default", "missing"),
    ];
    let mut names: Vec<String> = s
        .policies_for(&w)
        .iter()
        .map(|p| p.key().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["default/ns-wide", "default/selected", "istio-system/global"]
    );

    // Changing scope on upsert moves the policy out of the namespace index.
    s.upsert_policy(auth("default", "ns-wide", PolicyScope::WorkloadSelector));
    w.authorization_policies.clear();
    let names: Vec<String> = s
        .policies_for(&w)
        .iter()
        .map(|p| p.key().to_string())
        .collect();
    assert_eq!(names, ["istio-system/global"]);
    assert!(s.remove_policy(&PolicyKey::new("istio-system", "global")));
    assert!(s.policies_for(&w).is_empty());
}

#[test]
fn xds_resources_apply_and_remove_by_name() {
    let mut s = ProxyState::new();
    let w = pb::Workload {
        uid: "Kubernetes//v1/Pod/default/a".into(),
        name: "a".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        ..Default::default()
    };
    let svc = pb::Service {
        name: "svc".into(),
        namespace: "default".into(),
        hostname: "svc.default.svc.cluster.local".into(),
        ..Default::default()
    };
    let wrap = |t| pb::Address { r#type: Some(t) };
    s.apply_address(&w.uid.clone(), wrap(pb::address::Type::Workload(w)))
        .unwrap();
    s.apply_address(
        "default/svc.default.svc.cluster.local",
        wrap(pb::address::Type::Service(svc)),
    )
    .unwrap();
    assert_eq!(s.counts(), (1, 1, 0));

    let bad = pb::Workload {
        uid: "x".into(),
        addresses: vec![vec![1]],
        namespace: "n".into(),
        ..Default::default()
    };
    let err = s
        .apply_address("x", wrap(pb::address::Type::Workload(bad)))
        .unwrap_err();
    assert!(err.to_string().contains("resource \"x\""), "{err}");

    assert!(s.remove_address("default/svc.default.svc.cluster.local"));
    assert!(s.remove_address("Kubernetes//v1/Pod/default/a"));
    assert!(!s.remove_address("Kubernetes//v1/Pod/default/a"));
    assert_eq!(s.counts(), (0, 0, 0));

    let p = sec::Authorization {
        name: "p".into(),
        namespace: "default".into(),
        ..Default::default()
    };
    s.apply_authorization("default/p", p).unwrap();
    assert!(s.policy(&PolicyKey::new("default", "p")).is_some());
    assert!(s.remove_authorization("default/p"));
    assert!(!s.remove_authorization("default/p"));
}

#[test]
fn pick_endpoint_round_robins_over_healthy_endpoints() {
    let store = StateStore::default();
    let svc = service(vec![PortMapping::new(80, 0)]);
    store.update(|s| {
        s.upsert_service(svc.clone());
        s.upsert_workload(workload("a", "10.0.0.1", vec![PortMapping::new(80, 8080)]));
        s.upsert_workload(workload("b", "10.0.0.2", vec![]));
        let mut c = workload("c", "10.0.0.3", vec![PortMapping::new(80, 8080)]);
        c.status = HealthStatus::Unhealthy;
        s.upsert_workload(c);
    });
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (w, port) = store.pick_endpoint(&svc, 80).unwrap();
        seen.push((w.name.clone(), port));
    }
    // a uses its own mapping; b has none, and the service says "same port".
    assert_eq!(
        seen,
        [
            ("a".into(), 8080),
            ("b".into(), 80),
            ("a".into(), 8080),
            ("b".into(), 80)
        ]
    );
}

#[test]
fn pick_endpoint_uses_service_target_then_requires_a_mapping() {
    let store = StateStore::default();
    let svc = service(vec![PortMapping::new(80, 9090)]);
    store.update(|s| {
        s.upsert_service(svc.clone());
        s.upsert_workload(workload("a", "10.0.0.1", vec![PortMapping::new(443, 8443)]));
    });
    assert_eq!(store.pick_endpoint(&svc, 80).unwrap().1, 9090);
    // 443 is only known to the workload.
    assert_eq!(store.pick_endpoint(&svc, 443).unwrap().1, 8443);
    assert!(store.pick_endpoint(&svc, 25).is_none());
}

#[test]
fn pick_endpoint_returns_none_when_all_unhealthy() {
    let store = StateStore::default();
    let svc = service(vec![PortMapping::new(80, 0)]);
    store.update(|s| {
        let mut a = workload("a", "10.0.0.1", vec![]);
        a.status = HealthStatus::Unhealthy;
        s.upsert_workload(a);
    });
    assert!(store.pick_endpoint(&svc, 80).is_none());
}

#[tokio::test]
async fn update_bumps_version_for_subscribers() {
    let store = StateStore::default();
    let mut rx = store.subscribe();
    assert_eq!(*rx.borrow_and_update(), 0);
    store.update(|s| s.upsert_service(service(vec![])));
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), 1);
    assert_eq!(store.version(), 1);
    let cloned = store.clone();
    cloned.update(|_| ());
    assert_eq!(store.version(), 2);
}

#[test]
fn dump_lists_everything_as_json() {
    let store = StateStore::default();
    store.update(|s| {
        s.upsert_workload(workload("a", "10.0.0.1", vec![PortMapping::new(80, 8080)]));
        s.upsert_service(service(vec![PortMapping::new(80, 0)]));
        s.upsert_policy(auth("default", "p", PolicyScope::Namespace));
    });
    let v = store.dump();
    assert_eq!(v["workloads"][0]["uid"], "Kubernetes//v1/Pod/default/a");
    assert_eq!(v["workloads"][0]["protocol"], "HBONE");
    assert_eq!(
        v["workloads"][0]["services"]["default/svc.default.svc.cluster.local"][0]["target_port"],
        8080
    );
    assert_eq!(v["services"][0]["vips"][0]["address"], "10.96.0.1");
    assert_eq!(v["policies"][0]["name"], "p");
    assert_eq!(v["policies"][0]["action"], "Allow");
}

#[test]
fn policies_for_returns_shared_arcs() {
    let mut s = ProxyState::new();
    s.upsert_policy(auth("istio-system", "g", PolicyScope::Global));
    let w = workload("a", "10.0.0.1", vec![]);
    let a = s.policies_for(&w);
    let b = s.policies_for(&w);
    assert!(Arc::ptr_eq(&a[0], &b[0]));
}

#[test]
fn workloads_are_found_by_namespace_and_name_until_removed() {
    let mut s = ProxyState::new();
    let w = workload("a", "10.0.0.1", vec![]);
    s.upsert_workload(w.clone());
    assert_eq!(s.workload_by_name("default", "a").unwrap().uid, w.uid);
    assert!(s.workload_by_name("other", "a").is_none());
    s.remove_workload(&w.uid);
    assert!(s.workload_by_name("default", "a").is_none());
}

#[test]
fn host_network_workloads_are_not_found_by_the_shared_node_ip() {
    let mut s = ProxyState::new();
    let mut a = workload("a", "10.0.0.9", vec![]);
    a.host_network = true;
    let mut b = workload("b", "10.0.0.9", vec![]);
    b.host_network = true;
    s.upsert_workload(a);
    s.upsert_workload(b);
    assert!(s.workload_by_ip(&"/10.0.0.9".parse().unwrap()).is_none());
    assert!(s.workload_by_name("default", "a").is_some());
}
