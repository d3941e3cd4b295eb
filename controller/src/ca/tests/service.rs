//! The CreateCertificate service: authentication, impersonation, TTL, and real clients over the
//! 15012-style TLS listener.

use std::time::Duration;

use hbone::{CaClientConfig, CertificateProvider, IstioCaClient};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::metadata::MetadataMap;
use xds::client::{ClientConfig, DeltaClient, Handler, Rejected, TokenSource};
use xds::istio::v1::auth::IstioCertificateRequest;
use xds::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use xds::{AUTHORIZATION_TYPE, Node, Resource};

use super::*;
use crate::xds::{XdsMetrics, XdsServer};

fn tokens() -> Arc<dyn Authenticator> {
    Arc::new(NodeTokens::from_yaml("nodes: {node1: tok1, node2: tok2}").unwrap())
}

/// Pods of namespace ns1 run on node1; nothing runs anywhere else.
fn pods_on_node1() -> NodeAuthorizer {
    Arc::new(|node: &str, id: &Identity| node == "node1" && id.namespace == "ns1")
}

fn service_with(auth: Arc<dyn Authenticator>, cfg: CaConfig) -> CaService {
    let ca = CertificateAuthority::from_material(
        &CertificateAuthority::generate_root(&cfg).unwrap(),
        cfg,
    )
    .unwrap();
    CaService::new(Arc::new(ca), auth, Some(pods_on_node1()))
}

fn request(
    csr: &str,
    ttl: i64,
    impersonate: Option<&str>,
    token: Option<&str>,
) -> Request<IstioCertificateRequest> {
    let metadata = impersonate.map(|uri| {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(uri.to_string())),
            },
        );
        s
    });
    let mut req = Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: ttl,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

async fn code(svc: &CaService, req: Request<IstioCertificateRequest>) -> tonic::Code {
    match svc.create_certificate(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

fn seconds_left(chain: &[String]) -> i64 {
    let der = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    leaf.validity()
        .time_to_expiration()
        .unwrap()
        .whole_seconds()
}

#[tokio::test]
async fn missing_or_wrong_token_is_unauthenticated() {
    let svc = service_with(tokens(), config());
    let want = id("ns1", "sa1");
    let uri = want.to_string();
    let (_, csr) = csr(&want);
    for token in [None, Some("wrong")] {
        let c = code(&svc, request(&csr, 0, Some(&uri), token)).await;
        assert_eq!(c, tonic::Code::Unauthenticated, "{token:?}");
    }
    assert_eq!(
        code(&svc, request(&csr, 0, Some(&uri), Some("tok1"))).await,
        tonic::Code::Ok
    );
}

#[tokio::test]
async fn node_may_impersonate_only_pods_on_its_node() {
    let svc = service_with(tokens(), config());
    let on_node1 = id("ns1", "sa1");
    let (_, csr1) = csr(&on_node1);
    let resp = svc
        .create_certificate(request(&csr1, 0, Some(&on_node1.to_string()), Some("tok1")))
        .await
        .unwrap()
        .into_inner();
    verify_chain(&resp.cert_chain).unwrap();
    assert_eq!(
        sans_of(&resp.cert_chain[0]),
        vec![format!("URI:{on_node1}")]
    );

    // node2 hosts no pod with that identity.
    let c = code(
        &svc,
        request(&csr1, 0, Some(&on_node1.to_string()), Some("tok2")),
    )
    .await;
    assert_eq!(c, tonic::Code::PermissionDenied);
    // node1 hosts no pod of ns2.
    let elsewhere = id("ns2", "sa1");
    let c = code(
        &svc,
        request(
            &csr(&elsewhere).1,
            0,
            Some(&elsewhere.to_string()),
            Some("tok1"),
        ),
    )
    .await;
    assert_eq!(c, tonic::Code::PermissionDenied);
    // A node token alone grants no identity of its own.
    assert_eq!(
        code(&svc, request(&csr1, 0, None, Some("tok1"))).await,
        tonic::Code::PermissionDenied
    );
    // The CSR must name the impersonated identity.
    let c = code(
        &svc,
        request(
            &csr(&id("ns1", "other")).1,
            0,
            Some(&on_node1.to_string()),
            Some("tok1"),
        ),
    )
    .await;
    assert_eq!(c, tonic::Code::InvalidArgument);
    // Garbage in the metadata is rejected as such.
    assert_eq!(
        code(&svc, request(&csr1, 0, Some("spiffe://x"), Some("tok1"))).await,
        tonic::Code::InvalidArgument
    );
}

#[tokio::test]
async fn workload_callers_get_only_their_own_identity() {
    let me = id("ns1", "me");
    let caller = me.clone();
    let auth = move |_: &MetadataMap| -> Result<Caller, tonic::Status> {
        Ok(Caller {
            identity: Some(caller.clone()),
            node: None,
        })
    };
    let svc = service_with(Arc::new(auth), config());
    assert_eq!(
        code(&svc, request(&csr(&me).1, 0, None, None)).await,
        tonic::Code::Ok
    );
    let other = id("ns1", "other");
    assert_eq!(
        code(&svc, request(&csr(&other).1, 0, None, None)).await,
        tonic::Code::InvalidArgument
    );
    // Impersonation needs a node caller even for a pod on a node.
    let c = code(
        &svc,
        request(&csr(&other).1, 0, Some(&other.to_string()), None),
    )
    .await;
    assert_eq!(c, tonic::Code::PermissionDenied);
    // Identities outside the CA's trust domain are never issued.
    let foreign = Identity::new("other.domain", "ns1", "me");
    let auth = move |_: &MetadataMap| -> Result<Caller, tonic::Status> {
        Ok(Caller {
            identity: Some(foreign.clone()),
            node: None,
        })
    };
    let svc = service_with(Arc::new(auth), config());
    let c = code(
        &svc,
        request(
            &csr(&Identity::new("other.domain", "ns1", "me")).1,
            0,
            None,
            None,
        ),
    )
    .await;
    assert_eq!(c, tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn requested_ttl_is_capped_and_defaulted() {
    let cfg = CaConfig {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
        ..config()
    };
    let svc = service_with(tokens(), cfg);
    let want = id("ns1", "sa1");
    let uri = want.to_string();
    let issue = |ttl: i64| {
        let svc = svc.clone();
        let uri = uri.clone();
        let csr = csr(&want).1;
        async move {
            let resp = svc
                .create_certificate(request(&csr, ttl, Some(&uri), Some("tok1")))
                .await
                .unwrap();
            seconds_left(&resp.into_inner().cert_chain)
        }
    };
    let capped = issue(48 * 3600).await;
    assert!((7190..=7200).contains(&capped), "{capped}");
    let defaulted = issue(0).await;
    assert!((3590..=3600).contains(&defaulted), "{defaulted}");
    let asked = issue(600).await;
    assert!((590..=600).contains(&asked), "{asked}");
}

/// Forwards resource names to the test.
struct Names(mpsc::Sender<Vec<String>>);

impl Handler for Names {
    fn handle(&mut self, _: &str, updates: Vec<Resource>, _: Vec<String>) -> Vec<Rejected> {
        let _ = self
            .0
            .try_send(updates.into_iter().map(|r| r.name).collect());
        Vec::new()
    }
}

#[tokio::test]
async fn istio_ca_client_and_delta_client_share_the_tls_listener() {
    let dir = tmpdir("e2e");
    let store = FileRootStore::new(&dir);
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&store, config())
            .await
            .unwrap(),
    );
    let serving = ca
        .issue_serving_cert(&ServingConfig {
            ips: vec!["127.0.0.1".parse().unwrap()],
            ..ServingConfig::default()
        })
        .unwrap();
    let ads = XdsServer::new(Arc::new(XdsMetrics::unregistered().unwrap()));
    let policy = prost_types::Any {
        type_url: AUTHORIZATION_TYPE.into(),
        value: vec![],
    };
    ads.update(AUTHORIZATION_TYPE, vec![("ns1/p".into(), policy)], vec![]);
    let svc = CaService::new(ca.clone(), tokens(), Some(pods_on_node1()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(crate::xds::serve(
        listener,
        ads.clone(),
        Some(svc),
        Some(serving.tls_config()),
        stop.clone(),
    ));

    // Clients trust what the CA published.
    let root = tokio::fs::read_to_string(store.published_roots())
        .await
        .unwrap();
    let ca_config = |root: String| CaClientConfig {
        address: format!("https://{addr}"),
        root_ca_pem: Some(root),
        token: TokenSource::Static("tok1".into()),
        cluster_id: "Kubernetes".into(),
        impersonate: true,
        ttl: Duration::from_secs(3600),
    };
    let client = IstioCaClient::new(ca_config(root.clone())).unwrap();
    let want = id("ns1", "sa1");
    let cert = client.fetch(&want).await.unwrap();
    assert_eq!(cert.identity, want);
    assert_eq!(cert.roots, ders(ca.root_pem()));
    let err = client.fetch(&id("ns2", "sa1")).await.unwrap_err();
    assert!(err.to_string().contains("no pod"), "{err}");
    // A client with another root refuses our serving certificate.
    let stranger = IstioCaClient::new(ca_config(test_ca().root_pem().to_string())).unwrap();
    assert!(stranger.fetch(&want).await.is_err());

    let (tx, mut rx) = mpsc::channel(8);
    let (delta, _subs) = DeltaClient::new(ClientConfig {
        address: format!("https://{addr}"),
        root_ca_pem: Some(root),
        tls_server_name: Some("istiod.istio-system.svc".into()),
        token: TokenSource::Static("tok1".into()),
        cluster_id: "Kubernetes".into(),
        node: Node {
            id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        },
        wildcard_types: vec![AUTHORIZATION_TYPE.into()],
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    });
    let client_stop = CancellationToken::new();
    tokio::spawn(delta.run(Names(tx), client_stop.clone()));
    let names = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names, vec!["ns1/p"]);

    client_stop.cancel();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
