//! The e2e test mesh, started with this package's ztunnel binary.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use e2e::mesh::{Mesh, Options, allow_principal, deny_principal, eventually};

/// Starts a mesh for test number `id` (unique per test).
pub fn start(id: u8, opts: Options<'_>) -> Mesh {
    Mesh::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_ztunnel")),
        id,
        opts,
    )
}
