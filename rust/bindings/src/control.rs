//! Long work watched from Python: the work runs on a worker thread (which uses the
//! core's pool) while the calling thread waits with the GIL released, waking every
//! 100 ms to run Python's signal handlers (so Ctrl-C, or any handler that raises,
//! cancels the work, which then removes its temporary output) and to report progress
//! to an optional callback.

use pyo3::prelude::*;
use unilora_core::CoreError;
use unilora_core::control::{Control, run_watched, wait_a_poll};

use crate::errors::IntoPyResult;

/// Runs `work` on a scoped thread; meanwhile the caller waits without the GIL, checks
/// signals and calls `progress(done, total)` about every 100 ms. An exception (from a
/// signal handler or the callback) cancels the work through `control` and is raised
/// once the worker has cleaned up; a panic of the worker is an internal error.
pub(crate) fn run_with_signals<T: Send>(
    py: Python<'_>,
    control: &Control,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce() -> Result<T, CoreError> + Send,
) -> PyResult<T> {
    let mut pending: Option<PyErr> = None;
    let result = run_watched(
        work,
        |_finished| {
            if pending.is_some() {
                return;
            }
            let outcome = py.check_signals().and_then(|()| match progress {
                Some(cb) => cb.call1(control.progress()).map(drop),
                None => Ok(()),
            });
            if let Err(e) = outcome {
                control.cancel();
                pending = Some(e);
            }
        },
        |is_finished| py.detach(|| wait_a_poll(is_finished)),
    );
    match pending {
        Some(err) => Err(err),
        None => result.py(),
    }
}
