//! Certificate store: fetches workload certificates on demand, shares concurrent fetches, and
//! rotates each known identity in the background at half-life with jittered retry.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::Shared;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::Identity;
use crate::ca::{CaError, CertificateProvider};
use crate::certificate::{CertDump, WorkloadCertificate};

/// Retry and jitter settings for rotation.
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// First retry delay after a failed fetch (also the floor between refreshes).
    pub min_backoff: Duration,
    /// Cap on the retry delay.
    pub max_backoff: Duration,
    /// Jitter fraction in `[0, 1]`: retries vary by ±this share, refreshes are delayed by up
    /// to this share of the remaining half-life.
    pub jitter: f64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            jitter: 0.1,
        }
    }
}

/// Why the store could not produce a certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// The provider failed and no valid certificate is cached.
    #[error("fetching certificate for {id}: {source}")]
    Fetch {
        /// The identity asked for.
        id: Identity,
        /// The provider's error (shared by every caller of the same fetch).
        #[source]
        source: Arc<CaError>,
    },
}

type CertResult = Result<Arc<WorkloadCertificate>, CertError>;
type SharedFetch = Shared<Pin<Box<dyn Future<Output = CertResult> + Send>>>;

struct Entry {
    // Distinguishes this entry from one re-created after `forget`.
    epoch: u64,
    cert: Option<Arc<WorkloadCertificate>>,
    pending: Option<SharedFetch>,
    rotation: Option<AbortHandle>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // Removing an identity (or dropping the store) stops its rotation.
        if let Some(task) = self.rotation.take() {
            task.abort();
        }
    }
}

struct Inner {
    provider: Arc<dyn CertificateProvider>,
    config: RotationConfig,
    entries: Mutex<HashMap<Identity, Entry>>,
    next_epoch: AtomicU64,
    rotations: AtomicU64,
    changes: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        // Entries stay coherent even if a holder panicked; keep serving.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs a certificate into `entry`; replacing one is a rotation and is announced.
    fn install(&self, entry: &mut Entry, cert: Arc<WorkloadCertificate>) {
        if entry.cert.replace(cert).is_some() {
            let n = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
            self.changes.send_replace(n);
        }
    }
}

/// Per-identity workload certificates with background rotation; clones share state.
#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("identities", &self.inner.lock().len())
            .field("rotations", &self.rotation_count())
            .finish()
    }
}

impl CertStore {
    /// Creates an empty store fed by `provider`.
    pub fn new(provider: Arc<dyn CertificateProvider>, config: RotationConfig) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                provider,
                config,
                entries: Mutex::new(HashMap::new()),
                next_epoch: AtomicU64::new(0),
                rotations: AtomicU64::new(0),
                changes,
            }),
        }
    }

    /// The current certificate for `id`, fetching it (once for all concurrent callers) if
    /// there is none or it has expired. Starts background rotation on first success.
    pub async fn get(&self, id: &Identity) -> CertResult {
        let fetch = {
            let mut entries = self.inner.lock();
            let entry = entries.entry(id.clone()).or_insert_with(|| Entry {
                epoch: self.inner.next_epoch.fetch_add(1, Ordering::Relaxed),
                cert: None,
                pending: None,
                rotation: None,
            });
            if let Some(cert) = &entry.cert
                && !cert.is_expired()
            {
                return Ok(cert.clone());
            }
            match &entry.pending {
                Some(p) => p.clone(),
                None => {
                    let p = self.fetch(id.clone(), entry.epoch);
                    entry.pending = Some(p.clone());
                    p
                }
            }
        };
        fetch.await
    }

    /// The cached certificate for `id` if it is still valid; never fetches.
    pub fn cached(&self, id: &Identity) -> Option<Arc<WorkloadCertificate>> {
        self.inner
            .lock()
            .get(id)
            .and_then(|e| e.cert.clone())
            .filter(|c| !c.is_expired())
    }

    fn fetch(&self, id: Identity, epoch: u64) -> SharedFetch {
        let weak = Arc::downgrade(&self.inner);
        let provider = self.inner.provider.clone();
        let fut = async move {
            let result = provider.fetch(&id).await;
            // Callers hold the store while awaiting, so this only fails if they all went away.
            let inner = weak.upgrade();
            let mut entries = inner.as_ref().map(|i| i.lock());
            let entry = entries
                .as_mut()
                .and_then(|m| m.get_mut(&id))
                .filter(|e| e.epoch == epoch);
            match result {
                Ok(cert) => {
                    let cert = Arc::new(cert);
                    if let (Some(inner), Some(entry)) = (&inner, entry) {
                        entry.pending = None;
                        inner.install(entry, cert.clone());
                        if entry.rotation.is_none() {
                            let task = tokio::spawn(rotate(weak.clone(), id.clone(), epoch));
                            entry.rotation = Some(task.abort_handle());
                        }
                    }
                    tracing::info!(identity = %id, serial = %cert.serial, "certificate fetched");
                    Ok(cert)
                }
                Err(e) => {
                    if let Some(entry) = entry {
                        entry.pending = None;
                    }
                    tracing::warn!(identity = %id, error = %e, "certificate fetch failed");
                    Err(CertError::Fetch {
                        id,
                        source: Arc::new(e),
                    })
                }
            }
        };
        let boxed: Pin<Box<dyn Future<Output = CertResult> + Send>> = Box::pin(fut);
        boxed.shared()
    }

    /// Drops `id`'s certificate and stops its rotation.
    pub fn forget(&self, id: &Identity) {
        let removed = self.inner.lock().remove(id);
        // Dropped outside the lock; Entry's Drop aborts the rotation task.
        drop(removed);
    }

    /// Summaries of all cached certificates, sorted by identity.
    pub fn dump(&self) -> Vec<CertDump> {
        let mut out: Vec<_> = self
            .inner
            .lock()
            .values()
            .filter_map(|e| e.cert.as_ref().map(|c| c.dump()))
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// A receiver of the rotation count, updated whenever a certificate is replaced by a newer
    /// one (first fetches are not announced; bursts may coalesce, so use the value, not the
    /// number of wake-ups, for counting).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// How many times a certificate has been replaced by a newer one.
    pub fn rotation_count(&self) -> u64 {
        self.inner.rotations.load(Ordering::Relaxed)
    }
}

/// Uniform random factor in `[1 - jitter, 1 + jitter]`.
fn jittered(d: Duration, jitter: f64) -> Duration {
    let j = jitter.clamp(0.0, 1.0);
    let factor = 1.0 - j + 2.0 * j * rand::random::<f64>();
    d.mul_f64(factor)
}

/// How long to wait before refreshing `cert`: until half-life plus up to `jitter` of the
/// remaining half, never less than `floor` (so near-expired certs cannot cause a hot loop).
fn refresh_delay(cert: &WorkloadCertificate, config: &RotationConfig) -> Duration {
    let refresh_at = cert.refresh_at();
    let spread = cert
        .not_after
        .duration_since(refresh_at)
        .unwrap_or_default()
        .mul_f64(config.jitter.clamp(0.0, 1.0) * rand::random::<f64>());
    (refresh_at + spread)
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .max(config.min_backoff)
}

/// Background rotation for one identity; holds only a weak reference to the store.
async fn rotate(weak: Weak<Inner>, id: Identity, epoch: u64) {
    loop {
        let (delay, provider, config) = {
            let Some(inner) = weak.upgrade() else { return };
            let entries = inner.lock();
            let Some(cert) = entries
                .get(&id)
                .filter(|e| e.epoch == epoch)
                .and_then(|e| e.cert.clone())
            else {
                return;
            };
            (
                refresh_delay(&cert, &inner.config),
                inner.provider.clone(),
                inner.config.clone(),
            )
        };
        tokio::time::sleep(delay).await;
        let mut backoff = config.min_backoff;
        loop {
            match provider.fetch(&id).await {
                Ok(cert) => {
                    let Some(inner) = weak.upgrade() else { return };
                    let mut entries = inner.lock();
                    let Some(entry) = entries.get_mut(&id).filter(|e| e.epoch == epoch) else {
                        return;
                    };
                    tracing::info!(identity = %id, serial = %cert.serial, "certificate rotated");
                    inner.install(entry, Arc::new(cert));
                    break;
                }
                Err(e) => {
                    let wait = jittered(backoff, config.jitter);
                    tracing::warn!(identity = %id, error = %e, retry_in = ?wait,
                        "certificate rotation failed; serving the previous certificate");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(config.max_backoff);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use super::*;
    use crate::ca::{FakeCa, FetchFuture};

    /// Wraps a FakeCa: counts calls, can be told to fail, and can add latency.
    struct TestProvider {
        ca: FakeCa,
        ttl: Duration,
        delay: Duration,
        calls: AtomicUsize,
        failures: AtomicUsize,
        fail: AtomicBool,
    }

    impl TestProvider {
        fn new(ttl: Duration, delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                ca: FakeCa::new("cluster.local").unwrap(),
                ttl,
                delay,
                calls: AtomicUsize::new(0),
                failures: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
            })
        }
    }

    impl CertificateProvider for TestProvider {
        fn fetch(&self, id: &Identity) -> FetchFuture<'_> {
            let id = id.clone();
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if self.fail.load(Ordering::SeqCst) {
                    self.failures.fetch_add(1, Ordering::SeqCst);
                    return Err(CaError::Config("injected failure".into()));
                }
                self.ca.issue(&id, self.ttl)
            })
        }
    }

    fn fast() -> RotationConfig {
        RotationConfig {
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            jitter: 0.1,
        }
    }

    fn id() -> Identity {
        Identity::new("cluster.local", "ns", "sa")
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn store_rotates_short_lived_cert_before_expiry() {
        let ca = Arc::new(
            FakeCa::new("cluster.local")
                .unwrap()
                .with_ttl(Duration::from_secs(2)),
        );
        let store = CertStore::new(ca, fast());
        let first = store.get(&id()).await.unwrap();
        let mut changes = store.subscribe();
        let seen = *changes.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("no rotation within 5s")
            .unwrap();
        assert!(*changes.borrow() > seen);
        assert_eq!(*changes.borrow(), store.rotation_count());
        let second = store.get(&id()).await.unwrap();
        assert_ne!(first.serial, second.serial);
        assert!(!second.is_expired());
        assert!(store.rotation_count() >= 1);
        assert_eq!(store.dump().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_gets_share_one_fetch() {
        let p = TestProvider::new(Duration::from_secs(3600), Duration::from_millis(200));
        let store = CertStore::new(p.clone(), fast());
        let gets = (0..10).map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.get(&id()).await })
        });
        let certs: Vec<_> = futures::future::join_all(gets)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);
        assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
        // A later get is served from cache.
        store.get(&id()).await.unwrap();
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);
        assert_eq!(store.rotation_count(), 0);
    }

    #[tokio::test]
    async fn failing_rotation_keeps_old_cert_until_expiry_and_retries() {
        let p = TestProvider::new(Duration::from_secs(3), Duration::ZERO);
        let store = CertStore::new(p.clone(), fast());
        let first = store.get(&id()).await.unwrap();
        p.fail.store(true, Ordering::SeqCst);
        wait_for("two failed refreshes", || {
            p.failures.load(Ordering::SeqCst) >= 2
        })
        .await;
        let during = store.get(&id()).await.unwrap();
        assert_eq!(during.serial, first.serial);
        assert!(!during.is_expired());

        let until_expiry = first
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(until_expiry + Duration::from_millis(100)).await;
        assert!(matches!(
            store.get(&id()).await,
            Err(CertError::Fetch { .. })
        ));
        assert!(store.cached(&id()).is_none());
        assert!(p.failures.load(Ordering::SeqCst) >= 4, "kept retrying");

        p.fail.store(false, Ordering::SeqCst);
        wait_for("recovery", || store.cached(&id()).is_some()).await;
        let recovered = store.get(&id()).await.unwrap();
        assert_ne!(recovered.serial, first.serial);
    }

    #[tokio::test]
    async fn forget_stops_rotation_and_removes_cert() {
        let p = TestProvider::new(Duration::from_secs(2), Duration::ZERO);
        let store = CertStore::new(p.clone(), fast());
        store.get(&id()).await.unwrap();
        store.forget(&id());
        assert!(store.dump().is_empty());
        assert!(store.cached(&id()).is_none());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);
        assert_eq!(store.rotation_count(), 0);
    }

    #[tokio::test]
    async fn dropping_store_ends_rotation_tasks() {
        let p = TestProvider::new(Duration::from_secs(3600), Duration::ZERO);
        let store = CertStore::new(p.clone(), fast());
        store.get(&id()).await.unwrap();
        store
            .get(&Identity::new("cluster.local", "b", "b"))
            .await
            .unwrap();
        // Store + two rotation tasks each hold the provider.
        wait_for("tasks started", || Arc::strong_count(&p) == 4).await;
        drop(store);
        wait_for("tasks aborted", || Arc::strong_count(&p) == 1).await;
    }

    #[tokio::test]
    async fn failed_fetch_is_reported_to_every_waiter_and_retried_later() {
        let p = TestProvider::new(Duration::from_secs(3600), Duration::from_millis(100));
        p.fail.store(true, Ordering::SeqCst);
        let store = CertStore::new(p.clone(), fast());
        let who = id();
        let (a, b) = tokio::join!(store.get(&who), store.get(&who));
        assert!(a.is_err() && b.is_err());
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);
        p.fail.store(false, Ordering::SeqCst);
        store.get(&id()).await.unwrap();
        assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10), 0.2);
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
        assert_eq!(
            jittered(Duration::from_secs(1), 0.0),
            Duration::from_secs(1)
        );
    }
}
