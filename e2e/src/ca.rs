//! A certificate authority for tests: Istio's CreateCertificate gRPC served (plaintext) from
//! inside a netns, backed by hbone's development CA, so tests hold the same root ztunnel trusts
//! and can mint client certificates of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hbone::Identity;
use hbone::ca::{FakeCa, IMPERSONATED_IDENTITY};
use hbone::certificate::WorkloadCertificate;
use tonic::{Request, Response, Status};
use xds::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use xds::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

use crate::netns::in_netns;

/// Bearer token the test CA accepts.
pub const TOKEN: &str = "test-node-token";

struct Service {
    ca: Arc<FakeCa>,
    issued: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
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
        let req = request.into_inner();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        // Without impersonation (dedicated mode) the caller asks for its own identity: the
        // one in its CSR. (A real CA takes it from the token; this one trusts the test.)
        let uri = match impersonated {
            Some(uri) => uri,
            None => csr_identity(&req.csr)?,
        };
        let id: Identity = uri
            .parse()
            .map_err(|_| Status::invalid_argument("bad identity"))?;
        let ttl = Duration::from_secs(u64::try_from(req.validity_duration).unwrap_or(3600));
        let cert_chain = self
            .ca
            .sign_csr(&req.csr, &id, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

fn csr_identity(csr_pem: &str) -> Result<String, Status> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
    csr.params
        .subject_alt_names
        .iter()
        .find_map(|san| match san {
            rcgen::SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .ok_or_else(|| Status::invalid_argument("CSR has no URI SAN"))
}

/// A running test CA.
pub struct TestCa {
    ca: Arc<FakeCa>,
    issued: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestCa {
    /// Serves on 127.0.0.1:`port` inside netns `ns` (where ztunnel runs).
    pub fn start(ns: &str, port: u16) -> Self {
        let ca = Arc::new(FakeCa::new("cluster.local").expect("test CA"));
        Self::serve(ca, Arc::new(AtomicU64::new(0)), ns, port)
    }

    /// Serves the same CA (same root, same counter) in another netns too.
    pub fn serve_also(&self, ns: &str, port: u16) -> Self {
        Self::serve(self.ca.clone(), self.issued.clone(), ns, port)
    }

    fn serve(ca: Arc<FakeCa>, issued: Arc<AtomicU64>, ns: &str, port: u16) -> Self {
        let listener = in_netns(ns, move || {
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind test CA")
        });
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = Service {
            ca: ca.clone(),
            issued: issued.clone(),
        };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(IstioCertificateServiceServer::new(service))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Self {
            ca,
            issued,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Issues a certificate directly (for test clients).
    pub fn issue(&self, id: &Identity) -> WorkloadCertificate {
        self.ca.issue(id, Duration::from_secs(3600)).unwrap()
    }

    /// Certificates issued over gRPC so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
