//! Data-path runtimes: one single-threaded tokio runtime per worker thread, each owning its own
//! listeners, HBONE pool and connections.
//!
//! Why not one work-stealing runtime: its single IO driver hands every readiness event to
//! whichever worker happens to hold it, so one proxied connection bounces between CPUs and each
//! hop is a cross-CPU wake-up (an IPI, ~40 µs on a small VM). Here every worker has its own
//! listener in each SO_REUSEPORT group, and when there is one worker per CPU the worker is pinned
//! to its CPU and its listeners carry SO_INCOMING_CPU: the kernel hands a new connection to the
//! worker on the CPU that processed its SYN (the client's CPU), and the connection's tasks, its
//! HBONE stream and the app-side socket stay there.

use std::cell::Cell;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard the calling thread belongs to, if it is a data-path worker.
pub fn current() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

/// One data-path worker: a handle to its runtime and the CPU it is pinned to.
#[derive(Clone, Debug)]
pub struct Shard {
    /// Position among the shards (also the index of per-shard state).
    pub index: usize,
    /// Spawns onto this worker's runtime.
    pub handle: Handle,
    /// The CPU the worker is pinned to; its listeners then prefer connections from that CPU.
    pub cpu: Option<usize>,
}

/// The running data-path workers; dropping the last clone stops them.
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Shard>,
    stops: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// Whether workers are pinned to CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Affinity {
    /// Pin when there is exactly one worker per CPU the process may run on.
    Auto,
    /// Never pin; new connections are spread by the kernel's reuseport hash.
    Off,
}

impl Shards {
    /// Starts `workers` threads named `ztunnel-worker`, each running its own runtime and
    /// busy-polling for `busy_poll` after it last did work (see [`crate::spin`]).
    pub fn start(workers: usize, affinity: Affinity, busy_poll: Duration) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let cpus = match affinity {
            Affinity::Auto => allowed_cpus().filter(|c| c.len() == workers),
            Affinity::Off => None,
        };
        let mut shards = Vec::with_capacity(workers);
        let mut stops = Vec::with_capacity(workers);
        for index in 0..workers {
            let cpu = cpus.as_ref().map(|c| c[index]);
            let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("ztunnel-worker".into())
                .spawn(move || worker(index, cpu, busy_poll, handle_tx, stop_rx))?;
            let handle = handle_rx
                .recv()
                .map_err(|_| std::io::Error::other("data-path worker exited at start"))??;
            shards.push(Shard { index, handle, cpu });
            stops.push((stop_tx, thread));
        }
        Ok(Self {
            inner: Arc::new(Inner { shards, stops }),
        })
    }

    /// The workers, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &Shard> {
        self.inner.shards.iter()
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.inner.shards.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.inner.shards.is_empty()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (stop, thread) in std::mem::take(&mut self.stops) {
            let _ = stop.send(());
            // A worker never blocks: its runtime stops at once, dropping its remaining tasks.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

fn worker(
    index: usize,
    cpu: Option<usize>,
    busy_poll: Duration,
    handle_tx: std::sync::mpsc::SyncSender<std::io::Result<Handle>>,
    stop: oneshot::Receiver<()>,
) {
    if let Some(cpu) = cpu {
        let mut set = nix::sched::CpuSet::new();
        let pinned = set
            .set(cpu)
            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
        if let Err(e) = pinned {
            tracing::warn!(cpu, error = %e, "cannot pin data-path worker");
        }
    }
    CURRENT.with(|c| c.set(Some(index)));
    crate::spin::enable(busy_poll);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(crate::spin::before_park)
        .on_thread_unpark(crate::spin::after_unpark)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = handle_tx.send(Err(e));
            return;
        }
    };
    if handle_tx.send(Ok(runtime.handle().clone())).is_err() {
        return;
    }
    let _ = runtime.block_on(crate::spin::driver(stop));
}

/// The CPUs this process may run on, in order.
pub(crate) fn allowed_cpus() -> Option<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread() {
        let shards = Shards::start(2, Affinity::Off, Duration::ZERO).unwrap();
        assert_eq!(shards.len(), 2);
        for shard in shards.iter() {
            let (tx, rx) = std::sync::mpsc::channel();
            shard.handle.spawn(async move {
                let _ = tx.send((current(), std::thread::current().name().map(String::from)));
            });
            let (index, name) = rx.recv().unwrap();
            assert_eq!(index, Some(shard.index));
            assert_eq!(name.as_deref(), Some("ztunnel-worker"));
        }
        assert_eq!(current(), None, "the test thread is not a worker");
    }

    #[test]
    fn auto_affinity_pins_only_with_one_worker_per_cpu() {
        let cpus = allowed_cpus().unwrap();
        let shards = Shards::start(cpus.len(), Affinity::Auto, Duration::ZERO).unwrap();
        let pinned: Vec<_> = shards.iter().map(|s| s.cpu).collect();
        assert_eq!(pinned, cpus.iter().map(|&c| Some(c)).collect::<Vec<_>>());
        let more = Shards::start(cpus.len() + 1, Affinity::Auto, Duration::ZERO).unwrap();
        assert!(more.iter().all(|s| s.cpu.is_none()));
    }

    #[test]
    fn dropping_the_shards_stops_their_threads() {
        let shards = Shards::start(1, Affinity::Off, Duration::ZERO).unwrap();
        let handle = shards.iter().next().unwrap().handle.clone();
        drop(shards);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(handle.spawn(async move {
            let _ = tx.send(());
        }));
        assert!(rx.recv().is_err(), "a stopped runtime runs nothing");
    }
}
