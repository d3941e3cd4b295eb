//! Processes the sandbox starts: daemonized inside a network namespace with output to a log
//! file, recorded by pid and start time (so a recycled pid is never signalled), stopped with
//! SIGTERM then SIGKILL, and found again by the namespace they run in.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process identified by pid and kernel start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of /proc/<pid>/stat).
    pub start_time: u64,
}

/// The state letter and start time from /proc/<pid>/stat.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `pid (comm) S ... starttime ...`; comm may contain spaces and parentheses.
fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 (state) is fields[0], so field 22 (starttime) is fields[19].
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl ProcessRecord {
    /// The record of a running process.
    pub fn of(pid: u32) -> Option<Self> {
        let pid = i32::try_from(pid).ok()?;
        stat(pid).map(|(_, start_time)| Self { pid, start_time })
    }

    /// True while the process exists, is the same process, and has not exited (zombie).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((s, t)) if t == self.start_time && s != 'Z' && s != 'X')
    }

    /// Sends `sig` if the process is still the recorded one.
    pub fn signal(&self, sig: Signal) {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid), sig);
        }
    }
}

/// What to run and where.
pub struct Spawn<'a> {
    /// Network namespace name (`ip netns exec` also bind-mounts /etc/netns/<ns>/* files).
    pub netns: &'a str,
    /// Program (a path, or a name looked up in the PATH given in `env`).
    pub program: &'a Path,
    /// Arguments.
    pub args: &'a [String],
    /// The complete environment.
    pub env: &'a [(String, String)],
    /// File receiving stdout and stderr (appended).
    pub log: &'a Path,
    /// Working directory.
    pub cwd: &'a Path,
}

/// Starts a process in its own session (it survives meshctl exiting), stdin from /dev/null.
/// `ip netns exec` execs the program in place, so the child's pid is the program's pid.
pub fn spawn(s: &Spawn<'_>) -> anyhow::Result<Child> {
    if let Some(dir) = s.log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = File::options()
        .create(true)
        .append(true)
        .open(s.log)
        .with_context(|| format!("opening log {}", s.log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", s.netns])
        .arg(s.program)
        .args(s.args)
        .env_clear()
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .current_dir(s.cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe; a new session detaches the process from meshctl's
    // terminal so it keeps running after meshctl exits.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {} in {}", s.program.display(), s.netns))
}

/// SIGTERM to every live process, SIGKILL to those still alive after `grace`; waits (briefly)
/// for them to be gone.
pub fn terminate(records: &[ProcessRecord], grace: Duration) {
    let live: Vec<ProcessRecord> = records.iter().copied().filter(|r| r.alive()).collect();
    if live.is_empty() {
        return;
    }
    for r in &live {
        r.signal(Signal::SIGTERM);
    }
    if !wait_gone(&live, grace) {
        for r in &live {
            r.signal(Signal::SIGKILL);
        }
        wait_gone(&live, Duration::from_secs(3));
    }
}

fn wait_gone(records: &[ProcessRecord], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if records.iter().all(|r| !r.alive()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to one process, then up to `grace` for it to exit; SIGKILL if it did not. Returns
/// how long it took and whether it exited by itself.
pub fn stop(record: &ProcessRecord, grace: Duration) -> (Duration, bool) {
    let started = Instant::now();
    record.signal(Signal::SIGTERM);
    if wait_gone(std::slice::from_ref(record), grace) {
        return (started.elapsed(), true);
    }
    record.signal(Signal::SIGKILL);
    wait_gone(std::slice::from_ref(record), Duration::from_secs(3));
    (started.elapsed(), false)
}

/// Inodes of the sockets a process holds open (from /proc/<pid>/fd).
pub fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| parse_socket_link(&l.to_string_lossy()))
        .collect()
}

/// Parses an fd link target `socket:[12345]`.
fn parse_socket_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Appends a line marking what meshctl did to a component's log (several processes of one
/// component may write to the same log during a restart or upgrade).
pub fn note(log: &Path, what: &str) {
    use std::io::Write;
    if let Ok(mut f) = File::options().create(true).append(true).open(log) {
        let _ = writeln!(f, "--- meshctl: {what} ---");
    }
}

/// The inode identifying a network namespace file (e.g. /var/run/netns/<name>).
pub fn netns_inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Parses the target of /proc/<pid>/ns/net, `net:[4026531840]`.
fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Every process (other than this one) whose network namespace is one of `inodes`.
pub fn processes_in_netns(inodes: &BTreeSet<u64>) -> Vec<ProcessRecord> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .and_then(|l| parse_ns_link(&l.to_string_lossy()))
                .is_some_and(|ino| inodes.contains(&ino))
        })
        .filter_map(ProcessRecord::of)
        .filter(ProcessRecord::alive)
        .collect()
}

/// The last `n` lines of a log file (for error messages).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_command_names() {
        let mut fields = vec!["S"];
        fields.extend(std::iter::repeat_n("0", 18));
        fields.push("123456");
        fields.push("99");
        let line = format!("77 (we ird) (x)) {}", fields.join(" "));
        assert_eq!(parse_stat(&line), Some(('S', 123456)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_recycled_pid_is_not() {
        let me = ProcessRecord::of(std::process::id()).unwrap();
        assert!(me.alive());
        let other = ProcessRecord {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.alive());
    }

    #[test]
    fn stop_terminates_a_child_and_reports_a_clean_exit() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let r = ProcessRecord::of(child.id()).unwrap();
        // Reap in the background so the exited child does not linger as a zombie we own.
        let reaper = std::thread::spawn(move || child.wait());
        let (took, clean) = stop(&r, Duration::from_secs(5));
        assert!(clean, "sleep exits on SIGTERM");
        assert!(took < Duration::from_secs(5));
        assert!(!r.alive());
        reaper.join().unwrap().unwrap();
    }

    #[test]
    fn own_sockets_are_found_by_inode() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inodes = socket_inodes(std::process::id() as i32);
        assert!(!inodes.is_empty(), "the listener is a socket fd");
        drop(l);
        assert_eq!(parse_socket_link("socket:[77]"), Some(77));
        assert_eq!(parse_socket_link("pipe:[77]"), None);
    }

    #[test]
    fn ns_link_parsing() {
        assert_eq!(parse_ns_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_ns_link("mnt:[1]"), None);
    }
}
