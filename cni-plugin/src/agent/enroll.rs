//! Enrollment: the agent's state machine. Every pod it has seen (from CNI ADD, from its
//! persisted state, or found by scanning) has a record; a record is *enrolled* when its
//! redirection is installed and ztunnel has it. Plugin requests, label changes and periodic
//! repair all go through here, one at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use super::cluster::{ClusterView, PodFacts, PodKey};
use super::metrics::Metrics;
use super::netns::{self, PodNetns};
use super::redirect::RedirectMode;
use super::rules::{RulesError, Verification};
use super::zds::{Delivery, ZdsHub, ZdsPod};
use crate::protocol::{Outcome, PluginCommand, PluginRequest, PluginResponse};

/// File under the state dir holding the pod records.
const STATE_FILE: &str = "pods.json";

/// What the enroller needs to know.
#[derive(Clone, Debug)]
pub struct EnrollConfig {
    /// How every pod is redirected.
    pub redirect: RedirectMode,
    /// Where the pod records are persisted across agent restarts.
    pub state_dir: PathBuf,
    /// How long an ADD waits for the pod to appear in the config source.
    pub pod_wait: Duration,
}

/// One pod the agent knows a netns for.
struct Record {
    uid: String,
    service_account: String,
    container_id: String,
    netns: Arc<PodNetns>,
    enrolled: bool,
}

/// Runs `f`, also returning how long it took (for the enrollment log line).
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let r = f.await;
    (r, t.elapsed())
}

/// What survives an agent restart.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedRecord {
    namespace: String,
    name: String,
    uid: String,
    service_account: String,
    container_id: String,
    netns: PathBuf,
    enrolled: bool,
}

/// The agent's pods and the operations on them.
pub struct Enroller {
    cfg: EnrollConfig,
    view: Arc<RwLock<ClusterView>>,
    view_changes: watch::Receiver<u64>,
    hub: ZdsHub,
    metrics: Metrics,
    records: Mutex<BTreeMap<PodKey, Record>>,
    persist: watch::Sender<Arc<Vec<SavedRecord>>>,
    /// Per pod: the netns and its nftables generation when its rules were last found intact.
    verified: std::sync::Mutex<BTreeMap<PodKey, (Arc<PodNetns>, u32)>>,
    /// Pods whose sandbox got a CNI DEL: reconcile must not find their netns by IP and enroll
    /// them again while the runtime tears the sandbox down. Cleared by the pod's next ADD or
    /// when the pod leaves the cluster view.
    deleted: std::sync::Mutex<std::collections::BTreeSet<PodKey>>,
}

impl Enroller {
    /// An enroller reading cluster state from `view` (bumped on `view_changes`).
    pub fn new(
        cfg: EnrollConfig,
        view: Arc<RwLock<ClusterView>>,
        view_changes: watch::Receiver<u64>,
        hub: ZdsHub,
        metrics: Metrics,
    ) -> Self {
        let (persist, snapshots) = watch::channel(Arc::new(Vec::new()));
        // Owned through `persist`: the writer ends once the enroller is dropped.
        tokio::spawn(write_state(cfg.state_dir.clone(), snapshots));
        Self {
            cfg,
            view,
            view_changes,
            hub,
            metrics,
            records: Mutex::new(BTreeMap::new()),
            persist,
            verified: std::sync::Mutex::new(BTreeMap::new()),
            deleted: std::sync::Mutex::new(Default::default()),
        }
    }

    /// Reloads records persisted by a previous run whose netns still exists, re-installs their
    /// redirection and puts them back in the set ztunnel receives. Call before serving ZDS.
    pub async fn restore(&self) {
        let path = self.state_file();
        let saved: Vec<SavedRecord> = match tokio::fs::read(&path).await {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable agent state");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        let mut records = self.records.lock().await;
        for s in saved {
            let key = PodKey {
                namespace: s.namespace,
                name: s.name,
            };
            let Ok(ns) = netns::open(&s.netns) else {
                tracing::info!(pod = %key, "netns of a remembered pod is gone; forgetting it");
                continue;
            };
            let mut rec = Record {
                uid: s.uid,
                service_account: s.service_account,
                container_id: s.container_id,
                netns: Arc::new(ns),
                enrolled: false,
            };
            if s.enrolled
                && let Err(e) = self.enroll(&key, &mut rec).await
            {
                tracing::warn!(pod = %key, error = %e, "re-enrolling a remembered pod failed");
            }
            records.insert(key, rec);
        }
        tracing::info!(pods = records.len(), "restored agent state");
        self.after_change(&records).await;
    }

    /// Handles one plugin request.
    pub async fn handle(&self, req: PluginRequest) -> PluginResponse {
        let key = PodKey {
            namespace: req.pod_namespace.clone(),
            name: req.pod_name.clone(),
        };
        let start = Instant::now();
        let result = match req.command {
            PluginCommand::Add => self.cni_add(&key, &req).await,
            PluginCommand::Del => self.cni_del(&key, &req).await,
            PluginCommand::Check => self.cni_check(&key).await,
        };
        let resp = match result {
            Ok(outcome) => PluginResponse {
                outcome,
                message: String::new(),
            },
            Err(message) => {
                tracing::warn!(pod = %key, command = ?req.command, %message, "plugin request failed");
                PluginResponse {
                    outcome: Outcome::Failed,
                    message,
                }
            }
        };
        tracing::info!(pod = %key, command = ?req.command, outcome = ?resp.outcome, elapsed = ?start.elapsed(), "plugin request");
        self.metrics
            .plugin_requests
            .with_label_values(&[
                &format!("{:?}", req.command).to_uppercase(),
                &format!("{:?}", resp.outcome),
            ])
            .inc();
        resp
    }

    async fn cni_add(&self, key: &PodKey, req: &PluginRequest) -> Result<Outcome, String> {
        self.deleted_pods().remove(key);
        let facts = self.wait_for_pod(key).await?;
        let ns = netns::open(Path::new(&req.netns))
            .map_err(|e| format!("opening pod netns {}: {e}", req.netns))?;
        let uid = [facts.uid.clone(), req.pod_uid.clone().unwrap_or_default()]
            .into_iter()
            .find(|u| !u.is_empty())
            .unwrap_or_else(|| key.to_string());
        let mut rec = Record {
            uid,
            service_account: facts.service_account.clone(),
            container_id: req.container_id.clone(),
            netns: Arc::new(ns),
            enrolled: false,
        };
        let mut records = self.records.lock().await;
        if let Some(mut old) = records.remove(key)
            && old.enrolled
        {
            // A new sandbox for the same pod: the old one is being replaced.
            self.unenroll(key, &mut old).await;
        }
        let outcome = if facts.captured {
            match self.enroll(key, &mut rec).await {
                Ok(()) => Outcome::Enrolled,
                Err(e) => {
                    self.after_change(&records).await;
                    return Err(e);
                }
            }
        } else {
            Outcome::NotAmbient
        };
        records.insert(key.clone(), rec);
        self.after_change(&records).await;
        Ok(outcome)
    }

    async fn cni_del(&self, key: &PodKey, req: &PluginRequest) -> Result<Outcome, String> {
        let mut records = self.records.lock().await;
        self.deleted_pods().insert(key.clone());
        let matches = records
            .get(key)
            .is_some_and(|r| req.container_id.is_empty() || r.container_id == req.container_id);
        if matches && let Some(mut rec) = records.remove(key) {
            if rec.enrolled {
                self.unenroll(key, &mut rec).await;
            }
            self.after_change(&records).await;
        }
        Ok(Outcome::Removed)
    }

    async fn cni_check(&self, key: &PodKey) -> Result<Outcome, String> {
        let records = self.records.lock().await;
        match records.get(key) {
            Some(rec) if rec.enrolled => {
                let verified = self
                    .cfg
                    .redirect
                    .verify_since(&rec.netns.file, &rec.uid, None);
                match verified.await.map(|(v, _)| v) {
                    Ok(Verification::Intact) => Ok(Outcome::Verified),
                    Ok(drift) => Err(format!("pod {key} redirection drifted: {drift:?}")),
                    Err(e) => Err(format!("verifying pod {key} redirection: {e}")),
                }
            }
            _ => {
                let captured = self.view_read().pod(key).is_some_and(|f| f.captured);
                if captured {
                    Err(format!(
                        "pod {key} is ambient but not enrolled on this node"
                    ))
                } else {
                    Ok(Outcome::NotAmbient)
                }
            }
        }
    }

    /// Brings every record in line with the cluster view: enrolls pods whose labels now say
    /// ambient (finding the netns of running pods the agent has no record of), unenrolls pods
    /// that opted out.
    pub async fn reconcile(&self) {
        let wanted: Vec<(PodKey, PodFacts)> = {
            let view = self.view_read();
            if !view.synced() {
                return;
            }
            view.pods().map(|(k, f)| (k.clone(), f)).collect()
        };
        self.deleted_pods()
            .retain(|k| wanted.iter().any(|(key, _)| key == k));
        let mut records = self.records.lock().await;
        for (key, facts) in wanted {
            match records.get_mut(&key) {
                Some(rec) if facts.captured && !rec.enrolled => {
                    if let Err(e) = self.enroll(&key, rec).await {
                        tracing::warn!(pod = %key, error = %e, "enrolling after a label change failed");
                    }
                }
                Some(rec) if !facts.captured && rec.enrolled => self.unenroll(&key, rec).await,
                Some(_) => {}
                None if facts.captured && !self.deleted_pods().contains(&key) => {
                    let ips = facts.ips.clone();
                    let found = tokio::task::spawn_blocking(move || netns::find_by_ip(&ips))
                        .await
                        .ok()
                        .flatten();
                    let Some(ns) = found else {
                        tracing::debug!(pod = %key, "ambient pod has no netns on this node yet");
                        continue;
                    };
                    tracing::info!(pod = %key, netns = %ns.path.display(), "found a running pod's netns");
                    let mut rec = Record {
                        uid: if facts.uid.is_empty() {
                            key.to_string()
                        } else {
                            facts.uid.clone()
                        },
                        service_account: facts.service_account.clone(),
                        container_id: String::new(),
                        netns: Arc::new(ns),
                        enrolled: false,
                    };
                    if let Err(e) = self.enroll(&key, &mut rec).await {
                        tracing::warn!(pod = %key, error = %e, "enrolling a running pod failed");
                    }
                    records.insert(key, rec);
                }
                None => {}
            }
        }
        self.after_change(&records).await;
    }

    /// Re-checks every enrolled pod's redirection and re-applies what drifted. Verification runs
    /// without holding the records, so CNI requests are never queued behind a sweep.
    pub async fn repair(&self) {
        let enrolled: Vec<(PodKey, String, Arc<PodNetns>)> = {
            let records = self.records.lock().await;
            records
                .iter()
                .filter(|(_, r)| r.enrolled)
                .map(|(k, r)| (k.clone(), r.uid.clone(), r.netns.clone()))
                .collect()
        };
        let known: BTreeMap<PodKey, u32> = {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            // Forget pods that left (and the netns handles they hold).
            verified.retain(|k, (ns, _)| {
                enrolled
                    .iter()
                    .any(|(key, _, n)| key == k && Arc::ptr_eq(n, ns))
            });
            verified.iter().map(|(k, (_, g))| (k.clone(), *g)).collect()
        };
        self.report_ebpf_drops(enrolled.iter().map(|(_, uid, _)| uid.as_str()));
        for (key, uid, ns) in enrolled {
            let since = known.get(&key).copied();
            match self.cfg.redirect.verify_since(&ns.file, &uid, since).await {
                Ok((Verification::Intact, generation)) => {
                    if let Some(g) = generation {
                        self.verified
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key, (ns, g));
                    }
                }
                Ok((drift, _)) => {
                    self.verified
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                    let records = self.records.lock().await;
                    // Only if the pod is still enrolled with the same netns.
                    let current = records
                        .get(&key)
                        .is_some_and(|r| r.enrolled && Arc::ptr_eq(&r.netns, &ns));
                    if !current {
                        continue;
                    }
                    tracing::warn!(pod = %key, ?drift, "redirection drifted; repairing");
                    match self.cfg.redirect.apply(&ns.file, &uid).await {
                        Ok(()) => self.metrics.repairs.inc(),
                        Err(e) => {
                            self.metrics
                                .enrollment_failures
                                .with_label_values(&["repair"])
                                .inc();
                            tracing::error!(pod = %key, error = %e, "repairing redirection failed");
                        }
                    }
                }
                Err(e) => tracing::warn!(pod = %key, error = %e, "verifying redirection failed"),
            }
        }
    }

    /// Waits until a view change (or `timeout`), for callers that loop on reconcile.
    pub fn view_changes(&self) -> watch::Receiver<u64> {
        self.view_changes.clone()
    }

    /// Number of enrolled pods.
    pub async fn enrolled(&self) -> usize {
        self.records
            .lock()
            .await
            .values()
            .filter(|r| r.enrolled)
            .count()
    }

    async fn enroll(&self, key: &PodKey, rec: &mut Record) -> Result<(), String> {
        let start = Instant::now();
        let pod = ZdsPod {
            uid: rec.uid.clone(),
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            service_account: rec.service_account.clone(),
            netns: Arc::new(
                rec.netns
                    .file
                    .try_clone()
                    .map_err(|e| format!("duplicating netns fd: {e}"))?,
            ),
        };
        let redirect = timed(self.cfg.redirect.apply(&rec.netns.file, &rec.uid));
        let ((rules, rules_took), (handed, zds_took)) = if self.cfg.redirect.before_handoff() {
            let (rules, took) = redirect.await;
            if let Err(e) = rules {
                return Err(self.redirection_failed(key, &rec.uid, e).await);
            }
            ((Ok(()), took), timed(self.hub.add(pod)).await)
        } else {
            // Both at once: ztunnel binding its listeners in the pod does not depend on the
            // rules, and until the rules exist nothing is captured (so nothing can bypass).
            tokio::join!(redirect, timed(self.hub.add(pod)))
        };
        if let Err(e) = rules {
            return Err(self.redirection_failed(key, &rec.uid, e).await);
        }
        match handed {
            Ok(delivery) => {
                rec.enrolled = true;
                self.metrics
                    .enrollment_seconds
                    .observe(start.elapsed().as_secs_f64());
                if delivery == Delivery::Queued {
                    tracing::info!(pod = %key, "enrolled; no ztunnel connected yet, traffic is held until one is");
                } else {
                    tracing::info!(pod = %key, elapsed = ?start.elapsed(), rules = ?rules_took, ztunnel = ?zds_took, "enrolled");
                }
                Ok(())
            }
            Err(e) => {
                // Keep the redirection: with no ztunnel listening the pod fails closed.
                let _ = self.hub.del(&rec.uid).await;
                self.metrics
                    .enrollment_failures
                    .with_label_values(&["ztunnel"])
                    .inc();
                Err(format!("handing pod {key} to ztunnel: {e}"))
            }
        }
    }

    /// Reports a failed redirection install; ztunnel must not keep serving the pod as enrolled.
    async fn redirection_failed(&self, key: &PodKey, uid: &str, e: RulesError) -> String {
        let _ = self.hub.del(uid).await;
        self.metrics
            .enrollment_failures
            .with_label_values(&["rules"])
            .inc();
        format!("installing redirection for pod {key}: {e}")
    }

    async fn unenroll(&self, key: &PodKey, rec: &mut Record) {
        if let Err(e) = self.hub.del(&rec.uid).await {
            tracing::warn!(pod = %key, error = %e, "ztunnel did not acknowledge removal");
        }
        if let Err(e) = self.cfg.redirect.remove(&rec.netns.file, &rec.uid).await {
            tracing::warn!(pod = %key, error = %e, "removing redirection failed");
        }
        rec.enrolled = false;
        tracing::info!(pod = %key, "unenrolled");
    }

    async fn wait_for_pod(&self, key: &PodKey) -> Result<PodFacts, String> {
        let mut changes = self.view_changes.clone();
        let deadline = tokio::time::Instant::now() + self.cfg.pod_wait;
        loop {
            if let Some(f) = self.view_read().pod(key) {
                return Ok(f);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                return Err(format!(
                    "pod {key} is not known to the config source on this node after {:?}",
                    self.cfg.pod_wait
                ));
            }
        }
    }

    /// eBPF mode: sets `mesh_cni_ebpf_dropped_connections` to the drops of the pods `uids`.
    fn report_ebpf_drops<'a>(&self, uids: impl Iterator<Item = &'a str>) {
        if !matches!(self.cfg.redirect, RedirectMode::Ebpf { .. }) {
            return;
        }
        let mut total = ebpf::Dropped::default();
        for d in uids.filter_map(|uid| self.cfg.redirect.dropped(uid)) {
            total.outbound += d.outbound;
            total.inbound += d.inbound;
        }
        for (direction, n) in [("outbound", total.outbound), ("inbound", total.inbound)] {
            let gauge = self.metrics.ebpf_dropped.with_label_values(&[direction]);
            gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn deleted_pods(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<PodKey>> {
        self.deleted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn view_read(&self) -> std::sync::RwLockReadGuard<'_, ClusterView> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_file(&self) -> PathBuf {
        self.cfg.state_dir.join(STATE_FILE)
    }

    /// Updates the gauge and persists the records.
    async fn after_change(&self, records: &BTreeMap<PodKey, Record>) {
        self.metrics
            .enrolled_pods
            .set(records.values().filter(|r| r.enrolled).count() as i64);
        let saved: Vec<SavedRecord> = records
            .iter()
            .map(|(k, r)| SavedRecord {
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                uid: r.uid.clone(),
                service_account: r.service_account.clone(),
                container_id: r.container_id.clone(),
                netns: r.netns.path.clone(),
                enrolled: r.enrolled,
            })
            .collect();
        // Written by a background task: CNI requests never wait for the disk.
        let _ = self.persist.send(Arc::new(saved));
    }
}

/// Writes the newest record snapshot whenever it changes, until the enroller goes away.
async fn write_state(dir: PathBuf, mut snapshots: watch::Receiver<Arc<Vec<SavedRecord>>>) {
    let path = dir.join(STATE_FILE);
    let tmp = path.with_extension("json.tmp");
    while snapshots.changed().await.is_ok() {
        let saved = snapshots.borrow_and_update().clone();
        let body = serde_json::to_vec_pretty(&*saved).unwrap_or_default();
        let write = async {
            tokio::fs::create_dir_all(&dir).await?;
            tokio::fs::write(&tmp, body).await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(e) = write.await {
            tracing::error!(file = %path.display(), error = %e, "persisting agent state failed");
        }
    }
}
