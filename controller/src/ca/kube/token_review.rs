//! Kubernetes-mode [`Authenticator`]: the bearer token is a projected service-account token,
//! verified with a TokenReview; node proxies (ztunnel) are tied to the node of the pod their
//! token is bound to.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hbone::Identity;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::ca::{Authenticator, Caller, bearer_token};

/// Audience the tokens presented to the CA must carry.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// TokenReview `user.extra` key naming the node of a pod-bound token (Kubernetes ≥ 1.32).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// TokenReview `user.extra` key naming the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview `user.extra` key with the uid of the pod a token is bound to.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

const SA_PREFIX: &str = "system:serviceaccount:";

/// TokenReview authentication settings.
#[derive(Clone, Debug)]
pub struct TokenReviewConfig {
    /// Trust domain of the identities given to callers.
    pub trust_domain: String,
    /// Audiences requested in the review; the token must be valid for one of them.
    pub audiences: Vec<String>,
    /// Service accounts of node proxies, as `namespace/name`; their callers get a node.
    pub node_proxies: Vec<String>,
    /// How long a successful review is reused.
    pub cache_ttl: Duration,
    /// Most reviews kept (0 disables caching).
    pub cache_capacity: usize,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            audiences: vec![TOKEN_AUDIENCE.into()],
            node_proxies: vec!["istio-system/ztunnel".into()],
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 4096,
        }
    }
}

/// SHA-256 of a token: the cache never holds the tokens themselves.
type TokenHash = [u8; 32];

/// Successful reviews by token hash, each until its deadline.
struct ReviewCache {
    entries: HashMap<TokenHash, (Instant, Caller)>,
    ttl: Duration,
    capacity: usize,
}

impl ReviewCache {
    fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            ttl,
            capacity,
        }
    }

    fn get(&mut self, key: &TokenHash, now: Instant) -> Option<Caller> {
        match self.entries.get(key) {
            Some((deadline, caller)) if *deadline > now => Some(caller.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: TokenHash, caller: Caller, now: Instant) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (deadline, _)| *deadline > now);
            if self.entries.len() >= self.capacity {
                // Still full of live entries: drop the one closest to expiry.
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (deadline, _))| *deadline)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.entries.remove(&k);
                }
            }
        }
        self.entries.insert(key, (now + self.ttl, caller));
    }
}

fn token_hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `(namespace, name)` of a `system:serviceaccount:<ns>:<sa>` username.
fn service_account(username: &str) -> Option<(&str, &str)> {
    let (ns, sa) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
    let valid = |s: &str| !s.is_empty() && !s.contains([':', '/']);
    (valid(ns) && valid(sa)).then_some((ns, sa))
}

/// The first non-empty value of a `user.extra` key.
fn extra<'a>(user: &'a UserInfo, key: &str) -> Option<&'a str> {
    user.extra
        .as_ref()?
        .get(key)?
        .iter()
        .map(String::as_str)
        .find(|v| !v.is_empty())
}

/// Authenticates callers by TokenReview of their bearer token.
pub struct TokenReviewAuthenticator {
    client: Client,
    config: TokenReviewConfig,
    cache: Mutex<ReviewCache>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// An authenticator reviewing tokens through `client`.
    pub fn new(client: Client, config: TokenReviewConfig) -> Self {
        let cache = ReviewCache::new(config.cache_ttl, config.cache_capacity);
        Self {
            client,
            config,
            cache: Mutex::new(cache),
        }
    }

    /// The settings.
    pub fn config(&self) -> &TokenReviewConfig {
        &self.config
    }

    fn is_node_proxy(&self, ns: &str, sa: &str) -> bool {
        self.config
            .node_proxies
            .iter()
            .any(|p| p.split_once('/') == Some((ns, sa)))
    }

    /// Reviews `token`; the flag says whether the answer may be cached.
    async fn review(&self, token: &str) -> Result<(Caller, bool), Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(self.config.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let result = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed");
                Status::unavailable("token review failed")
            })?;
        let status = result.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.as_deref().unwrap_or("not authenticated");
            return Err(Status::unauthenticated(format!("token rejected: {why}")));
        }
        // The API server lists the requested audiences the token is valid for.
        if let Some(got) = &status.audiences
            && !self.config.audiences.is_empty()
            && !got.iter().any(|a| self.config.audiences.contains(a))
        {
            return Err(Status::unauthenticated(format!(
                "token is not valid for audience {:?}",
                self.config.audiences
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.as_deref().unwrap_or_default();
        let (ns, sa) = service_account(username).ok_or_else(|| {
            Status::unauthenticated(format!("{username:?} is not a service account"))
        })?;
        let identity = Some(Identity::new(self.config.trust_domain.as_str(), ns, sa));
        if !self.is_node_proxy(ns, sa) {
            return Ok((
                Caller {
                    identity,
                    node: None,
                },
                true,
            ));
        }
        if let Some(node) = extra(&user, NODE_NAME_EXTRA) {
            let node = Some(node.to_string());
            return Ok((Caller { identity, node }, true));
        }
        let Some(pod) = extra(&user, POD_NAME_EXTRA) else {
            tracing::warn!(%username, "node proxy token is not bound to a pod; it gets no node");
            return Ok((
                Caller {
                    identity,
                    node: None,
                },
                true,
            ));
        };
        let node = self.pod_node(ns, pod, extra(&user, POD_UID_EXTRA)).await?;
        // A node-less answer may be a transient state; only complete answers are reused.
        let cacheable = node.is_some();
        Ok((Caller { identity, node }, cacheable))
    }

    /// The node of pod `ns/name` (with uid `uid` when known), `None` when it is gone or unscheduled.
    async fn pod_node(
        &self,
        ns: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Option<String>, Status> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| {
                tracing::warn!(%ns, pod = %name, error = %e, "looking up the node proxy's pod failed");
                Status::unavailable("looking up the caller's pod failed")
            })?;
        let Some(pod) = pod else {
            tracing::warn!(%ns, pod = %name, "node proxy's bound pod does not exist");
            return Ok(None);
        };
        // A pod recreated under the same name may run elsewhere: the token names the old one.
        if let Some(uid) = uid
            && pod.metadata.uid.as_deref() != Some(uid)
        {
            tracing::warn!(%ns, pod = %name, "node proxy's bound pod was replaced");
            return Ok(None);
        }
        Ok(pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()))
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        let key = token_hash(token);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key, Instant::now());
        if let Some(caller) = cached {
            return Ok(caller);
        }
        let (caller, cacheable) = self.review(token).await?;
        if cacheable {
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
                key,
                caller.clone(),
                Instant::now(),
            );
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(node: &str) -> Caller {
        Caller {
            identity: None,
            node: Some(node.into()),
        }
    }

    #[test]
    fn service_account_usernames_parse_strictly() {
        assert_eq!(
            service_account("system:serviceaccount:istio-system:ztunnel"),
            Some(("istio-system", "ztunnel"))
        );
        for bad in [
            "system:serviceaccount:ns",
            "system:serviceaccount::sa",
            "system:serviceaccount:ns:",
            "system:serviceaccount:ns:sa:extra",
            "system:serviceaccount:n/s:sa",
            "admin",
            "system:node:node1",
        ] {
            assert_eq!(service_account(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_entries_expire_after_ttl() {
        let mut c = ReviewCache::new(Duration::from_secs(60), 8);
        let t0 = Instant::now();
        c.insert(token_hash("a"), caller("n1"), t0);
        assert_eq!(
            c.get(&token_hash("a"), t0 + Duration::from_secs(59)),
            Some(caller("n1"))
        );
        assert_eq!(c.get(&token_hash("b"), t0), None);
        assert_eq!(c.get(&token_hash("a"), t0 + Duration::from_secs(60)), None);
        assert!(c.entries.is_empty());
    }

    #[test]
    fn full_cache_drops_expired_then_oldest() {
        let mut c = ReviewCache::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        c.insert(token_hash("a"), caller("a"), t0);
        c.insert(token_hash("b"), caller("b"), t0 + Duration::from_secs(1));
        c.insert(token_hash("c"), caller("c"), t0 + Duration::from_secs(2));
        assert_eq!(c.entries.len(), 2);
        let now = t0 + Duration::from_secs(3);
        assert_eq!(c.get(&token_hash("a"), now), None);
        assert!(c.get(&token_hash("b"), now).is_some());
        assert!(c.get(&token_hash("c"), now).is_some());
        // Once "b" and "c" expired, a new entry replaces them instead of evicting live ones.
        let later = t0 + Duration::from_secs(100);
        c.insert(token_hash("d"), caller("d"), later);
        assert_eq!(c.entries.len(), 1);
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let mut c = ReviewCache::new(Duration::from_secs(60), 0);
        let t0 = Instant::now();
        c.insert(token_hash("a"), caller("a"), t0);
        assert_eq!(c.get(&token_hash("a"), t0), None);
    }
}
