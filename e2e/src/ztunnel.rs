//! Runs the real ztunnel binary inside a test netns.

use std::ops::{Deref, DerefMut};
use std::path::Path;

use crate::process::NetnsProcess;

/// A ztunnel process.
pub struct Ztunnel(NetnsProcess);

impl Deref for Ztunnel {
    type Target = NetnsProcess;
    fn deref(&self) -> &NetnsProcess {
        &self.0
    }
}

impl DerefMut for Ztunnel {
    fn deref_mut(&mut self) -> &mut NetnsProcess {
        &mut self.0
    }
}

impl Ztunnel {
    /// Starts the ztunnel binary `bin` in shared mode; by default with a local config and the
    /// development CA (`env` entries override, e.g. to use a control plane).
    pub fn start(
        bin: &Path,
        ns: &str,
        dir: &Path,
        config: &Path,
        uds: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let config = config.to_string_lossy();
        let uds = uds.to_string_lossy();
        let mut all = vec![
            ("XDS_ADDRESS", ""),
            ("LOCAL_XDS_PATH", config.as_ref()),
            ("FAKE_CA", "true"),
            ("INPOD_UDS", uds.as_ref()),
            ("PROXY_MODE", "shared"),
            ("RUST_LOG", "info"),
            ("DRAIN_DURATION", "3s"),
        ];
        all.extend_from_slice(env);
        Self(NetnsProcess::start("ztunnel", bin, ns, dir, &[], &all))
    }

    /// Waits until /healthz/ready answers 200.
    pub fn wait_ready(&mut self) {
        self.0.wait_http_ok(15021, "/healthz/ready");
    }

    /// The Prometheus exposition text.
    pub fn metrics(&self) -> String {
        self.get(15020, "/metrics").expect("scrape metrics").1
    }

    /// The admin /config_dump document.
    pub fn config_dump(&self) -> serde_json::Value {
        let body = self.get(15000, "/config_dump").expect("config_dump").1;
        serde_json::from_str(&body).expect("config_dump is JSON")
    }
}

/// Sum of every series of metric `name` whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
