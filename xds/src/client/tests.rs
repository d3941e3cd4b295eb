//! The delta client against an in-process ADS server that scripts responses and records requests.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// One accepted stream: what the client sent, and a sender to push responses.
struct Conn {
    requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    metadata: tonic::metadata::MetadataMap,
}

#[derive(Clone)]
struct Server {
    conns: mpsc::Sender<Conn>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Server {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let (req_tx, req_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbound.next().await {
                if req_tx.send(r).await.is_err() {
                    break;
                }
            }
        });
        let (resp_tx, resp_rx) = mpsc::channel(16);
        let _ = self
            .conns
            .send(Conn {
                requests: req_rx,
                responses: resp_tx,
                metadata,
            })
            .await;
        Ok(Response::new(Box::pin(ReceiverStream::new(resp_rx))))
    }
}

async fn start_server() -> (String, mpsc::Receiver<Conn>, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Server { conns: tx }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), s.cancelled())
            .await
            .unwrap();
    });
    (format!("http://{addr}"), rx, stop)
}

/// Records what it was given; rejects resources named `bad*`.
#[derive(Clone, Default)]
struct Recorder {
    applied: Arc<Mutex<Vec<String>>>,
    removed: Arc<Mutex<Vec<String>>>,
}

impl Handler for Recorder {
    fn handle(&mut self, _t: &str, updates: Vec<Resource>, removed: Vec<String>) -> Vec<Rejected> {
        let mut rejected = vec![];
        for r in updates {
            if r.name.starts_with("bad") {
                rejected.push(Rejected {
                    name: r.name,
                    error: "malformed".into(),
                });
            } else {
                self.applied.lock().unwrap().push(r.name);
            }
        }
        self.removed.lock().unwrap().extend(removed);
        rejected
    }
}

fn config(address: String) -> ClientConfig {
    ClientConfig {
        address,
        root_ca_pem: None,
        tls_server_name: None,
        token: TokenSource::Static("tok".into()),
        cluster_id: "c1".into(),
        node: Node {
            id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        },
        wildcard_types: vec!["t/a".into()],
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    }
}

fn resource(name: &str, version: &str) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        ..Default::default()
    }
}

async fn next(conn: &mut Conn) -> DeltaDiscoveryRequest {
    tokio::time::timeout(Duration::from_secs(5), conn.requests.recv())
        .await
        .expect("request within 5s")
        .expect("stream open")
}

async fn accept(conns: &mut mpsc::Receiver<Conn>) -> Conn {
    tokio::time::timeout(Duration::from_secs(5), conns.recv())
        .await
        .expect("connection within 5s")
        .unwrap()
}

#[tokio::test]
async fn subscribes_acks_nacks_and_resumes_with_versions() {
    let (addr, mut conns, stop) = start_server().await;
    let (client, _subs) = DeltaClient::new(config(addr));
    let rec = Recorder::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(client.run(rec.clone(), shutdown.clone()));

    let mut conn = accept(&mut conns).await;
    assert_eq!(conn.metadata.get("authorization").unwrap(), "Bearer tok");
    assert_eq!(conn.metadata.get("clusterid").unwrap(), "c1");
    let first = next(&mut conn).await;
    assert_eq!(first.type_url, "t/a");
    assert!(first.node.is_some(), "node sent on the first request");
    assert!(
        first.resource_names_subscribe.is_empty(),
        "wildcard subscription"
    );
    assert!(first.initial_resource_versions.is_empty());

    let resp = DeltaDiscoveryResponse {
        type_url: "t/a".into(),
        nonce: "n1".into(),
        resources: vec![
            resource("good", "v1"),
            resource("bad", "v1"),
            resource("gone", "v1"),
        ],
        ..Default::default()
    };
    conn.responses.send(Ok(resp)).await.unwrap();
    let nack = next(&mut conn).await;
    assert_eq!(nack.response_nonce, "n1");
    let detail = nack.error_detail.expect("NACK carries error_detail");
    assert!(
        detail.message.contains("bad: malformed"),
        "{}",
        detail.message
    );
    assert_eq!(*rec.applied.lock().unwrap(), vec!["good", "gone"]);

    let resp = DeltaDiscoveryResponse {
        type_url: "t/a".into(),
        nonce: "n2".into(),
        removed_resources: vec!["gone".into()],
        ..Default::default()
    };
    conn.responses.send(Ok(resp)).await.unwrap();
    let ack = next(&mut conn).await;
    assert_eq!(ack.response_nonce, "n2");
    assert!(ack.error_detail.is_none(), "plain ACK");
    assert_eq!(*rec.removed.lock().unwrap(), vec!["gone"]);

    // The server drops the stream: the client reconnects and reports what it holds.
    conn.responses
        .send(Err(Status::unavailable("restart")))
        .await
        .unwrap();
    drop(conn);
    let mut conn = accept(&mut conns).await;
    let resumed = next(&mut conn).await;
    let versions: Vec<_> = resumed.initial_resource_versions.into_iter().collect();
    assert_eq!(versions, vec![("good".to_string(), "v1".to_string())]);

    shutdown.cancel();
    task.await.unwrap();
    stop.cancel();
}

#[tokio::test]
async fn on_demand_subscription_is_sent_once_and_kept_across_reconnects() {
    let (addr, mut conns, stop) = start_server().await;
    let (client, subs) = DeltaClient::new(config(addr));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(client.run(Recorder::default(), shutdown.clone()));
    let mut conn = accept(&mut conns).await;
    next(&mut conn).await;

    assert!(subs.subscribe("t/a", vec!["net/10.0.0.9".into()]).await);
    let req = next(&mut conn).await;
    assert_eq!(req.resource_names_subscribe, vec!["net/10.0.0.9"]);
    // Asking again for the same name sends nothing new.
    assert!(subs.subscribe("t/a", vec!["net/10.0.0.9".into()]).await);
    conn.responses
        .send(Err(Status::unavailable("restart")))
        .await
        .unwrap();
    drop(conn);
    let mut conn = accept(&mut conns).await;
    let resumed = next(&mut conn).await;
    assert_eq!(resumed.resource_names_subscribe, vec!["*", "net/10.0.0.9"]);

    shutdown.cancel();
    task.await.unwrap();
    stop.cancel();
}
