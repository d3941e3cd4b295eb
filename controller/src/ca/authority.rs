//! The signing authority: loads or generates the CA, signs workload CSRs and issues the
//! controller's own serving certificate.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use hbone::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use hbone::ca::{leaf_profile, random_serial};

use super::pem::{PemCert, load_key, split_certs};
use super::{CaError, CaMaterial, RootStore};

/// CA settings.
#[derive(Clone, Debug)]
pub struct CaConfig {
    /// Trust domain of issued identities (and of a generated root's subject).
    pub trust_domain: String,
    /// Lifetime when a request asks for none.
    pub default_ttl: Duration,
    /// Longest lifetime granted to a workload certificate.
    pub max_ttl: Duration,
    /// Lifetime of a generated root.
    pub root_ttl: Duration,
    /// How far `not_before` is backdated to tolerate clock skew between nodes.
    pub clock_skew: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
            root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
            clock_skew: Duration::from_secs(60),
        }
    }
}

/// What the controller's serving certificate names.
#[derive(Clone, Debug)]
pub struct ServingConfig {
    /// Namespace of the controller's SPIFFE identity.
    pub namespace: String,
    /// Service account of the controller's SPIFFE identity.
    pub service_account: String,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// Lifetime (capped by the CA's own validity).
    pub ttl: Duration,
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            namespace: "istio-system".into(),
            service_account: "istiod".into(),
            dns_names: vec!["istiod.istio-system.svc".into(), "istiod".into()],
            ips: Vec::new(),
            ttl: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// The controller's TLS identity for the 15012 listener.
#[derive(Clone)]
pub struct ServingCert {
    /// Leaf followed by intermediates, PEM.
    pub cert_chain_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Roots a client verifies the chain with.
    pub root_pem: String,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// tonic server TLS settings presenting this certificate.
    pub fn tls_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &self.cert_chain_pem,
            &self.key_pem,
        ))
    }
}

/// A loaded CA ready to sign.
pub struct CertificateAuthority {
    config: CaConfig,
    issuer: Issuer<'static, KeyPair>,
    signing_not_after: OffsetDateTime,
    /// Signing certificate (when not the root) and further intermediates, PEM, leaf-most first.
    intermediates: Vec<String>,
    root_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.config.trust_domain)
            .field("intermediates", &self.intermediates.len())
            .finish_non_exhaustive()
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CaError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| CaError::Material(format!("certificate: {e}")))
}

/// Whether `child` was issued and signed by `parent`.
fn issued_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

impl CertificateAuthority {
    /// Loads the CA from `store`, generating and saving a root on first start, then
    /// publishes the root bundle.
    pub async fn load_or_create(store: &dyn RootStore, config: CaConfig) -> Result<Self, CaError> {
        let material = match store.load().await? {
            Some(m) => m,
            None => {
                let m = Self::generate_root(&config)?;
                store.save(&m).await?;
                tracing::info!(trust_domain = %config.trust_domain, "generated a new self-signed mesh root CA");
                m
            }
        };
        let ca = Self::from_material(&material, config)?;
        store.publish_roots(ca.root_pem()).await?;
        Ok(ca)
    }

    /// A new self-signed ECDSA P-256 root.
    pub fn generate_root(config: &CaConfig) -> Result<CaMaterial, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, config.trust_domain.as_str());
        params.distinguished_name = dn;
        // One level of intermediates below the root stays possible.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - config.clock_skew;
        params.not_after = now + config.root_ttl;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(CaMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_chain_pem: None,
            root_pem: None,
        })
    }

    /// Builds the CA from stored material, checking that key, chain and roots fit together.
    pub fn from_material(m: &CaMaterial, config: CaConfig) -> Result<Self, CaError> {
        let key = load_key(&m.key_pem)?;
        let signing = split_certs(&m.cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Material("ca-cert.pem holds no certificate".into()))?;
        let cert = parse(&signing.der)?;
        if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(CaError::Material(
                "ca-key.pem does not match ca-cert.pem".into(),
            ));
        }
        if !cert.is_ca() {
            return Err(CaError::Material(
                "ca-cert.pem is not a CA certificate".into(),
            ));
        }
        if !cert.validity().is_valid() {
            return Err(CaError::Material(
                "ca-cert.pem is expired or not yet valid".into(),
            ));
        }
        let signing_not_after =
            OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
                .map_err(|e| CaError::Material(format!("ca-cert.pem validity: {e}")))?;

        let mut roots = split_certs(m.root_pem.as_deref().unwrap_or(&m.cert_pem))?;
        let self_signed = issued_by(&cert, &cert);
        if self_signed && !roots.iter().any(|r| r.der == signing.der) {
            // A self-signed CA is its own anchor, even when root-cert.pem lists older roots.
            roots.push(signing.clone());
        }
        if roots.is_empty() {
            return Err(CaError::Material(
                "root-cert.pem holds no certificate".into(),
            ));
        }
        let intermediates = if self_signed {
            Vec::new()
        } else {
            Self::verified_chain(&signing, m.cert_chain_pem.as_deref(), &roots)?
        };
        let root_pem: String = roots.iter().map(|r| r.pem.as_str()).collect();
        let issuer = Issuer::from_ca_cert_der(&signing.der, key)?;
        let ca = Self {
            config,
            issuer,
            signing_not_after,
            intermediates,
            root_pem,
        };
        ca.self_check(&cert)?;
        Ok(ca)
    }

    /// Signing certificate plus cert-chain.pem (roots dropped), each linked to the next and the
    /// last to one of `roots`.
    fn verified_chain(
        signing: &PemCert,
        chain_pem: Option<&str>,
        roots: &[PemCert],
    ) -> Result<Vec<String>, CaError> {
        let mut chain: Vec<PemCert> = match chain_pem {
            Some(p) => split_certs(p)?,
            None => Vec::new(),
        };
        chain.retain(|c| !roots.iter().any(|r| r.der == c.der));
        if chain.first().map(|c| &c.der) != Some(&signing.der) {
            chain.retain(|c| c.der != signing.der);
            chain.insert(0, signing.clone());
        }
        let parsed: Vec<X509Certificate<'_>> = chain
            .iter()
            .map(|c| parse(&c.der))
            .collect::<Result<_, _>>()?;
        for (i, pair) in parsed.windows(2).enumerate() {
            if !issued_by(&pair[0], &pair[1]) {
                return Err(CaError::Material(format!(
                    "cert-chain.pem: certificate {i} is not signed by certificate {}",
                    i + 1
                )));
            }
        }
        let parsed_roots: Vec<X509Certificate<'_>> = roots
            .iter()
            .map(|r| parse(&r.der))
            .collect::<Result<_, _>>()?;
        let last = parsed
            .last()
            .ok_or_else(|| CaError::Material("empty chain".into()))?;
        if !parsed_roots.iter().any(|r| issued_by(last, r)) {
            return Err(CaError::Material(
                "cert-chain.pem does not chain to root-cert.pem".into(),
            ));
        }
        Ok(chain.into_iter().map(|c| c.pem).collect())
    }

    /// Issues a throwaway leaf and checks its issuer name matches the signing certificate's
    /// subject byte for byte (re-encoded names would break path building in verifiers).
    fn self_check(&self, signing: &X509Certificate<'_>) -> Result<(), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let id = Identity::new(
            self.config.trust_domain.as_str(),
            "self-check",
            "self-check",
        );
        let leaf = self
            .leaf_params(
                vec![SanType::URI(id.to_string().try_into()?)],
                Duration::from_secs(60),
            )?
            .signed_by(&key, &self.issuer)?;
        if issued_by(&parse(leaf.der())?, signing) {
            Ok(())
        } else {
            Err(CaError::Material(
                "certificates signed with ca-cert.pem do not verify against it".into(),
            ))
        }
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// The settings.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// PEM root bundle (what clients trust; last element of every issued chain).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// PEM intermediates between leaves and the root, leaf-most first (empty for a root CA).
    pub fn intermediates(&self) -> &[String] {
        &self.intermediates
    }

    /// The lifetime to grant for a requested `validity_duration` in seconds: the default when
    /// not positive, capped at the maximum.
    pub fn ttl_for(&self, requested_secs: i64) -> Duration {
        match u64::try_from(requested_secs) {
            Ok(s) if s > 0 => Duration::from_secs(s).min(self.config.max_ttl),
            _ => self.config.default_ttl.min(self.config.max_ttl),
        }
    }

    fn leaf_params(&self, sans: Vec<SanType>, ttl: Duration) -> Result<CertificateParams, CaError> {
        let now = OffsetDateTime::now_utc();
        // Backdated for clock skew; a leaf never outlives the certificate that signed it.
        Ok(leaf_profile(
            sans,
            now - self.config.clock_skew,
            (now + ttl).min(self.signing_not_after),
        ))
    }

    fn chain_with(&self, leaf_pem: String) -> Vec<String> {
        let mut chain = Vec::with_capacity(self.intermediates.len() + 2);
        chain.push(leaf_pem);
        chain.extend(self.intermediates.iter().cloned());
        chain.push(self.root_pem.clone());
        chain
    }

    /// Signs a PEM CSR whose only SAN is the URI of `id`; returns leaf, intermediates…, roots.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CaError::Csr(format!("PEM: {e}")))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| CaError::Csr(format!("DER: {e}")))?;
        if !rest.is_empty() {
            return Err(CaError::Csr("trailing data after the request".into()));
        }
        csr.verify_signature()
            .map_err(|_| CaError::Csr("signature does not verify".into()))?;
        let mut sans: Vec<&GeneralName<'_>> = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                sans.extend(san.general_names.iter());
            }
        }
        let want = id.to_string();
        match sans.as_slice() {
            [GeneralName::URI(uri)] if *uri == want => {}
            [] => return Err(CaError::Csr("no subject alternative name".into())),
            _ => {
                return Err(CaError::Csr(format!(
                    "the only SAN must be the URI {want}, got {sans:?}"
                )));
            }
        }
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| CaError::Csr(format!("public key: {e}")))?;
        let leaf = self
            .leaf_params(vec![SanType::URI(want.try_into()?)], ttl)?
            .signed_by(&spki, &self.issuer)?;
        Ok(self.chain_with(leaf.pem()))
    }

    /// Issues the controller's serving certificate (fresh key): SPIFFE URI plus DNS/IP SANs.
    pub fn issue_serving_cert(&self, cfg: &ServingConfig) -> Result<ServingCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let id = Identity::new(
            self.config.trust_domain.as_str(),
            cfg.namespace.as_str(),
            cfg.service_account.as_str(),
        );
        let mut sans = vec![SanType::URI(id.to_string().try_into()?)];
        for name in &cfg.dns_names {
            sans.push(SanType::DnsName(name.as_str().try_into()?));
        }
        sans.extend(cfg.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let params = self.leaf_params(sans, cfg.ttl)?;
        let not_after = SystemTime::from(params.not_after);
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut chain = leaf.pem();
        for pem in &self.intermediates {
            chain.push_str(pem);
        }
        Ok(ServingCert {
            cert_chain_pem: chain,
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
            not_after,
        })
    }
}
