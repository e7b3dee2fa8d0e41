//! Progress and cancellation of long work (the merge), and the one loop that runs such
//! work on a thread while its caller watches: the Python binding (signals, progress
//! callback, GIL released while it waits) and the Rust progress bar both use
//! [`run_watched`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{CoreError, Result};

/// How often [`run_watched`] calls its watcher.
pub const POLL: Duration = Duration::from_millis(100);

/// Progress and cancellation shared between a running merge and its caller.
#[derive(Debug, Default)]
pub struct Control {
    done: AtomicU64,
    total: AtomicU64,
    cancelled: AtomicBool,
}

impl Control {
    /// A fresh control: nothing done, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the running work to stop; it returns [`CoreError::Interrupted`] soon after
    /// and leaves no output behind.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether [`Control::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// `(bytes done, bytes in total)` of the tensor data to write (the total is 0
    /// until planning is over).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Adds `n` bytes to the work done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the total once it is known.
    pub fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
}

/// Runs `work` on a scoped thread. The calling thread calls `watch(finished)` right
/// away, then about every [`POLL`] and once more when the work has finished; between
/// calls it waits through `wait(is_finished)`, which must return within about
/// [`POLL`] (the Python binding releases the GIL there). A panic of the work becomes
/// [`CoreError::Internal`].
pub fn run_watched<T: Send>(
    work: impl FnOnce() -> Result<T> + Send,
    mut watch: impl FnMut(bool),
    mut wait: impl FnMut(&(dyn Fn() -> bool + Sync)),
) -> Result<T> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(work);
        loop {
            let finished = handle.is_finished();
            watch(finished);
            if finished {
                break;
            }
            wait(&|| handle.is_finished());
        }
        handle
            .join()
            .unwrap_or_else(|panic| Err(CoreError::from_panic("a worker thread", &*panic)))
    })
}

/// Sleeps until `is_finished()` or [`POLL`] has passed, checking every 5 ms: the
/// `wait` of [`run_watched`] for callers with nothing else to do meanwhile.
pub fn wait_a_poll(is_finished: &(dyn Fn() -> bool + Sync)) {
    let start = Instant::now();
    while !is_finished() && start.elapsed() < POLL {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_worker_is_an_internal_error() {
        let mut calls = 0;
        let result: Result<()> = run_watched(
            || panic!("tile 7 out of range"),
            |_| calls += 1,
            wait_a_poll,
        );
        let err = result.unwrap_err();
        assert!(matches!(err, CoreError::Internal(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.starts_with("internal error: ") && text.contains("tile 7 out of range"));
        assert!(calls >= 1);
    }

    #[test]
    fn the_watcher_sees_the_end() {
        let control = Control::new();
        let mut last = None;
        let out = run_watched(
            || {
                std::thread::sleep(Duration::from_millis(250));
                control.add(5);
                Ok(42)
            },
            |finished| last = Some((finished, control.progress().0)),
            wait_a_poll,
        );
        assert_eq!(out.unwrap(), 42);
        assert_eq!(last, Some((true, 5)));
    }
}
