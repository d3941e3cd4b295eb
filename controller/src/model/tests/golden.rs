//! Golden tests: every `testdata/<case>.yaml` is applied to a fresh model and the full state is
//! compared with `testdata/<case>.golden.json`. Cases named `*.slices.yaml` run in
//! EndpointSlices mode. `UPDATE_GOLDEN=1` rewrites the golden files instead of comparing.
//!
//! Each case is also applied one object at a time, forwards and backwards, with the deltas
//! replayed into a mirror (as an xDS client would): the mirror must end equal to the state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use super::json;
use super::{Model, ModelConfig, ModelDelta, objects};
use crate::config::{ConfigEvent, Kind, Object};
use crate::model::EndpointMode;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/testdata")
}

fn config_for(case: &str) -> ModelConfig {
    let mut cfg = ModelConfig::default();
    if case.ends_with(".slices") {
        cfg.mode = EndpointMode::EndpointSlices;
    }
    cfg
}

/// The full model state as pretty JSON.
fn render(model: &Model, objs: &[Object]) -> String {
    let addresses: BTreeMap<&str, Value> = model
        .addresses()
        .map(|(k, v)| (k, json::address(v)))
        .collect();
    let authorizations: BTreeMap<&str, Value> = model
        .authorizations()
        .map(|(k, v)| (k, json::authorization(v)))
        .collect();
    let statuses: BTreeMap<String, String> = objs
        .iter()
        .filter(|o| {
            matches!(
                o.kind(),
                Kind::AuthorizationPolicy | Kind::PeerAuthentication
            )
        })
        .filter_map(|o| Some((o.key().to_string(), model.policy_status(&o.key())?)))
        .collect();
    let doc = json!({
        "addresses": addresses,
        "authorizations": authorizations,
        "statuses": statuses,
    });
    let mut s = serde_json::to_string_pretty(&doc).unwrap();
    s.push('\n');
    s
}

#[derive(Default, PartialEq, Debug)]
struct Mirror {
    addresses: BTreeMap<String, xds::istio::workload::Address>,
    authorizations: BTreeMap<String, xds::istio::security::Authorization>,
}

impl Mirror {
    fn replay(&mut self, d: ModelDelta) {
        for (k, v) in d.addresses {
            match v {
                Some(v) => self.addresses.insert(k, v),
                None => self.addresses.remove(&k),
            };
        }
        for (k, v) in d.authorizations {
            match v {
                Some(v) => self.authorizations.insert(k, v),
                None => self.authorizations.remove(&k),
            };
        }
    }

    fn of(model: &Model) -> Self {
        Self {
            addresses: model
                .addresses()
                .map(|(k, v)| (k.into(), v.clone()))
                .collect(),
            authorizations: model
                .authorizations()
                .map(|(k, v)| (k.into(), v.clone()))
                .collect(),
        }
    }
}

/// Applies objects one per batch and checks the replayed deltas against the final state.
fn one_at_a_time(case: &str, objs: impl Iterator<Item = Object>) -> Mirror {
    let mut model = Model::new(config_for(case));
    let mut mirror = Mirror::default();
    for o in objs {
        mirror.replay(model.apply(vec![ConfigEvent::Apply(Arc::new(o))]));
    }
    assert_eq!(
        mirror,
        Mirror::of(&model),
        "{case}: deltas disagree with state"
    );
    mirror
}

fn cases() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(testdata())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    out.sort();
    out
}

#[test]
fn golden_outputs_match_inputs() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let cases = cases();
    assert!(cases.len() >= 7, "golden cases missing: {cases:?}");
    let mut failures = Vec::new();
    for (case, path) in cases {
        let yaml = std::fs::read_to_string(&path).unwrap();
        let objs = objects(&yaml);
        let mut model = Model::new(config_for(&case));
        let events = objs
            .iter()
            .map(|o| ConfigEvent::Apply(Arc::new(o.clone())))
            .collect();
        let mut mirror = Mirror::default();
        mirror.replay(model.apply(events));
        assert_eq!(
            mirror,
            Mirror::of(&model),
            "{case}: batch delta disagrees with state"
        );
        assert_eq!(
            one_at_a_time(&case, objs.clone().into_iter()),
            mirror,
            "{case}: forward"
        );
        assert_eq!(
            one_at_a_time(&case, objs.clone().into_iter().rev()),
            mirror,
            "{case}: reverse"
        );

        let got = render(&model, &objs);
        let golden = path.with_file_name(format!("{case}.golden.json"));
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want != got {
            failures.push(format!(
                "{case}: output differs from {} (UPDATE_GOLDEN=1 to regenerate)\n--- got ---\n{got}",
                golden.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
