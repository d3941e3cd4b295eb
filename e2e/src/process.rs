//! A mesh binary run as a process inside a test netns, its output captured to a log file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::apps::http_get;

/// A running process; killed on drop.
pub struct NetnsProcess {
    child: Child,
    /// What it is (for messages).
    pub name: String,
    /// Netns it runs in.
    pub ns: String,
    log: PathBuf,
}

impl NetnsProcess {
    /// Starts `bin` with `args` and `env` inside `ns`; output goes to `<dir>/<name>-<ns>.log`.
    pub fn start(
        name: &str,
        bin: &Path,
        ns: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("{name}-{ns}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", bin.display()));
        Self {
            child,
            name: name.to_string(),
            ns: ns.to_string(),
            log,
        }
    }

    /// GET `path` on 127.0.0.1:`port` inside the process's netns.
    pub fn get(&self, port: u16, path: &str) -> std::io::Result<(u16, String)> {
        http_get(&self.ns, SocketAddr::from(([127, 0, 0, 1], port)), path)
    }

    /// Waits until GET `path` on `port` answers 200; panics (with the log) after 30 s or if the
    /// process exits.
    pub fn wait_http_ok(&mut self, port: u16, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((200, _)) = self.get(port, path) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited early ({status}):\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} not ready after 30s:\n{}", self.name, self.log());
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
        panic!(
            "{} did not exit within {timeout:?}:\n{}",
            self.name,
            self.log()
        );
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NetnsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
