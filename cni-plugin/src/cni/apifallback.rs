//! Deciding enrollment without the node agent in Kubernetes mode: read the pod and its namespace
//! from the API server with the plugin's kubeconfig and apply the shared enrollment rule.
//! Anything uncertain (bad kubeconfig, API down or slow, pod unknown) is an error so the caller
//! fails closed.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Api, Client, Config};
use meshconfig::enrollment::pod_captured;

use super::spec::PodRef;

/// Total time allowed for the API lookup (client setup and both GETs): the runtime is waiting
/// on this ADD, so a hung API server must not hang pod creation.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the API server could not tell whether a pod is ambient.
#[derive(Debug, thiserror::Error)]
pub enum ApiLookupError {
    /// The kubeconfig file is missing, unreadable or unusable.
    #[error("bad kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig path from the network configuration.
        path: String,
        /// Why it cannot be used.
        source: KubeconfigError,
    },
    /// The kubeconfig was read but no client can be built from it (e.g. bad TLS material).
    #[error("cannot build an API client from kubeconfig {path}: {source}")]
    Client {
        /// The kubeconfig path from the network configuration.
        path: String,
        /// Why.
        source: kube::Error,
    },
    /// The single-threaded runtime for the lookup could not start.
    #[error("cannot start the API client runtime: {0}")]
    Runtime(std::io::Error),
    /// The API server does not know the pod.
    #[error("pod {0} not found in the API server")]
    PodNotFound(String),
    /// A GET failed (connection refused, TLS, HTTP error status, RBAC, ...).
    #[error("cannot read {what} from the API server: {source}")]
    Api {
        /// The object asked for, e.g. `namespace shop`.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// The whole lookup took longer than allowed.
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

/// Whether `pod` is captured according to the API server named by `kubeconfig`, all within
/// `timeout`. Blocks the calling thread (the plugin is a short-lived synchronous process).
pub fn pod_captured_from_api(
    kubeconfig: &Path,
    pod: &PodRef,
    timeout: Duration,
) -> Result<bool, ApiLookupError> {
    let path = kubeconfig.display().to_string();
    let file = Kubeconfig::read_from(kubeconfig).map_err(|source| ApiLookupError::Kubeconfig {
        path: path.clone(),
        source,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ApiLookupError::Runtime)?;
    let verdict = rt.block_on(async {
        tokio::time::timeout(timeout, lookup(file, &path, pod, timeout))
            .await
            .unwrap_or(Err(ApiLookupError::Timeout(timeout)))
    });
    // A DNS lookup may still sit in a blocking thread after a timeout; do not wait for it.
    rt.shutdown_background();
    verdict
}

async fn lookup(
    file: Kubeconfig,
    path: &str,
    pod: &PodRef,
    timeout: Duration,
) -> Result<bool, ApiLookupError> {
    let mut config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|source| ApiLookupError::Kubeconfig {
            path: path.to_string(),
            source,
        })?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    let client = Client::try_from(config).map_err(|source| ApiLookupError::Client {
        path: path.to_string(),
        source,
    })?;
    // A namespace the API does not know has no labels; the pod's own labels still decide.
    let namespace = Api::<Namespace>::all(client.clone())
        .get_opt(&pod.namespace)
        .await
        .map_err(|source| ApiLookupError::Api {
            what: format!("namespace {}", pod.namespace),
            source,
        })?;
    let found = Api::<Pod>::namespaced(client, &pod.namespace)
        .get_opt(&pod.name)
        .await
        .map_err(|source| ApiLookupError::Api {
            what: format!("pod {pod}"),
            source,
        })?
        .ok_or_else(|| ApiLookupError::PodNotFound(pod.to_string()))?;
    Ok(pod_captured(namespace.as_ref(), &found))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: "cart".into(),
            uid: None,
        }
    }

    #[test]
    fn missing_kubeconfig_is_a_kubeconfig_error() {
        let err = pod_captured_from_api(
            Path::new("/nonexistent/mesh-cni/kubeconfig"),
            &pod(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, ApiLookupError::Kubeconfig { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/mesh-cni/kubeconfig"),
            "{err}"
        );
    }

    #[test]
    fn refused_connection_is_an_api_error() {
        // Bind then drop to get a local port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let path = std::env::temp_dir().join(format!(
            "mesh-cni-apifallback-{}-{port}.yaml",
            std::process::id()
        ));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters: [{{name: k, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: k, user: u}}}}]\n\
                 users: [{{name: u, user: {{}}}}]\n"
            ),
        )
        .unwrap();
        let err = pod_captured_from_api(&path, &pod(), Duration::from_secs(3)).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, ApiLookupError::Api { .. }), "{err:?}");
        assert!(err.to_string().contains("namespace shop"), "{err}");
    }
}
