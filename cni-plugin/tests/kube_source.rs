//! The node agent's kube source (`KubeSource::for_node`) against the in-process API server
//! stand-in: it lists and watches Namespaces and only the Pods scheduled on its node (field
//! selector `spec.nodeName`), and passes on label changes and deletions.

#[path = "../../controller/tests/support/apiserver.rs"]
mod apiserver;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiserver::ApiServer;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use meshconfig::config::{ConfigEvent, Kind, Object, ObjectKey};
use meshconfig::source::kube::KubeSource;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn namespace(name: &str, mode: Option<&str>) -> Value {
    let labels = match mode {
        Some(m) => json!({"istio.io/dataplane-mode": m}),
        None => json!({}),
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "app", "image": "app"}], "nodeName": node},
        "status": {"podIP": "10.0.0.5", "phase": "Running"}})
}

fn client(api: &ApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url.parse().unwrap())).unwrap()
}

/// Collects events until `pred` holds over everything received (or panics after 10 s).
async fn until(
    rx: &mut mpsc::Receiver<Vec<ConfigEvent>>,
    seen: &mut Vec<ConfigEvent>,
    pred: impl Fn(&[ConfigEvent]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pred(seen) {
        let batch = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out; got {seen:#?}"))
            .expect("source alive");
        seen.extend(batch);
    }
}

fn applied(events: &[ConfigEvent]) -> BTreeSet<ObjectKey> {
    events
        .iter()
        .filter_map(|e| match e {
            ConfigEvent::Apply(o) => Some(o.key()),
            _ => None,
        })
        .collect()
}

fn deleted(events: &[ConfigEvent]) -> BTreeSet<ObjectKey> {
    events
        .iter()
        .filter_map(|e| match e {
            ConfigEvent::Delete(k) => Some(k.clone()),
            _ => None,
        })
        .collect()
}

fn pods(events: &[ConfigEvent]) -> BTreeSet<ObjectKey> {
    applied(events)
        .into_iter()
        .chain(deleted(events))
        .filter(|k| k.kind == Kind::Pod)
        .collect()
}

/// The dataplane-mode label of the last applied version of namespace `name`, if any.
fn last_mode(events: &[ConfigEvent], name: &str) -> Option<Option<String>> {
    events.iter().rev().find_map(|e| match e {
        ConfigEvent::Apply(o) => match o.as_ref() {
            Object::Namespace(n) if n.metadata.name.as_deref() == Some(name) => Some(
                n.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("istio.io/dataplane-mode").cloned()),
            ),
            _ => None,
        },
        _ => None,
    })
}

#[tokio::test]
async fn node_source_sees_namespaces_and_only_pods_on_its_node() {
    let api = ApiServer::start().await;
    api.apply("namespaces", namespace("shop", Some("ambient")));
    api.apply("namespaces", namespace("legacy", None));
    api.apply("pods", pod("shop", "cart", "node-a"));
    api.apply("pods", pod("shop", "web", "node-b"));
    api.apply("pods", pod("legacy", "batch", "node-a"));
    let (tx, mut rx) = mpsc::channel(64);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let errs = errors.clone();
    let source = KubeSource::new(
        client(&api),
        tx,
        Arc::new(move |k, e| errs.lock().unwrap().push(format!("{k}: {e}"))),
    )
    .for_node("node-a");
    let stop = CancellationToken::new();
    let task = tokio::spawn(source.run(stop.clone()));

    // Initial list: both namespaces, node A's pods, then Synced.
    let mut seen = Vec::new();
    until(&mut rx, &mut seen, |e| {
        e.iter().any(|e| matches!(e, ConfigEvent::Synced))
    })
    .await;
    let key = |kind, ns: &str, name: &str| ObjectKey::new(kind, ns, name);
    let all = applied(&seen);
    assert!(all.contains(&key(Kind::Namespace, "", "shop")), "{seen:#?}");
    assert!(
        all.contains(&key(Kind::Namespace, "", "legacy")),
        "{seen:#?}"
    );
    assert_eq!(
        pods(&seen),
        BTreeSet::from([
            key(Kind::Pod, "shop", "cart"),
            key(Kind::Pod, "legacy", "batch")
        ])
    );
    // A node agent watches only what it needs.
    assert_eq!(api.request_count("GET", "/api/v1/services"), 0);
    assert_eq!(
        api.request_count("GET", "/apis/discovery.k8s.io/v1/endpointslices"),
        0
    );

    // Watch: a pod on node B is filtered out; the node A pod created after it arrives alone.
    seen.clear();
    api.apply("pods", pod("shop", "checkout-b", "node-b"));
    api.apply("pods", pod("shop", "checkout-a", "node-a"));
    until(&mut rx, &mut seen, |e| {
        applied(e).contains(&key(Kind::Pod, "shop", "checkout-a"))
    })
    .await;
    assert_eq!(
        pods(&seen),
        BTreeSet::from([key(Kind::Pod, "shop", "checkout-a")])
    );

    // Namespace label changes arrive as events carrying the new labels.
    seen.clear();
    api.apply("namespaces", namespace("legacy", Some("ambient")));
    until(&mut rx, &mut seen, |e| {
        last_mode(e, "legacy") == Some(Some("ambient".into()))
    })
    .await;
    seen.clear();
    api.apply("namespaces", namespace("shop", None));
    until(&mut rx, &mut seen, |e| last_mode(e, "shop") == Some(None)).await;

    // Deletions: node B's is never seen, node A's arrives.
    seen.clear();
    api.delete("v1", "pods", "shop", "web");
    api.delete("v1", "pods", "shop", "cart");
    until(&mut rx, &mut seen, |e| {
        deleted(e).contains(&key(Kind::Pod, "shop", "cart"))
    })
    .await;
    assert_eq!(
        pods(&seen),
        BTreeSet::from([key(Kind::Pod, "shop", "cart")])
    );

    stop.cancel();
    task.await.unwrap();
    api.stop();
    assert!(errors.lock().unwrap().is_empty(), "{:?}", errors.lock());
}

#[tokio::test]
async fn stand_in_honours_field_selectors_on_list() {
    let api = ApiServer::start().await;
    api.apply("pods", pod("shop", "cart", "node-a"));
    api.apply("pods", pod("shop", "web", "node-b"));
    api.apply("pods", pod("legacy", "batch", "node-a"));
    let pods = Api::<Pod>::all(client(&api));
    let names = |list: kube::core::ObjectList<Pod>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect()
    };
    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(names(on_a), ["batch", "cart"]);
    let not_a = pods
        .list(&ListParams::default().fields("spec.nodeName!=node-a"))
        .await
        .unwrap();
    assert_eq!(names(not_a), ["web"]);
    let both = pods
        .list(&ListParams::default().fields("metadata.name=cart,spec.nodeName==node-a"))
        .await
        .unwrap();
    assert_eq!(names(both), ["cart"]);
    let none = pods
        .list(&ListParams::default().fields("metadata.name=cart,spec.nodeName=node-b"))
        .await
        .unwrap();
    assert!(names(none).is_empty());
    api.stop();
}
