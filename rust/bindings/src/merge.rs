//! Bindings of the streaming merge: one adapter, each of several adapters in one pass,
//! or their weighted sum. Each runs watched (see `control.rs`) and returns the core's
//! report, a Python class.

use std::path::PathBuf;

use pyo3::prelude::*;
use unilora_core::control::Control;
use unilora_core::merge::{EachReport, MergeOptions, MergeReport, MultiMergeOptions};

use crate::args::output_dtype;
use crate::control::run_with_signals;

fn multi_options(
    base: PathBuf,
    adapters: Vec<PathBuf>,
    dtype: Option<&str>,
    overwrite: bool,
    tile_elems: usize,
    fsync: bool,
) -> PyResult<MultiMergeOptions> {
    let mut opts = MultiMergeOptions::new(base, adapters);
    opts.dtype = output_dtype(dtype)?;
    opts.overwrite = overwrite;
    opts.tile_elems = tile_elems;
    opts.fsync = fsync;
    Ok(opts)
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
    opts.dtype = output_dtype(dtype)?;
    opts.overwrite = overwrite;
    opts.tile_elems = tile_elems;
    opts.fsync = fsync;
    let control = Control::new();
    run_with_signals(py, &control, progress.as_ref(), || {
        unilora_core::merge(&opts, &control)
    })
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
