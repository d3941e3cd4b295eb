//! PEM/DER helpers: split certificate bundles keeping each block's text, and load CA keys in
//! PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`) form. ring reads only
//! PKCS#8, so the other two are re-wrapped, which is how Istio's `cacerts` keys often come.

use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::CaError;

/// One certificate of a PEM bundle: its original text block and its DER.
#[derive(Clone, Debug)]
pub(crate) struct PemCert {
    /// The `-----BEGIN CERTIFICATE-----` block, newline-terminated.
    pub pem: String,
    /// The decoded certificate.
    pub der: CertificateDer<'static>,
}

/// Every certificate in a PEM bundle, in order (other block types are skipped).
pub(crate) fn split_certs(pem: &str) -> Result<Vec<PemCert>, CaError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let block_and_rest = &rest[start..];
        let end = block_and_rest
            .find(END)
            .ok_or_else(|| CaError::Material("unterminated certificate PEM block".into()))?
            + END.len();
        let block = &block_and_rest[..end];
        let der = CertificateDer::from_pem_slice(block.as_bytes())
            .map_err(|e| CaError::Material(format!("certificate PEM: {e}")))?;
        out.push(PemCert {
            pem: format!("{block}\n"),
            der,
        });
        rest = &block_and_rest[end..];
    }
    Ok(out)
}

// DER of AlgorithmIdentifier contents and OIDs used when re-wrapping keys.
const RSA_ALG_ID: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Loads a private key from PEM in any of the three common encodings.
pub(crate) fn load_key(pem: &str) -> Result<KeyPair, CaError> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CaError::Material(format!("CA key PEM: {e}")))?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => wrap_pkcs8(RSA_ALG_ID, k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(k) => {
            let der = k.secret_sec1_der();
            let curve = sec1_curve(der)?;
            let alg = tlv(0x30, &[EC_PUBLIC_KEY_OID, curve].concat());
            wrap_pkcs8(&alg, der)
        }
        _ => return Err(CaError::Material("unsupported CA key encoding".into())),
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(|e| CaError::Material(format!("CA key: {e}")))
}

/// PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }.
fn wrap_pkcs8(alg_id: &[u8], key: &[u8]) -> Vec<u8> {
    let body = [&[0x02, 0x01, 0x00][..], alg_id, &tlv(0x04, key)].concat();
    tlv(0x30, &body)
}

/// The named-curve OID (as a TLV) of a SEC1 ECPrivateKey; from `[0] parameters` when present,
/// else guessed from the private key length.
fn sec1_curve(der: &[u8]) -> Result<&'static [u8], CaError> {
    let bad = || CaError::Material("malformed EC PRIVATE KEY".into());
    let (tag, body, _) = read_tlv(der).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (_version_tag, _version, rest) = read_tlv(body).ok_or_else(bad)?;
    let (priv_tag, private, mut rest) = read_tlv(rest).ok_or_else(bad)?;
    if priv_tag != 0x04 {
        return Err(bad());
    }
    while let Some((tag, value, next)) = read_tlv(rest) {
        if tag == 0xa0 {
            return [P256_OID, P384_OID]
                .into_iter()
                .find(|oid| *oid == value)
                .ok_or_else(|| CaError::Material("EC key on an unsupported curve".into()));
        }
        rest = next;
    }
    match private.len() {
        32 => Ok(P256_OID),
        48 => Ok(P384_OID),
        _ => Err(CaError::Material("EC key on an unsupported curve".into())),
    }
}

/// Splits one DER TLV off `input`: (tag, value, rest).
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Encodes one DER TLV.
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
pub(crate) mod testing {
    //! Key encodings for tests.
    use super::*;

    /// The SEC1 key inside a PKCS#8 EC key, as `EC PRIVATE KEY` PEM.
    pub fn sec1_pem(key: &KeyPair) -> String {
        let der = key.serialize_der();
        let (_, body, _) = read_tlv(&der).unwrap();
        let (_, _, rest) = read_tlv(body).unwrap(); // version
        let (_, _, rest) = read_tlv(rest).unwrap(); // algorithm
        let (_, sec1, _) = read_tlv(rest).unwrap(); // privateKey
        // Round-trip through rustls' PEM reader to make sure the label is right.
        let pem = pem_encode("EC PRIVATE KEY", sec1);
        assert!(matches!(
            PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap(),
            PrivateKeyDer::Sec1(_)
        ));
        pem
    }

    /// Encodes DER as PEM with `label`.
    pub fn pem_encode(label: &str, der: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                b64.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
            for _ in chunk.len()..3 {
                b64.push('=');
            }
        }
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::sec1_pem;
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn der_length_encoding_round_trips() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let v = vec![7u8; len];
            let enc = tlv(0x04, &v);
            let (tag, value, rest) = read_tlv(&enc).unwrap();
            assert_eq!((tag, value.len(), rest.len()), (0x04, len, 0));
        }
        assert!(read_tlv(&[0x30, 0x05, 1]).is_none(), "truncated");
    }

    #[test]
    fn loads_pkcs8_sec1_and_pkcs1_keys() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let from_pkcs8 = load_key(&key.serialize_pem()).unwrap();
        assert_eq!(from_pkcs8.der_bytes(), key.der_bytes());
        let from_sec1 = load_key(&sec1_pem(&key)).unwrap();
        assert_eq!(from_sec1.der_bytes(), key.der_bytes());
        let rsa = load_key(include_str!("testdata/rsa-pkcs1.pem")).unwrap();
        assert!(rsa.is_compatible(&rcgen::PKCS_RSA_SHA256));
        assert!(
            load_key("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
                .is_err()
        );
    }

    #[test]
    fn split_keeps_blocks_in_order_and_skips_other_pem() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        let bundle = format!(
            "junk\n{}{}{}",
            a.cert.pem(),
            a.signing_key.serialize_pem(),
            b.cert.pem()
        );
        let certs = split_certs(&bundle).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].der, *a.cert.der());
        assert_eq!(certs[1].der, *b.cert.der());
        assert!(split_certs("-----BEGIN CERTIFICATE-----\nAAAA").is_err());
    }
}
