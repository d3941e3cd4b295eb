//! The `files` config source: a directory of Kubernetes YAML (`*.yaml`/`*.yml`, recursive),
//! polled for changes and turned into batches of [`ConfigEvent`]s.
//!
//! Bad input changes nothing else: a malformed document is reported as a [`FileError`] and
//! skipped. When a previously valid object's new definition is rejected, its previous version
//! stays in force (as the API server would keep it), so a typo can never silently drop, say, a
//! DENY policy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::parse::{ParsedFile, parse_file};
use crate::config::{ConfigEvent, EventSender, Object, ObjectKey};

/// How often the directory is polled by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Deepest directory nesting followed (guards against symlink loops).
const MAX_DEPTH: usize = 16;
/// A file whose mtime is older than this is trusted unchanged when its size and mtime match;
/// younger files are re-read because writes within one mtime tick are invisible.
const MTIME_SETTLE: Duration = Duration::from_secs(2);

/// A problem with one document, or with a whole file or directory (`document == 0`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileError {
    /// The file (or directory) concerned.
    pub file: PathBuf,
    /// 1-based index of the document among the file's non-empty documents; 0 for the whole file.
    pub document: usize,
    /// 1-based line where the document starts; 0 for the whole file.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}: document {}: {}",
                self.file.display(),
                self.line,
                self.document,
                self.message
            )
        }
    }
}

impl std::error::Error for FileError {}

/// Called once for every newly appearing error (wired to a metric and a log by the binary).
pub type ErrorHook = Arc<dyn Fn(&FileError) + Send + Sync>;

/// A cloneable view of the errors of the latest load, for status reporting.
#[derive(Clone, Debug, Default)]
pub struct FileErrors(Arc<Mutex<Vec<FileError>>>);

impl FileErrors {
    /// The errors of the latest load.
    pub fn get(&self) -> Vec<FileError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, errors: Vec<FileError>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = errors;
    }
}

/// Loads every object in `dir` once; objects sorted by key, errors by file and line.
pub fn load_dir(dir: &Path) -> (Vec<Arc<Object>>, Vec<FileError>) {
    let mut loader = Loader::new(dir.to_path_buf());
    let change = loader.refresh(true);
    let objects = loader.state.values().map(|c| c.object.clone()).collect();
    (objects, change.map(|c| c.errors).unwrap_or_default())
}

/// The `files` source.
pub struct FileSource {
    dir: PathBuf,
    tx: EventSender,
    on_error: ErrorHook,
    errors: FileErrors,
    poll_interval: Duration,
}

impl FileSource {
    /// A source for `dir`, sending to `tx` and reporting each new error to `on_error`.
    pub fn new(dir: PathBuf, tx: EventSender, on_error: ErrorHook) -> Self {
        Self {
            dir,
            tx,
            on_error,
            errors: FileErrors::default(),
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// Overrides the poll interval (tests use a short one).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The errors of the latest load.
    pub fn errors(&self) -> Vec<FileError> {
        self.errors.get()
    }

    /// A handle to the latest errors that stays valid after [`FileSource::run`] takes `self`.
    pub fn error_handle(&self) -> FileErrors {
        self.errors.clone()
    }

    /// Loads the directory, sends every object plus [`ConfigEvent::Synced`] in one batch, then
    /// polls and sends one batch per change until `shutdown` fires or the receiver goes away.
    pub async fn run(self, shutdown: CancellationToken) {
        let FileSource {
            dir,
            tx,
            on_error,
            errors,
            poll_interval,
        } = self;
        let mut loader = Loader::new(dir);
        let mut ticker = tokio::time::interval(poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // Directory walks and file reads block; keep them off the async workers.
            let task = tokio::task::spawn_blocking(move || {
                let change = loader.refresh(first);
                (loader, change)
            });
            let (returned, change) = tokio::select! {
                _ = shutdown.cancelled() => return,
                joined = task => match joined {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(error = %e, "files source: load task failed");
                        return;
                    }
                },
            };
            loader = returned;
            let Some(change) = change else { continue };
            for err in &change.new_errors {
                on_error(err);
            }
            errors.set(change.errors);
            let mut batch = change.events;
            if first {
                batch.push(ConfigEvent::Synced);
                first = false;
            }
            if batch.is_empty() {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                sent = tx.send(batch) => if sent.is_err() {
                    tracing::debug!("files source: receiver gone, stopping");
                    return;
                },
            }
        }
    }
}

/// A file as last seen.
struct CachedFile {
    len: u64,
    modified: Option<SystemTime>,
    hash: u64,
    parsed: Arc<ParsedFile>,
}

/// An object currently in force, and where it came from.
#[derive(Clone)]
struct Current {
    object: Arc<Object>,
    /// Serialized form, to tell real changes from rewrites of the same content.
    content: String,
    file: PathBuf,
    document: usize,
    line: usize,
}

/// The result of a refresh that found changes.
struct Change {
    events: Vec<ConfigEvent>,
    errors: Vec<FileError>,
    new_errors: Vec<FileError>,
}

/// Incremental directory loader: re-parses only files whose content changed.
struct Loader {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    io_errors: Vec<FileError>,
    state: BTreeMap<ObjectKey, Current>,
    errors: Vec<FileError>,
}

impl Loader {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            io_errors: Vec::new(),
            state: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    /// Rescans the directory; `None` when nothing changed (unless `force`).
    fn refresh(&mut self, force: bool) -> Option<Change> {
        if !self.scan() && !force {
            return None;
        }
        let (next, errors) = self.assemble();
        let mut events = Vec::new();
        for (key, cur) in &next {
            match self.state.get(key) {
                Some(old) if old.content == cur.content => {}
                _ => events.push(ConfigEvent::Apply(cur.object.clone())),
            }
        }
        for key in self.state.keys() {
            if !next.contains_key(key) {
                events.push(ConfigEvent::Delete(key.clone()));
            }
        }
        let old_errors: BTreeSet<&FileError> = self.errors.iter().collect();
        let new_errors = errors
            .iter()
            .filter(|e| !old_errors.contains(e))
            .cloned()
            .collect();
        self.state = next;
        self.errors = errors.clone();
        Some(Change {
            events,
            errors,
            new_errors,
        })
    }

    /// Updates the file cache; true when any file appeared, vanished or changed content.
    fn scan(&mut self) -> bool {
        let mut found = Vec::new();
        let mut failed_dirs = Vec::new();
        let mut io_errors = Vec::new();
        walk(&self.dir, 0, &mut found, &mut failed_dirs, &mut io_errors);
        found.sort();
        let mut previous = std::mem::take(&mut self.files);
        let mut changed = false;
        for path in found {
            let prev = previous.remove(&path);
            let (entry, file_changed) = load_file(&path, prev, &mut io_errors);
            changed |= file_changed;
            if let Some(entry) = entry {
                self.files.insert(path, entry);
            }
        }
        // Files we could not list this time are kept as they were rather than deleted.
        for (path, entry) in previous {
            if failed_dirs.iter().any(|d| path.starts_with(d)) {
                self.files.insert(path, entry);
            } else {
                changed = true;
            }
        }
        io_errors.sort();
        changed |= io_errors != self.io_errors;
        self.io_errors = io_errors;
        changed
    }

    /// Combines all files (sorted path order, later definitions win) into the objects in force.
    fn assemble(&self) -> (BTreeMap<ObjectKey, Current>, Vec<FileError>) {
        let mut next: BTreeMap<ObjectKey, Current> = BTreeMap::new();
        let mut errors = self.io_errors.clone();
        let mut rejected = BTreeSet::new();
        let mut unidentified = BTreeSet::new();
        for (path, cached) in &self.files {
            let parsed = &cached.parsed;
            errors.extend(parsed.errors.iter().cloned());
            rejected.extend(parsed.rejected.iter().cloned());
            if parsed.unidentified {
                unidentified.insert(path);
            }
            for loc in &parsed.objects {
                let key = loc.object.key();
                if let Some(earlier) = next.get(&key) {
                    errors.push(FileError {
                        file: path.clone(),
                        document: loc.document,
                        line: loc.line,
                        message: format!(
                            "duplicate {key}: also defined in {} (document {}, line {}); this later definition is used",
                            earlier.file.display(),
                            earlier.document,
                            earlier.line
                        ),
                    });
                }
                next.insert(
                    key,
                    Current {
                        object: loc.object.clone(),
                        content: content(&loc.object),
                        file: path.clone(),
                        document: loc.document,
                        line: loc.line,
                    },
                );
            }
        }
        // Rejected definitions leave the previous version in force.
        for key in rejected {
            if !next.contains_key(&key)
                && let Some(old) = self.state.get(&key)
            {
                next.insert(key, old.clone());
            }
        }
        // A file with unattributable errors (e.g. broken YAML) keeps its missing objects.
        for (key, old) in &self.state {
            if !next.contains_key(key) && unidentified.contains(&old.file) {
                next.insert(key.clone(), old.clone());
            }
        }
        errors.sort();
        (next, errors)
    }
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Collects YAML files under `dir`, skipping dot entries (ConfigMap mounts keep every file a
/// second time under `..data`).
fn walk(
    dir: &Path,
    depth: usize,
    found: &mut Vec<PathBuf>,
    failed_dirs: &mut Vec<PathBuf>,
    errors: &mut Vec<FileError>,
) {
    let mut fail = |msg: String, failed_dirs: &mut Vec<PathBuf>| {
        failed_dirs.push(dir.to_path_buf());
        errors.push(FileError {
            file: dir.to_path_buf(),
            document: 0,
            line: 0,
            message: msg,
        });
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot read directory: {e}"), failed_dirs),
    };
    let mut subdirs = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                fail(format!("cannot list directory: {e}"), failed_dirs);
                continue;
            }
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks; a dangling link is simply not a file.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            subdirs.push(path);
        } else if meta.is_file() && is_yaml(&path) {
            found.push(path);
        }
    }
    for sub in subdirs {
        if depth < MAX_DEPTH {
            walk(&sub, depth + 1, found, failed_dirs, errors);
        }
    }
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

fn settled(modified: Option<SystemTime>) -> bool {
    modified
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age > MTIME_SETTLE)
}

/// Returns the file's new cache entry (the old one if it cannot be read) and whether its
/// content changed.
fn load_file(
    path: &Path,
    prev: Option<CachedFile>,
    errors: &mut Vec<FileError>,
) -> (Option<CachedFile>, bool) {
    let io_error = |what: &str, e: std::io::Error| FileError {
        file: path.to_path_buf(),
        document: 0,
        line: 0,
        message: format!("cannot {what}: {e}"),
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            errors.push(io_error("stat file", e));
            return (prev, false);
        }
    };
    let len = meta.len();
    let modified = meta.modified().ok();
    if let Some(p) = &prev
        && p.len == len
        && p.modified == modified
        && settled(modified)
    {
        return (prev, false);
    }
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            errors.push(io_error("read file", e));
            return (prev, false);
        }
    };
    let hash = hash_bytes(&bytes);
    if let Some(p) = prev
        && p.hash == hash
    {
        let entry = CachedFile {
            len,
            modified,
            hash,
            parsed: p.parsed,
        };
        return (Some(entry), false);
    }
    let parsed = match std::str::from_utf8(&bytes) {
        Ok(text) => parse_file(path, text),
        Err(e) => ParsedFile {
            errors: vec![FileError {
                file: path.to_path_buf(),
                document: 0,
                line: 0,
                message: format!("not valid UTF-8: {e}"),
            }],
            unidentified: true,
            ..ParsedFile::default()
        },
    };
    let entry = CachedFile {
        len,
        modified,
        hash,
        parsed: Arc::new(parsed),
    };
    (Some(entry), true)
}

/// Serialized form of an object, for change detection.
fn content(object: &Object) -> String {
    let json = match object {
        Object::Namespace(o) => serde_json::to_string(o),
        Object::Pod(o) => serde_json::to_string(o),
        Object::Service(o) => serde_json::to_string(o),
        Object::EndpointSlice(o) => serde_json::to_string(o),
        Object::ServiceAccount(o) => serde_json::to_string(o),
        Object::ServiceEntry(o) => serde_json::to_string(o),
        Object::WorkloadEntry(o) => serde_json::to_string(o),
        Object::AuthorizationPolicy(o) => serde_json::to_string(o),
        Object::PeerAuthentication(o) => serde_json::to_string(o),
    };
    // Serialization cannot fail for these types; Debug output is an equally stable fallback.
    json.unwrap_or_else(|_| format!("{object:?}"))
}

#[cfg(test)]
mod tests;
