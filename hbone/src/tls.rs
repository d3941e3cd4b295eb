//! rustls configurations for HBONE mTLS (TLS 1.3 only, AES-GCM suites, ALPN `h2`) with SPIFFE
//! identity verification on both sides.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::Identity;
use crate::certificate::{WorkloadCertificate, uri_sans};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls rejected the configuration (e.g. key does not match certificate).
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the roots.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// None of the given roots is a usable trust anchor.
    #[error("no usable trust roots")]
    NoRoots,
    /// A client config needs at least one acceptable server identity.
    #[error("no expected server identities")]
    NoExpectedIdentities,
}

/// The crypto provider for HBONE: ring, restricted to TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![
                rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(TlsError::NoRoots);
    }
    Ok(Arc::new(store))
}

/// Server side of HBONE: demands a client certificate chaining to `cert.roots` with a SPIFFE
/// identity in our own trust domain, and presents `cert`'s leaf + intermediates.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(root_store(&cert.roots)?, provider.clone())
            .build()?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        inner,
        trust_domain: cert.identity.trust_domain.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.private_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection re-authenticates with the current certificates.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE: verifies the server chain against `cert.roots` (no DNS/IP name check)
/// and requires one of its URI SANs to be among `expected`; presents `cert`'s chain.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: &[Identity],
) -> Result<Arc<ClientConfig>, TlsError> {
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentities);
    }
    let provider = provider();
    let verifier = Arc::new(ChainVerifier {
        roots: root_store(&cert.roots)?,
        algs: provider.signature_verification_algorithms,
        expected: Expected::Identities(expected.to_vec()),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.private_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Client config for talking to a CA whose serving certificate may carry only a SPIFFE SAN:
/// the chain must verify to `roots`; names are not checked.
pub(crate) fn ca_client_config(
    roots: &[CertificateDer<'static>],
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ChainVerifier {
        roots: root_store(roots)?,
        algs: provider.signature_verification_algorithms,
        expected: Expected::ControlPlane,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The peer's identity: the first URI SAN of the leaf that is a SPIFFE workload identity.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<Identity> {
    let leaf = certs.first()?;
    uri_sans(leaf)
        .ok()?
        .iter()
        .find_map(|s| s.parse::<Identity>().ok())
}

fn spiffe_ids(end_entity: &CertificateDer<'_>) -> Result<Vec<Identity>, rustls::Error> {
    let sans = uri_sans(end_entity).map_err(|e| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(OtherError(Arc::new(e))))
    })?;
    Ok(sans.iter().filter_map(|s| s.parse().ok()).collect())
}

/// Web PKI client verification plus "some SPIFFE SAN is in our trust domain".
#[derive(Debug)]
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if spiffe_ids(end_entity)?
            .iter()
            .any(|id| id.trust_domain == self.trust_domain)
        {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who the server must prove to be, beyond a chain to the roots.
#[derive(Debug)]
enum Expected {
    /// One of these SPIFFE identities (HBONE: the connect-time name is an IP and meaningless).
    Identities(Vec<Identity>),
    /// The control plane (CA): a certificate valid for the dialed host name or IP, as Istio's
    /// ztunnel checks istiod. Every workload certificate chains to the same root, so the chain
    /// alone would let any workload pose as the CA; and a SPIFFE identity is no proof either,
    /// since node proxies may obtain the identity of any pod on their node. Workload
    /// certificates carry URI SANs only, so they never pass a name check.
    ControlPlane,
}

/// Server verification by chain to the mesh roots plus the identity in [`Expected`].
#[derive(Debug)]
struct ChainVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: Expected,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let valid = match &self.expected {
            Expected::Identities(expected) => spiffe_ids(end_entity)?
                .iter()
                .any(|id| expected.contains(id)),
            Expected::ControlPlane => verify_server_name(&parsed, server_name).is_ok(),
        };
        if !valid {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::ca::FakeCa;

    const DAY: Duration = Duration::from_secs(86_400);

    fn id(td: &str, ns: &str, sa: &str) -> Identity {
        Identity::new(td, ns, sa)
    }

    struct Outcome {
        client: Result<Option<Identity>, std::io::Error>,
        server: Result<Option<Identity>, std::io::Error>,
    }

    /// Runs a handshake plus a one-byte exchange so that late (post-Finished) client
    /// certificate rejections surface on both sides.
    async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
        let (c_io, s_io) = tokio::io::duplex(64 * 1024);
        let connector = TlsConnector::from(client);
        let acceptor = TlsAcceptor::from(server);
        let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)).into());
        let client_side = async move {
            let mut s = connector.connect(name, c_io).await?;
            let (_, conn) = s.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let peer = conn.peer_certificates().and_then(peer_identity);
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            Ok(peer)
        };
        let server_side = async move {
            let mut s = acceptor.accept(s_io).await?;
            let (_, conn) = s.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            let peer = conn.peer_certificates().and_then(peer_identity);
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            s.write_all(b"y").await?;
            s.flush().await?;
            Ok(peer)
        };
        let (client, server) = tokio::join!(client_side, server_side);
        Outcome { client, server }
    }

    #[tokio::test]
    async fn mutual_tls_succeeds_and_each_side_sees_peer_identity() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let a = id("cluster.local", "ns-a", "sa-a");
        let b = id("cluster.local", "ns-b", "sa-b");
        let ca_cert = ca.issue(&a, DAY).unwrap();
        let cb_cert = ca.issue(&b, DAY).unwrap();
        let other = id("cluster.local", "x", "y");
        let client = client_config(&ca_cert, &[other, b.clone()]).unwrap();
        let server = server_config(&cb_cert).unwrap();
        let out = handshake(client, server).await;
        assert_eq!(out.client.unwrap(), Some(b));
        assert_eq!(out.server.unwrap(), Some(a));
    }

    #[tokio::test]
    async fn client_rejects_server_with_unexpected_identity() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let a = ca.issue(&id("cluster.local", "a", "a"), DAY).unwrap();
        let b = ca.issue(&id("cluster.local", "b", "b"), DAY).unwrap();
        let client = client_config(&a, &[id("cluster.local", "c", "c")]).unwrap();
        let out = handshake(client, server_config(&b).unwrap()).await;
        let err = out.client.unwrap_err();
        assert!(err.to_string().contains("NotValidForName"), "{err}");
        assert!(out.server.is_err());
    }

    #[tokio::test]
    async fn client_rejects_server_from_other_root() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let rogue = FakeCa::new("cluster.local").unwrap();
        let b_id = id("cluster.local", "b", "b");
        let a = ca.issue(&id("cluster.local", "a", "a"), DAY).unwrap();
        let b = rogue.issue(&b_id, DAY).unwrap();
        let out = handshake(
            client_config(&a, &[b_id]).unwrap(),
            server_config(&b).unwrap(),
        )
        .await;
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn server_rejects_client_cert_from_other_root() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let rogue = FakeCa::new("cluster.local").unwrap();
        let b_id = id("cluster.local", "b", "b");
        let a = rogue.issue(&id("cluster.local", "a", "a"), DAY).unwrap();
        let b = ca.issue(&b_id, DAY).unwrap();
        // The client trusts the server's root, so only the server can object.
        let mut a_trusting = a.clone();
        a_trusting.roots = b.roots.clone();
        let out = handshake(
            client_config(&a_trusting, &[b_id]).unwrap(),
            server_config(&b).unwrap(),
        )
        .await;
        let err = out.server.unwrap_err();
        // Same issuer name, different key: webpki reports a bad signature.
        let msg = err.to_string();
        assert!(
            msg.contains("BadSignature") || msg.contains("UnknownIssuer"),
            "{msg}"
        );
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn server_rejects_client_without_certificate() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let b_id = id("cluster.local", "b", "b");
        let b = ca.issue(&b_id, DAY).unwrap();
        let p = provider();
        let verifier = Arc::new(ChainVerifier {
            roots: root_store(&b.roots).unwrap(),
            algs: p.signature_verification_algorithms,
            expected: Expected::Identities(vec![b_id]),
        });
        let mut client = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        let out = handshake(Arc::new(client), server_config(&b).unwrap()).await;
        let err = out.server.unwrap_err();
        assert!(err.to_string().contains("no certificates"), "{err}");
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn server_rejects_client_from_other_trust_domain() {
        // Same root, so only the trust-domain rule can reject.
        let ca = FakeCa::new("cluster.local").unwrap();
        let b_id = id("cluster.local", "b", "b");
        let a = ca.issue(&id("other.domain", "a", "a"), DAY).unwrap();
        let b = ca.issue(&b_id, DAY).unwrap();
        let out = handshake(
            client_config(&a, &[b_id]).unwrap(),
            server_config(&b).unwrap(),
        )
        .await;
        let err = out.server.unwrap_err();
        assert!(
            err.to_string().contains("ApplicationVerificationFailure"),
            "{err}"
        );
    }

    #[test]
    fn client_config_needs_expected_identities_and_roots() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let a = ca.issue(&id("cluster.local", "a", "a"), DAY).unwrap();
        assert!(matches!(
            client_config(&a, &[]),
            Err(TlsError::NoExpectedIdentities)
        ));
        let mut no_roots = a.clone();
        no_roots.roots.clear();
        assert!(matches!(server_config(&no_roots), Err(TlsError::NoRoots)));
    }

    #[test]
    fn configs_disable_sni_and_resumption() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let a_id = id("cluster.local", "a", "a");
        let a = ca.issue(&a_id, DAY).unwrap();
        let c = client_config(&a, &[a_id]).unwrap();
        assert!(!c.enable_sni);
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
        let s = server_config(&a).unwrap();
        assert_eq!(s.send_tls13_tickets, 0);
        assert!(!s.session_storage.can_cache());
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            vec![
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            ]
        );
    }

    #[test]
    fn peer_identity_skips_non_spiffe_uris() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::URI("https://example.com/".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://td/ns/n/sa/s".try_into().unwrap()),
        ];
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            peer_identity(&[cert.der().clone()]),
            Some(id("td", "n", "s"))
        );
        assert_eq!(peer_identity(&[]), None);
    }
}
