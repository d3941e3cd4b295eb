//! Chaining `mesh-cni` into a node's CNI configuration (used by the agent in Kubernetes): copy
//! the binary into the CNI bin dir and append our entry to the primary network config list.
//! Every write is a temp file plus rename, so a runtime never reads a half-written file.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

/// The plugin's `type` and binary name.
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// Installation failure.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// No usable `*.conflist`/`*.conf` in the CNI config dir (the primary CNI is not installed
    /// yet, or all its files are broken).
    #[error("no usable CNI network config in {}{}", dir.display(), describe_skipped(skipped))]
    NoConfig {
        /// The directory searched.
        dir: PathBuf,
        /// Files passed over and why.
        skipped: Vec<String>,
    },
    /// Our entry is not a JSON object or names another plugin type.
    #[error("invalid mesh-cni config entry: {0}")]
    InvalidEntry(String),
    /// Converting a `.conf` would overwrite an existing `.conflist` of the same name.
    #[error("cannot convert {} to {}: the target already exists", from.display(), to.display())]
    Conflict {
        /// The single-plugin config.
        from: PathBuf,
        /// The conflist it would become.
        to: PathBuf,
    },
}

fn describe_skipped(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {})", skipped.join("; "))
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// Copies `plugin_binary` to `<cni_bin_dir>/mesh-cni`, then adds (or replaces) `entry` in the
/// primary network config of `cni_net_dir`; returns the conflist written.
pub fn install(
    plugin_binary: &Path,
    cni_bin_dir: &Path,
    cni_net_dir: &Path,
    entry: Value,
) -> Result<PathBuf, InstallError> {
    let entry = normalize_entry(entry)?;
    // Find the config first so a node without a primary CNI gets no stray binary either.
    let (primary, doc) = primary_config(cni_net_dir)?;
    fs::create_dir_all(cni_bin_dir).map_err(io_err("creating", cni_bin_dir))?;
    let binary = fs::read(plugin_binary).map_err(io_err("reading", plugin_binary))?;
    // The binary goes first: a config must never name a plugin the runtime cannot find.
    write_atomic(&cni_bin_dir.join(PLUGIN_TYPE), &binary, 0o755)?;

    let is_conf = primary.extension().is_some_and(|e| e == "conf");
    let (target, mut list) = if is_conf {
        let to = primary.with_extension("conflist");
        if to.exists() {
            return Err(InstallError::Conflict { from: primary, to });
        }
        (to, conf_to_conflist(doc))
    } else {
        (primary.clone(), doc)
    };
    let before = list.clone();
    if let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) {
        upsert_entry(plugins, entry);
    }
    if is_conf || list != before {
        write_atomic(&target, &render(&list), 0o644)?;
    }
    if is_conf {
        fs::remove_file(&primary).map_err(io_err("removing", &primary))?;
    }
    Ok(target)
}

/// Removes our entry from every conflist in `cni_net_dir` and our binary from `cni_bin_dir`;
/// returns the conflists changed. Broken files are left alone.
pub fn uninstall(cni_bin_dir: &Path, cni_net_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let mut first_error = None;
    for path in config_files(cni_net_dir)? {
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let Ok(mut doc) = read_json(&path) else {
            continue;
        };
        let Some(plugins) = doc.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let n = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() == n {
            continue;
        }
        match write_atomic(&path, &render(&doc), 0o644) {
            Ok(()) => changed.push(path),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Err(e) = crate::plugin_kubeconfig::remove(cni_net_dir) {
        first_error.get_or_insert(e);
    }
    let binary = cni_bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            first_error.get_or_insert(io_err("removing", &binary)(e));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(changed),
    }
}

/// Checks our entry and fills in its type.
fn normalize_entry(entry: Value) -> Result<Value, InstallError> {
    let Value::Object(mut map) = entry else {
        return Err(InstallError::InvalidEntry(format!(
            "expected a JSON object, got {entry}"
        )));
    };
    match map.get("type") {
        None => {
            map.insert("type".into(), Value::from(PLUGIN_TYPE));
        }
        Some(t) if t == PLUGIN_TYPE => {}
        Some(t) => {
            return Err(InstallError::InvalidEntry(format!(
                "type is {t}, expected {PLUGIN_TYPE:?}"
            )));
        }
    }
    Ok(Value::Object(map))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Replaces our first entry in place (dropping duplicates), or appends it.
fn upsert_entry(plugins: &mut Vec<Value>, entry: Value) {
    match plugins.iter().position(is_ours) {
        Some(i) => {
            plugins[i] = entry;
            let mut seen = 0;
            plugins.retain(|p| {
                if is_ours(p) {
                    seen += 1;
                    seen == 1
                } else {
                    true
                }
            });
        }
        None => plugins.push(entry),
    }
}

/// A single-plugin config as a one-element list (or as-is if it already carries a list).
fn conf_to_conflist(conf: Value) -> Value {
    if conf.get("plugins").is_some_and(Value::is_array) {
        return conf;
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.get(key) {
            list.insert(key.into(), v.clone());
        }
    }
    list.insert("plugins".into(), Value::Array(vec![conf]));
    Value::Object(list)
}

/// The lexicographically first usable config file, parsed. Unusable files are skipped, as a
/// runtime would not use them either, and reported if nothing usable remains.
fn primary_config(dir: &Path) -> Result<(PathBuf, Value), InstallError> {
    let mut skipped = Vec::new();
    for path in config_files(dir)? {
        let doc = match read_json(&path) {
            Ok(doc) => doc,
            Err(why) => {
                tracing::warn!(file = %path.display(), error = %why, "skipping CNI config");
                skipped.push(format!("{}: {why}", path.display()));
                continue;
            }
        };
        let conflist = path.extension().is_some_and(|e| e == "conflist");
        let usable = if conflist || doc.get("plugins").is_some() {
            doc.get("plugins").is_some_and(Value::is_array)
        } else {
            doc.get("type").is_some_and(Value::is_string)
        };
        if !usable {
            let why = if conflist || doc.get("plugins").is_some() {
                "no `plugins` list"
            } else {
                "no plugin `type`"
            };
            tracing::warn!(file = %path.display(), error = why, "skipping CNI config");
            skipped.push(format!("{}: {why}", path.display()));
            continue;
        }
        return Ok((path, doc));
    }
    Err(InstallError::NoConfig {
        dir: dir.to_path_buf(),
        skipped,
    })
}

/// `*.conf` and `*.conflist` regular files in `dir`, sorted by name; hidden files (our temp
/// files among them) are ignored.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".conf") || name.ends_with(".conflist")) {
            continue;
        }
        let path = entry.path();
        if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads a JSON object; the error says what is wrong with the file.
fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    if !doc.is_object() {
        return Err("not a JSON object".into());
    }
    Ok(doc)
}

fn render(doc: &Value) -> Vec<u8> {
    // Rendering a Value cannot fail.
    let mut out = serde_json::to_vec_pretty(doc).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Writes `data` to a hidden temp file next to `path` and renames it over `path`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden and without a .conf suffix, so no runtime ever picks the temp file up.
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(data).map_err(io_err("writing", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("setting permissions of", &tmp))?;
        f.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming into", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A scratch node: `bin/`, `net.d/` and a fake plugin binary.
    struct Node {
        root: PathBuf,
    }

    impl Node {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let root = std::env::temp_dir().join(format!(
                "mesh-cni-install-{tag}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(root.join("net.d")).unwrap();
            fs::write(root.join("plugin"), b"#!fake mesh-cni").unwrap();
            Self { root }
        }
        fn bin(&self) -> PathBuf {
            self.root.join("bin")
        }
        fn net(&self) -> PathBuf {
            self.root.join("net.d")
        }
        fn write(&self, name: &str, doc: &Value) {
            fs::write(self.net().join(name), serde_json::to_vec(doc).unwrap()).unwrap();
        }
        fn read(&self, name: &str) -> Value {
            serde_json::from_slice(&fs::read(self.net().join(name)).unwrap()).unwrap()
        }
        fn install(&self, entry: Value) -> Result<PathBuf, InstallError> {
            install(&self.root.join("plugin"), &self.bin(), &self.net(), entry)
        }
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(self.net())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn bridge_list() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn entry() -> Value {
        json!({"type": "mesh-cni", "agentSocket": "/var/run/mesh-cni/plugin.sock"})
    }

    #[test]
    fn install_copies_binary_and_appends_entry_to_first_conflist() {
        let node = Node::new("append");
        node.write("10-bridge.conflist", &bridge_list());
        node.write(
            "20-other.conflist",
            &json!({"cniVersion": "1.0.0", "name": "o", "plugins": []}),
        );
        let path = node.install(entry()).unwrap();
        assert_eq!(path, node.net().join("10-bridge.conflist"));
        assert_eq!(
            node.read("10-bridge.conflist"),
            json!({
                "cniVersion": "1.0.0",
                "name": "k8s",
                "plugins": [
                    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}},
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                    {"type": "mesh-cni", "agentSocket": "/var/run/mesh-cni/plugin.sock"}
                ]
            })
        );
        assert_eq!(node.read("20-other.conflist")["plugins"], json!([]));
        let bin = node.bin().join("mesh-cni");
        assert_eq!(fs::read(&bin).unwrap(), b"#!fake mesh-cni");
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(node.names(), ["10-bridge.conflist", "20-other.conflist"]);
    }

    #[test]
    fn reinstall_is_idempotent_and_replaces_our_entry_in_place() {
        let node = Node::new("idem");
        node.write("10-bridge.conflist", &bridge_list());
        node.install(entry()).unwrap();
        let once = fs::read(node.net().join("10-bridge.conflist")).unwrap();
        node.install(entry()).unwrap();
        assert_eq!(
            fs::read(node.net().join("10-bridge.conflist")).unwrap(),
            once
        );

        let mut doubled = node.read("10-bridge.conflist");
        doubled["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "mesh-cni"}));
        node.write("10-bridge.conflist", &doubled);
        node.install(json!({"agentSocket": "/run/other.sock"}))
            .unwrap();
        let plugins = node.read("10-bridge.conflist")["plugins"].clone();
        assert_eq!(plugins.as_array().unwrap().len(), 3);
        assert_eq!(
            plugins[2],
            json!({"type": "mesh-cni", "agentSocket": "/run/other.sock"})
        );
        assert_eq!(node.names(), ["10-bridge.conflist"]);
    }

    #[test]
    fn single_plugin_conf_becomes_a_conflist() {
        let node = Node::new("conf");
        let conf = json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "br0"});
        node.write("05-net.conf", &conf);
        let path = node.install(entry()).unwrap();
        assert_eq!(path, node.net().join("05-net.conflist"));
        assert_eq!(node.names(), ["05-net.conflist"]);
        assert_eq!(
            node.read("05-net.conflist"),
            json!({"cniVersion": "0.4.0", "name": "net", "plugins": [conf, entry()]})
        );
    }

    #[test]
    fn invalid_files_are_skipped_and_reported_when_nothing_is_usable() {
        let node = Node::new("invalid");
        fs::write(node.net().join("00-broken.conflist"), b"{not json").unwrap();
        node.write("01-noplugins.conflist", &json!({"name": "x"}));
        fs::write(node.net().join(".hidden.conf"), b"{}").unwrap();
        let err = node.install(entry()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, InstallError::NoConfig { .. }), "{text}");
        assert!(
            text.contains("00-broken.conflist: not valid JSON"),
            "{text}"
        );
        assert!(
            text.contains("01-noplugins.conflist: no `plugins` list"),
            "{text}"
        );
        assert!(!node.bin().join("mesh-cni").exists());

        node.write("10-bridge.conflist", &bridge_list());
        let path = node.install(entry()).unwrap();
        assert_eq!(path, node.net().join("10-bridge.conflist"));
        assert_eq!(
            fs::read(node.net().join("00-broken.conflist")).unwrap(),
            b"{not json"
        );
    }

    #[test]
    fn entry_of_another_type_is_rejected() {
        let node = Node::new("entry");
        node.write("10-bridge.conflist", &bridge_list());
        assert!(matches!(
            node.install(json!({"type": "bridge"})),
            Err(InstallError::InvalidEntry(_))
        ));
        assert!(matches!(
            node.install(json!([])),
            Err(InstallError::InvalidEntry(_))
        ));
        assert_eq!(node.read("10-bridge.conflist"), bridge_list());
    }

    #[test]
    fn uninstall_restores_the_plugins_list_and_removes_the_binary() {
        let node = Node::new("uninstall");
        node.write("10-bridge.conflist", &bridge_list());
        node.write(
            "20-spare.conflist",
            &json!({"cniVersion": "1.0.0", "name": "s", "plugins": [{"type": "mesh-cni"}]}),
        );
        fs::write(node.net().join("30-broken.conflist"), b"nope").unwrap();
        node.install(entry()).unwrap();
        let changed = uninstall(&node.bin(), &node.net()).unwrap();
        assert_eq!(
            changed,
            [
                node.net().join("10-bridge.conflist"),
                node.net().join("20-spare.conflist")
            ]
        );
        assert_eq!(node.read("10-bridge.conflist"), bridge_list());
        assert_eq!(node.read("20-spare.conflist")["plugins"], json!([]));
        assert!(!node.bin().join("mesh-cni").exists());
        // Nothing left to do the second time.
        assert!(uninstall(&node.bin(), &node.net()).unwrap().is_empty());
    }
}
