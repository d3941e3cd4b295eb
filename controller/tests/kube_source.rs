//! The kube source against the in-process API server stand-in: initial list, watch events,
//! reconnects resuming from the last resourceVersion, and relists after compaction that delete
//! what vanished while disconnected.

mod support {
    pub mod apiserver;
}

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use controller::config::{ConfigEvent, Kind, ObjectKey};
use controller::source::kube::KubeSource;
use serde_json::json;
use support::apiserver::ApiServer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn namespace(name: &str, ambient: bool) -> serde_json::Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "app", "image": "app"}], "nodeName": "node1"},
        "status": {"podIP": "10.0.0.5", "phase": "Running"}})
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

#[tokio::test]
async fn lists_watches_reconnects_and_relists() {
    let api = ApiServer::start().await;
    api.apply("namespaces", namespace("shop", true));
    api.apply("pods", pod("shop", "cart"));
    let config = kube::Config::new(api.url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let errs = errors.clone();
    let source = KubeSource::new(
        client,
        tx,
        Arc::new(move |k, e| errs.lock().unwrap().push(format!("{k}: {e}"))),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(source.run(stop.clone()));

    // Initial list of every kind, then Synced.
    let mut seen = Vec::new();
    until(&mut rx, &mut seen, |e| {
        e.iter().any(|e| matches!(e, ConfigEvent::Synced))
    })
    .await;
    let cart = ObjectKey::new(Kind::Pod, "shop", "cart");
    let shop = ObjectKey::new(Kind::Namespace, "", "shop");
    assert!(
        applied(&seen).contains(&cart) && applied(&seen).contains(&shop),
        "{seen:#?}"
    );

    // Watch events.
    seen.clear();
    api.apply("pods", pod("shop", "checkout"));
    api.delete("v1", "pods", "shop", "cart");
    let checkout = ObjectKey::new(Kind::Pod, "shop", "checkout");
    until(&mut rx, &mut seen, |e| {
        applied(e).contains(&checkout) && deleted(e).contains(&cart)
    })
    .await;

    // A cut watch resumes from its last version: only the new object arrives.
    seen.clear();
    api.cut_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.apply("pods", pod("shop", "payments"));
    let payments = ObjectKey::new(Kind::Pod, "shop", "payments");
    until(&mut rx, &mut seen, |e| applied(e).contains(&payments)).await;

    // Disconnected through a compaction: the relist deletes what vanished meanwhile.
    seen.clear();
    api.delete_while_disconnected("v1", "pods", "shop", "checkout");
    until(&mut rx, &mut seen, |e| deleted(e).contains(&checkout)).await;
    assert!(!deleted(&seen).contains(&payments), "{seen:#?}");

    stop.cancel();
    task.await.unwrap();
    api.stop();
}
