//! Istio CRD types. PLACEHOLDER: replaced by the real, field-exact types.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// security.istio.io AuthorizationPolicy.
#[derive(Clone, Debug, Default)]
pub struct AuthorizationPolicy {
    /// Metadata.
    pub metadata: ObjectMeta,
}
/// security.istio.io PeerAuthentication.
#[derive(Clone, Debug, Default)]
pub struct PeerAuthentication {
    /// Metadata.
    pub metadata: ObjectMeta,
}
/// networking.istio.io ServiceEntry.
#[derive(Clone, Debug, Default)]
pub struct ServiceEntry {
    /// Metadata.
    pub metadata: ObjectMeta,
}
/// networking.istio.io WorkloadEntry.
#[derive(Clone, Debug, Default)]
pub struct WorkloadEntry {
    /// Metadata.
    pub metadata: ObjectMeta,
}
