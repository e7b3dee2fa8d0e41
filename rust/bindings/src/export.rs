//! Bindings of the exports: the exact PEFT LoRA equivalent and PEFT's Uni-LoRA format.
//! Each returns the core's report, a Python class.

use std::path::PathBuf;

use pyo3::prelude::*;
use unilora_core::safetensors::Dtype;
use unilora_core::{ExportOptions, ExportReport, PeftExportReport, SavedModules};

use crate::errors::IntoPyResult;

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

/// Writes the adapter in the format of PEFT's Uni-LoRA tuner (saved indices and
/// scales) into the folder `out`.
///
/// Returns the report (a `PeftExportResult`: an `ExportResult` with `notes`, what PEFT's
/// format changes or leaves out).
#[pyfunction]
#[pyo3(signature = (adapter, out, *, overwrite=false))]
pub fn export_peft(
    py: Python<'_>,
    adapter: PathBuf,
    out: PathBuf,
    overwrite: bool,
) -> PyResult<PeftExportReport> {
    let mut opts = ExportOptions::new(adapter, out);
    opts.overwrite = overwrite;
    py.detach(|| unilora_core::export_peft(&opts)).py()
}
