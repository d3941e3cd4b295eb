//! [`RootStore`] on Kubernetes, following Istio's layout: the self-signed CA lives in Secret
//! `istio-ca-secret`, a plugged-in CA in Secret `cacerts` (which wins), and the root bundle is
//! published as ConfigMap `istio-ca-root-cert` in every namespace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::{is_already_exists, is_conflict, is_not_found};
use crate::ca::{
    CA_CERT, CA_KEY, CERT_CHAIN, CaConfig, CaError, CaMaterial, CertificateAuthority, ROOT_CERT,
    RootStore,
};

/// Namespace the controller keeps its CA Secret in unless configured otherwise.
pub const DEFAULT_NAMESPACE: &str = "istio-system";
/// Secret holding the generated self-signed CA.
pub const CA_SECRET: &str = "istio-ca-secret";
/// Type of the generated CA Secret (as Istio creates it).
pub const CA_SECRET_TYPE: &str = "istio.io/ca-root";
/// Secret holding a plugged-in CA; takes precedence over [`CA_SECRET`].
pub const PLUGGED_SECRET: &str = "cacerts";
/// ConfigMap carrying `root-cert.pem` in every namespace.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";

/// cert-manager style keys Istio also accepts in `cacerts`.
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_CA: &str = "ca.crt";

/// Namespaces written at once when publishing roots.
const PUBLISH_CONCURRENCY: usize = 8;
/// Read-modify-write rounds before giving up on a contended ConfigMap.
const WRITE_ATTEMPTS: usize = 3;

/// CA material in Secrets of one namespace, roots published to ConfigMaps cluster-wide.
#[derive(Clone)]
pub struct KubeRootStore {
    client: Client,
    namespace: String,
    /// The bundle last given to `publish_roots`, for namespaces created later.
    roots: Arc<Mutex<Option<Arc<str>>>>,
    /// Set when `save` found the Secret created by another replica.
    lost_race: Arc<AtomicBool>,
}

impl std::fmt::Debug for KubeRootStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRootStore")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn kube_err(op: &str, what: impl std::fmt::Display) -> impl FnOnce(kube::Error) -> CaError {
    let what = what.to_string();
    let op = op.to_string();
    move |e| CaError::Store(format!("{op} {what}: {e}"))
}

/// One key of a Secret as text; empty values count as absent (Istio writes empty optional keys).
fn secret_text(secret: &Secret, key: &str, name: &str) -> Result<Option<String>, CaError> {
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) else {
        return Ok(None);
    };
    if bytes.0.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    String::from_utf8(bytes.0.clone())
        .map(Some)
        .map_err(|_| CaError::Material(format!("secret {name}: {key} is not UTF-8 PEM")))
}

/// Reads Istio's `ca-cert.pem`/`ca-key.pem` layout, or cert-manager's `tls.crt`/`tls.key`/`ca.crt`.
fn material_from(secret: &Secret, name: &str) -> Result<CaMaterial, CaError> {
    let text = |key: &str| secret_text(secret, key, name);
    match (text(CA_CERT)?, text(CA_KEY)?) {
        (Some(cert_pem), Some(key_pem)) => Ok(CaMaterial {
            cert_pem,
            key_pem,
            cert_chain_pem: text(CERT_CHAIN)?,
            root_pem: text(ROOT_CERT)?,
        }),
        (None, None) => match (text(TLS_CRT)?, text(TLS_KEY)?) {
            // tls.crt may carry intermediates after the signing certificate.
            (Some(crt), Some(key_pem)) => Ok(CaMaterial {
                cert_pem: crt.clone(),
                key_pem,
                cert_chain_pem: Some(crt),
                root_pem: text(TLS_CA)?,
            }),
            _ => Err(CaError::Incomplete(format!(
                "secret {name} has neither {CA_CERT}/{CA_KEY} nor {TLS_CRT}/{TLS_KEY}"
            ))),
        },
        (Some(_), None) => Err(CaError::Incomplete(format!(
            "secret {name} has {CA_CERT} but no {CA_KEY}"
        ))),
        (None, Some(_)) => Err(CaError::Incomplete(format!(
            "secret {name} has {CA_KEY} but no {CA_CERT}"
        ))),
    }
}

fn terminating(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating")
}

impl KubeRootStore {
    /// A store keeping CA Secrets in `namespace` (normally [`DEFAULT_NAMESPACE`]).
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            roots: Arc::new(Mutex::new(None)),
            lost_race: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The namespace holding the CA Secrets.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// [`CertificateAuthority::load_or_create`], loading again once when another replica
    /// created `istio-ca-secret` between our load and save, so every replica signs with one root.
    pub async fn load_or_create_authority(
        &self,
        config: CaConfig,
    ) -> Result<CertificateAuthority, CaError> {
        self.lost_race.store(false, Ordering::SeqCst);
        match CertificateAuthority::load_or_create(self, config.clone()).await {
            Err(e) if self.lost_race.swap(false, Ordering::SeqCst) => {
                tracing::info!(reason = %e, "another replica created the CA first; loading it");
                CertificateAuthority::load_or_create(self, config).await
            }
            other => other,
        }
    }

    /// Writes the current root bundle into `namespace` (call when a namespace appears).
    /// Fails when no bundle was published yet (before `load_or_create`).
    pub async fn publish_to_namespace(&self, namespace: &str) -> Result<(), CaError> {
        let roots = self
            .roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| CaError::Store("no root bundle has been published yet".into()))?;
        self.write_roots(namespace, &roots).await
    }

    /// The root bundle last published, if any.
    pub fn current_roots(&self) -> Option<Arc<str>> {
        self.roots.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn load_secret(&self, name: &str) -> Result<Option<CaMaterial>, CaError> {
        let what = format!("secret {}/{name}", self.namespace);
        match self
            .secrets()
            .get_opt(name)
            .await
            .map_err(kube_err("reading", &what))?
        {
            Some(secret) => material_from(&secret, &what).map(Some),
            None => Ok(None),
        }
    }

    /// Creates or updates the root ConfigMap in `ns`, leaving an identical one untouched.
    async fn write_roots(&self, ns: &str, roots: &str) -> Result<(), CaError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let what = format!("configmap {ns}/{ROOT_CONFIGMAP}");
        let pp = PostParams::default();
        for _ in 0..WRITE_ATTEMPTS {
            let existing = api
                .get_opt(ROOT_CONFIGMAP)
                .await
                .map_err(kube_err("reading", &what))?;
            let result = match existing {
                Some(cm)
                    if cm
                        .data
                        .as_ref()
                        .and_then(|d| d.get(ROOT_CERT))
                        .map(String::as_str)
                        == Some(roots) =>
                {
                    return Ok(());
                }
                Some(mut cm) => {
                    // Our resourceVersion stays in the object, so a concurrent writer makes this
                    // a conflict instead of a lost update.
                    cm.data
                        .get_or_insert_default()
                        .insert(ROOT_CERT.into(), roots.into());
                    api.replace(ROOT_CONFIGMAP, &pp, &cm).await.map(drop)
                }
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(ROOT_CONFIGMAP.into()),
                            namespace: Some(ns.into()),
                            labels: Some(BTreeMap::from([(
                                "istio.io/config".to_string(),
                                "true".to_string(),
                            )])),
                            ..ObjectMeta::default()
                        },
                        data: Some(BTreeMap::from([(ROOT_CERT.to_string(), roots.to_string())])),
                        ..ConfigMap::default()
                    };
                    match api.create(&pp, &cm).await {
                        // The namespace went away meanwhile: nothing to publish to.
                        Err(e) if is_not_found(&e) => return Ok(()),
                        other => other.map(drop),
                    }
                }
            };
            match result {
                Ok(()) => return Ok(()),
                // Someone wrote (or deleted) it between our read and write: read again.
                Err(e) if is_conflict(&e) || is_already_exists(&e) || is_not_found(&e) => {
                    tracing::debug!(%ns, error = %e, "root ConfigMap changed concurrently; retrying");
                }
                Err(e) => return Err(kube_err("writing", &what)(e)),
            }
        }
        Err(CaError::Store(format!(
            "writing {what}: still contended after {WRITE_ATTEMPTS} attempts"
        )))
    }
}

#[tonic::async_trait]
impl RootStore for KubeRootStore {
    async fn load(&self) -> Result<Option<CaMaterial>, CaError> {
        if let Some(m) = self.load_secret(PLUGGED_SECRET).await? {
            tracing::info!(namespace = %self.namespace, "using the plugged-in CA from secret {PLUGGED_SECRET}");
            return Ok(Some(m));
        }
        self.load_secret(CA_SECRET).await
    }

    async fn save(&self, material: &CaMaterial) -> Result<(), CaError> {
        let mut data = BTreeMap::from([
            (
                CA_CERT.to_string(),
                ByteString(material.cert_pem.clone().into_bytes()),
            ),
            (
                CA_KEY.to_string(),
                ByteString(material.key_pem.clone().into_bytes()),
            ),
        ]);
        if let Some(chain) = &material.cert_chain_pem {
            data.insert(CERT_CHAIN.into(), ByteString(chain.clone().into_bytes()));
        }
        if let Some(root) = &material.root_pem {
            data.insert(ROOT_CERT.into(), ByteString(root.clone().into_bytes()));
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            type_: Some(CA_SECRET_TYPE.into()),
            data: Some(data),
            ..Secret::default()
        };
        let what = format!("secret {}/{CA_SECRET}", self.namespace);
        // Create-only: replicas racing on first start must not overwrite each other's root.
        match self.secrets().create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            Err(e) if is_already_exists(&e) => {
                self.lost_race.store(true, Ordering::SeqCst);
                Err(CaError::Store(format!(
                    "{what} was created concurrently by another replica; load it instead"
                )))
            }
            Err(e) => Err(kube_err("creating", &what)(e)),
        }
    }

    async fn publish_roots(&self, roots_pem: &str) -> Result<(), CaError> {
        let roots: Arc<str> = roots_pem.into();
        *self.roots.lock().unwrap_or_else(|p| p.into_inner()) = Some(roots.clone());
        let namespaces = Api::<Namespace>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(kube_err("listing", "namespaces"))?;
        let names: Vec<String> = namespaces
            .items
            .iter()
            .filter(|ns| !terminating(ns))
            .filter_map(|ns| ns.metadata.name.clone())
            .collect();
        let total = names.len();
        let failures: Vec<String> = futures::stream::iter(names)
            .map(|ns| {
                let roots = roots.clone();
                async move {
                    let r = self.write_roots(&ns, &roots).await;
                    r.err().map(|e| e.to_string())
                }
            })
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .filter_map(|failure| async move { failure })
            .collect()
            .await;
        if failures.is_empty() {
            tracing::info!(namespaces = total, "published {ROOT_CONFIGMAP}");
            Ok(())
        } else {
            Err(CaError::Store(format!(
                "publishing roots failed in {} of {total} namespaces: {}",
                failures.len(),
                failures.join("; ")
            )))
        }
    }
}
