use std::net::SocketAddr;

use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use xds::istio::v1::auth::IstioCertificateResponse;
use xds::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};

use super::*;

const TOKEN: &str = "secret-token";

struct TestCa {
    ca: Arc<FakeCa>,
}

#[tonic::async_trait]
impl IstioCertificateService for TestCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated("bad token"));
        }
        if request.metadata().get("clusterid").is_none() {
            return Err(Status::invalid_argument("no clusterid"));
        }
        let req = request.into_inner();
        let kind = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| v.kind.clone());
        let Some(prost_types::value::Kind::StringValue(uri)) = kind else {
            return Err(Status::invalid_argument("no ImpersonatedIdentity"));
        };
        let id: Identity = uri
            .parse()
            .map_err(|_| Status::invalid_argument("bad identity"))?;
        let ttl = Duration::from_secs(u64::try_from(req.validity_duration).unwrap_or(0));
        let cert_chain = self
            .ca
            .sign_csr(&req.csr, &id, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

async fn serve(
    ca: Arc<FakeCa>,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    let router = builder.add_service(IstioCertificateServiceServer::new(TestCa { ca }));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (addr, task)
}

fn config(address: String, token: &str) -> CaClientConfig {
    CaClientConfig {
        address,
        token: TokenSource::Static(token.to_string()),
        cluster_id: "Kubernetes".into(),
        impersonate: true,
        ttl: Duration::from_secs(3600),
        ..CaClientConfig::default()
    }
}

#[tokio::test]
async fn istio_ca_client_fetches_impersonated_identity() {
    let ca = Arc::new(FakeCa::new("cluster.local").unwrap());
    let (addr, task) = serve(ca.clone(), None).await;
    let client = IstioCaClient::new(config(format!("http://{addr}"), TOKEN)).unwrap();
    let id = Identity::new("cluster.local", "ns1", "sa1");
    let cert = client.fetch(&id).await.unwrap();
    assert_eq!(cert.identity, id);
    let life = cert.lifetime().as_secs();
    assert!((3600..=3602).contains(&life), "lifetime {life}");
    // The channel is reused for a second identity.
    let id2 = Identity::new("cluster.local", "ns2", "sa2");
    assert_eq!(client.fetch(&id2).await.unwrap().identity, id2);
    task.abort();
}

#[tokio::test]
async fn istio_ca_client_fails_with_wrong_token() {
    let ca = Arc::new(FakeCa::new("cluster.local").unwrap());
    let (addr, task) = serve(ca, None).await;
    let client = IstioCaClient::new(config(format!("http://{addr}"), "nope")).unwrap();
    let err = client
        .fetch(&Identity::new("cluster.local", "ns1", "sa1"))
        .await
        .unwrap_err();
    match err {
        CaError::Status(s) => assert_eq!(s.code(), tonic::Code::Unauthenticated),
        other => panic!("unexpected {other}"),
    }
    task.abort();
}

#[tokio::test]
async fn istio_ca_client_reads_token_file_each_time() {
    let ca = Arc::new(FakeCa::new("cluster.local").unwrap());
    let (addr, task) = serve(ca, None).await;
    let path = std::env::temp_dir().join(format!("hbone-ca-token-{}", std::process::id()));
    tokio::fs::write(&path, "wrong\n").await.unwrap();
    let mut cfg = config(format!("http://{addr}"), "");
    cfg.token = TokenSource::File(path.clone());
    let client = IstioCaClient::new(cfg).unwrap();
    let id = Identity::new("cluster.local", "ns1", "sa1");
    assert!(client.fetch(&id).await.is_err());
    tokio::fs::write(&path, format!("{TOKEN}\n")).await.unwrap();
    assert_eq!(client.fetch(&id).await.unwrap().identity, id);
    let _ = tokio::fs::remove_file(&path).await;
    task.abort();
}

/// A serving certificate from the mesh root for the CA's address (IP SAN) and Istio's DNS name,
/// plus the control plane's SPIFFE identity, as the controller issues its own.
fn ca_server_tls(ca: &FakeCa) -> tonic::transport::ServerTlsConfig {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let sans = vec![
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::DnsName("istiod.istio-system.svc".try_into().unwrap()),
        SanType::URI(
            "spiffe://cluster.local/ns/istio-system/sa/istiod"
                .try_into()
                .unwrap(),
        ),
    ];
    let cert = leaf_profile(sans, now - Duration::from_secs(1), now + DEFAULT_TTL)
        .signed_by(&key, &ca.issuer)
        .unwrap();
    tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        cert.pem(),
        key.serialize_pem(),
    ))
}

/// A certificate the CA hands to a pod: SPIFFE URI SAN only.
fn workload_server_tls(ca: &FakeCa, id: &Identity) -> tonic::transport::ServerTlsConfig {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let chain = ca
        .sign_csr(&make_csr(id, &key).unwrap(), id, DEFAULT_TTL)
        .unwrap();
    tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        &chain[0],
        key.serialize_pem(),
    ))
}

#[tokio::test]
async fn istio_ca_client_accepts_a_serving_cert_for_the_dialed_address() {
    let ca = Arc::new(FakeCa::new("cluster.local").unwrap());
    let (addr, task) = serve(ca.clone(), Some(ca_server_tls(&ca))).await;
    let mut cfg = config(format!("https://{addr}"), TOKEN);
    cfg.root_ca_pem = Some(ca.root_pem().to_string());
    let client = IstioCaClient::new(cfg).unwrap();
    let id = Identity::new("cluster.local", "ns1", "sa1");
    assert_eq!(client.fetch(&id).await.unwrap().identity, id);
    task.abort();
}

/// The error chain of a failed fetch, for asserting on why it failed.
fn chain(err: &CaError) -> String {
    let mut out = err.to_string();
    let mut src = std::error::Error::source(err);
    while let Some(e) = src {
        out.push_str(&format!(": {e}"));
        src = e.source();
    }
    out
}

#[tokio::test]
async fn istio_ca_client_rejects_a_workload_certificate_posing_as_the_ca() {
    // Same root, but a workload's certificate: no name for the dialed address. Not even the
    // control plane's own SPIFFE identity passes, since a node proxy may obtain it for a pod on
    // its node.
    let ca = Arc::new(FakeCa::new("cluster.local").unwrap());
    for id in [
        Identity::new(ca.trust_domain(), "default", "attacker"),
        Identity::new(ca.trust_domain(), "istio-system", "istiod"),
    ] {
        let (addr, task) = serve(ca.clone(), Some(workload_server_tls(&ca, &id))).await;
        let mut cfg = config(format!("https://{addr}"), TOKEN);
        cfg.root_ca_pem = Some(ca.root_pem().to_string());
        let client = IstioCaClient::new(cfg).unwrap();
        let err = client
            .fetch(&Identity::new("cluster.local", "ns1", "sa1"))
            .await
            .unwrap_err();
        let why = chain(&err);
        assert!(why.contains("NotValidForName"), "{id}: {why}");
        task.abort();
    }
}

#[tokio::test]
async fn istio_ca_client_rejects_serving_cert_from_other_root() {
    let ca = Arc::new(FakeCa::new("cluster.local").unwrap());
    let (addr, task) = serve(ca.clone(), Some(ca_server_tls(&ca))).await;
    let other = FakeCa::new("cluster.local").unwrap();
    let mut cfg = config(format!("https://{addr}"), TOKEN);
    cfg.root_ca_pem = Some(other.root_pem().to_string());
    let client = IstioCaClient::new(cfg).unwrap();
    let err = client
        .fetch(&Identity::new("cluster.local", "ns1", "sa1"))
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Status(_)), "{err}");
    task.abort();
}

#[test]
fn fake_ca_refuses_csr_for_other_identity() {
    let ca = FakeCa::new("cluster.local").unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let asked = Identity::new("cluster.local", "a", "a");
    let csr = make_csr(&asked, &key).unwrap();
    let other = Identity::new("cluster.local", "b", "b");
    assert!(matches!(
        ca.sign_csr(&csr, &other, DEFAULT_TTL),
        Err(CaError::CsrIdentity(_))
    ));
    assert!(ca.sign_csr("junk", &asked, DEFAULT_TTL).is_err());
}

#[tokio::test]
async fn fake_ca_provider_uses_configured_ttl() {
    let ca = FakeCa::new("td")
        .unwrap()
        .with_ttl(Duration::from_secs(120));
    let id = Identity::new("td", "n", "s");
    let cert = ca.fetch(&id).await.unwrap();
    assert_eq!(cert.identity, id);
    let life = cert.lifetime().as_secs();
    assert!((120..=122).contains(&life), "lifetime {life}");
}

#[test]
fn client_config_rejects_bad_address_and_roots() {
    let mut cfg = CaClientConfig {
        address: "http://".into(),
        ..CaClientConfig::default()
    };
    assert!(matches!(
        IstioCaClient::new(cfg.clone()),
        Err(CaError::Config(_))
    ));
    cfg.address = "istiod:15012".into();
    cfg.root_ca_pem = Some("not pem".into());
    assert!(matches!(IstioCaClient::new(cfg), Err(CaError::Config(_))));
}
