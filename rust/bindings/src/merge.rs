//! Bindings of the streaming merge, the LoRA export and the safetensors header reader.
//!
//! The merge runs on a worker thread (which uses the crate's pool) while the calling
//! thread waits with the GIL released, waking every 100 ms to run Python's signal
//! handlers (so Ctrl-C, or any handler that raises, cancels the merge, which then
//! removes its temporary output) and to report progress to an optional callback.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use unilora_core::control::{Control, run_watched, wait_a_poll};
use unilora_core::merge::{EachReport, MergeOptions, MergeReport, MultiMergeOptions};
use unilora_core::safetensors::{Dtype, Header};
use unilora_core::{CoreError, ExportOptions, ExportReport, SavedModules};

use crate::errors::IntoPyResult;

fn parse_dtype(dtype: Option<&str>) -> PyResult<Option<Dtype>> {
    dtype.map(Dtype::parse_target).transpose().py()
}

/// Runs `work` on a scoped thread; meanwhile the caller waits without the GIL, checks
/// signals and calls `progress(done, total)` about every 100 ms. An exception (from a
/// signal handler or the callback) cancels the work through `control` and is raised
/// once the worker has cleaned up; a panic of the worker is an internal error.
fn run_with_signals<T: Send>(
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

/// Merges the adapter into a safetensors file or model folder, writing `out`.
///
/// Returns the report (a `MergeResult`).
#[pyfunction]
#[pyo3(signature = (base, adapter, out, *, dtype=None, overwrite=false, progress=None, tile_elems=0, fsync=true))]
#[allow(clippy::too_many_arguments)]
pub fn merge<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
    dtype: Option<&str>,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
    tile_elems: usize,
    fsync: bool,
) -> PyResult<MergeReport> {
    let mut opts = MergeOptions::new(base, adapter, out);
    opts.dtype = parse_dtype(dtype)?;
    opts.overwrite = overwrite;
    opts.tile_elems = tile_elems;
    opts.fsync = fsync;
    let control = Control::new();
    run_with_signals(py, &control, progress.as_ref(), || {
        unilora_core::merge(&opts, &control)
    })
}

fn multi_options(
    base: PathBuf,
    adapters: Vec<PathBuf>,
    dtype: Option<&str>,
    overwrite: bool,
    tile_elems: usize,
    fsync: bool,
) -> PyResult<MultiMergeOptions> {
    let mut opts = MultiMergeOptions::new(base, adapters);
    opts.dtype = parse_dtype(dtype)?;
    opts.overwrite = overwrite;
    opts.tile_elems = tile_elems;
    opts.fsync = fsync;
    Ok(opts)
}

/// Merges each adapter alone into the base in one pass over it, writing
/// `out_dir/<adapter folder name>` (plus `.safetensors` for a file base) for each.
///
/// Returns the report of the pass (a `MergeEachResult`: one `MergeResult` per adapter,
/// and the bytes of tensor data read from the base, once, and the adapters).
#[pyfunction]
#[pyo3(signature = (base, adapters, out_dir, *, dtype=None, overwrite=false, progress=None, tile_elems=0, fsync=true))]
#[allow(clippy::too_many_arguments)]
pub fn merge_each<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    out_dir: PathBuf,
    dtype: Option<&str>,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
    tile_elems: usize,
    fsync: bool,
) -> PyResult<EachReport> {
    let opts = multi_options(base, adapters, dtype, overwrite, tile_elems, fsync)?;
    let control = Control::new();
    run_with_signals(py, &control, progress.as_ref(), || {
        unilora_core::merge_each(&opts, &out_dir, &control)
    })
}

/// Merges several adapters into one checkpoint `out`: `W + sum_i w_i * dW_i`.
///
/// Returns the report (a `MergeResult`).
#[pyfunction]
#[pyo3(signature = (base, adapters, weights, out, *, dtype=None, overwrite=false, progress=None, tile_elems=0, fsync=true))]
#[allow(clippy::too_many_arguments)]
pub fn merge_weighted<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    weights: Vec<f64>,
    out: PathBuf,
    dtype: Option<&str>,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
    tile_elems: usize,
    fsync: bool,
) -> PyResult<MergeReport> {
    let opts = multi_options(base, adapters, dtype, overwrite, tile_elems, fsync)?;
    let control = Control::new();
    run_with_signals(py, &control, progress.as_ref(), || {
        unilora_core::merge_weighted(&opts, &weights, &out, &control)
    })
}

/// Writes the exact PEFT LoRA equivalent of the adapter into the folder `out`.
///
/// `saved_modules` (`"error"`, `"keep"`, `"drop"` or `"separate"`) says what to do with
/// the adapter's `modules_to_save` tensors. Returns the report (an `ExportResult`).
#[pyfunction]
#[pyo3(signature = (adapter, out, *, dtype="f32", overwrite=false, saved_modules="error"))]
pub fn export_lora(
    py: Python<'_>,
    adapter: PathBuf,
    out: PathBuf,
    dtype: &str,
    overwrite: bool,
    saved_modules: &str,
) -> PyResult<ExportReport> {
    let mut opts = ExportOptions::new(adapter, out);
    opts.dtype = Dtype::parse_target(dtype).py()?;
    opts.overwrite = overwrite;
    opts.saved_modules = SavedModules::parse(saved_modules).py()?;
    py.detach(|| unilora_core::export_lora(&opts)).py()
}

/// Reads and validates a safetensors header without loading any tensor.
///
/// Returns `(metadata or None, {name: (dtype, shape, (begin, end))}, data_start)`, the
/// tensors in offset order; offsets are relative to the data buffer at `data_start`.
#[pyfunction]
pub fn safetensors_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyAny>> {
    let (_, header) = py.detach(|| Header::read(&path)).py()?;
    let meta = match &header.metadata {
        Some(m) => {
            let d = PyDict::new(py);
            for (k, v) in m {
                d.set_item(k, v.as_str().unwrap_or_default())?;
            }
            d.into_any()
        }
        None => py.None().into_bound(py),
    };
    let tensors = PyDict::new(py);
    for t in &header.tensors {
        tensors.set_item(&t.name, (t.dtype.name(), t.shape.clone(), (t.begin, t.end)))?;
    }
    Ok((meta, tensors, header.data_start())
        .into_pyobject(py)?
        .into_any())
}
