//! networking.istio.io: ServiceEntry and WorkloadEntry.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// ServiceEntry spec (`networking.istio.io/v1`).
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "ServiceEntry",
    namespaced,
    status = "serde_json::Value",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    /// Hostnames of the service (DNS names, wildcards allowed for some resolutions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDRs of the service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Ports of the service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Whether the service is inside or outside the mesh.
    pub location: ServiceEntryLocation,
    /// How endpoints are discovered.
    pub resolution: ServiceEntryResolution,
    /// Inline endpoints (exclusive with `workloadSelector`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Selects pods and WorkloadEntries as endpoints (exclusive with `endpoints`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<ServiceEntryWorkloadSelector>,
    /// Namespaces the service is visible to (`.` own, `*` all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Identities allowed to serve this service (checked by clients).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

/// A ServiceEntry port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port number the service is reached on.
    pub number: u32,
    /// Protocol: HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP or TLS.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// Port name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Endpoint port, when it differs from `number`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// ServiceEntry location.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceEntryLocation {
    /// Outside the mesh (the default): no mTLS to endpoints.
    #[default]
    MeshExternal,
    /// Part of the mesh.
    MeshInternal,
}

/// ServiceEntry endpoint resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceEntryResolution {
    /// Pass through to the original destination (the default).
    #[default]
    None,
    /// Use the static endpoint addresses.
    Static,
    /// Resolve endpoint hostnames (or hosts) via DNS, all addresses.
    Dns,
    /// Resolve via DNS, first address only.
    DnsRoundRobin,
}

/// ServiceEntry `workloadSelector` (note: `labels`, not `matchLabels`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryWorkloadSelector {
    /// Labels an endpoint workload must carry, all of them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// WorkloadEntry spec (`networking.istio.io/v1`); also the shape of ServiceEntry `endpoints`.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "WorkloadEntry",
    namespaced,
    status = "serde_json::Value",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    /// IP address or DNS name of the workload (or `unix://` path).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Port name to workload port number; overrides the service's `targetPort`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    /// Labels of the workload.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Network the workload is on; empty means the local network.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// Locality `region/zone/subzone`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Load-balancing weight; 0 means default.
    #[serde(skip_serializing_if = "is_zero")]
    pub weight: u32,
    /// Service account of the workload (identity), in the entry's namespace.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// serde helper: omit zero weights on output.
fn is_zero(v: &u32) -> bool {
    *v == 0
}
