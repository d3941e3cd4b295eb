//! The kubeconfig `mesh-cni` uses to ask the API server itself while the node agent is down
//! (Kubernetes mode). The agent writes it next to the node's CNI config from its own service
//! account (the plugin runs on the host and cannot read the agent's mounted secret), and
//! rewrites it when the projected token rotates, as Istio's CNI installer does.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::install::{InstallError, write_atomic};

/// File name of the plugin's kubeconfig in the CNI network config directory. Without a
/// `.conf`/`.conflist` suffix, so no runtime takes it for a network config.
pub const FILE_NAME: &str = "mesh-cni-kubeconfig";

/// Where Kubernetes mounts a pod's service account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// API server credentials for the plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCredentials {
    /// `https://host:port` of the API server.
    pub server: String,
    /// PEM bundle the API server's certificate verifies against.
    pub ca_pem: Vec<u8>,
    /// Bearer token.
    pub token: String,
}

impl ApiCredentials {
    /// The agent's in-cluster credentials: the `KUBERNETES_SERVICE_HOST`/`_PORT` the kubelet
    /// sets plus the mounted token and CA; `None` outside a cluster (the host is unset).
    pub fn in_cluster(
        host: Option<&str>,
        port: Option<&str>,
        account_dir: &Path,
    ) -> io::Result<Option<Self>> {
        let Some(host) = host.filter(|h| !h.is_empty()) else {
            return Ok(None);
        };
        let port = port.filter(|p| !p.is_empty()).unwrap_or("443");
        // An IPv6 service address needs brackets in a URL.
        let server = if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        };
        let token = fs::read_to_string(account_dir.join("token"))?
            .trim()
            .to_string();
        let ca_pem = fs::read(account_dir.join("ca.crt"))?;
        Ok(Some(Self {
            server,
            ca_pem,
            token,
        }))
    }

    /// The kubeconfig document (JSON, which every kubeconfig reader accepts as YAML).
    pub fn render(&self) -> Vec<u8> {
        // ByteString serializes as base64, the encoding kubeconfig's `*-data` fields use.
        let ca =
            serde_json::to_value(k8s_openapi::ByteString(self.ca_pem.clone())).unwrap_or_default();
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "local",
                "cluster": {"server": self.server, "certificate-authority-data": ca},
            }],
            "users": [{"name": "mesh-cni", "user": {"token": self.token}}],
            "contexts": [{"name": "mesh-cni", "context": {"cluster": "local", "user": "mesh-cni"}}],
            "current-context": "mesh-cni",
        });
        let mut out = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// Path of the plugin's kubeconfig in `cni_net_dir`.
pub fn path(cni_net_dir: &Path) -> PathBuf {
    cni_net_dir.join(FILE_NAME)
}

/// Writes the kubeconfig (owner-only: it holds a token) unless it already has this content;
/// returns whether it changed.
pub fn write(cni_net_dir: &Path, creds: &ApiCredentials) -> Result<bool, InstallError> {
    let target = path(cni_net_dir);
    let data = creds.render();
    if fs::read(&target).is_ok_and(|old| old == data) {
        return Ok(false);
    }
    write_atomic(&target, &data, 0o600)?;
    Ok(true)
}

/// Removes the kubeconfig; a missing file is fine.
pub fn remove(cni_net_dir: &Path) -> Result<(), InstallError> {
    let target = path(cni_net_dir);
    match fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(InstallError::Io {
            action: "removing",
            path: target,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn account(dir: &Path, token: &str) {
        fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        fs::write(dir.join("ca.crt"), b"-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-cni-kc-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn no_credentials_outside_a_cluster() {
        let d = tempdir("none");
        assert_eq!(
            ApiCredentials::in_cluster(None, Some("443"), &d).unwrap(),
            None
        );
        assert_eq!(
            ApiCredentials::in_cluster(Some(""), None, &d).unwrap(),
            None
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn rendered_kubeconfig_is_readable_by_kube_and_holds_token_and_ca() {
        let d = tempdir("render");
        account(&d, "tok-1");
        let creds = ApiCredentials::in_cluster(Some("fd00::1"), Some("6443"), &d)
            .unwrap()
            .unwrap();
        assert_eq!(creds.server, "https://[fd00::1]:6443");
        assert!(write(&d, &creds).unwrap());
        let kc = kube::config::Kubeconfig::read_from(path(&d)).unwrap();
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://[fd00::1]:6443"));
        let ca = serde_json::from_value::<k8s_openapi::ByteString>(serde_json::Value::String(
            cluster.certificate_authority_data.clone().unwrap(),
        ))
        .unwrap();
        assert_eq!(ca.0, creds.ca_pem);
        assert_eq!(kc.current_context.as_deref(), Some("mesh-cni"));
        let raw: serde_json::Value = serde_json::from_slice(&fs::read(path(&d)).unwrap()).unwrap();
        assert_eq!(raw["users"][0]["user"]["token"], "tok-1");
        assert_eq!(
            fs::metadata(path(&d)).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn rewritten_only_when_the_token_rotates_and_removed_on_uninstall() {
        let d = tempdir("rotate");
        account(&d, "tok-1");
        let read = |d: &Path| {
            ApiCredentials::in_cluster(Some("10.96.0.1"), None, d)
                .unwrap()
                .unwrap()
        };
        assert!(write(&d, &read(&d)).unwrap());
        assert!(!write(&d, &read(&d)).unwrap(), "same token: untouched");
        account(&d, "tok-2");
        assert!(write(&d, &read(&d)).unwrap());
        assert!(
            String::from_utf8(fs::read(path(&d)).unwrap())
                .unwrap()
                .contains("tok-2")
        );
        remove(&d).unwrap();
        assert!(!path(&d).exists());
        remove(&d).unwrap();
        let _ = fs::remove_dir_all(&d);
    }
}
