use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::config::Kind;
use crate::crd::{AuthorizationAction, MtlsMode};

/// A unique scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "controller-files-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn find<'a>(objects: &'a [Arc<Object>], kind: Kind, ns: &str, name: &str) -> &'a Object {
    let key = ObjectKey::new(kind, ns, name);
    objects
        .iter()
        .find(|o| o.key() == key)
        .unwrap_or_else(|| panic!("{key} not loaded"))
}

const ALL_KINDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: foo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: sleep
  namespace: foo
---
apiVersion: v1
kind: Pod
metadata:
  name: sleep-1
  namespace: foo
  labels:
    app: sleep
spec:
  serviceAccountName: sleep
  nodeName: node-1
  containers:
  - name: sleep
    image: curlimages/curl
status:
  podIP: 10.0.0.5
  podIPs:
  - ip: 10.0.0.5
---
apiVersion: v1
kind: Service
metadata:
  name: httpbin
spec:
  clusterIP: 10.96.0.10
  selector:
    app: httpbin
  ports:
  - name: http
    port: 8000
    targetPort: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: httpbin-abc
  labels:
    kubernetes.io/service-name: httpbin
addressType: IPv4
endpoints:
- addresses: ["10.0.0.7"]
ports:
- name: http
  port: 80
---
# A namespace-wide allow-nothing policy, as in Istio's docs.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: foo
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-ip
  namespace: foo
spec:
  action: DENY
  rules:
  - from:
    - source:
        notIpBlocks: ["10.0.0.0/8"]
    to:
    - operation:
        ports: ["8080"]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc
  namespace: foo
spec:
  hosts: ["api.example.com"]
  addresses: ["240.240.0.1"]
  location: MESH_EXTERNAL
  resolution: DNS
  ports:
  - number: 443
    name: https
    protocol: TLS
  endpoints:
  - address: api.example.com
    ports:
      https: 8443
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1alpha3
kind: WorkloadEntry
metadata:
  name: vm-1
  namespace: foo
spec:
  address: 10.1.0.9
  labels:
    app: legacy
  serviceAccount: legacy
  network: vm-net
  ports:
    http: 8080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ignored
spec: {}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ignored
spec: {}
"#;

#[test]
fn multi_document_file_loads_every_supported_kind() {
    let dir = TempDir::new("all");
    dir.write("all.yaml", ALL_KINDS);
    let (objects, errors) = load_dir(&dir.0);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(objects.len(), 11);

    let Object::Pod(pod) = find(&objects, Kind::Pod, "foo", "sleep-1") else {
        panic!()
    };
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    assert_eq!(ip, Some("10.0.0.5"));
    // Missing namespaces default to `default`.
    find(&objects, Kind::Service, "default", "httpbin");
    find(&objects, Kind::EndpointSlice, "default", "httpbin-abc");
    find(&objects, Kind::Namespace, "", "foo");
    find(&objects, Kind::ServiceAccount, "foo", "sleep");

    let Object::AuthorizationPolicy(nothing) =
        find(&objects, Kind::AuthorizationPolicy, "foo", "allow-nothing")
    else {
        panic!()
    };
    assert!(nothing.spec.rules.is_empty());
    assert_eq!(nothing.spec.action, AuthorizationAction::Allow);

    let Object::AuthorizationPolicy(ap) =
        find(&objects, Kind::AuthorizationPolicy, "foo", "httpbin")
    else {
        panic!()
    };
    let rule = &ap.spec.rules[0];
    assert_eq!(rule.from.len(), 2);
    let src = rule.from[0].source.as_ref().unwrap();
    assert_eq!(src.principals, vec!["cluster.local/ns/default/sa/sleep"]);
    assert_eq!(rule.to[1].operation.as_ref().unwrap().paths, vec!["/data"]);
    assert_eq!(rule.when[0].key, "request.auth.claims[iss]");
    let sel = ap.spec.selector.as_ref().unwrap();
    assert_eq!(
        sel.match_labels.get("version").map(String::as_str),
        Some("v1")
    );

    let Object::AuthorizationPolicy(deny) =
        find(&objects, Kind::AuthorizationPolicy, "foo", "deny-ip")
    else {
        panic!()
    };
    assert_eq!(deny.spec.action, AuthorizationAction::Deny);
    let from = deny.spec.rules[0].from[0].source.as_ref().unwrap();
    assert_eq!(from.not_ip_blocks, vec!["10.0.0.0/8"]);

    let Object::PeerAuthentication(pa) = find(&objects, Kind::PeerAuthentication, "foo", "finance")
    else {
        panic!()
    };
    assert_eq!(pa.spec.mtls.as_ref().unwrap().mode, MtlsMode::Strict);
    assert_eq!(pa.spec.port_level_mtls[&8080].mode, MtlsMode::Disable);

    let Object::ServiceEntry(se) = find(&objects, Kind::ServiceEntry, "foo", "external-svc") else {
        panic!()
    };
    assert_eq!(se.spec.ports[0].number, 443);
    assert_eq!(se.spec.endpoints[0].ports["https"], 8443);

    let Object::WorkloadEntry(we) = find(&objects, Kind::WorkloadEntry, "foo", "vm-1") else {
        panic!()
    };
    assert_eq!(we.spec.service_account, "legacy");
    assert_eq!(we.spec.ports["http"], 8080);
}

#[test]
fn malformed_document_is_reported_with_file_and_line_while_others_load() {
    let dir = TempDir::new("malformed");
    let file = dir.write(
        "mixed.yaml",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: [unclosed\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: svc\nspec:\n  ports: 5\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: b\n",
    );
    let (objects, errors) = load_dir(&dir.0);
    let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
    assert_eq!(
        keys,
        vec!["ServiceAccount/default/a", "ServiceAccount/default/b"]
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!((errors[0].document, errors[0].line), (2, 6));
    assert_eq!(errors[0].file, file);
    assert!(errors[0].message.contains("invalid YAML"), "{}", errors[0]);
    assert_eq!((errors[1].document, errors[1].line), (3, 11));
    assert!(
        errors[1].message.contains("Service/default/svc")
            && errors[1].message.contains("spec.ports")
            && errors[1].message.contains("line 16"),
        "{}",
        errors[1]
    );
    assert!(
        errors[1]
            .to_string()
            .starts_with(&format!("{}:11:", file.display()))
    );
}

#[test]
fn unknown_field_in_authorization_policy_is_rejected_by_name() {
    let dir = TempDir::new("unknown");
    dir.write(
        "ap.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n\
         spec:\n  rules:\n  - from:\n    - source:\n        principal: [\"x\"]\n",
    );
    let (objects, errors) = load_dir(&dir.0);
    assert!(objects.is_empty());
    assert_eq!(errors.len(), 1);
    let msg = &errors[0].message;
    assert!(msg.contains("unknown field `principal`"), "{msg}");
    assert!(msg.contains("spec.rules[0].from[0].source"), "{msg}");
    assert!(msg.contains("AuthorizationPolicy/default/p"), "{msg}");
}

#[test]
fn misspelled_top_level_field_and_bad_enum_are_rejected() {
    let dir = TempDir::new("toplevel");
    dir.write(
        "ap.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n\
         sepc:\n  action: DENY\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: q\n\
         spec:\n  mtls:\n    mode: strict\n",
    );
    let (objects, errors) = load_dir(&dir.0);
    assert!(objects.is_empty());
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].message.contains("unknown field `sepc`"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].message.contains("spec.mtls.mode"),
        "{}",
        errors[1]
    );
}

#[test]
fn port_level_mtls_accepts_quoted_port_keys() {
    let dir = TempDir::new("ports");
    dir.write(
        "pa.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: p\n\
         spec:\n  selector:\n    matchLabels: {app: a}\n  portLevelMtls:\n    \"9090\":\n      mode: PERMISSIVE\n",
    );
    let (objects, errors) = load_dir(&dir.0);
    assert!(errors.is_empty(), "{errors:?}");
    let Object::PeerAuthentication(pa) = objects[0].as_ref() else {
        panic!()
    };
    assert_eq!(pa.spec.port_level_mtls[&9090].mode, MtlsMode::Permissive);
}

#[test]
fn list_items_are_loaded_and_bad_items_reported() {
    let dir = TempDir::new("list");
    dir.write(
        "list.yaml",
        "apiVersion: v1\nkind: List\nitems:\n\
         - apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p1\n    namespace: ns\n\
         - apiVersion: apps/v1\n  kind: Deployment\n  metadata:\n    name: d\n\
         - apiVersion: networking.istio.io/v1beta1\n  kind: WorkloadEntry\n  metadata:\n    name: w\n  spec:\n    adress: 1.2.3.4\n\
         - apiVersion: v1\n  kind: ServiceAccount\n  metadata:\n    name: sa\n",
    );
    let (objects, errors) = load_dir(&dir.0);
    let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
    assert_eq!(keys, vec!["Pod/ns/p1", "ServiceAccount/default/sa"]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let msg = &errors[0].message;
    assert!(
        msg.starts_with("items[2]: WorkloadEntry/default/w: "),
        "{msg}"
    );
    assert!(msg.contains("unknown field `adress`"), "{msg}");
    assert!(!msg.contains(" at line "), "{msg}");
}

#[test]
fn unknown_kinds_and_versions_are_errors() {
    let dir = TempDir::new("kinds");
    dir.write(
        "k.yaml",
        "apiVersion: v1\nkind: Podd\nmetadata:\n  name: x\n---\n\
         apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata:\n  name: y\n---\n\
         kind: Pod\nmetadata:\n  name: z\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  namespace: n\n",
    );
    let (objects, errors) = load_dir(&dir.0);
    assert!(objects.is_empty());
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert!(messages[0].contains("unknown kind `Podd`"), "{messages:?}");
    assert!(
        messages[1].contains("unsupported apiVersion"),
        "{messages:?}"
    );
    assert!(messages[2].contains("apiVersion"), "{messages:?}");
    assert!(
        messages[3].contains("metadata.name is required"),
        "{messages:?}"
    );
}

#[test]
fn duplicate_key_last_file_wins_and_is_reported() {
    let dir = TempDir::new("dup");
    let pod = |label: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:\n    v: {label}\n")
    };
    dir.write("a.yaml", &pod("first"));
    let b = dir.write("b.yml", &pod("second"));
    let (objects, errors) = load_dir(&dir.0);
    assert_eq!(objects.len(), 1);
    let labels = objects[0].meta().labels.clone().unwrap_or_default();
    assert_eq!(labels.get("v").map(String::as_str), Some("second"));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, b);
    assert!(
        errors[0].message.contains("duplicate Pod/default/p"),
        "{}",
        errors[0]
    );
    assert!(errors[0].message.contains("a.yaml"), "{}", errors[0]);
}

#[test]
fn subdirectories_are_read_and_hidden_entries_skipped() {
    let dir = TempDir::new("tree");
    let sa = |n: &str| format!("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {n}\n");
    dir.write("top.yaml", &sa("top"));
    dir.write("sub/deeper/x.yml", &sa("deep"));
    dir.write("..data/top.yaml", &sa("hidden"));
    dir.write("notes.txt", "not yaml");
    let (objects, errors) = load_dir(&dir.0);
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<String> = objects.iter().map(|o| o.key().name).collect();
    assert_eq!(names, vec!["deep", "top"]);
}

#[test]
fn missing_directory_is_an_error_not_a_panic() {
    let dir = TempDir::new("gone");
    let missing = dir.0.join("nope");
    let (objects, errors) = load_dir(&missing);
    assert!(objects.is_empty());
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("cannot read directory"));
}

async fn next_batch(rx: &mut crate::config::EventReceiver) -> Vec<ConfigEvent> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no batch within 5s")
        .expect("channel closed")
}

/// Batch as sorted strings: `+key` for Apply, `-key` for Delete, `synced`.
fn describe(batch: &[ConfigEvent]) -> Vec<String> {
    let mut out: Vec<String> = batch
        .iter()
        .map(|e| match e {
            ConfigEvent::Apply(o) => format!("+{}", o.key()),
            ConfigEvent::Delete(k) => format!("-{k}"),
            ConfigEvent::Synced => "synced".into(),
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn watch_emits_apply_on_change_and_delete_on_removal() {
    let dir = TempDir::new("watch");
    let sa = |n: &str, label: &str| {
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {n}\n  labels:\n    v: \"{label}\"\n"
        )
    };
    let two = format!("{}---\n{}", sa("a", "1"), sa("b", "1"));
    dir.write("one.yaml", &two);
    dir.write("two.yaml", &sa("c", "1"));

    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let hook: ErrorHook = Arc::new(move |e: &FileError| {
        hook_seen.lock().unwrap().push(e.clone());
    });
    let source =
        FileSource::new(dir.0.clone(), tx, hook).with_poll_interval(Duration::from_millis(20));
    let status = source.error_handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));

    let initial = next_batch(&mut rx).await;
    assert_eq!(
        describe(&initial),
        vec![
            "+ServiceAccount/default/a",
            "+ServiceAccount/default/b",
            "+ServiceAccount/default/c",
            "synced"
        ]
    );
    assert!(matches!(initial.last(), Some(ConfigEvent::Synced)));

    // Rewriting identical content is not a change; changing one object's labels is.
    dir.write("one.yaml", &two);
    dir.write("two.yaml", &sa("c", "2"));
    assert_eq!(
        describe(&next_batch(&mut rx).await),
        vec!["+ServiceAccount/default/c"]
    );

    // Removing a document deletes its object.
    dir.write("one.yaml", &sa("a", "1"));
    assert_eq!(
        describe(&next_batch(&mut rx).await),
        vec!["-ServiceAccount/default/b"]
    );

    // Breaking a document reports an error but keeps the object in force.
    dir.write(
        "one.yaml",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: [a\n",
    );
    dir.write("three.yaml", &sa("d", "1"));
    assert_eq!(
        describe(&next_batch(&mut rx).await),
        vec!["+ServiceAccount/default/d"]
    );
    let errors = status.get();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Deleting the file deletes what it defined.
    fs::remove_file(dir.0.join("one.yaml")).unwrap();
    assert_eq!(
        describe(&next_batch(&mut rx).await),
        vec!["-ServiceAccount/default/a"]
    );
    assert!(status.get().is_empty());

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run did not stop")
        .unwrap();
}

#[tokio::test]
async fn rejected_update_keeps_previous_policy() {
    let dir = TempDir::new("keep");
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny\n\
                spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [bad]\n";
    dir.write("p.yaml", deny);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let source = FileSource::new(dir.0.clone(), tx, Arc::new(|_: &FileError| {}))
        .with_poll_interval(Duration::from_millis(20));
    let status = source.error_handle();
    let shutdown = CancellationToken::new();
    tokio::spawn(source.run(shutdown.clone()));
    assert_eq!(next_batch(&mut rx).await.len(), 2);

    // A typo in the policy must not delete it (that would open access).
    dir.write("p.yaml", &deny.replace("namespaces", "namespace"));
    dir.write(
        "q.yaml",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: marker\n",
    );
    assert_eq!(
        describe(&next_batch(&mut rx).await),
        vec!["+ServiceAccount/default/marker"]
    );
    assert!(
        status.get()[0]
            .message
            .contains("unknown field `namespace`")
    );
    shutdown.cancel();
}
