//! The chained CNI plugin `mesh-cni`: relays ADD/DEL/CHECK for Kubernetes pods to the node
//! agent, passes the previous plugin's result through unchanged, and fails closed when an
//! ambient pod cannot be enrolled.

pub mod apifallback;
pub mod fallback;
pub mod plugin;
pub mod spec;

pub use plugin::{Execution, execute, run};
pub use spec::{CniError, Command, NetConf, PodRef};
