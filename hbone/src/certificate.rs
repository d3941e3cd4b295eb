//! A workload's certificate: key, leaf + intermediates, trust roots and validity window, as
//! returned by an Istio-compatible CA.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::Identity;

/// Why a CA response or key could not be turned into a [`WorkloadCertificate`].
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The private key PEM held no usable key.
    #[error("invalid private key PEM: {0}")]
    Key(String),
    /// A certificate PEM block could not be decoded.
    #[error("invalid certificate PEM: {0}")]
    Pem(String),
    /// The chain needs at least a leaf and a root element.
    #[error("certificate chain has {0} elements; need leaf and root(s)")]
    ChainTooShort(usize),
    /// A chain element contained no certificate.
    #[error("certificate chain element {0} holds no certificate")]
    EmptyElement(usize),
    /// The DER of a certificate could not be parsed.
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    /// The leaf has no URI SAN at all.
    #[error("leaf certificate has no URI SAN")]
    NoUriSan,
    /// The leaf's first URI SAN is not a SPIFFE workload identity.
    #[error("leaf URI SAN {0:?} is not a SPIFFE workload identity")]
    BadIdentity(String),
    /// The validity times cannot be represented.
    #[error("certificate validity out of range")]
    Validity,
}

/// A workload certificate with its private key and the roots peers must chain to.
#[derive(Clone)]
pub struct WorkloadCertificate {
    /// The identity named by the leaf's first URI SAN.
    pub identity: Identity,
    /// Leaf first, then intermediates (what we present in handshakes).
    pub chain: Vec<CertificateDer<'static>>,
    /// Trust anchors for verifying peers.
    pub roots: Vec<CertificateDer<'static>>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    /// Lowercase hex of the leaf's serial number.
    pub serial: String,
    // Shared so clones do not copy (or leave around extra copies of) key material.
    key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &rfc3339(self.not_before))
            .field("not_after", &rfc3339(self.not_after))
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// Summary of a certificate for `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertDump {
    /// SPIFFE URI of the certificate.
    pub identity: String,
    /// Lowercase hex serial of the leaf.
    pub serial: String,
    /// Validity start, RFC 3339 UTC.
    pub not_before: String,
    /// Validity end, RFC 3339 UTC.
    pub not_after: String,
    /// When rotation is due, RFC 3339 UTC.
    pub refresh_at: String,
    /// Subjects of leaf and intermediates, in order.
    pub chain_subjects: Vec<String>,
    /// Subjects of the trust roots.
    pub root_subjects: Vec<String>,
}

impl WorkloadCertificate {
    /// Builds a certificate from a PEM private key and an Istio CA `cert_chain`
    /// (leaf, intermediates..., root(s) last; the last element may hold several roots).
    pub fn from_pem(key_pem: &str, cert_chain: &[String]) -> Result<Self, CertificateError> {
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CertificateError::Key(e.to_string()))?;
        let Some((roots_pem, chain_pem)) = cert_chain.split_last() else {
            return Err(CertificateError::ChainTooShort(0));
        };
        if chain_pem.is_empty() {
            return Err(CertificateError::ChainTooShort(cert_chain.len()));
        }
        let mut chain = Vec::new();
        for (i, pem) in chain_pem.iter().enumerate() {
            let certs = parse_certs(pem)?;
            if certs.is_empty() {
                return Err(CertificateError::EmptyElement(i));
            }
            chain.extend(certs);
        }
        let roots = parse_certs(roots_pem)?;
        if roots.is_empty() {
            return Err(CertificateError::EmptyElement(cert_chain.len() - 1));
        }
        Self::from_der(key, chain, roots)
    }

    /// Builds a certificate from DER parts; the identity comes from the leaf's first URI SAN.
    pub fn from_der(
        key: PrivateKeyDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertificateError> {
        let leaf_der = chain.first().ok_or(CertificateError::ChainTooShort(0))?;
        let leaf = parse(leaf_der)?;
        let first_uri = uri_sans_of(&leaf)?
            .into_iter()
            .next()
            .ok_or(CertificateError::NoUriSan)?;
        let identity = first_uri
            .parse::<Identity>()
            .map_err(|_| CertificateError::BadIdentity(first_uri.clone()))?;
        let validity = leaf.validity();
        let not_before = unix_to_system(validity.not_before.timestamp())?;
        let not_after = unix_to_system(validity.not_after.timestamp())?;
        let serial = hex(leaf.raw_serial());
        Ok(Self {
            identity,
            chain,
            roots,
            not_before,
            not_after,
            serial,
            key: Arc::new(key),
        })
    }

    /// A copy of the private key (rustls configs take ownership of one).
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // Constructors guarantee a non-empty chain.
        &self.chain[0]
    }

    /// Total validity period of the leaf.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// When rotation is due: halfway through the validity window.
    pub fn refresh_at(&self) -> SystemTime {
        self.not_before + self.lifetime() / 2
    }

    /// Whether the certificate has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Whether the certificate has expired now.
    pub fn is_expired(&self) -> bool {
        self.is_expired_at(SystemTime::now())
    }

    /// A summary for debug dumps.
    pub fn dump(&self) -> CertDump {
        CertDump {
            identity: self.identity.to_string(),
            serial: self.serial.clone(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
            refresh_at: rfc3339(self.refresh_at()),
            chain_subjects: self.chain.iter().map(|c| subject(c)).collect(),
            root_subjects: self.roots.iter().map(|c| subject(c)).collect(),
        }
    }
}

pub(crate) fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertificateError::Pem(e.to_string()))
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CertificateError> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| CertificateError::Parse(e.to_string()))
}

fn uri_sans_of(cert: &X509Certificate<'_>) -> Result<Vec<String>, CertificateError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertificateError::Parse(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// All URI SANs of a DER certificate, in order.
pub fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, CertificateError> {
    uri_sans_of(&parse(der)?)
}

fn subject(der: &CertificateDer<'_>) -> String {
    parse(der)
        .map(|c| c.subject().to_string())
        .unwrap_or_else(|e| format!("<{e}>"))
}

fn unix_to_system(secs: i64) -> Result<SystemTime, CertificateError> {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
    .ok_or(CertificateError::Validity)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Formats a time as RFC 3339 UTC with second precision (`1970-01-01T00:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    // Times before the epoch do not occur in certificates we accept; clamp them.
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), per the well-known
// era-based algorithm (400-year eras of 146097 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::FakeCa;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661); // 2000-02-29 01:01:01
        assert_eq!(rfc3339(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // last second of 2024
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn from_pem_reads_identity_validity_and_roots() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = crate::ca::make_csr(&id, &key).unwrap();
        let mut chain = ca.sign_csr(&csr, &id, Duration::from_secs(3600)).unwrap();
        // Two roots in the last element must both be kept.
        let other = FakeCa::new("other").unwrap();
        let last = chain.pop().unwrap();
        chain.push(format!("{last}{}", other.root_pem()));
        let cert = WorkloadCertificate::from_pem(&key.serialize_pem(), &chain).unwrap();
        assert_eq!(cert.identity, id);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots.len(), 2);
        let life = cert.lifetime().as_secs();
        assert!((3600..=3602).contains(&life), "lifetime {life}");
        let half = cert.refresh_at().duration_since(cert.not_before).unwrap();
        assert_eq!(half, cert.lifetime() / 2);
        assert!(!cert.is_expired());
        let dump = cert.dump();
        assert_eq!(dump.identity, id.to_string());
        assert_eq!(dump.serial, cert.serial);
        assert_eq!(dump.root_subjects.len(), 2);
        assert!(dump.not_after.ends_with('Z'));
    }

    #[test]
    fn from_pem_rejects_chain_without_root() {
        let ca = FakeCa::new("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = crate::ca::make_csr(&id, &key).unwrap();
        let chain = ca.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap();
        let err = WorkloadCertificate::from_pem(&key.serialize_pem(), &chain[..1]).unwrap_err();
        assert!(matches!(err, CertificateError::ChainTooShort(1)), "{err}");
        let err = WorkloadCertificate::from_pem("garbage", &chain).unwrap_err();
        assert!(matches!(err, CertificateError::Key(_)), "{err}");
        let bad = vec![chain[0].clone(), "not pem".to_string()];
        let err = WorkloadCertificate::from_pem(&key.serialize_pem(), &bad).unwrap_err();
        assert!(matches!(err, CertificateError::EmptyElement(1)), "{err}");
    }

    #[test]
    fn from_pem_rejects_leaf_without_spiffe_uri() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["example.com".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let chain = vec![cert.pem(), cert.pem()];
        let err = WorkloadCertificate::from_pem(&key.serialize_pem(), &chain).unwrap_err();
        assert!(matches!(err, CertificateError::NoUriSan), "{err}");
    }
}
