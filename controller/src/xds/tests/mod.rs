//! Conformance of the delta-ADS server, driven by our own delta client (`xds::client`) and, for
//! nonce-level details, by a raw gRPC stream.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::metadata::MetadataMap;
use xds::client::{ClientConfig, DeltaClient, Handler, Rejected, SubscriptionHandle, TokenSource};
use xds::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds::istio::workload::{Address, Workload, address};
use xds::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource,
};

mod raw;

use super::*;
use crate::ca::{Caller, bearer_token};

const WAIT: Duration = Duration::from_secs(5);

fn any(type_url: &str, body: &str) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.into(),
        value: body.as_bytes().to_vec(),
    }
}

fn policy(name: &str, body: &str) -> (String, prost_types::Any) {
    (name.to_string(), any(AUTHORIZATION_TYPE, body))
}

fn workload(uid: &str, ip: [u8; 4], tag: &str) -> (String, prost_types::Any) {
    let a = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.into(),
            name: tag.into(),
            namespace: "ns".into(),
            network: "net".into(),
            addresses: vec![ip.to_vec()],
            ..Default::default()
        })),
    };
    (
        uid.to_string(),
        prost_types::Any {
            type_url: ADDRESS_TYPE.into(),
            value: a.encode_to_vec(),
        },
    )
}

struct TestServer {
    xds: XdsServer,
    metrics: Arc<XdsMetrics>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(config: XdsConfig, auth: Option<Arc<dyn Authenticator>>) -> TestServer {
    let metrics = Arc::new(XdsMetrics::unregistered().unwrap());
    let xds = XdsServer::with_config(metrics.clone(), config, auth);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, xds.clone(), None, None, stop.clone()));
    TestServer {
        xds,
        metrics,
        addr,
        stop,
    }
}

fn fast() -> XdsConfig {
    XdsConfig {
        debounce: Duration::from_millis(10),
        max_debounce: Duration::from_millis(100),
        ..XdsConfig::default()
    }
}

/// One response as the client's handler saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    type_url: String,
    /// (name, aliases)
    updated: Vec<(String, Vec<String>)>,
    removed: Vec<String>,
}

impl Seen {
    fn names(&self) -> BTreeSet<&str> {
        self.updated.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// Forwards each response to the test; rejects resources named `bad*`.
struct Recorder {
    tx: mpsc::Sender<Seen>,
    connects: mpsc::Sender<()>,
}

impl Handler for Recorder {
    fn handle(
        &mut self,
        type_url: &str,
        updates: Vec<Resource>,
        removed: Vec<String>,
    ) -> Vec<Rejected> {
        let rejected = updates
            .iter()
            .filter(|r| r.name.starts_with("bad"))
            .map(|r| Rejected {
                name: r.name.clone(),
                error: "bad resource".into(),
            })
            .collect();
        let _ = self.tx.try_send(Seen {
            type_url: type_url.to_string(),
            updated: updates.into_iter().map(|r| (r.name, r.aliases)).collect(),
            removed,
        });
        rejected
    }

    fn connected(&mut self) {
        let _ = self.connects.try_send(());
    }
}

struct TestClient {
    seen: mpsc::Receiver<Seen>,
    connects: mpsc::Receiver<()>,
    subs: SubscriptionHandle,
    stop: CancellationToken,
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestClient {
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("response within 5s")
            .expect("client running")
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(Some(s)) = tokio::time::timeout(d, self.seen.recv()).await {
            panic!("unexpected response {s:?}");
        }
    }
}

fn client(addr: SocketAddr, types: &[&str], backoff: Duration) -> TestClient {
    let config = ClientConfig {
        address: format!("http://{addr}"),
        root_ca_pem: None,
        tls_server_name: None,
        token: TokenSource::None,
        cluster_id: "Kubernetes".into(),
        node: Node {
            id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        },
        wildcard_types: types.iter().map(|t| t.to_string()).collect(),
        initial_backoff: backoff,
        max_backoff: backoff,
    };
    let (c, subs) = DeltaClient::new(config);
    let (tx, seen) = mpsc::channel(256);
    let (ctx, connects) = mpsc::channel(16);
    let stop = CancellationToken::new();
    tokio::spawn(c.run(Recorder { tx, connects: ctx }, stop.clone()));
    TestClient {
        seen,
        connects,
        subs,
        stop,
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn nacks(m: &XdsMetrics, t: &str) -> u64 {
    m.nacks.with_label_values(&[metrics::type_label(t)]).get()
}

fn acks(xds: &XdsServer) -> u64 {
    xds.connections().iter().map(|c| c.acks).sum()
}

#[tokio::test]
async fn wildcard_subscriber_receives_everything_and_acks() {
    let s = start(fast(), None).await;
    s.xds.update(
        ADDRESS_TYPE,
        vec![
            workload("w1", [10, 0, 0, 1], "a"),
            workload("w2", [10, 0, 0, 2], "b"),
        ],
        vec![],
    );
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("ns/p", "x")], vec![]);
    let mut c = client(
        s.addr,
        &[ADDRESS_TYPE, AUTHORIZATION_TYPE],
        Duration::from_millis(50),
    );
    let mut got = [c.next().await, c.next().await];
    got.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    assert_eq!(got[0].type_url, AUTHORIZATION_TYPE);
    assert_eq!(got[0].names(), BTreeSet::from(["ns/p"]));
    assert_eq!(got[1].type_url, ADDRESS_TYPE);
    assert_eq!(got[1].names(), BTreeSet::from(["w1", "w2"]));
    eventually("two ACKs", || acks(&s.xds) == 2).await;
    let info = &s.xds.connections()[0];
    assert!(info.node_id.starts_with("ztunnel~"), "{info:?}");
    assert_eq!((info.responses, info.resources_sent, info.nacks), (2, 3, 0));
    assert_eq!(s.metrics.connected.get(), 1);
    drop(c);
    eventually("disconnect", || s.metrics.connected.get() == 0).await;
}

#[tokio::test]
async fn empty_type_still_gets_a_first_response() {
    let s = start(fast(), None).await;
    let mut c = client(s.addr, &[AUTHORIZATION_TYPE], Duration::from_millis(50));
    let first = c.next().await;
    assert!(first.updated.is_empty() && first.removed.is_empty());
}

#[tokio::test]
async fn rejected_resource_is_nacked_rest_kept_and_same_version_not_resent() {
    let s = start(fast(), None).await;
    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("good1", "1"), policy("bad1", "1")],
        vec![],
    );
    let mut c = client(s.addr, &[AUTHORIZATION_TYPE], Duration::from_millis(50));
    assert_eq!(c.next().await.names(), BTreeSet::from(["bad1", "good1"]));
    eventually("NACK counted", || {
        nacks(&s.metrics, AUTHORIZATION_TYPE) == 1
    })
    .await;

    // A later push carries only the new resource; the rejected version is not sent again.
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("good2", "1")], vec![]);
    assert_eq!(c.next().await.names(), BTreeSet::from(["good2"]));
    eventually("ACK of the second push", || acks(&s.xds) == 1).await;
    c.nothing_for(Duration::from_millis(150)).await;
    assert_eq!(nacks(&s.metrics, AUTHORIZATION_TYPE), 1);

    // A new version of the rejected resource is sent (and rejected) once more.
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("bad1", "2")], vec![]);
    assert_eq!(c.next().await.names(), BTreeSet::from(["bad1"]));
    eventually("second NACK", || nacks(&s.metrics, AUTHORIZATION_TYPE) == 2).await;
    c.nothing_for(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn updates_push_only_changed_names_and_removals() {
    let s = start(fast(), None).await;
    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("a", "1"), policy("b", "1"), policy("c", "1")],
        vec![],
    );
    let mut c = client(s.addr, &[AUTHORIZATION_TYPE], Duration::from_millis(50));
    assert_eq!(c.next().await.names().len(), 3);

    // `a` is re-sent with identical content: not a change.
    assert_eq!(
        s.xds.update(
            AUTHORIZATION_TYPE,
            vec![policy("a", "1"), policy("b", "2")],
            vec![]
        ),
        1
    );
    let seen = c.next().await;
    assert_eq!(seen.names(), BTreeSet::from(["b"]));
    assert!(seen.removed.is_empty());

    s.xds.update(AUTHORIZATION_TYPE, vec![], vec!["c".into()]);
    let seen = c.next().await;
    assert!(seen.updated.is_empty());
    assert_eq!(seen.removed, vec!["c"]);

    // A burst that adds and removes `d` before the push never mentions `d`.
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("d", "1")], vec![]);
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("e", "1")], vec!["d".into()]);
    let seen = c.next().await;
    assert_eq!(seen.names(), BTreeSet::from(["e"]));
    assert!(seen.removed.is_empty(), "{seen:?}");
    c.nothing_for(Duration::from_millis(100)).await;

    // replace_all removes what is not listed.
    s.xds
        .replace_all(AUTHORIZATION_TYPE, vec![policy("a", "1"), policy("f", "1")]);
    let seen = c.next().await;
    assert_eq!(seen.names(), BTreeSet::from(["f"]));
    assert_eq!(seen.removed, vec!["b", "e"]);
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_only_differences() {
    let s = start(fast(), None).await;
    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("a", "1"), policy("b", "1"), policy("c", "1")],
        vec![],
    );
    // A long backoff leaves time to change the store while the client is away.
    let mut c = client(s.addr, &[AUTHORIZATION_TYPE], Duration::from_secs(1));
    assert_eq!(c.next().await.names().len(), 3);
    eventually("ACK", || acks(&s.xds) == 1).await;

    s.xds.disconnect_all();
    eventually("stream closed", || s.xds.connection_count() == 0).await;
    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("b", "2"), policy("d", "1")],
        vec!["c".into()],
    );
    let seen = c.next().await;
    assert_eq!(seen.names(), BTreeSet::from(["b", "d"]));
    assert_eq!(seen.removed, vec!["c"]);
    assert_eq!(c.connects.try_recv().ok(), Some(()));
    assert_eq!(c.connects.try_recv().ok(), Some(()), "reconnected once");
    c.nothing_for(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn on_demand_subscription_by_name_alias_and_missing_key() {
    let s = start(fast(), None).await;
    s.xds.update(
        ADDRESS_TYPE,
        vec![
            workload("w1", [10, 0, 0, 9], "v1"),
            workload("w2", [10, 0, 0, 10], "v1"),
        ],
        vec![],
    );
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("ns/p", "1")], vec![]);
    let mut c = client(s.addr, &[], Duration::from_millis(50));
    c.nothing_for(Duration::from_millis(100)).await;

    assert!(
        c.subs
            .subscribe(ADDRESS_TYPE, vec!["net/10.0.0.9".into()])
            .await
    );
    let seen = c.next().await;
    assert_eq!(seen.type_url, ADDRESS_TYPE);
    assert_eq!(
        seen.updated,
        vec![("w1".to_string(), vec!["net/10.0.0.9".to_string()])]
    );

    assert!(
        c.subs
            .subscribe(ADDRESS_TYPE, vec!["net/10.9.9.9".into()])
            .await
    );
    let seen = c.next().await;
    assert!(seen.updated.is_empty());
    assert_eq!(seen.removed, vec!["net/10.9.9.9"]);

    assert!(
        c.subs
            .subscribe(AUTHORIZATION_TYPE, vec!["ns/p".into()])
            .await
    );
    assert_eq!(c.next().await.names(), BTreeSet::from(["ns/p"]));

    // Changes to resources nobody subscribed to are not pushed; subscribed ones are.
    s.xds.update(
        ADDRESS_TYPE,
        vec![workload("w2", [10, 0, 0, 10], "v2")],
        vec![],
    );
    c.nothing_for(Duration::from_millis(100)).await;
    s.xds.update(
        ADDRESS_TYPE,
        vec![workload("w1", [10, 0, 0, 9], "v2")],
        vec![],
    );
    let seen = c.next().await;
    assert_eq!(
        seen.updated,
        vec![("w1".to_string(), vec!["net/10.0.0.9".to_string()])]
    );
    s.xds.update(ADDRESS_TYPE, vec![], vec!["w1".into()]);
    assert_eq!(c.next().await.removed, vec!["w1"]);
}

#[tokio::test]
async fn proxy_behind_the_change_log_is_resynced_by_reconnecting() {
    // A one-entry change log: any burst of two changes outruns it.
    let config = XdsConfig {
        change_log: 1,
        ..fast()
    };
    let s = start(config, None).await;
    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("a", "1"), policy("b", "1"), policy("c", "1")],
        vec![],
    );
    let mut c = client(s.addr, &[AUTHORIZATION_TYPE], Duration::from_millis(50));
    assert_eq!(c.next().await.names().len(), 3);
    eventually("ACK", || acks(&s.xds) == 1).await;

    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("a", "2"), policy("d", "1")],
        vec!["b".into()],
    );
    // The proxy reconnects with its versions and gets exactly the differences.
    let seen = c.next().await;
    assert_eq!(seen.names(), BTreeSet::from(["a", "d"]));
    assert_eq!(seen.removed, vec!["b"]);
    assert_eq!(s.metrics.resyncs.get(), 1);
    c.nothing_for(Duration::from_millis(100)).await;
}
