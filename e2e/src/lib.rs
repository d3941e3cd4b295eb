//! End-to-end harness shared by integration tests and benchmarks: pods as network namespaces
//! with in-pod redirection, a node-agent stand-in speaking ZDS, the real ztunnel binary run as a
//! process, and small test apps. Everything here needs root.

pub mod apps;
pub mod ca;
pub mod cni;
pub mod controller;
pub mod mesh;
pub mod netns;
pub mod node;
pub mod process;
pub mod zds;
pub mod ztunnel;

/// True when running as root; network-namespace tests skip (pass) otherwise, except under CI
/// (`CI` set), where a missing root is a failure.
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        true
    } else if std::env::var_os("CI").is_some() {
        // CI runs as root: a skipped netns test there would be a silent hole in the suite.
        panic!("this test needs root for network namespaces, and CI is set");
    } else {
        eprintln!("skipping: needs root for network namespaces");
        false
    }
}
pub mod testapp;
