//! Socket workloads of the data-path benchmark, on plain std threads: a sink (bulk throughput),
//! a 1 KiB echo (ping-pong latency) and one-request-per-connection servers (connection rate),
//! all in the server pod, plus the matching clients in the client pod.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Port of the sink server (throughput).
pub const SINK_PORT: u16 = 5001;
/// Port of the 1 KiB echo server (latency).
pub const ECHO_PORT: u16 = 5002;
/// First port of the request/response servers (connection rate).
pub const RR_BASE_PORT: u16 = 5100;
/// How many request/response ports; clients rotate over them so no single 4-tuple space fills
/// with TIME_WAIT entries.
pub const RR_PORTS: u16 = 16;
/// Size of one throughput write.
const CHUNK: usize = 128 * 1024;
/// Size of a request and of a reply in the latency and connection-rate tests.
const MSG: usize = 1024;
/// Bound on any single blocking socket call, so a broken path fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` on a new thread that first joins netns `ns`; sockets it creates live there.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> JoinHandle<Result<T>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        f()
    })
}

/// Waits for a worker thread and returns its result; a panic becomes an error.
pub fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("worker thread panicked"))?
}

fn listen(ns: &str, port: u16) -> Result<TcpListener> {
    join(spawn_in(ns, move || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).with_context(|| format!("bind :{port}"))
    }))
}

/// Bytes the sink received on one connection and the time from first byte to EOF.
type SinkReport = (u64, Duration);

/// The benchmark servers in one pod. Dropping it stops every accept loop.
pub struct Servers {
    listeners: Vec<TcpListener>,
    sink_reports: Receiver<SinkReport>,
}

impl Servers {
    /// Starts the sink, the echo and the request/response servers in netns `ns`.
    pub fn start(ns: &str) -> Result<Self> {
        let mut listeners = Vec::new();
        let (tx, sink_reports) = sync_channel(4);

        let sink = listen(ns, SINK_PORT)?;
        listeners.push(sink.try_clone()?);
        std::thread::spawn(move || accept_each(sink, move |s| sink_conn(s, &tx)));

        let echo = listen(ns, ECHO_PORT)?;
        listeners.push(echo.try_clone()?);
        std::thread::spawn(move || accept_each(echo, echo_conn));

        for port in RR_BASE_PORT..RR_BASE_PORT + RR_PORTS {
            let l = listen(ns, port)?;
            listeners.push(l.try_clone()?);
            // Served inline: a thread per connection would dominate the cost being measured.
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    match conn {
                        Ok(s) => {
                            let _ = rr_conn(s);
                        }
                        Err(e) if e.kind() == ErrorKind::InvalidInput => break,
                        Err(_) => continue,
                    }
                }
            });
        }
        Ok(Self {
            listeners,
            sink_reports,
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // shutdown(SHUT_RD) on a listening socket wakes a blocked accept() with EINVAL on Linux.
        for l in &self.listeners {
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Read);
        }
    }
}

/// Accepts until the listener is shut down, handling each connection on its own thread.
fn accept_each(l: TcpListener, handle: impl Fn(TcpStream) -> Result<()> + Send + Clone + 'static) {
    for conn in l.incoming() {
        match conn {
            Ok(s) => {
                let h = handle.clone();
                std::thread::spawn(move || h(s));
            }
            Err(e) if e.kind() == ErrorKind::InvalidInput => break,
            Err(_) => continue,
        }
    }
}

fn sink_conn(mut s: TcpStream, tx: &SyncSender<SinkReport>) -> Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut first: Option<Instant> = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let elapsed = first.map(|t| t.elapsed()).unwrap_or_default();
    let _ = tx.try_send((total, elapsed));
    Ok(())
}

fn echo_conn(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; MSG];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

fn rr_conn(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; MSG];
    s.read_exact(&mut buf)?;
    s.write_all(&buf)?;
    // Wait for the client's FIN so the client closes first, as HTTP/1.1 clients usually do.
    let _ = s.read(&mut buf)?;
    Ok(())
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Single-stream throughput as the server saw it.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Bytes the server received.
    pub bytes: u64,
    /// Seconds from the server's first byte to EOF.
    pub secs: f64,
}

impl Throughput {
    /// Gigabits per second.
    pub fn gbps(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 * 8.0 / self.secs / 1e9
        } else {
            0.0
        }
    }
}

/// One connection from `ns` to the sink at `ip`, writing 128 KiB chunks for `dur`.
pub fn throughput(servers: &Servers, ns: &str, ip: Ipv4Addr, dur: Duration) -> Result<Throughput> {
    // Reports left over from an aborted earlier run would be mistaken for this one.
    while servers.sink_reports.try_recv().is_ok() {}
    let addr = SocketAddr::from((ip, SINK_PORT));
    join(spawn_in(ns, move || {
        let mut s = connect(addr)?;
        let chunk = vec![0x5au8; CHUNK];
        let start = Instant::now();
        while start.elapsed() < dur {
            s.write_all(&chunk).context("write to sink")?;
        }
        s.shutdown(Shutdown::Write)?;
        // The sink closes after EOF; waiting for that means every byte was delivered.
        let mut rest = [0u8; 64];
        while s.read(&mut rest).context("wait for sink close")? > 0 {}
        Ok(())
    }))?;
    let (bytes, elapsed) = servers
        .sink_reports
        .recv_timeout(IO_TIMEOUT)
        .context("sink did not report")?;
    Ok(Throughput {
        bytes,
        secs: elapsed.as_secs_f64(),
    })
}

/// Round-trip time distribution of 1 KiB ping-pongs on one connection.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Round trips measured.
    pub samples: usize,
}

/// `warmup` unmeasured then `rounds` measured 1 KiB round trips from `ns` to the echo server.
pub fn latency(ns: &str, ip: Ipv4Addr, warmup: usize, rounds: usize) -> Result<Latency> {
    let addr = SocketAddr::from((ip, ECHO_PORT));
    let mut rtts = join(spawn_in(ns, move || {
        let mut s = connect(addr)?;
        let mut buf = [0x42u8; MSG];
        let mut rtts = Vec::with_capacity(rounds);
        for i in 0..warmup + rounds {
            let t = Instant::now();
            s.write_all(&buf).context("echo write")?;
            s.read_exact(&mut buf).context("echo read")?;
            if i >= warmup {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(rtts)
    }))?;
    rtts.sort_by(f64::total_cmp);
    Ok(Latency {
        p50_us: percentile(&rtts, 0.50),
        p99_us: percentile(&rtts, 0.99),
        samples: rtts.len(),
    })
}

/// Nearest-rank percentile of sorted samples (0 when empty).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One connection: send a request, read the reply, close (the client closes first).
fn exchange(addr: SocketAddr, buf: &mut [u8; MSG]) -> Result<()> {
    let mut s = connect(addr)?;
    s.write_all(buf)?;
    s.read_exact(buf)?;
    Ok(())
}

/// Connections completed by the connection-rate test.
#[derive(Debug, Clone, Copy)]
pub struct ConnRate {
    /// Request/reply exchanges that completed.
    pub completed: u64,
    /// Attempts that failed.
    pub errors: u64,
    /// Wall time of the test.
    pub secs: f64,
}

impl ConnRate {
    /// Completed connections per second.
    pub fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.completed as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// `threads` clients in `ns`, each looping connect / send 1 KiB / read 1 KiB / close for `dur`,
/// rotating over the request/response ports (each thread on its own subset).
pub fn conn_rate(ns: &str, ip: Ipv4Addr, threads: u16, dur: Duration) -> Result<ConnRate> {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            spawn_in(ns, move || {
                let ports: Vec<u16> = (RR_BASE_PORT..RR_BASE_PORT + RR_PORTS)
                    .skip(t as usize)
                    .step_by(threads as usize)
                    .collect();
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut buf = [0x33u8; MSG];
                let begin = Instant::now();
                let mut i = 0usize;
                while begin.elapsed() < dur {
                    let addr = SocketAddr::from((ip, ports[i % ports.len()]));
                    i += 1;
                    match exchange(addr, &mut buf) {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                Ok((ok, failed))
            })
        })
        .collect();
    let mut total = ConnRate {
        completed: 0,
        errors: 0,
        secs: 0.0,
    };
    for w in workers {
        let (ok, failed) = join(w)?;
        total.completed += ok;
        total.errors += failed;
    }
    total.secs = start.elapsed().as_secs_f64();
    if total.completed == 0 {
        bail!("no connection completed ({} failed)", total.errors);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn throughput_converts_bytes_per_second_to_gigabits() {
        let t = Throughput {
            bytes: 1_250_000_000,
            secs: 2.0,
        };
        assert!((t.gbps() - 5.0).abs() < 1e-9);
    }
}
