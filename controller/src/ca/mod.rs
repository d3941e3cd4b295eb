//! The mesh CA: a root (generated and persisted, or plugged in from Istio's `cacerts` layout)
//! that signs workload CSRs over `istio.v1.auth.IstioCertificateService`, after authenticating
//! the caller and checking that it may hold the requested identity.

mod auth;
mod authority;
mod pem;
mod service;
mod store;

pub use auth::{Authenticator, Caller, NodeAuthorizer, NodeTokens, TokenFileError, bearer_token};
pub use authority::{CaConfig, CertificateAuthority, ServingCert, ServingConfig};
pub use service::{CaService, IMPERSONATED_IDENTITY};
pub use store::{CA_CERT, CA_KEY, CERT_CHAIN, CaMaterial, FileRootStore, ROOT_CERT, RootStore};

/// Why the CA could not load, persist or issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing CA files failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Only some of the CA files exist.
    #[error("incomplete CA material: {0}")]
    Incomplete(String),
    /// A key or certificate could not be decoded.
    #[error("invalid CA material: {0}")]
    Material(String),
    /// The CSR is malformed, badly signed, or asks for something else than the identity.
    #[error("invalid CSR: {0}")]
    Csr(String),
    /// Building or signing a certificate failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A store backend (e.g. Kubernetes) failed.
    #[error("CA store: {0}")]
    Store(String),
}

pub mod kube;
#[cfg(test)]
mod tests;
