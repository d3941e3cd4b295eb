//! Runs the real ztunnel binary inside a test netns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::apps::http_get;

/// A ztunnel process.
pub struct Ztunnel {
    child: Child,
    /// Netns it runs in.
    pub ns: String,
    log: PathBuf,
}

impl Ztunnel {
    /// Starts the ztunnel binary `bin` in shared mode with a local config and the development CA.
    pub fn start(
        bin: &Path,
        ns: &str,
        dir: &Path,
        config: &Path,
        uds: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("ztunnel-{ns}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(bin)
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", config)
            .env("FAKE_CA", "true")
            .env("INPOD_UDS", uds)
            .env("PROXY_MODE", "shared")
            .env("RUST_LOG", "info")
            .env("DRAIN_DURATION", "3s")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start ztunnel");
        Self {
            child,
            ns: ns.to_string(),
            log,
        }
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Waits until /healthz/ready answers 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(&self.ns, Self::local(15021), "/healthz/ready") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ztunnel exited early ({status}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("ztunnel not ready after 30s:\n{}", self.log());
    }

    /// The Prometheus exposition text.
    pub fn metrics(&self) -> String {
        http_get(&self.ns, Self::local(15020), "/metrics")
            .expect("scrape metrics")
            .1
    }

    /// The admin /config_dump document.
    pub fn config_dump(&self) -> serde_json::Value {
        let body = http_get(&self.ns, Self::local(15000), "/config_dump")
            .expect("config_dump")
            .1;
        serde_json::from_str(&body).expect("config_dump is JSON")
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// Waits for exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ztunnel did not exit within {timeout:?}:\n{}", self.log());
    }

    /// Everything ztunnel logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
