//! Certificate providers: the Istio CA gRPC client and an in-process fake CA for development.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::codegen::Service;
use tonic::codegen::http::Uri;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use xds::istio::v1::auth::IstioCertificateRequest;
use xds::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

use crate::Identity;
use crate::certificate::{CertificateError, WorkloadCertificate};
use crate::tls::TlsError;

/// Default certificate lifetime requested from a CA.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// gRPC metadata key naming the identity a node proxy asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA client configuration is unusable.
    #[error("CA client config: {0}")]
    Config(String),
    /// TLS setup for the CA connection failed.
    #[error("CA TLS: {0}")]
    Tls(#[from] TlsError),
    /// The CA answered with a gRPC error (or could not be reached).
    #[error("CA request failed: {0}")]
    Status(Box<tonic::Status>),
    /// The token file could not be read.
    #[error("reading token {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// The read error.
        source: io::Error,
    },
    /// A value cannot be carried in gRPC metadata.
    #[error("invalid metadata value for {0}")]
    Metadata(&'static str),
    /// Key, CSR or certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CA's response is not a usable certificate.
    #[error("CA response: {0}")]
    Certificate(#[from] CertificateError),
    /// The issued certificate names a different identity than requested.
    #[error("CA issued {got} but {requested} was requested")]
    IdentityMismatch {
        /// What we asked for (SPIFFE URI).
        requested: String,
        /// What the leaf says (SPIFFE URI).
        got: String,
    },
    /// A CSR presented to the fake CA does not carry the identity being issued.
    #[error("CSR does not request {0}")]
    CsrIdentity(Identity),
}

impl From<tonic::Status> for CaError {
    fn from(s: tonic::Status) -> Self {
        CaError::Status(Box::new(s))
    }
}

/// Boxed future returned by [`CertificateProvider::fetch`].
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CaError>> + Send + 'a>>;

/// Something that can issue a certificate for an identity.
pub trait CertificateProvider: Send + Sync {
    /// Obtains a fresh certificate (new key) for `id`.
    fn fetch(&self, id: &Identity) -> FetchFuture<'_>;
}

pub use xds::client::TokenSource;

/// Reads the bearer token, naming the file when that fails.
async fn bearer(token: &TokenSource) -> Result<Option<String>, CaError> {
    token.token().await.map_err(|source| CaError::Token {
        path: match token {
            TokenSource::File(p) => p.clone(),
            _ => PathBuf::new(),
        },
        source,
    })
}

/// Settings for [`IstioCaClient`].
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// CA address, e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM root(s) the CA's serving chain must verify to; `None` = plaintext.
    pub root_ca_pem: Option<String>,
    /// Bearer token source.
    pub token: TokenSource,
    /// Sent as `clusterid` metadata.
    pub cluster_id: String,
    /// Ask for the identity on a pod's behalf (node proxy mode).
    pub impersonate: bool,
    /// Requested certificate lifetime.
    pub ttl: Duration,
}

impl Default for CaClientConfig {
    fn default() -> Self {
        Self {
            address: "https://istiod.istio-system.svc:15012".to_string(),
            root_ca_pem: None,
            token: TokenSource::None,
            cluster_id: "Kubernetes".to_string(),
            impersonate: false,
            ttl: DEFAULT_TTL,
        }
    }
}

/// Client of `istio.v1.auth.IstioCertificateService`.
pub struct IstioCaClient {
    config: CaClientConfig,
    endpoint: Endpoint,
    tls: Option<tokio_rustls::TlsConnector>,
    // Created on first use: building a Channel needs a running tokio runtime.
    channel: Mutex<Option<Channel>>,
}

impl fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstioCaClient")
            .field("address", &self.config.address)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl IstioCaClient {
    /// Validates the config; no connection is made until the first fetch.
    pub fn new(config: CaClientConfig) -> Result<Self, CaError> {
        let bad = |what: String| CaError::Config(format!("{what}: {:?}", config.address));
        let with_scheme = if config.address.contains("://") {
            config.address.clone()
        } else {
            format!("https://{}", config.address)
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| bad(format!("invalid address ({e})")))?;
        let authority = uri
            .authority()
            .ok_or_else(|| bad("address has no host".to_string()))?
            .clone();
        // tonic's own TLS demands a DNS-name match, which SPIFFE-only CA certs cannot satisfy,
        // so the endpoint is always plain and TLS is layered in our connector.
        let plain: Uri = format!("http://{authority}")
            .parse()
            .map_err(|e| bad(format!("invalid address ({e})")))?;
        let mut endpoint = Endpoint::from(plain)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30));
        let tls = match &config.root_ca_pem {
            None => None,
            Some(pem) => {
                let roots = pem_certs(pem)?;
                let tls_config = crate::tls::ca_client_config(&roots)?;
                let origin: Uri = format!("https://{authority}")
                    .parse()
                    .map_err(|e| bad(format!("invalid address ({e})")))?;
                endpoint = endpoint.origin(origin);
                Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config)))
            }
        };
        Ok(Self {
            config,
            endpoint,
            tls,
            channel: Mutex::new(None),
        })
    }

    fn channel(&self) -> Channel {
        // A poisoned lock only means another fetch panicked; the Option is still coherent.
        let mut guard = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .get_or_insert_with(|| match &self.tls {
                Some(tls) => self
                    .endpoint
                    .connect_with_connector_lazy(RustlsConnector { tls: tls.clone() }),
                None => self.endpoint.connect_lazy(),
            })
            .clone()
    }

    async fn request(&self, id: Identity) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = make_csr(&id, &key)?;
        let metadata = self.config.impersonate.then(|| {
            let mut s = prost_types::Struct::default();
            s.fields.insert(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            );
            s
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.config.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        if let Some(token) = bearer(&self.config.token).await? {
            let v = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| CaError::Metadata("authorization"))?;
            req.metadata_mut().insert("authorization", v);
        }
        let cluster = MetadataValue::try_from(self.config.cluster_id.as_str())
            .map_err(|_| CaError::Metadata("clusterid"))?;
        req.metadata_mut().insert("clusterid", cluster);
        let mut client = IstioCertificateServiceClient::new(self.channel());
        let resp = client.create_certificate(req).await?.into_inner();
        let cert = WorkloadCertificate::from_pem(&key.serialize_pem(), &resp.cert_chain)?;
        if cert.identity != id {
            return Err(CaError::IdentityMismatch {
                requested: id.to_string(),
                got: cert.identity.to_string(),
            });
        }
        tracing::debug!(identity = %id, serial = %cert.serial, "certificate issued by CA");
        Ok(cert)
    }
}

impl CertificateProvider for IstioCaClient {
    fn fetch(&self, id: &Identity) -> FetchFuture<'_> {
        Box::pin(self.request(id.clone()))
    }
}

fn pem_certs(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, CaError> {
    match crate::certificate::parse_certs(pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(CaError::Config("root_ca_pem holds no certificate".into())),
        Err(e) => Err(CaError::Config(format!("invalid root_ca_pem: {e}"))),
    }
}

/// Connects TCP then TLS (chain-to-root verification only) for tonic.
#[derive(Clone)]
struct RustlsConnector {
    tls: tokio_rustls::TlsConnector,
}

type TlsIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl Service<Uri> for RustlsConnector {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
            let host = uri
                .host()
                .ok_or_else(|| invalid("CA address has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name =
                ServerName::try_from(host).map_err(|_| invalid("CA host is not a valid name"))?;
            let stream = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Builds a PEM CSR for `id` (URI SAN only, empty subject) signed by `key`.
pub fn make_csr(id: &Identity, key: &KeyPair) -> Result<String, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    Ok(params.serialize_request(key)?.pem()?)
}

/// Development-only in-process CA with a self-signed ECDSA P-256 root.
pub struct FakeCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    ttl: Duration,
}

impl fmt::Debug for FakeCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeCa")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The mesh's certificate profile for workload (and controller serving) leaves: empty subject
/// as Istio issues (rcgen then marks the SAN critical), not a CA, digitalSignature +
/// keyEncipherment, serverAuth + clientAuth, a random positive serial.
pub fn leaf_profile(
    sans: Vec<SanType>,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = not_before;
    p.not_after = not_after;
    p.serial_number = Some(random_serial());
    p
}

/// A random positive certificate serial.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as DER integers in certificates should be.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

impl FakeCa {
    /// Creates a CA with a fresh root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "fake mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(10 * 365 * 86_400);
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            root_pem: root.pem(),
            ttl: DEFAULT_TTL,
        })
    }

    /// Sets the lifetime used by [`CertificateProvider::fetch`].
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The trust domain this CA was created for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate in PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn leaf_params(id: &Identity, ttl: Duration) -> Result<CertificateParams, CaError> {
        let now = time::OffsetDateTime::now_utc();
        let san = SanType::URI(id.to_string().try_into()?);
        Ok(leaf_profile(
            vec![san],
            now - Duration::from_secs(1),
            now + ttl,
        ))
    }

    /// Issues a certificate (fresh key) for `id` valid for `ttl`.
    pub fn issue(&self, id: &Identity, ttl: Duration) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = Self::leaf_params(id, ttl)?.signed_by(&key, &self.issuer)?;
        let chain = [leaf.pem(), self.root_pem.clone()];
        Ok(WorkloadCertificate::from_pem(&key.serialize_pem(), &chain)?)
    }

    /// Signs a PEM CSR that requests `id`; returns the Istio-style chain (leaf, root last).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        // Parsing also verifies the CSR's self-signature.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let want = id.to_string();
        let requested = csr
            .params
            .subject_alt_names
            .iter()
            .any(|san| matches!(san, SanType::URI(u) if u.as_str() == want));
        if !requested {
            return Err(CaError::CsrIdentity(id.clone()));
        }
        let leaf = Self::leaf_params(id, ttl)?.signed_by(&csr.public_key, &self.issuer)?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }
}

impl CertificateProvider for FakeCa {
    fn fetch(&self, id: &Identity) -> FetchFuture<'_> {
        let result = self.issue(id, self.ttl);
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests;
