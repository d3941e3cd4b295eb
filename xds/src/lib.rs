//! Wire API shared by every component: generated protobuf types (Envoy delta discovery, Istio
//! workload/authorization/ZDS/CA) and the delta-ADS client.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod client;

/// Envoy's discovery protocol messages and the ADS service.
pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

/// `google.rpc.Status`, used for NACK details.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// Istio's APIs.
pub mod istio {
    /// Workload discovery (`istio.workload.Address`) and, nested, ZDS.
    pub mod workload {
        tonic::include_proto!("istio.workload");
        /// Node agent -> ztunnel netns hand-off.
        pub mod zds {
            tonic::include_proto!("istio.workload.zds");
        }
    }
    /// L4 authorization (`istio.security.Authorization`).
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    /// The CA protocol (`IstioCertificateService`).
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub use envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource,
};

/// Type URL of workload and service resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of L4 authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
