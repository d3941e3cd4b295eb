//! Shared harness for ztunnel's network-namespace tests (run as root).
#![allow(dead_code)]

pub mod apps;
pub mod net;
pub mod zds;
pub mod ztunnel;

/// Skips (passes) a test when not root: these tests need netns and nftables.
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        true
    } else {
        eprintln!("skipping: needs root for network namespaces");
        false
    }
}
