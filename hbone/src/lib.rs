//! HBONE: the mesh's mTLS tunnel. SPIFFE identities, rustls configs that verify them, a
//! certificate store fed by the Istio CA protocol, and the HTTP/2 CONNECT client pool and server.

pub mod ca;
pub mod certificate;
mod coalesce;
pub mod early;
pub mod identity;
pub mod pool;
pub mod server;
pub mod store;
pub mod stream;
pub mod tls;

pub use ca::{CaClientConfig, CaError, CertificateProvider, FakeCa, IstioCaClient, TokenSource};
pub use certificate::{CertDump, CertificateError, WorkloadCertificate};
pub use identity::{Identity, IdentityError};
pub use pool::{
    ConnectFuture, ConnectRequest, Connector, Pool, PoolConfig, PoolKey, PoolStats, TcpConnector,
};
pub use server::{InboundRequest, ServerSettings, serve};
pub use store::{CertError, CertStore, RotationConfig};
pub use stream::{H2Stream, HboneError, TlsTransport, copy_bidirectional, tls_transport};
pub use tls::{TlsError, client_config, peer_identity, server_config};
