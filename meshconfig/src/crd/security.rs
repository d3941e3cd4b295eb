//! security.istio.io: AuthorizationPolicy and PeerAuthentication.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Selects workloads by pod labels (`selector.matchLabels`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must carry, all of them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// A reference to the resource a policy attaches to (`targetRef`/`targetRefs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group of the target, e.g. `gateway.networking.k8s.io`; empty for core.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Kind of the target, e.g. `Gateway` or `Service`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Name of the target.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Namespace of the target; must be the policy's own namespace when set.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// AuthorizationPolicy spec (`security.istio.io/v1`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "serde_json::Value",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; absent means the whole namespace (or mesh, in the root namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Single attachment target (Gateway, Service, ...), exclusive with `selector`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Attachment targets, exclusive with `selector` and `targetRef`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Rules; a request matches the policy if any rule matches. Empty means "matches nothing".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// What to do with a matching request.
    pub action: AuthorizationAction,
    /// External authorizer for `action: CUSTOM`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

/// AuthorizationPolicy action.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    /// Allow matching requests (the default).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Audit matching requests (no effect on the decision).
    Audit,
    /// Delegate matching requests to an external authorizer.
    Custom,
}

/// The extension provider of a CUSTOM policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    /// Provider name as configured in the mesh config.
    pub name: String,
}

/// One authorization rule: all present sections (`from`, `to`, `when`) must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources; any may match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    /// Operations; any may match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Extra conditions; all must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// One `from` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// The source to match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// One `to` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// The operation to match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// Request source attributes; every populated field must match (positive hit, no negative hit).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities (`<trust-domain>/ns/<ns>/sa/<sa>`), with `*` prefix/suffix wildcards.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Negated `principals`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Request (JWT) principals `<iss>/<sub>`; L7 only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Negated `requestPrincipals`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Negated `namespaces`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts as `<ns>/<sa>` (or `<sa>` in the policy's namespace).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Negated `serviceAccounts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Source IPs or CIDRs (the connection's peer address).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Negated `ipBlocks`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs or CIDRs (X-Forwarded-For / PROXY); L7 only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Negated `remoteIpBlocks`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// Request operation attributes; every populated field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP hosts; L7 only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Negated `hosts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings (Istio's schema).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Negated `ports`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods; L7 only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Negated `methods`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// HTTP paths; L7 only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Negated `paths`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// A `when` condition on a request attribute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Attribute name, e.g. `source.ip`, `request.headers[x-foo]`.
    pub key: String,
    /// Values of which one must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Values none of which may match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// PeerAuthentication spec (`security.istio.io/v1`).
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    namespaced,
    status = "serde_json::Value",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads the policy applies to; absent means the whole namespace (or mesh, in the root namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Mode for all ports not listed in `portLevelMtls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerAuthenticationMutualTls>,
    /// Per-port override, keyed by the workload's (target) port number; needs a `selector`.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "super::ports::deserialize"
    )]
    pub port_level_mtls: BTreeMap<u32, PeerAuthenticationMutualTls>,
}

/// The mTLS setting of a PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationMutualTls {
    /// The mode.
    pub mode: MtlsMode,
}

/// PeerAuthentication mTLS mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope (namespace, then mesh); the default.
    #[default]
    Unset,
    /// Plaintext only.
    Disable,
    /// Accept both mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
}
