//! The crate's own thread pool: sized by `UNILORA_NUM_THREADS` or [`set_num_threads`],
//! rebuilt after `fork()` (a forked child has none of its parent's threads), and
//! bypassed entirely with one thread. Results never depend on the thread count: every
//! output element is a pure function of its position.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

struct PoolState {
    /// Requested size; 0 means "from the environment or the CPU count".
    requested: usize,
    /// The pool and the process id that built it.
    pool: Option<(u32, usize, Arc<ThreadPool>)>,
}

static STATE: Mutex<PoolState> = Mutex::new(PoolState {
    requested: 0,
    pool: None,
});

fn default_threads() -> usize {
    std::env::var("UNILORA_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Sets the number of worker threads; `0` restores the default
/// (`UNILORA_NUM_THREADS`, else the number of available CPUs). `1` runs everything
/// on the calling thread.
pub fn set_num_threads(n: usize) {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    st.requested = n;
    st.pool = None;
}

/// The number of threads the next parallel call will use.
pub fn num_threads() -> usize {
    let st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if st.requested > 0 {
        st.requested
    } else {
        default_threads()
    }
}

/// Runs `f` inside the pool (or inline with a single thread).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = {
        let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let n = if st.requested > 0 {
            st.requested
        } else {
            default_threads()
        };
        if n <= 1 {
            None
        } else {
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
        }
    };
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}
