//! Deciding enrollment without the node agent: read the same Kubernetes YAML the sandbox's
//! controller reads and apply the shared enrollment rule. Anything uncertain is an error so the
//! caller fails closed.

use std::path::Path;

use meshconfig::config::Object;
use meshconfig::enrollment::pod_captured;
use meshconfig::source::files::load_dir;

use super::spec::PodRef;

/// Whether `pod` is captured according to the objects in `dir`; `Err` says why it cannot tell.
pub fn pod_captured_in_dir(dir: &Path, pod: &PodRef) -> Result<bool, String> {
    let (objects, errors) = load_dir(dir);
    let mut found_pod = None;
    let mut found_ns = None;
    for obj in &objects {
        match obj.as_ref() {
            Object::Pod(p)
                if p.metadata.name.as_deref() == Some(pod.name.as_str())
                    && p.metadata.namespace.as_deref().unwrap_or("default") == pod.namespace =>
            {
                found_pod = Some(p);
            }
            Object::Namespace(n) if n.metadata.name.as_deref() == Some(pod.namespace.as_str()) => {
                found_ns = Some(n);
            }
            _ => {}
        }
    }
    let problems = || {
        if errors.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            format!(" (unreadable config: {})", list.join("; "))
        }
    };
    let Some(p) = found_pod else {
        return Err(format!(
            "pod {pod} is not defined in {}{}",
            dir.display(),
            problems()
        ));
    };
    // A missing namespace is normal only if nothing failed to load: the broken document might
    // be the namespace that enrolls the pod.
    if found_ns.is_none() && !errors.is_empty() {
        return Err(format!(
            "namespace {} is not defined in {}{}",
            pod.namespace,
            dir.display(),
            problems()
        ));
    }
    Ok(pod_captured(found_ns, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!(
                "mesh-cni-fallback-{tag}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn pod(ns: &str, name: &str) -> PodRef {
        PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: None,
        }
    }

    const OBJECTS: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
spec:
  containers: [{name: app, image: app}]
---
apiVersion: v1
kind: Pod
metadata:
  name: opted-out
  namespace: shop
  labels:
    istio.io/dataplane-mode: none
spec:
  containers: [{name: app, image: app}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: plain
spec:
  containers: [{name: app, image: app}]
";

    #[test]
    fn enrollment_follows_namespace_and_pod_labels() {
        let dir = TempDir::new("labels");
        fs::write(dir.0.join("objects.yaml"), OBJECTS).unwrap();
        assert_eq!(pod_captured_in_dir(&dir.0, &pod("shop", "web")), Ok(true));
        assert_eq!(
            pod_captured_in_dir(&dir.0, &pod("shop", "opted-out")),
            Ok(false)
        );
        assert_eq!(pod_captured_in_dir(&dir.0, &pod("plain", "web")), Ok(false));
    }

    #[test]
    fn unknown_pod_or_missing_dir_cannot_be_decided() {
        let dir = TempDir::new("unknown");
        fs::write(dir.0.join("objects.yaml"), OBJECTS).unwrap();
        let err = pod_captured_in_dir(&dir.0, &pod("shop", "ghost")).unwrap_err();
        assert!(err.contains("pod shop/ghost is not defined"), "{err}");
        assert!(pod_captured_in_dir(&dir.0.join("absent"), &pod("shop", "web")).is_err());
    }

    #[test]
    fn broken_document_hiding_the_namespace_fails_closed() {
        let dir = TempDir::new("broken");
        fs::write(
            dir.0.join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: [this is not a map\n",
        )
        .unwrap();
        fs::write(
            dir.0.join("pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n",
        )
        .unwrap();
        let err = pod_captured_in_dir(&dir.0, &pod("shop", "web")).unwrap_err();
        assert!(err.contains("namespace shop is not defined"), "{err}");
    }
}
