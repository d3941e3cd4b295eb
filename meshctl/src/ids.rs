//! Identifiers: stable content hashes (FNV-1a, the same in every meshctl build), pod UIDs and
//! node tokens from the kernel's random source.

use std::io::Read;

use serde::Serialize;

/// 64-bit FNV-1a of `data`.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hex hash of a value's JSON form (field order is fixed by its types, maps are sorted).
pub fn content_hash<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    format!("{:016x}", fnv64(&json))
}

/// `n` random bytes.
fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// A random RFC 4122 version 4 UUID, as Kubernetes uses for metadata.uid.
pub fn new_uid() -> std::io::Result<String> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A random 32-hex-digit bearer token.
pub fn new_token() -> std::io::Result<String> {
    Ok(random_bytes::<16>()?
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn uids_are_v4_and_distinct() {
        let a = new_uid().unwrap();
        let b = new_uid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn content_hash_changes_with_content() {
        assert_eq!(content_hash(&[1, 2]), content_hash(&[1, 2]));
        assert_ne!(content_hash(&[1, 2]), content_hash(&[2, 1]));
    }
}
