//! Istio CRD types, field-for-field with Istio's API (security.istio.io and networking.istio.io).
//!
//! Each `*Spec` derives `kube::CustomResource`, which generates the top-level type
//! (`AuthorizationPolicy { metadata, spec, status }`) implementing `kube::Resource` for the
//! storage version `v1`. The file loader accepts every served version listed below, because the
//! schemas are identical across them. Every spec struct rejects unknown fields so a typo in a
//! policy is an error instead of a silently different policy.

mod networking;
mod ports;
mod security;

pub use networking::{
    ServiceEntry, ServiceEntryLocation, ServiceEntryResolution, ServiceEntrySpec,
    ServiceEntryWorkloadSelector, ServicePort, WorkloadEntry, WorkloadEntrySpec,
};
pub use security::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationPolicySpec, Condition,
    ExtensionProvider, MtlsMode, Operation, PeerAuthentication, PeerAuthenticationMutualTls,
    PeerAuthenticationSpec, PolicyTargetReference, Rule, RuleFrom, RuleTo, Source,
    WorkloadSelector,
};

/// API group of AuthorizationPolicy and PeerAuthentication.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// Versions of [`SECURITY_GROUP`] accepted from files (same schema; `v1` is stored).
pub const SECURITY_VERSIONS: &[&str] = &["v1", "v1beta1"];
/// API group of ServiceEntry and WorkloadEntry.
pub const NETWORKING_GROUP: &str = "networking.istio.io";
/// Versions of [`NETWORKING_GROUP`] accepted from files (same schema; `v1` is stored).
pub const NETWORKING_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use kube::Resource;

    use super::*;

    #[test]
    fn json_from_api_server_round_trips_with_string_port_keys() {
        let json = serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "p", "namespace": "foo"},
            "spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}},
            "status": {"conditions": []}
        });
        let pa: PeerAuthentication = serde_json::from_value(json).unwrap();
        assert_eq!(pa.spec.port_level_mtls[&8080].mode, MtlsMode::Disable);
        let back = serde_json::to_value(&pa).unwrap();
        assert_eq!(back["apiVersion"], "security.istio.io/v1");
        assert_eq!(back["kind"], "PeerAuthentication");
        assert_eq!(back["spec"]["portLevelMtls"]["8080"]["mode"], "DISABLE");
        let again: PeerAuthentication = serde_json::from_value(back).unwrap();
        assert_eq!(again, pa);
    }

    #[test]
    fn port_keys_outside_port_range_are_rejected() {
        let json = serde_json::json!({"portLevelMtls": {"70000": {"mode": "STRICT"}}});
        let err = serde_json::from_value::<PeerAuthenticationSpec>(json).unwrap_err();
        assert!(err.to_string().contains("port number"), "{err}");
    }

    #[test]
    fn spec_rejects_unknown_fields_in_json_too() {
        let json = serde_json::json!({"hosts": ["a.example"], "resolutio": "DNS"});
        let err = serde_json::from_value::<ServiceEntrySpec>(json).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `resolutio`"),
            "{err}"
        );
    }

    #[test]
    fn resources_carry_istio_group_version_kind_and_plural() {
        assert_eq!(
            AuthorizationPolicy::api_version(&()),
            "security.istio.io/v1"
        );
        assert_eq!(AuthorizationPolicy::plural(&()), "authorizationpolicies");
        assert_eq!(PeerAuthentication::plural(&()), "peerauthentications");
        assert_eq!(ServiceEntry::group(&()), NETWORKING_GROUP);
        assert_eq!(ServiceEntry::plural(&()), "serviceentries");
        assert_eq!(WorkloadEntry::kind(&()), "WorkloadEntry");
        // CRD generation works with the strict schemas (used by install manifests).
        let crd = serde_json::to_value(AuthorizationPolicy::crd()).unwrap();
        assert_eq!(
            crd["metadata"]["name"],
            "authorizationpolicies.security.istio.io"
        );
    }

    #[test]
    fn defaults_follow_istio() {
        let se: ServiceEntrySpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(se.location, ServiceEntryLocation::MeshExternal);
        assert_eq!(se.resolution, ServiceEntryResolution::None);
        let ap: AuthorizationPolicySpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(ap.action, AuthorizationAction::Allow);
    }
}
