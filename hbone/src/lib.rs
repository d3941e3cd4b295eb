//! HBONE: the mesh's mTLS tunnel. SPIFFE identities, rustls configs that verify them, a
//! certificate store fed by the Istio CA protocol, and the HTTP/2 CONNECT client pool and server.

pub mod identity;

pub use identity::{Identity, IdentityError};
