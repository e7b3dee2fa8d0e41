//! The crate's own thread pool: sized by `UNILORA_NUM_THREADS` or [`set_num_threads`],
//! rebuilt after `fork()` (a forked child has none of its parent's threads), and
//! bypassed entirely with one thread. Results never depend on the thread count: every
//! output element is a pure function of its position.
//!
//! The size is capped at [`max_threads`] (256, or the number of CPUs if larger): a pool
//! of a million threads would take the process down before doing any work.
//! [`check_num_threads`] refuses larger requests; `UNILORA_NUM_THREADS` above the cap
//! is clamped ([`env_warning`] describes it for the Python layer to show).

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{CoreError, Result};

/// The lower bound of the cap on the number of worker threads.
pub const MIN_THREAD_CAP: usize = 256;

fn available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The largest number of worker threads accepted: 256, or the CPU count if larger.
pub fn max_threads() -> usize {
    MIN_THREAD_CAP.max(available())
}

/// Checks a requested number of threads (`0` means the default).
pub fn check_num_threads(n: usize) -> Result<usize> {
    let max = max_threads();
    if n > max {
        return Err(CoreError::InvalidArgument(format!(
            "{n} threads requested; the limit is {max} (256 or the number of CPUs if \
             larger); use 0 for the default"
        )));
    }
    Ok(n)
}

/// `UNILORA_NUM_THREADS`: `None` when unset, empty or `0`; otherwise the parsed value
/// (`Err` with the raw text when it is not a number).
fn env_threads() -> Option<std::result::Result<usize, String>> {
    let raw = std::env::var("UNILORA_NUM_THREADS").ok()?;
    match raw.trim() {
        "" | "0" => None,
        t => Some(t.parse::<usize>().map_err(|_| raw.clone())),
    }
}

/// A description of a `UNILORA_NUM_THREADS` value that is ignored or clamped, if any.
pub fn env_warning() -> Option<String> {
    match env_threads()? {
        Err(raw) => Some(format!(
            "UNILORA_NUM_THREADS={raw:?} is not a number of threads; using the CPU count"
        )),
        Ok(n) if n > max_threads() => Some(format!(
            "UNILORA_NUM_THREADS={n} exceeds the limit of {} threads; using {}",
            max_threads(),
            max_threads()
        )),
        Ok(_) => None,
    }
}

struct PoolState {
    /// Requested size; 0 means "from the environment or the CPU count".
    requested: usize,
    /// The pool and the process id that built it.
    pool: Option<(u32, usize, Arc<ThreadPool>)>,
}

impl PoolState {
    /// The thread count in effect: the requested one, else the default.
    fn threads(&self) -> usize {
        if self.requested > 0 {
            self.requested
        } else {
            default_threads()
        }
    }
}

static STATE: Mutex<PoolState> = Mutex::new(PoolState {
    requested: 0,
    pool: None,
});

fn default_threads() -> usize {
    match env_threads() {
        Some(Ok(n)) => n.min(max_threads()),
        _ => available(),
    }
}

/// Sets the number of worker threads; `0` restores the default
/// (`UNILORA_NUM_THREADS`, else the number of available CPUs). `1` runs everything
/// on one worker thread. Values above [`max_threads`] are clamped to it (see
/// [`check_num_threads`] to refuse them instead).
pub fn set_num_threads(n: usize) {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    st.requested = n.min(max_threads());
    let wanted = st.threads();
    // Keep a pool of the wanted size: setting the same count again (as a loop that
    // sets it before every call does) must not tear down and respawn the workers.
    if matches!(&st.pool, Some((_, size, _)) if *size != wanted.max(1)) {
        st.pool = None;
    }
}

/// The number of threads the next parallel call will use.
pub fn num_threads() -> usize {
    STATE.lock().unwrap_or_else(|e| e.into_inner()).threads()
}

/// Runs `f` inside the pool of the current thread count (one worker for `1`).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = {
        let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
        // One thread is a pool of one too: outside a pool, rayon's parallel iterators
        // would run on its global pool (one thread per CPU).
        let n = st.threads().max(1);
        let pid = std::process::id();
        match &st.pool {
            Some((p, size, pool)) if *p == pid && *size == n => Some(pool.clone()),
            _ => {
                let built = ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("unilora-{i}"))
                    .build()
                    .ok()
                    .map(Arc::new);
                if let Some(pool) = &built {
                    st.pool = Some((pid, n, pool.clone()));
                }
                built
            }
        }
    };
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::{MIN_THREAD_CAP, check_num_threads, install, max_threads, set_num_threads};

    #[test]
    fn thread_requests_above_the_cap_are_refused() {
        assert!(max_threads() >= MIN_THREAD_CAP);
        assert_eq!(check_num_threads(0).unwrap(), 0);
        assert_eq!(check_num_threads(max_threads()).unwrap(), max_threads());
        let err = check_num_threads(1_000_000).unwrap_err().to_string();
        assert!(
            err.contains("1000000 threads requested") && err.contains("limit"),
            "{err}"
        );
    }

    #[test]
    fn parallel_work_runs_on_exactly_the_set_number_of_threads() {
        // One test for both counts: the setting is process-wide.
        for n in [1, 2, 1] {
            set_num_threads(n);
            assert_eq!(install(rayon::current_num_threads), n);
            let first = install(|| rayon::current_thread_index().map(|_| ()));
            assert!(first.is_some(), "work ran outside the pool for n = {n}");
        }
        set_num_threads(0);
    }
}
