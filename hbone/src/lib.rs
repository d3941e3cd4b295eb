//! HBONE: the mesh's mTLS tunnel. SPIFFE identities, rustls configs that verify them, a
//! certificate store fed by the Istio CA protocol, and the HTTP/2 CONNECT client pool and server.

pub mod ca;
pub mod certificate;
pub mod identity;
pub mod pool;
pub mod server;
pub mod store;
pub mod stream;
pub mod tls;

pub use identity::{Identity, IdentityError};
