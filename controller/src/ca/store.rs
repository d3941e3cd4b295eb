//! Where CA material lives: a directory in Istio's `cacerts` layout for files mode; Kubernetes
//! (Secret + ConfigMap) can implement the same [`RootStore`] trait.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::CaError;

/// CA certificate and key, plus (for a plugged-in intermediate) its chain and roots.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// `ca-cert.pem`: the signing certificate.
    pub cert_pem: String,
    /// `ca-key.pem`: its private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key_pem: String,
    /// `cert-chain.pem`: signing certificate and intermediates up to (optionally) the root.
    pub cert_chain_pem: Option<String>,
    /// `root-cert.pem`: the trust anchor(s); defaults to `ca-cert.pem` for a self-signed root.
    pub root_pem: Option<String>,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret.
        f.debug_struct("CaMaterial")
            .field("cert_chain", &self.cert_chain_pem.is_some())
            .field("root", &self.root_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Persistence of CA material and publication of the root bundle.
#[tonic::async_trait]
pub trait RootStore: Send + Sync {
    /// The stored material, `None` when nothing is stored yet (first start).
    async fn load(&self) -> Result<Option<CaMaterial>, CaError>;
    /// Persists a freshly generated self-signed root.
    async fn save(&self, material: &CaMaterial) -> Result<(), CaError>;
    /// Publishes the PEM roots that clients should trust.
    async fn publish_roots(&self, roots_pem: &str) -> Result<(), CaError>;
}

/// File names of Istio's plugged-in CA layout.
pub const CA_CERT: &str = "ca-cert.pem";
/// Private key of `ca-cert.pem`.
pub const CA_KEY: &str = "ca-key.pem";
/// Chain from the signing certificate towards the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Root bundle.
pub const ROOT_CERT: &str = "root-cert.pem";

/// A directory holding `ca-cert.pem`, `ca-key.pem` and optionally `cert-chain.pem` and
/// `root-cert.pem`; the root bundle is published to `root-cert.pem` there unless redirected.
#[derive(Clone, Debug)]
pub struct FileRootStore {
    dir: PathBuf,
    publish: PathBuf,
}

impl FileRootStore {
    /// A store in `dir`, publishing roots to `<dir>/root-cert.pem`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let publish = dir.join(ROOT_CERT);
        Self { dir, publish }
    }

    /// Publishes the roots to `path` instead (e.g. when `dir` is a read-only mount).
    pub fn publish_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.publish = path.into();
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the root bundle is published.
    pub fn published_roots(&self) -> &Path {
        &self.publish
    }
}

async fn read_optional(path: &Path) -> Result<Option<String>, CaError> {
    match tokio::fs::read_to_string(path).await {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CaError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes via a temporary file and rename, so readers never see a partial file; `mode` is
/// applied at creation so a key is never readable by others, even briefly.
async fn write_atomic(path: PathBuf, contents: String, mode: u32) -> Result<(), CaError> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { op, path, source }
        };
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(contents.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming onto", &path))
    })
    .await
    .map_err(|e| CaError::Store(format!("write task failed: {e}")))?
}

#[tonic::async_trait]
impl RootStore for FileRootStore {
    async fn load(&self) -> Result<Option<CaMaterial>, CaError> {
        let cert = read_optional(&self.dir.join(CA_CERT)).await?;
        let key = read_optional(&self.dir.join(CA_KEY)).await?;
        let (cert_pem, key_pem) = match (cert, key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(CaError::Incomplete(format!(
                    "{CA_KEY} missing in {}",
                    self.dir.display()
                )));
            }
            (None, Some(_)) => {
                return Err(CaError::Incomplete(format!(
                    "{CA_CERT} missing in {}",
                    self.dir.display()
                )));
            }
        };
        Ok(Some(CaMaterial {
            cert_pem,
            key_pem,
            cert_chain_pem: read_optional(&self.dir.join(CERT_CHAIN)).await?,
            root_pem: read_optional(&self.dir.join(ROOT_CERT)).await?,
        }))
    }

    async fn save(&self, material: &CaMaterial) -> Result<(), CaError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|source| CaError::Io {
                op: "creating",
                path: self.dir.clone(),
                source,
            })?;
        // Key first: a crash in between leaves "key without cert", which load reports.
        write_atomic(self.dir.join(CA_KEY), material.key_pem.clone(), 0o600).await?;
        write_atomic(self.dir.join(CA_CERT), material.cert_pem.clone(), 0o644).await?;
        if let Some(chain) = &material.cert_chain_pem {
            write_atomic(self.dir.join(CERT_CHAIN), chain.clone(), 0o644).await?;
        }
        if let Some(root) = &material.root_pem {
            write_atomic(self.dir.join(ROOT_CERT), root.clone(), 0o644).await?;
        }
        Ok(())
    }

    async fn publish_roots(&self, roots_pem: &str) -> Result<(), CaError> {
        // Unchanged content is left alone: the plugged-in directory may be read-only.
        if read_optional(&self.publish).await?.as_deref() == Some(roots_pem) {
            return Ok(());
        }
        if let Some(parent) = self.publish.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| CaError::Io {
                    op: "creating",
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        write_atomic(self.publish.clone(), roots_pem.to_string(), 0o644).await
    }
}
