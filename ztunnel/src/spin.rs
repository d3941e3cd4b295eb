//! Bounded busy-polling for a data-path worker.
//!
//! Why: when a worker sleeps in `epoll_wait`, the next packet for it has to wake its CPU. On a
//! VM that wake-up is an IPI plus a halt exit, tens of microseconds paid by the sender (the
//! profile of a 1 KiB ping-pong showed the apps spending a tenth of all CPU in
//! `sock_def_readable` waking ztunnel). A worker that has just been busy is likely to get more
//! traffic within microseconds (the reply to what it forwarded), so for a short window after
//! its last work it polls its sockets without sleeping instead. A worker that finds nothing for
//! a whole window sleeps as before, so an idle proxy costs no CPU; each empty poll also calls
//! `sched_yield`, so a co-located app thread that has become runnable gets the CPU at once.
//!
//! Mechanism: tokio's current-thread scheduler runs the `on_thread_park` hook before it parks,
//! and if that hook wakes the `block_on` future it polls the IO driver with a zero timeout
//! instead of sleeping. The worker's `block_on` future registers its waker here.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A scheduler turn (unpark to next park) longer than this many empty turns did real work.
const WORK_FACTOR: u32 = 4;
/// ... and at least this long, whatever the empty turns cost.
const MIN_WORK_TURN: Duration = Duration::from_micros(8);
/// Spinning stops this many windows after the last real wake-up even if turns keep looking
/// busy, so a mistaken work signal (a preempted turn) cannot keep an idle worker spinning.
const MAX_WINDOWS: u32 = 40;

thread_local! {
    static STATE: RefCell<Option<Spin>> = const { RefCell::new(None) };
}

/// The busy-poll state of one worker thread.
struct Spin {
    window: Duration,
    /// Poll without sleeping until then.
    until: Cell<Option<Instant>>,
    /// The park that just ended was a zero-timeout poll we asked for.
    polled: Cell<bool>,
    /// When the scheduler last came back from parking.
    unparked_at: Cell<Instant>,
    /// The shortest turn seen: what an empty poll costs on this machine and build.
    empty_turn: Cell<Duration>,
    /// Spinning ends by then at the latest (set at each real wake-up).
    limit: Cell<Instant>,
    /// Parks turned into polls so far.
    polls: Cell<u64>,
    /// Waker of the worker's `block_on` future: waking it turns the next park into a poll.
    waker: RefCell<Option<Waker>>,
}

/// Enables busy-polling for `window` on the calling worker thread (no-op for a zero window).
pub fn enable(window: Duration) {
    if window.is_zero() {
        return;
    }
    STATE.with(|s| {
        *s.borrow_mut() = Some(Spin {
            window,
            until: Cell::new(None),
            polled: Cell::new(false),
            unparked_at: Cell::new(Instant::now()),
            empty_turn: Cell::new(MIN_WORK_TURN),
            limit: Cell::new(Instant::now()),
            polls: Cell::new(0),
            waker: RefCell::new(None),
        })
    });
}

/// `on_thread_park` hook: keeps the worker polling while its window is open.
pub fn before_park() {
    STATE.with(|s| {
        let state = s.borrow();
        let Some(spin) = state.as_ref() else {
            return;
        };
        let now = Instant::now();
        let turn = now.duration_since(spin.unparked_at.get());
        let empty = spin.empty_turn.get().min(turn);
        spin.empty_turn.set(empty);
        if turn > (empty * WORK_FACTOR).max(MIN_WORK_TURN) {
            spin.until
                .set(Some((now + spin.window).min(spin.limit.get())));
        }
        let open = spin.until.get().is_some_and(|until| now < until);
        spin.polled.set(open);
        if open {
            spin.polls.set(spin.polls.get() + 1);
            std::thread::yield_now();
            if let Some(w) = spin.waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    });
}

/// `on_thread_unpark` hook: waking from a real sleep means traffic arrived; open a window.
pub fn after_unpark() {
    STATE.with(|s| {
        let state = s.borrow();
        let Some(spin) = state.as_ref() else {
            return;
        };
        let now = Instant::now();
        if !spin.polled.get() {
            spin.until.set(Some(now + spin.window));
            spin.limit.set(now + spin.window * MAX_WINDOWS);
        }
        spin.unparked_at.set(now);
    });
}

/// How many times this thread polled instead of sleeping (0 when busy-polling is off).
pub fn polls() -> u64 {
    STATE.with(|s| s.borrow().as_ref().map_or(0, |spin| spin.polls.get()))
}

/// Wraps the worker's `block_on` future so the park hook can wake it.
pub fn driver<F: Future + Unpin>(inner: F) -> Driver<F> {
    Driver { inner }
}

/// The worker's `block_on` future, registering its waker for [`before_park`].
pub struct Driver<F> {
    inner: F,
}

impl<F: Future + Unpin> Future for Driver<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        STATE.with(|s| {
            if let Some(spin) = s.borrow().as_ref() {
                let mut waker = spin.waker.borrow_mut();
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
            }
        });
        Pin::new(&mut self.inner).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a fresh thread with a current-thread runtime wired like a worker's.
    fn on_worker<T: Send + 'static>(
        window: Duration,
        f: impl Future<Output = T> + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            enable(window);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(before_park)
                .on_thread_unpark(after_unpark)
                .build()
                .unwrap();
            rt.block_on(driver(Box::pin(f)))
        })
        .join()
        .unwrap()
    }

    fn thread_cpu() -> Duration {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
        Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
    }

    #[test]
    fn a_woken_worker_polls_for_a_while_then_sleeps_again() {
        // A timer wake-up opens a 200 µs window (at most 40 windows with mistaken work
        // signals), so 300 ms of idle time costs a few ms of CPU at most, and timers still fire.
        let (polls, cpu) = on_worker(Duration::from_micros(200), async {
            let start = thread_cpu();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let woke = polls();
            tokio::time::sleep(Duration::from_millis(300)).await;
            (woke, thread_cpu() - start)
        });
        assert!(polls > 0, "never polled instead of sleeping");
        assert!(
            cpu < Duration::from_millis(100),
            "did not go back to sleep: {cpu:?}"
        );
    }

    #[test]
    fn without_a_window_a_worker_always_sleeps() {
        let polls = on_worker(Duration::ZERO, async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::task::yield_now().await;
            polls()
        });
        assert_eq!(polls, 0);
    }

    #[test]
    fn tasks_make_progress_while_spinning() {
        let done = on_worker(Duration::from_millis(50), async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _ = tx.send(7);
            });
            tokio::time::timeout(Duration::from_secs(5), rx).await
        });
        assert_eq!(done.unwrap().unwrap(), 7);
    }
}
