//! Resource usage of a process from /proc: CPU time and resident memory.

use anyhow::{Context, Result};

/// utime + stime of `pid`, in seconds (all threads).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&stat).context("parse /proc/<pid>/stat")?;
    // SAFETY: sysconf only reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// utime + stime in clock ticks from a /proc/<pid>/stat line.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) sit at offsets 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `Vm*` line of /proc/<pid>/status (e.g. `VmRSS`, `VmHWM`) in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    parse_status_kib(&status, field)
        .map(|kib| kib * 1024)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The kB value of `field` in /proc/<pid>/status text.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if name != field {
            return None;
        }
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// (busy, total) jiffies of all CPUs from /proc/stat text; iowait counts as idle.
pub fn parse_cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // Fields: user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Percentage of all CPUs busy over `window`: other work on the machine skews every figure.
pub fn machine_busy_percent(window: std::time::Duration) -> Result<f64> {
    let read = || -> Result<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        parse_cpu_jiffies(&text).context("parse /proc/stat")
    };
    let (b0, t0) = read()?;
    std::thread::sleep(window);
    let (b1, t1) = read()?;
    let total = t1.saturating_sub(t0);
    Ok(if total == 0 {
        0.0
    } else {
        b1.saturating_sub(b0) as f64 * 100.0 / total as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_sum_user_and_system_despite_odd_names() {
        let stat = "4242 (zt (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 170 30 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(200));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tztunnel\nVmHWM:\t   20480 kB\nVmRSS:\t    9216 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(9216));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn machine_cpu_counts_iowait_as_idle() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_cpu_jiffies(stat), Some((150, 1000)));
        assert_eq!(parse_cpu_jiffies("intr 1 2"), None);
    }

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(status_bytes(me, "VmRSS").unwrap() > 0);
    }
}
