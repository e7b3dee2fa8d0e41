//! Bindings of the core's thread pool: its size, read and set.

use pyo3::prelude::*;
use unilora_core::parallel;

use crate::args::uint;
use crate::errors::IntoPyResult;

/// Sets the number of worker threads (0 restores the default); at most
/// `max(256, CPU count)`.
#[pyfunction]
pub fn set_num_threads(n: &Bound<'_, PyAny>) -> PyResult<()> {
    let n = parallel::check_num_threads(usize::try_from(uint(n, "n", 0)?).unwrap_or(usize::MAX))
        .py()?;
    parallel::set_num_threads(n);
    Ok(())
}

/// The number of worker threads the next parallel call will use.
#[pyfunction]
pub fn get_num_threads() -> usize {
    parallel::num_threads()
}

/// Why `UNILORA_NUM_THREADS` is ignored or clamped, or `None` when it is used as set
/// (the package warns with it once imported, naming the importing line).
#[pyfunction]
pub fn thread_env_warning() -> Option<String> {
    parallel::env_warning()
}
