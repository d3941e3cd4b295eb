//! Kubernetes mode of the CA: CA material in Secrets, the root bundle published as a ConfigMap
//! in every namespace, and callers authenticated with TokenReview.

mod store;
mod token_review;

pub use store::{
    CA_SECRET, CA_SECRET_TYPE, DEFAULT_NAMESPACE, KubeRootStore, PLUGGED_SECRET, ROOT_CONFIGMAP,
};
pub use token_review::{
    NODE_NAME_EXTRA, POD_NAME_EXTRA, POD_UID_EXTRA, TOKEN_AUDIENCE, TokenReviewAuthenticator,
    TokenReviewConfig,
};

/// Whether a kube error is the API server's "not found" (by reason or, for bare errors, code).
fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found() || s.code == 404)
}

/// Whether a kube error says the object exists already (the answer to a create race).
fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists() || s.code == 409)
}

/// Whether a kube error is an optimistic-concurrency conflict on update.
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.code == 409)
}
