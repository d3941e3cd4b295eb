//! Typed configuration objects, the same whichever source produced them (files or Kubernetes),
//! and the events sources send downstream.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

use crate::crd::{AuthorizationPolicy, PeerAuthentication, ServiceEntry, WorkloadEntry};

/// The kinds the controller understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 ServiceAccount.
    ServiceAccount,
    /// networking.istio.io ServiceEntry.
    ServiceEntry,
    /// networking.istio.io WorkloadEntry.
    WorkloadEntry,
    /// security.istio.io AuthorizationPolicy.
    AuthorizationPolicy,
    /// security.istio.io PeerAuthentication.
    PeerAuthentication,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies one object: kind, namespace ("" for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    /// Kind.
    pub kind: Kind,
    /// Namespace, empty for cluster-scoped kinds.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key.
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One typed configuration object. Objects travel in an `Arc`, so the size spread between
/// variants (a Pod is large) costs nothing.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// A namespace.
    Namespace(Namespace),
    /// A pod.
    Pod(Pod),
    /// A service.
    Service(Service),
    /// An endpoint slice.
    EndpointSlice(EndpointSlice),
    /// A service account.
    ServiceAccount(ServiceAccount),
    /// An Istio ServiceEntry.
    ServiceEntry(ServiceEntry),
    /// An Istio WorkloadEntry.
    WorkloadEntry(WorkloadEntry),
    /// An Istio AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// An Istio PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::WorkloadEntry(_) => Kind::WorkloadEntry,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
        }
    }

    /// The object's metadata.
    pub fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ServiceEntry(o) => &o.metadata,
            Object::WorkloadEntry(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
        }
    }

    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        let namespace = match self.kind() {
            Kind::Namespace => String::new(),
            _ => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        ObjectKey::new(
            self.kind(),
            namespace,
            meta.name.clone().unwrap_or_default(),
        )
    }
}

/// A change from a source.
#[derive(Clone, Debug)]
pub enum ConfigEvent {
    /// The object was created or updated.
    Apply(Arc<Object>),
    /// The object is gone.
    Delete(ObjectKey),
    /// The source has delivered its complete initial state.
    Synced,
}

/// Where sources send batches of events (one batch = one consistent change).
pub type EventSender = tokio::sync::mpsc::Sender<Vec<ConfigEvent>>;
/// The receiving end, owned by the model.
pub type EventReceiver = tokio::sync::mpsc::Receiver<Vec<ConfigEvent>>;
