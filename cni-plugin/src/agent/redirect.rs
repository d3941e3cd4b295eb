//! The redirection the agent programs in each enrolled pod, in the mode the node runs:
//! nftables rules (the default, as Istio) or eBPF programs (no netfilter on the pod's path).

use std::fs::File;
use std::path::PathBuf;

use super::ebpf_mode;
use super::rules::{self, RedirectConfig, RulesError, Verification};

/// How pods are redirected into ztunnel.
#[derive(Clone, Debug)]
pub enum RedirectMode {
    /// The `istio-ambient` nftables table plus connmark policy routing.
    Nftables(RedirectConfig),
    /// The `ebpf` crate's programs, pinned under `pin_root/<pod uid>/`.
    Ebpf {
        /// bpffs directory holding every pod's pins (ztunnel must see the same path).
        pin_root: PathBuf,
    },
}

impl RedirectMode {
    /// Programs the pod (`uid` names its pins in eBPF mode); idempotent.
    pub async fn apply(&self, netns: &File, uid: &str) -> Result<(), RulesError> {
        match self {
            Self::Nftables(cfg) => rules::apply(netns, cfg).await,
            Self::Ebpf { pin_root } => ebpf_mode::apply(netns, uid, pin_root).await,
        }
    }

    /// Removes what [`apply`](Self::apply) programmed; succeeds when it is already gone.
    pub async fn remove(&self, netns: &File, uid: &str) -> Result<(), RulesError> {
        match self {
            Self::Nftables(_) => rules::remove(netns).await,
            Self::Ebpf { pin_root } => ebpf_mode::remove(netns, uid, pin_root).await,
        }
    }

    /// Checks the pod still holds what [`apply`](Self::apply) programs. `known` and the
    /// returned value are the nftables generation shortcut of [`rules::verify_since`] (eBPF
    /// mode needs none: its check spawns no process).
    pub async fn verify_since(
        &self,
        netns: &File,
        uid: &str,
        known: Option<u32>,
    ) -> Result<(Verification, Option<u32>), RulesError> {
        match self {
            Self::Nftables(cfg) => rules::verify_since(netns, cfg, known).await,
            Self::Ebpf { pin_root } => Ok((ebpf_mode::verify(netns, uid, pin_root).await?, None)),
        }
    }

    /// eBPF mode: the connections the pod's programs dropped for want of a ztunnel listener
    /// (`None` in nftables mode, or when nothing is pinned for the pod).
    pub fn dropped(&self, uid: &str) -> Option<ebpf::Dropped> {
        match self {
            Self::Nftables(_) => None,
            Self::Ebpf { pin_root } => ebpf::PodRedirection::new(pin_root, uid)
                .and_then(|p| p.dropped())
                .ok(),
        }
    }

    /// Whether the pod must be programmed before ztunnel gets it. nftables rules capture
    /// nothing until they exist, so both can happen at once; in eBPF mode ztunnel registers
    /// its listeners in the pod's pins when it gets the pod, so the pins must exist first.
    pub fn before_handoff(&self) -> bool {
        matches!(self, Self::Ebpf { .. })
    }
}
