//! HTTP request rate: nginx (generated config, 1 KiB body) in the server pod, wrk in the client
//! pod. Both are external programs; when missing, the row is skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Port nginx listens on.
pub const HTTP_PORT: u16 = 8080;
/// Size of the served body.
const BODY_LEN: usize = 1024;

/// Paths of the external HTTP tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// nginx binary.
    pub nginx: PathBuf,
    /// wrk binary.
    pub wrk: PathBuf,
}

/// Finds an executable in PATH or the sbin directories (nginx lives in /usr/sbin).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Locates nginx and wrk, or names what is missing.
pub fn find_tools() -> std::result::Result<Tools, String> {
    match (which("nginx"), which("wrk")) {
        (Some(nginx), Some(wrk)) => Ok(Tools { nginx, wrk }),
        (n, w) => {
            let missing: Vec<&str> = [("nginx", n.is_none()), ("wrk", w.is_none())]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(name, _)| *name)
                .collect();
            Err(missing.join(" and "))
        }
    }
}

/// An nginx master (and its one worker) inside a pod netns; stopped on drop.
pub struct Nginx {
    child: Child,
}

fn config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    keepalive_requests 1000000;
    server {{
        listen {HTTP_PORT};
        root {d}/www;
        location / {{ default_type text/plain; }}
    }}
}}
"#
    )
}

impl Nginx {
    /// Writes a config under `dir` and starts nginx in netns `ns`; waits until it serves.
    pub fn start(tools: &Tools, ns: &str, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::write(dir.join("www/index.html"), vec![b'x'; BODY_LEN])?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir))?;
        let log = std::fs::File::create(dir.join("nginx.out"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&tools.nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start nginx")?;
        let mut nginx = Nginx { child };
        // Loopback skips the pod's redirection, so this checks nginx alone.
        let probe = SocketAddr::from(([127, 0, 0, 1], HTTP_PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, body)) = e2e::apps::http_get(ns, probe, "/")
                && body.len() == BODY_LEN
            {
                return Ok(nginx);
            }
            if let Some(status) = nginx.child.try_wait()? {
                let out = std::fs::read_to_string(dir.join("nginx.out")).unwrap_or_default();
                let err = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}):\n{out}{err}");
            }
            if Instant::now() > deadline {
                bail!("nginx did not serve {probe} within 10s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its worker; SIGKILL would orphan the worker in the netns.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What wrk reported.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    /// Requests per second.
    pub rps: f64,
    /// Socket errors and non-2xx responses, when wrk reported any.
    pub errors: Option<String>,
}

/// Runs wrk (2 threads, 16 connections) from netns `ns` against `url` for `dur`.
pub fn wrk(tools: &Tools, ns: &str, url: &str, dur: Duration) -> Result<WrkResult> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&tools.wrk)
        .args(["-t2", "-c16", "--timeout", "5s"])
        .arg(format!("-d{}s", dur.as_secs().max(1)))
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

/// Extracts requests/s and any error lines from wrk's report.
pub fn parse_wrk(text: &str) -> Option<WrkResult> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let errors: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Socket errors:") || l.starts_with("Non-2xx"))
        .collect();
    Some(WrkResult {
        rps,
        errors: (!errors.is_empty()).then(|| errors.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report_yields_rate_and_errors() {
        let text = "Running 5s test @ http://10.77.1.3:8080/\n  2 threads and 16 connections\n\
                    \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                    \x20 1000 requests in 5.00s, 1.2MB read\n\
                    \x20 Socket errors: connect 0, read 3, write 0, timeout 0\n\
                    Requests/sec:  12345.67\nTransfer/sec:      1.50MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.rps, 12345.67);
        assert_eq!(
            r.errors.as_deref(),
            Some("Socket errors: connect 0, read 3, write 0, timeout 0")
        );
        assert!(parse_wrk("nothing useful").is_none());
    }

    #[test]
    fn nginx_config_keeps_state_in_the_given_directory() {
        let c = config(Path::new("/tmp/x"));
        assert!(c.contains("pid /tmp/x/nginx.pid;"));
        assert!(c.contains("listen 8080;"));
        assert!(c.contains("access_log off;"));
        assert!(c.contains("daemon off;"));
    }
}
