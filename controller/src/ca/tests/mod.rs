//! CA tests: issuance and chain verification, persistence, plugged-in intermediates.

mod service;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hbone::{Identity, WorkloadCertificate};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use rustls::server::ParsedCertificate;
use x509_parser::extensions::GeneralName;

use super::pem::testing::{pem_encode, sec1_pem};
use super::*;

pub(super) fn tmpdir(name: &str) -> PathBuf {
    let n: u64 = rand::random();
    let d = std::env::temp_dir().join(format!("controller-ca-{name}-{}-{n:x}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub(super) fn config() -> CaConfig {
    CaConfig::default()
}

pub(super) fn test_ca() -> CertificateAuthority {
    let cfg = config();
    CertificateAuthority::from_material(&CertificateAuthority::generate_root(&cfg).unwrap(), cfg)
        .unwrap()
}

pub(super) fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// A fresh key and a CSR naming `id` only.
pub(super) fn csr(id: &Identity) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = hbone::ca::make_csr(id, &key).unwrap();
    (key, csr)
}

fn csr_with_sans(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Verifies an Istio-style chain (leaf, intermediates…, roots) as a TLS peer would.
pub(super) fn verify_chain(chain: &[String]) -> Result<(), rustls::Error> {
    let (roots_pem, certs) = chain.split_last().unwrap();
    let mut certs: Vec<CertificateDer<'static>> = certs.iter().flat_map(|p| ders(p)).collect();
    let leaf = certs.remove(0);
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(ders(roots_pem));
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &ParsedCertificate::try_from(&leaf)?,
        &roots,
        &certs,
        UnixTime::now(),
        algs.all,
    )
}

fn sans_of(pem: &str) -> Vec<String> {
    let der = &ders(pem)[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(b) => format!("IP:{b:?}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn issued_chain_verifies_to_root_and_names_only_the_identity() {
    let ca = test_ca();
    let want = id("ns1", "sa1");
    let (key, csr) = csr(&want);
    let chain = ca.sign_csr(&csr, &want, Duration::from_secs(3600)).unwrap();
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], ca.root_pem());
    verify_chain(&chain).unwrap();
    let cert = WorkloadCertificate::from_pem(&key.serialize_pem(), &chain).unwrap();
    assert_eq!(cert.identity, want);
    assert_eq!(sans_of(&chain[0]), vec![format!("URI:{want}")]);

    let der = &ders(&chain[0])[0];
    let (_, leaf) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(!leaf.is_ca());
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    // A small backdate tolerates skew; the end is the requested TTL.
    let life = leaf
        .validity()
        .time_to_expiration()
        .unwrap()
        .whole_seconds();
    assert!((3590..=3600).contains(&life), "{life}");

    // A chain from another CA does not verify against this root.
    let other = test_ca();
    let mut foreign = other
        .sign_csr(&csr, &want, Duration::from_secs(60))
        .unwrap();
    foreign[1] = ca.root_pem().to_string();
    assert!(verify_chain(&foreign).is_err());
}

#[tokio::test]
async fn issued_certs_complete_an_hbone_mtls_handshake() {
    let ca = test_ca();
    let issue = |i: &Identity| {
        let (key, csr) = csr(i);
        let chain = ca.sign_csr(&csr, i, Duration::from_secs(600)).unwrap();
        WorkloadCertificate::from_pem(&key.serialize_pem(), &chain).unwrap()
    };
    let (server_id, client_id) = (id("ns1", "server"), id("ns2", "client"));
    let server_cert = issue(&server_id);
    let client_cert = issue(&client_id);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(hbone::tls::server_config(&server_cert).unwrap());
    let connector = tokio_rustls::TlsConnector::from(
        hbone::tls::client_config(&client_cert, std::slice::from_ref(&server_id)).unwrap(),
    );
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move { acceptor.accept(a).await });
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let client = connector.connect(name, b).await.unwrap();
    let server = server.await.unwrap().unwrap();
    let peer = server.get_ref().1.peer_certificates().unwrap();
    assert_eq!(hbone::tls::peer_identity(peer), Some(client_id));
    drop(client);
}

#[test]
fn csr_must_carry_exactly_the_granted_uri_and_a_valid_signature() {
    let ca = test_ca();
    let want = id("ns1", "sa1");
    let ttl = Duration::from_secs(60);
    let uri = |i: &Identity| SanType::URI(i.to_string().try_into().unwrap());
    let cases = [
        ("other identity", csr(&id("ns1", "other")).1),
        (
            "extra DNS SAN",
            csr_with_sans(vec![
                uri(&want),
                SanType::DnsName("x.example".try_into().unwrap()),
            ]),
        ),
        (
            "two URIs",
            csr_with_sans(vec![uri(&want), uri(&id("ns2", "b"))]),
        ),
        ("no SAN", csr_with_sans(vec![])),
        ("garbage", "not a csr".to_string()),
    ];
    for (what, csr) in cases {
        assert!(
            matches!(ca.sign_csr(&csr, &want, ttl), Err(CaError::Csr(_))),
            "{what}"
        );
    }
    // Flipping a bit of the signature must be caught.
    let good = csr(&want).1;
    let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 1;
    let tampered = pem_encode("CERTIFICATE REQUEST", &der);
    match ca.sign_csr(&tampered, &want, ttl) {
        Err(CaError::Csr(m)) => assert!(m.contains("signature"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(ca.sign_csr(&good, &want, ttl).is_ok());
}

#[test]
fn ttl_is_defaulted_and_capped() {
    let cfg = CaConfig {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
        ..config()
    };
    let ca = CertificateAuthority::from_material(
        &CertificateAuthority::generate_root(&cfg).unwrap(),
        cfg,
    )
    .unwrap();
    assert_eq!(ca.ttl_for(0), Duration::from_secs(3600));
    assert_eq!(ca.ttl_for(-5), Duration::from_secs(3600));
    assert_eq!(ca.ttl_for(600), Duration::from_secs(600));
    assert_eq!(ca.ttl_for(48 * 3600), Duration::from_secs(7200));
}

#[tokio::test]
async fn root_is_generated_persisted_and_reloaded() {
    let dir = tmpdir("persist");
    let store = FileRootStore::new(&dir);
    let first = CertificateAuthority::load_or_create(&store, config())
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key mode {mode:o}");
    let published = std::fs::read_to_string(store.published_roots()).unwrap();
    assert_eq!(published, first.root_pem());

    let root = ders(first.root_pem()).remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&root).unwrap();
    assert!(parsed.is_ca());
    let bc = parsed.basic_constraints().unwrap().unwrap().value;
    assert_eq!(bc.path_len_constraint, Some(1));
    let years = parsed.validity().time_to_expiration().unwrap().whole_days() / 365;
    assert!((9..=10).contains(&years), "{years}");

    // A restart loads the same root, and what it signs verifies against the published root.
    let second = CertificateAuthority::load_or_create(&store, config())
        .await
        .unwrap();
    assert_eq!(second.root_pem(), first.root_pem());
    let want = id("ns1", "sa1");
    let mut chain = second
        .sign_csr(&csr(&want).1, &want, Duration::from_secs(60))
        .unwrap();
    *chain.last_mut().unwrap() = published;
    verify_chain(&chain).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn incomplete_or_mismatched_material_is_refused() {
    let dir = tmpdir("incomplete");
    let m = CertificateAuthority::generate_root(&config()).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &m.cert_pem).unwrap();
    let store = FileRootStore::new(&dir);
    assert!(matches!(
        CertificateAuthority::load_or_create(&store, config()).await,
        Err(CaError::Incomplete(_))
    ));
    let other = CertificateAuthority::generate_root(&config()).unwrap();
    let mismatched = CaMaterial {
        key_pem: other.key_pem,
        ..m
    };
    match CertificateAuthority::from_material(&mismatched, config()) {
        Err(CaError::Material(msg)) => assert!(msg.contains("does not match"), "{msg}"),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A root and an intermediate signed by it, the intermediate's key being `int_key`.
fn root_and_intermediate(int_key: &KeyPair) -> (String, String) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Istio");
    dn.push(DnType::CommonName, "Root CA");
    rp.distinguished_name = dn;
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(rp, root_key);
    let mut ip = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Istio");
    dn.push(DnType::CommonName, "Intermediate CA");
    dn.push(DnType::LocalityName, "cluster1");
    ip.distinguished_name = dn;
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let int = ip.signed_by(int_key, &root_issuer).unwrap();
    (root.pem(), int.pem())
}

async fn check_plugged_in(int_key: &KeyPair, key_pem: &str) {
    let (root, int) = root_and_intermediate(int_key);
    let dir = tmpdir("plugged");
    std::fs::write(dir.join("ca-cert.pem"), &int).unwrap();
    std::fs::write(dir.join("ca-key.pem"), key_pem).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), format!("{int}{root}")).unwrap();
    std::fs::write(dir.join("root-cert.pem"), &root).unwrap();
    let ca = CertificateAuthority::load_or_create(&FileRootStore::new(&dir), config())
        .await
        .unwrap();
    assert_eq!(ca.root_pem(), root);
    let want = id("ns1", "sa1");
    let chain = ca
        .sign_csr(&csr(&want).1, &want, Duration::from_secs(60))
        .unwrap();
    assert_eq!(chain, vec![chain[0].clone(), int.clone(), root.clone()]);
    verify_chain(&chain).unwrap();
    // Without the intermediate a verifier cannot build the path.
    assert!(verify_chain(&[chain[0].clone(), root.clone()]).is_err());
    assert_eq!(
        std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
        root
    );

    // A chain that leads to some other root is refused at load.
    let (other_root, _) = root_and_intermediate(int_key);
    std::fs::write(dir.join("root-cert.pem"), &other_root).unwrap();
    match CertificateAuthority::load_or_create(&FileRootStore::new(&dir), config()).await {
        Err(CaError::Material(m)) => assert!(m.contains("does not chain"), "{m}"),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn plugged_in_ec_intermediate_with_sec1_key_signs_full_chain() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    check_plugged_in(&key, &sec1_pem(&key)).await;
}

#[tokio::test]
async fn plugged_in_rsa_intermediate_with_pkcs1_key_signs_full_chain() {
    let pem = include_str!("../testdata/rsa-pkcs1.pem");
    let key = super::pem::load_key(pem).unwrap();
    check_plugged_in(&key, pem).await;
}

#[test]
fn serving_cert_names_spiffe_dns_and_ips() {
    let ca = test_ca();
    let cfg = ServingConfig {
        ips: vec!["127.0.0.1".parse().unwrap()],
        ..ServingConfig::default()
    };
    let cert = ca.issue_serving_cert(&cfg).unwrap();
    assert_eq!(
        sans_of(&cert.cert_chain_pem),
        vec![
            "URI:spiffe://cluster.local/ns/istio-system/sa/istiod".to_string(),
            "DNS:istiod.istio-system.svc".to_string(),
            "DNS:istiod".to_string(),
            "IP:[127, 0, 0, 1]".to_string(),
        ]
    );
    verify_chain(&[cert.cert_chain_pem.clone(), cert.root_pem.clone()]).unwrap();
    let _ = Arc::new(cert.tls_config());
}

#[test]
fn undecodable_material_is_refused_without_leaking_the_key() {
    let ca = test_ca();
    let bad = CaMaterial {
        cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        key_pem: "junk".into(),
        cert_chain_pem: None,
        root_pem: None,
    };
    assert!(matches!(
        CertificateAuthority::from_material(&bad, config()),
        Err(CaError::Material(_))
    ));
    assert!(ca.intermediates().is_empty());
    assert!(
        format!("{bad:?}").find("junk").is_none(),
        "key not in Debug"
    );
}
