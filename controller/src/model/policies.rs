//! AuthorizationPolicy → `istio.security.Authorization` (L4 only, as ztunnel enforces it).
//!
//! - Scope: GLOBAL in the root namespace without selector, NAMESPACE without selector,
//!   WORKLOAD_SELECTOR with a non-empty `selector.matchLabels` (an empty one counts as none). A
//!   root-namespace selector policy applies to matching workloads of every namespace. Workloads
//!   list the WORKLOAD_SELECTOR policies that select them in `authorization_policies`.
//! - Each rule's `from` list becomes one clause (one match per source), likewise `to`, and each
//!   `when` condition becomes its own clause: every clause must hold, any match in it may.
//! - L7-only attributes (hosts, methods, paths, request principals, remote IP blocks, `when`
//!   keys other than source.ip/namespace/principal and destination.ip/port) cannot be seen at
//!   L4. In an ALLOW policy the rule is dropped (it never matches: fail closed); in a DENY
//!   policy they are ignored, so the DENY matches more (fail closed). Invalid values (bad IPs or
//!   ports) are handled the same way. `rules: []` stays allow-nothing; `rules: [{}]` is
//!   allow-all (one rule, no clauses).
//! - AUDIT and CUSTOM policies, and policies attached with `targetRef(s)` (waypoints, gateways),
//!   are not sent to ztunnel. The reason for any change or skip is kept as the policy status.

use std::net::IpAddr;

use xds::istio::security as pb;

use super::index::{Labels, NsName, selector_matches};
use super::{Dirty, Model, ModelConfig, PolicyRef};
use crate::crd::{AuthorizationAction, AuthorizationPolicy, Rule};

/// Annotation that turns a policy into a dry run.
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// What the model keeps of an AuthorizationPolicy: its converted form.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PolicyInfo {
    /// Selector of a published WORKLOAD_SELECTOR policy (`None` otherwise).
    pub selector: Option<Labels>,
    /// The resource sent to ztunnel, if any.
    pub output: Option<pb::Authorization>,
    /// Why the conversion changed or skipped something.
    pub status: Option<String>,
}

impl PolicyInfo {
    /// Converts an AuthorizationPolicy.
    pub fn from_policy(p: &AuthorizationPolicy, name: &str, ns: &str, cfg: &ModelConfig) -> Self {
        let skipped = |reason: String| Self {
            selector: None,
            output: None,
            status: Some(reason),
        };
        let spec = &p.spec;
        if let Some(t) = spec.target_ref.iter().chain(spec.target_refs.iter()).next() {
            return skipped(format!(
                "attached to {} {:?} with targetRef: enforced by the waypoint or gateway, not by ztunnel",
                t.kind, t.name
            ));
        }
        let action = match spec.action {
            AuthorizationAction::Allow => pb::Action::Allow,
            AuthorizationAction::Deny => pb::Action::Deny,
            AuthorizationAction::Audit => {
                return skipped("AUDIT policies are not enforced by ztunnel".into());
            }
            AuthorizationAction::Custom => {
                return skipped("CUSTOM policies need a waypoint; not enforced by ztunnel".into());
            }
        };
        let selector = spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .filter(|l| !l.is_empty());
        let scope = match (&selector, ns == cfg.root_namespace) {
            (Some(_), _) => pb::Scope::WorkloadSelector,
            (None, true) => pb::Scope::Global,
            (None, false) => pb::Scope::Namespace,
        };
        let mut notes = Vec::new();
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| convert_rule(action, r, i, ns, &mut notes))
            .collect();
        let dry_run = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRY_RUN_ANNOTATION))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let status = (!notes.is_empty()).then(|| notes.join("; "));
        Self {
            selector,
            output: Some(pb::Authorization {
                name: name.to_string(),
                namespace: ns.to_string(),
                scope: scope as i32,
                action: action as i32,
                rules,
                dry_run,
            }),
            status,
        }
    }
}

/// Converts values of one field, applying the fail-closed rules for bad or unsupported input.
struct RuleConv<'a> {
    allow: bool,
    index: usize,
    notes: &'a mut Vec<String>,
    /// Set when an ALLOW rule cannot be represented and must be dropped.
    drop: bool,
}

impl RuleConv<'_> {
    /// An L7-only attribute is present.
    fn l7(&mut self, what: &str) {
        if self.allow {
            if !self.drop {
                self.notes.push(format!(
                    "rule {} dropped: {what} is L7-only and cannot match at L4",
                    self.index
                ));
            }
            self.drop = true;
        } else {
            self.notes.push(format!(
                "rule {}: {what} is L7-only and was ignored, so the DENY applies more broadly",
                self.index
            ));
        }
    }

    /// Values that must match (an empty result means "any").
    fn positive<T>(
        &mut self,
        field: &str,
        values: &[String],
        parse: fn(&str) -> Option<T>,
    ) -> Vec<T> {
        let parsed: Option<Vec<T>> = values.iter().map(|v| parse(v.trim())).collect();
        match parsed {
            Some(v) => v,
            None => {
                self.invalid(field, values, "field ignored");
                Vec::new()
            }
        }
    }

    /// Values that must not match.
    fn negative<T>(
        &mut self,
        field: &str,
        values: &[String],
        parse: fn(&str) -> Option<T>,
    ) -> Vec<T> {
        let parsed: Vec<Option<T>> = values.iter().map(|v| parse(v.trim())).collect();
        if parsed.iter().any(Option::is_none) {
            self.invalid(field, values, "invalid values ignored");
        }
        parsed.into_iter().flatten().collect()
    }

    fn invalid(&mut self, field: &str, values: &[String], deny_effect: &str) {
        if self.allow {
            if !self.drop {
                self.notes.push(format!(
                    "rule {} dropped: invalid value in {field} {values:?}",
                    self.index
                ));
            }
            self.drop = true;
        } else {
            self.notes.push(format!(
                "rule {}: invalid value in {field} {values:?}; {deny_effect}, so the DENY applies more broadly",
                self.index
            ));
        }
    }
}

/// Istio's string match syntax: `*` any present value, `*x` suffix, `x*` prefix, else exact.
fn string_match(v: &str) -> Option<pb::StringMatch> {
    use pb::string_match::MatchType;
    let m = if v == "*" {
        MatchType::Presence(())
    } else if let Some(s) = v.strip_prefix('*') {
        MatchType::Suffix(s.to_string())
    } else if let Some(p) = v.strip_suffix('*') {
        MatchType::Prefix(p.to_string())
    } else {
        MatchType::Exact(v.to_string())
    };
    Some(pb::StringMatch {
        match_type: Some(m),
    })
}

/// Principals are compared without `spiffe://`; accept it anyway.
fn principal_match(v: &str) -> Option<pb::StringMatch> {
    string_match(v.strip_prefix("spiffe://").unwrap_or(v))
}

/// An IP (host prefix) or CIDR.
fn ip_block(v: &str) -> Option<pb::Address> {
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
        None => (v.parse::<IpAddr>().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = len.unwrap_or(max);
    (length <= max).then(|| pb::Address {
        address: super::workloads::ip_bytes(&ip),
        length,
    })
}

fn port_number(v: &str) -> Option<u32> {
    v.parse::<u16>().ok().filter(|p| *p != 0).map(u32::from)
}

fn converted_rule_clauses(
    conv: &mut RuleConv<'_>,
    rule: &Rule,
    policy_ns: &str,
) -> Vec<pb::Clause> {
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let mut matches = Vec::new();
        for from in &rule.from {
            let s = from.source.clone().unwrap_or_default();
            for (name, present) in [
                ("source.requestPrincipals", !s.request_principals.is_empty()),
                (
                    "source.notRequestPrincipals",
                    !s.not_request_principals.is_empty(),
                ),
                ("source.remoteIpBlocks", !s.remote_ip_blocks.is_empty()),
                (
                    "source.notRemoteIpBlocks",
                    !s.not_remote_ip_blocks.is_empty(),
                ),
            ] {
                if present {
                    conv.l7(name);
                }
            }
            matches.push(pb::Match {
                principals: conv.positive("principals", &s.principals, principal_match),
                not_principals: conv.negative("notPrincipals", &s.not_principals, principal_match),
                namespaces: conv.positive("namespaces", &s.namespaces, string_match),
                not_namespaces: conv.negative("notNamespaces", &s.not_namespaces, string_match),
                service_accounts: parse_service_accounts(
                    conv,
                    "serviceAccounts",
                    &s.service_accounts,
                    policy_ns,
                    true,
                ),
                not_service_accounts: parse_service_accounts(
                    conv,
                    "notServiceAccounts",
                    &s.not_service_accounts,
                    policy_ns,
                    false,
                ),
                source_ips: conv.positive("ipBlocks", &s.ip_blocks, ip_block),
                not_source_ips: conv.negative("notIpBlocks", &s.not_ip_blocks, ip_block),
                ..Default::default()
            });
        }
        clauses.push(pb::Clause { matches });
    }
    if !rule.to.is_empty() {
        let mut matches = Vec::new();
        for to in &rule.to {
            let o = to.operation.clone().unwrap_or_default();
            for (name, present) in [
                ("operation.hosts", !o.hosts.is_empty()),
                ("operation.notHosts", !o.not_hosts.is_empty()),
                ("operation.methods", !o.methods.is_empty()),
                ("operation.notMethods", !o.not_methods.is_empty()),
                ("operation.paths", !o.paths.is_empty()),
                ("operation.notPaths", !o.not_paths.is_empty()),
            ] {
                if present {
                    conv.l7(name);
                }
            }
            matches.push(pb::Match {
                destination_ports: conv.positive("ports", &o.ports, port_number),
                not_destination_ports: conv.negative("notPorts", &o.not_ports, port_number),
                ..Default::default()
            });
        }
        clauses.push(pb::Clause { matches });
    }
    for c in &rule.when {
        let mut m = pb::Match::default();
        let (v, nv) = (&c.values, &c.not_values);
        match c.key.as_str() {
            "source.ip" => {
                m.source_ips = conv.positive("source.ip", v, ip_block);
                m.not_source_ips = conv.negative("source.ip", nv, ip_block);
            }
            "source.namespace" => {
                m.namespaces = conv.positive("source.namespace", v, string_match);
                m.not_namespaces = conv.negative("source.namespace", nv, string_match);
            }
            "source.principal" => {
                m.principals = conv.positive("source.principal", v, principal_match);
                m.not_principals = conv.negative("source.principal", nv, principal_match);
            }
            "destination.ip" => {
                m.destination_ips = conv.positive("destination.ip", v, ip_block);
                m.not_destination_ips = conv.negative("destination.ip", nv, ip_block);
            }
            "destination.port" => {
                m.destination_ports = conv.positive("destination.port", v, port_number);
                m.not_destination_ports = conv.negative("destination.port", nv, port_number);
            }
            other => conv.l7(&format!("when key {other:?}")),
        }
        clauses.push(pb::Clause { matches: vec![m] });
    }
    clauses
}

/// `<ns>/<sa>`, or `<sa>` in the policy's namespace.
fn service_account(v: &str, policy_ns: &str) -> Option<pb::ServiceAccountMatch> {
    let (ns, sa) = match v.split_once('/') {
        Some((ns, sa)) => (ns, sa),
        None => (policy_ns, v),
    };
    (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then(|| pb::ServiceAccountMatch {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
    })
}

fn parse_service_accounts(
    conv: &mut RuleConv<'_>,
    field: &str,
    values: &[String],
    policy_ns: &str,
    positive: bool,
) -> Vec<pb::ServiceAccountMatch> {
    let parsed: Vec<Option<pb::ServiceAccountMatch>> = values
        .iter()
        .map(|v| service_account(v.trim(), policy_ns))
        .collect();
    if parsed.iter().all(Option::is_some) {
        return parsed.into_iter().flatten().collect();
    }
    if positive {
        conv.invalid(field, values, "field ignored");
        Vec::new()
    } else {
        conv.invalid(field, values, "invalid values ignored");
        parsed.into_iter().flatten().collect()
    }
}

/// Converts one rule; `None` if it must be dropped (ALLOW rules that cannot match at L4).
fn convert_rule(
    action: pb::Action,
    rule: &Rule,
    index: usize,
    policy_ns: &str,
    notes: &mut Vec<String>,
) -> Option<pb::Rule> {
    let mut conv = RuleConv {
        allow: action == pb::Action::Allow,
        index,
        notes,
        drop: false,
    };
    let clauses = converted_rule_clauses(&mut conv, rule, policy_ns);
    (!conv.drop).then_some(pb::Rule { clauses })
}

impl Model {
    pub(super) fn set_auth_policy(
        &mut self,
        id: NsName,
        info: Option<PolicyInfo>,
        dirty: &mut Dirty,
    ) {
        let old = self.auth_policies.get(&id);
        if old == info.as_ref() {
            return;
        }
        // Logged on change only, so resyncs stay quiet.
        if let Some(i) = &info
            && let Some(status) = &i.status
        {
            let policy = format!("{}/{}", id.0, id.1);
            if i.output.is_some() {
                tracing::info!(%policy, %status, "authorization policy converted with changes");
            } else {
                tracing::warn!(%policy, %status, "authorization policy not sent to ztunnel");
            }
        }
        let old_selector = old.and_then(|o| o.selector.clone());
        let new_selector = info.as_ref().and_then(|i| i.selector.clone());
        dirty.policies.insert(PolicyRef::Authz(id.clone()));
        if old_selector != new_selector {
            // Root-namespace selector policies select in every namespace.
            let scope = (id.0 != self.cfg.root_namespace).then_some(id.0.as_str());
            for sel in old_selector.iter().chain(new_selector.iter()) {
                dirty.workloads.extend(self.index.select(scope, sel));
            }
            let set = self.selector_policies.entry(id.0.clone()).or_default();
            if new_selector.is_some() {
                set.insert(id.1.clone());
            } else {
                set.remove(&id.1);
            }
        }
        match info {
            Some(i) => {
                self.auth_policies.insert(id, i);
            }
            None => {
                self.auth_policies.remove(&id);
            }
        }
    }

    /// `<ns>/<name>` of the WORKLOAD_SELECTOR policies that select a workload.
    pub(super) fn selected_auth_policies(&self, ns: &str, labels: &Labels) -> Vec<String> {
        let mut out = Vec::new();
        let root = self.cfg.root_namespace.as_str();
        let namespaces: &[&str] = if ns == root { &[root] } else { &[ns, root] };
        for pns in namespaces {
            for name in self.selector_policies.get(*pns).into_iter().flatten() {
                let selected = self
                    .auth_policies
                    .get(&(pns.to_string(), name.clone()))
                    .and_then(|p| p.selector.as_ref())
                    .is_some_and(|s| selector_matches(s, labels));
                if selected {
                    out.push(format!("{pns}/{name}"));
                }
            }
        }
        out
    }
}
