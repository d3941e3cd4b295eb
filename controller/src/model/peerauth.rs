//! PeerAuthentication → L4 DENY policies that reject connections without a peer identity.
//!
//! Approach (Istio's): the mTLS mode is resolved per workload — the oldest workload-level
//! policy (selector matching the workload, same namespace), else the oldest namespace-level one,
//! else the oldest mesh-level one (root namespace, no selector); `UNSET` inherits from the next
//! level, and the default is PERMISSIVE. DISABLE behaves as PERMISSIVE (ztunnel always accepts
//! mTLS). Because a more specific level must be able to relax a broader STRICT, nothing is
//! published with GLOBAL or NAMESPACE scope; instead each workload references, in its
//! `authorization_policies`:
//! - `<root>/istio_converted_static_strict` (always published, WORKLOAD_SELECTOR, DENY when the
//!   peer has no identity) if its effective mode is STRICT, or
//! - `<ns>/converted_peer_authentication_<name>` if its workload-level policy has
//!   `portLevelMtls`: under a STRICT top-level mode the PERMISSIVE/DISABLE ports become
//!   `not_destination_ports` exceptions; under PERMISSIVE the STRICT ports become
//!   `destination_ports`. Port keys are workload (target) ports.
//!
//! The `_` in these names cannot occur in Kubernetes names, so they never collide with user
//! AuthorizationPolicies. `portLevelMtls` without a selector is ignored (as in Istio).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use xds::istio::security as pb;

use super::index::{Labels, NsName, selector_matches};
use super::{Dirty, Model, ModelConfig, PolicyRef};
use crate::crd::{MtlsMode, PeerAuthentication};

/// Name of the shared STRICT policy (in the root namespace).
pub const STATIC_STRICT_NAME: &str = "istio_converted_static_strict";
/// Prefix of the policy converted from a PeerAuthentication with port-level settings.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// Resource name of the policy converted from PeerAuthentication `ns`/`name`.
pub fn converted_name(ns: &str, name: &str) -> String {
    format!("{ns}/{CONVERTED_PREFIX}{name}")
}

/// The deny-without-identity match.
fn no_identity() -> pb::Match {
    pb::Match {
        not_principals: vec![pb::StringMatch {
            match_type: Some(pb::string_match::MatchType::Presence(())),
        }],
        ..Default::default()
    }
}

/// The always-published STRICT policy and its resource name.
pub fn static_strict_policy(cfg: &ModelConfig) -> (String, pb::Authorization) {
    let policy = pb::Authorization {
        name: STATIC_STRICT_NAME.into(),
        namespace: cfg.root_namespace.clone(),
        scope: pb::Scope::WorkloadSelector as i32,
        action: pb::Action::Deny as i32,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![no_identity()],
            }],
        }],
        dry_run: false,
    };
    (
        format!("{}/{STATIC_STRICT_NAME}", cfg.root_namespace),
        policy,
    )
}

/// A resolved mode: DISABLE counts as PERMISSIVE.
fn strict(mode: MtlsMode) -> bool {
    mode == MtlsMode::Strict
}

/// The single deny rule for a workload-level policy with port settings, if one is needed.
fn port_level_rule(top: MtlsMode, ports: &BTreeMap<u32, MtlsMode>) -> Option<pb::Rule> {
    let mut m = no_identity();
    if strict(top) {
        m.not_destination_ports = ports
            .iter()
            .filter(|(_, mode)| matches!(mode, MtlsMode::Permissive | MtlsMode::Disable))
            .map(|(p, _)| *p)
            .collect();
    } else {
        m.destination_ports = ports
            .iter()
            .filter(|(_, mode)| strict(**mode))
            .map(|(p, _)| *p)
            .collect();
        if m.destination_ports.is_empty() {
            return None;
        }
    }
    Some(pb::Rule {
        clauses: vec![pb::Clause { matches: vec![m] }],
    })
}

/// What the model keeps of a PeerAuthentication.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PeerAuthInfo {
    /// Non-empty matchLabels of a workload-level policy.
    pub selector: Option<Labels>,
    pub mode: MtlsMode,
    /// Port settings (workload-level policies only).
    pub ports: BTreeMap<u32, MtlsMode>,
    pub created: Option<Time>,
    pub status: Option<String>,
}

/// Which level a PeerAuthentication applies at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Mesh,
    Namespace,
    Workload,
}

impl PeerAuthInfo {
    /// Extracts what the model needs from a PeerAuthentication.
    pub fn from_peer_authentication(p: &PeerAuthentication) -> Self {
        let spec = &p.spec;
        let selector = spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .filter(|l| !l.is_empty());
        let mut notes = Vec::new();
        let mode = spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
        let mut ports: BTreeMap<u32, MtlsMode> = spec
            .port_level_mtls
            .iter()
            .map(|(p, m)| (*p, m.mode))
            .collect();
        if !ports.is_empty() && selector.is_none() {
            notes.push("portLevelMtls ignored: it needs a selector".to_string());
            ports.clear();
        }
        if mode == MtlsMode::Disable || ports.values().any(|m| *m == MtlsMode::Disable) {
            notes.push("DISABLE acts as PERMISSIVE: ztunnel always accepts mTLS".to_string());
        }
        let status = (!notes.is_empty()).then(|| notes.join("; "));
        Self {
            selector,
            mode,
            ports,
            created: p.metadata.creation_timestamp.clone(),
            status,
        }
    }

    fn level(&self, ns: &str, root: &str) -> Level {
        match (&self.selector, ns == root) {
            (Some(_), _) => Level::Workload,
            (None, true) => Level::Mesh,
            (None, false) => Level::Namespace,
        }
    }
}

impl Model {
    pub(super) fn set_peer_auth(
        &mut self,
        id: NsName,
        info: Option<PeerAuthInfo>,
        dirty: &mut Dirty,
    ) {
        let old = self.peer_auths.get(&id).cloned();
        if old == info {
            return;
        }
        if let Some(status) = info.as_ref().and_then(|i| i.status.as_ref()) {
            let policy = format!("{}/{}", id.0, id.1);
            tracing::info!(%policy, %status, "peer authentication converted with changes");
        }
        match &info {
            Some(i) => {
                self.peer_auths.insert(id.clone(), i.clone());
                self.peer_auths_by_ns
                    .entry(id.0.clone())
                    .or_default()
                    .insert(id.1.clone());
            }
            None => {
                self.peer_auths.remove(&id);
                if let Some(set) = self.peer_auths_by_ns.get_mut(&id.0) {
                    set.remove(&id.1);
                }
            }
        }
        dirty.policies.insert(PolicyRef::Peer(id.clone()));
        let root = self.cfg.root_namespace.clone();
        for i in old.iter().chain(info.iter()) {
            match i.level(&id.0, &root) {
                Level::Mesh => {
                    dirty.workloads.extend(self.index.all().cloned());
                    dirty.policies.extend(self.port_level_policies(None));
                }
                Level::Namespace => {
                    dirty
                        .workloads
                        .extend(self.index.in_namespace(&id.0).cloned());
                    dirty.policies.extend(self.port_level_policies(Some(&id.0)));
                }
                Level::Workload => {
                    if let Some(sel) = &i.selector {
                        dirty.workloads.extend(self.index.select(Some(&id.0), sel));
                    }
                }
            }
        }
    }

    /// Workload-level policies with port settings, in one namespace or all.
    fn port_level_policies(&self, ns: Option<&str>) -> Vec<PolicyRef> {
        self.peer_auths
            .iter()
            .filter(|((pns, _), i)| {
                ns.is_none_or(|n| n == pns) && i.selector.is_some() && !i.ports.is_empty()
            })
            .map(|(id, _)| PolicyRef::Peer(id.clone()))
            .collect()
    }

    /// The oldest policy in `ns` satisfying `pred` (creation time, then name).
    fn oldest_peer_auth(
        &self,
        ns: &str,
        pred: impl Fn(&PeerAuthInfo) -> bool,
    ) -> Option<(&String, &PeerAuthInfo)> {
        self.peer_auths_by_ns
            .get(ns)?
            .iter()
            .filter_map(|n| Some((n, self.peer_auths.get(&(ns.to_string(), n.clone()))?)))
            .filter(|(_, i)| pred(i))
            .min_by(|a, b| (&a.1.created, a.0).cmp(&(&b.1.created, b.0)))
    }

    /// The mode a workload in `ns` gets from the namespace and mesh levels.
    fn inherited_mode(&self, ns: &str) -> MtlsMode {
        let no_selector = |i: &PeerAuthInfo| i.selector.is_none();
        [ns, self.cfg.root_namespace.as_str()]
            .into_iter()
            .filter_map(|n| self.oldest_peer_auth(n, no_selector))
            .map(|(_, i)| i.mode)
            .find(|m| *m != MtlsMode::Unset)
            .unwrap_or(MtlsMode::Permissive)
    }

    fn top_mode(&self, ns: &str, info: Option<&PeerAuthInfo>) -> MtlsMode {
        match info.map(|i| i.mode) {
            Some(m) if m != MtlsMode::Unset => m,
            _ => self.inherited_mode(ns),
        }
    }

    /// The PeerAuthentication-derived policy a workload references, if any.
    pub(super) fn peer_auth_policies(&self, ns: &str, labels: &Labels) -> Option<String> {
        let workload_level = self.oldest_peer_auth(ns, |i| {
            i.selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, labels))
        });
        let top = self.top_mode(ns, workload_level.map(|(_, i)| i));
        if let Some((name, i)) = workload_level
            && !i.ports.is_empty()
        {
            return port_level_rule(top, &i.ports).map(|_| converted_name(ns, name));
        }
        strict(top).then(|| format!("{}/{STATIC_STRICT_NAME}", self.cfg.root_namespace))
    }

    /// The converted policy of a workload-level PeerAuthentication with port settings.
    pub(super) fn build_peer_policy(&self, id: &NsName) -> Option<pb::Authorization> {
        let info = self.peer_auths.get(id)?;
        if info.selector.is_none() || info.ports.is_empty() {
            return None;
        }
        let rule = port_level_rule(self.top_mode(&id.0, Some(info)), &info.ports)?;
        Some(pb::Authorization {
            name: format!("{CONVERTED_PREFIX}{}", id.1),
            namespace: id.0.clone(),
            scope: pb::Scope::WorkloadSelector as i32,
            action: pb::Action::Deny as i32,
            rules: vec![rule],
            dry_run: false,
        })
    }
}
