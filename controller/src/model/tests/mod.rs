//! Model tests: golden files (YAML in → xDS resources out) and incremental behaviour.

mod golden;
mod incremental;
mod json;

use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::{Model, ModelConfig, ModelDelta};
use crate::config::{ConfigEvent, Object};

fn typed<T: DeserializeOwned>(doc: serde_yaml::Value) -> T {
    serde_yaml::from_value(doc).unwrap()
}

/// Parses multi-document YAML into typed objects (empty documents are skipped).
pub(super) fn objects(yaml: &str) -> Vec<Object> {
    let mut out = Vec::new();
    for de in serde_yaml::Deserializer::from_str(yaml) {
        let doc: serde_yaml::Value = serde::Deserialize::deserialize(de).unwrap();
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let obj = match kind.as_str() {
            "Namespace" => Object::Namespace(typed(doc)),
            "Pod" => Object::Pod(typed(doc)),
            "Service" => Object::Service(typed(doc)),
            "EndpointSlice" => Object::EndpointSlice(typed(doc)),
            "ServiceAccount" => Object::ServiceAccount(typed(doc)),
            "ServiceEntry" => Object::ServiceEntry(typed(doc)),
            "WorkloadEntry" => Object::WorkloadEntry(typed(doc)),
            "AuthorizationPolicy" => Object::AuthorizationPolicy(typed(doc)),
            "PeerAuthentication" => Object::PeerAuthentication(typed(doc)),
            other => panic!("unknown kind {other:?}"),
        };
        out.push(obj);
    }
    out
}

/// Apply events for YAML objects.
pub(super) fn applies(yaml: &str) -> Vec<ConfigEvent> {
    objects(yaml)
        .into_iter()
        .map(|o| ConfigEvent::Apply(Arc::new(o)))
        .collect()
}

/// A model in Selector mode with default settings.
pub(super) fn model() -> Model {
    Model::new(ModelConfig::default())
}

fn names<T>(v: &[(String, Option<T>)]) -> Vec<String> {
    let mut out: Vec<String> = v
        .iter()
        .map(|(n, v)| match v {
            Some(_) => n.clone(),
            None => format!("-{n}"),
        })
        .collect();
    out.sort();
    out
}

/// Names in a delta as (addresses, authorizations), sorted, with `-` marking removals.
pub(super) fn delta_names(d: &ModelDelta) -> (Vec<String>, Vec<String>) {
    (names(&d.addresses), names(&d.authorizations))
}
