//! Runs the real mesh-controller binary (files source) inside a test netns.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

use crate::process::NetnsProcess;

/// Where a test controller keeps its inputs and state.
pub struct ControllerDirs {
    /// Kubernetes YAML the files source watches.
    pub config: PathBuf,
    /// CA root (generated on first start) and the published `root-cert.pem`.
    pub ca: PathBuf,
    /// Node tokens file (`{nodes: {node: token}}`).
    pub tokens: PathBuf,
}

impl ControllerDirs {
    /// Lays the directories out under `dir` with one node token per `(node, token)`.
    pub fn create(dir: &Path, nodes: &[(&str, &str)]) -> Self {
        let d = ControllerDirs {
            config: dir.join("k8s"),
            ca: dir.join("ca"),
            tokens: dir.join("node-tokens.yaml"),
        };
        std::fs::create_dir_all(&d.config).unwrap();
        let mut yaml = String::from("nodes:\n");
        for (node, token) in nodes {
            yaml.push_str(&format!("  {node}: {token}\n"));
        }
        std::fs::write(&d.tokens, yaml).unwrap();
        d
    }

    /// The root certificate clients trust (published by the controller).
    pub fn root_cert(&self) -> PathBuf {
        self.ca.join("root-cert.pem")
    }
}

/// A mesh-controller process.
pub struct Controller(NetnsProcess);

impl Deref for Controller {
    type Target = NetnsProcess;
    fn deref(&self) -> &NetnsProcess {
        &self.0
    }
}

impl DerefMut for Controller {
    fn deref_mut(&mut self) -> &mut NetnsProcess {
        &mut self.0
    }
}

impl Controller {
    /// Starts the controller with the files source on the default ports (15010/15012/15014)
    /// and waits until it is ready.
    pub fn start(bin: &Path, ns: &str, dir: &Path, dirs: &ControllerDirs) -> Self {
        let (config, ca, tokens) = (
            dirs.config.to_string_lossy().into_owned(),
            dirs.ca.to_string_lossy().into_owned(),
            dirs.tokens.to_string_lossy().into_owned(),
        );
        let args = [
            "--config-source",
            "files",
            "--config-dir",
            &config,
            "--ca-dir",
            &ca,
            "--node-tokens",
            &tokens,
            "--serving-ip",
            "127.0.0.1",
            "--debounce",
            "20ms",
        ];
        let mut c = Self(NetnsProcess::start(
            "mesh-controller",
            bin,
            ns,
            dir,
            &args,
            &[("RUST_LOG", "info")],
        ));
        c.0.wait_http_ok(15014, "/ready");
        c
    }

    /// The Prometheus exposition text.
    pub fn metrics(&self) -> String {
        self.get(15014, "/metrics").expect("scrape metrics").1
    }
}
