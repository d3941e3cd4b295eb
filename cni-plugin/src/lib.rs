//! Ambient enrollment on a node: the chained CNI plugin (`mesh-cni`) and the node agent
//! (`mesh-cni-agent`) that programs in-pod redirection and hands pod netns to ztunnel over ZDS.

pub mod agent;
pub mod cni;
pub mod install;
pub mod plugin_kubeconfig;
pub mod protocol;
