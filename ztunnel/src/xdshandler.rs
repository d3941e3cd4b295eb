//! Applies delta xDS resources (Address, Authorization) to the state; a resource that does not
//! decode or validate is NACKed and the rest of the response still applies.

use std::sync::Arc;

use prost::Message;
use xds::client::{ClientError, Handler, Rejected};
use xds::istio::security::Authorization;
use xds::istio::workload::Address;
use xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, Resource};

use crate::metrics::Metrics;
use crate::readiness::ReadyGuard;
use crate::state::StateStore;

/// The ztunnel side of the delta-ADS stream.
pub struct StateHandler {
    state: StateStore,
    metrics: Arc<Metrics>,
    /// Released after the first response of each type: ztunnel is ready once it has config.
    pending: Vec<(String, ReadyGuard)>,
    /// Fired once every type has been received (in-pod proxies start only then).
    on_synced: Option<tokio::sync::oneshot::Sender<()>>,
}

impl StateHandler {
    /// A handler writing into `state`; `ready` is released once both types were received.
    pub fn new(state: StateStore, metrics: Arc<Metrics>, ready: Vec<(String, ReadyGuard)>) -> Self {
        Self {
            state,
            metrics,
            pending: ready,
            on_synced: None,
        }
    }

    /// Signals `tx` once the first response of every type has been applied.
    pub fn notify_synced(mut self, tx: tokio::sync::oneshot::Sender<()>) -> Self {
        self.on_synced = Some(tx);
        self
    }
}

fn decode<M: Message + Default>(r: &Resource, type_url: &str) -> Result<M, String> {
    let any = r
        .resource
        .as_ref()
        .ok_or_else(|| "resource has no body".to_string())?;
    if any.type_url != type_url {
        return Err(format!("type {:?}, expected {type_url:?}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode: {e}"))
}

impl Handler for StateHandler {
    fn handle(
        &mut self,
        type_url: &str,
        updates: Vec<Resource>,
        removed: Vec<String>,
    ) -> Vec<Rejected> {
        self.metrics.xds_message(type_url);
        let mut rejected = Vec::new();
        let mut reject = |name: &str, error: String| {
            rejected.push(Rejected {
                name: name.to_string(),
                error,
            })
        };
        match type_url {
            ADDRESS_TYPE => self.state.update(|s| {
                for name in &removed {
                    s.remove_address(name);
                }
                for r in &updates {
                    match decode::<Address>(r, ADDRESS_TYPE) {
                        Ok(a) => {
                            if let Err(e) = s.apply_address(&r.name, a) {
                                reject(&r.name, e.to_string());
                            }
                        }
                        Err(e) => reject(&r.name, e),
                    }
                }
            }),
            AUTHORIZATION_TYPE => self.state.update(|s| {
                for name in &removed {
                    s.remove_authorization(name);
                }
                for r in &updates {
                    match decode::<Authorization>(r, AUTHORIZATION_TYPE) {
                        Ok(a) => {
                            if let Err(e) = s.apply_authorization(&r.name, a) {
                                reject(&r.name, e.to_string());
                            }
                        }
                        Err(e) => reject(&r.name, e),
                    }
                }
            }),
            other => {
                for r in &updates {
                    reject(&r.name, format!("unsupported type {other}"));
                }
            }
        }
        for _ in &rejected {
            self.metrics.config_error("xds");
        }
        self.pending.retain(|(t, _)| t != type_url);
        if self.pending.is_empty()
            && let Some(tx) = self.on_synced.take()
        {
            let _ = tx.send(());
        }
        rejected
    }

    fn disconnected(&mut self, reason: &ClientError) {
        let reason = match reason {
            ClientError::Connect(_) | ClientError::Endpoint { .. } => "connect",
            ClientError::Stream(_) => "error",
            ClientError::Closed => "closed",
        };
        self.metrics.xds_connection_terminated(reason);
    }

    fn responded(&mut self, type_url: &str, rejected: &[Rejected]) {
        if !rejected.is_empty() {
            self.metrics.xds_nack(type_url);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds::istio::workload::{Workload, address};

    fn any(type_url: &str, value: Vec<u8>) -> Option<prost_types::Any> {
        Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        })
    }

    fn workload(uid: &str, ip: [u8; 4]) -> Vec<u8> {
        Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                name: "p".into(),
                namespace: "ns".into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn bad_resources_are_rejected_and_the_rest_applied() {
        let state = StateStore::default();
        let metrics = Arc::new(Metrics::new());
        let mut h = StateHandler::new(state.clone(), metrics.clone(), vec![]);
        let updates = vec![
            Resource {
                name: "good".into(),
                resource: any(ADDRESS_TYPE, workload("good", [10, 0, 0, 1])),
                ..Default::default()
            },
            Resource {
                name: "garbage".into(),
                resource: any(ADDRESS_TYPE, vec![0xff, 0xff, 0xff]),
                ..Default::default()
            },
            Resource {
                name: "bad-ip".into(),
                // A 3-byte IP address.
                resource: any(
                    ADDRESS_TYPE,
                    Address {
                        r#type: Some(address::Type::Workload(Workload {
                            uid: "bad-ip".into(),
                            addresses: vec![vec![1, 2, 3]],
                            ..Default::default()
                        })),
                    }
                    .encode_to_vec(),
                ),
                ..Default::default()
            },
            Resource {
                name: "wrong-type".into(),
                resource: any(AUTHORIZATION_TYPE, vec![]),
                ..Default::default()
            },
        ];
        let rejected = h.handle(ADDRESS_TYPE, updates, vec![]);
        let names: Vec<_> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["garbage", "bad-ip", "wrong-type"]);
        assert!(rejected.iter().all(|r| !r.error.is_empty()));
        let s = state.read();
        assert!(
            s.workload_by_uid(&crate::state::WorkloadUid::new("good"))
                .is_some()
        );
        assert_eq!(s.counts().0, 1);
        drop(s);
        assert!(
            metrics
                .encode()
                .contains("ztunnel_config_errors_total{source=\"xds\"} 3")
        );

        // Removal by name.
        assert!(
            h.handle(ADDRESS_TYPE, vec![], vec!["good".into()])
                .is_empty()
        );
        assert_eq!(state.read().counts().0, 0);
    }
}
