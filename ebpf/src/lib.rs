//! eBPF in-pod redirection, the node agent's alternative to nftables: no netfilter hook, NAT
//! or conntrack entry on the pod's packets.
//!
//! - `bpf/redirect.c` holds two programs, compiled by clang at build time: `outbound`
//!   (sk_lookup, attached to the pod netns) hands connections the app makes to ztunnel's 15001
//!   listener, and `inbound` (tc ingress on the pod's interface) hands new inbound connections
//!   (except HBONE on 15008 and kubelet probes) to the 15006 listener. Both drop the packet
//!   when no listener is registered, so a pod is never reachable around ztunnel.
//! - [`PodRedirection`] loads them for one pod and pins links and maps under
//!   `<pin root>/<pod uid>/`, so they outlive the node agent; ztunnel opens the pinned
//!   `listeners` map to register its sockets ([`PodRedirection::register`]).
//! - Outbound capture also needs policy routing in the pod (the node agent's job): marked
//!   sockets use the main table, other local TCP is routed to `lo` (see `ROUTING` below).

mod bpffs;
mod pod;

pub use bpffs::ensure as ensure_bpffs;
pub use pod::{Dropped, Listener, PodRedirection};

/// Where pins live by default: a bpffs of its own under `/run`, because `ip netns exec`
/// remounts `/sys` (and so hides `/sys/fs/bpf`) for the commands it runs.
pub const DEFAULT_PIN_ROOT: &str = "/run/istio-ambient/bpf";

/// The policy routing outbound capture relies on, as `ip` arguments (run in the pod netns;
/// `{pod_ip}` is the pod's IPv4 address): ztunnel's marked sockets keep the main table, the
/// kubelet probe address keeps the main table (replies to probes must leave the pod), and any
/// other locally sent TCP goes to table 133, whose local default route makes the kernel look
/// for a local socket, where `outbound` picks ztunnel's.
pub const ROUTING: &[&str] = &[
    "rule add pref 100 fwmark 0x539/0xfff lookup main",
    "rule add pref 101 to 169.254.7.127 lookup main",
    "rule add pref 102 iif lo ipproto tcp lookup 133",
    "route add local 0.0.0.0/0 dev lo src {pod_ip} table 133",
];

/// Why redirection could not be installed, inspected or used.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The BPF object was rejected (verifier, map creation, pinned map mismatch).
    #[error("loading the redirection programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// Loading or attaching a program failed.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        source: aya::programs::ProgramError,
    },
    /// A map could not be opened or updated.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        source: aya::maps::MapError,
    },
    /// A link could not be pinned or converted.
    #[error("pinning {what}: {message}")]
    Pin {
        /// What was being pinned.
        what: String,
        /// Cause.
        message: String,
    },
    /// A filesystem or namespace operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The pod key cannot name a directory.
    #[error("pod key {0:?} is not usable as a directory name")]
    BadKey(String),
    /// Nothing is pinned for the pod.
    #[error("no eBPF redirection is installed at {0}")]
    NotInstalled(std::path::PathBuf),
}

impl EbpfError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        EbpfError::Io {
            what: what.into(),
            source,
        }
    }
}
