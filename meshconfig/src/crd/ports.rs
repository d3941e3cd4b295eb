//! Maps keyed by port number, which YAML writes as `8080:` but JSON (the API server) as `"8080":`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// One port-number map key, accepted as an integer or a decimal string.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                match u32::try_from(v) {
                    Ok(p) if (1..=65535).contains(&p) => Ok(PortKey(p)),
                    _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortKey, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                match v.parse::<u64>() {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

/// Deserializes a port-keyed map; a null value counts as empty.
pub(crate) fn deserialize<'de, D, V>(d: D) -> Result<BTreeMap<u32, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    let raw: Option<BTreeMap<PortKey, V>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.0, v))
        .collect())
}
