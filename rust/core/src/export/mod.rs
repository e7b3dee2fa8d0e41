//! Export of an adapter as a PEFT adapter: [`lora`] writes the exact standard LoRA
//! equivalent, [`peft`] the format of PEFT's Uni-LoRA tuner (saved indices and
//! scales). Both write an output folder atomically ([`write`](mod@write)); this module holds what
//! they share: the options, the report and what to do with `modules_to_save` tensors.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::adapter::Adapter;
use crate::error::{CoreError, Result};
use crate::safetensors::Dtype;

pub mod lora;
pub mod peft;
pub mod write;

pub use lora::{OUTPUT_KIND, export_lora, peft_config, write_saved_modules};
pub use peft::{PEFT_OUTPUT_KIND, PeftExportReport, export_peft};

/// Prefix PEFT puts before module names in a saved adapter.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What an export does with the adapter's `modules_to_save` tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SavedModules {
    /// Refuse an adapter that has any (the default): vLLM's LoRA loader and llama.cpp's
    /// `convert_lora_to_gguf.py` reject saved modules in a LoRA adapter.
    #[default]
    Error,
    /// Write them into the LoRA adapter, named as PEFT names them (PEFT loads them).
    Keep,
    /// Leave them out: the LoRA adapter then lacks those trained modules.
    Drop,
    /// Write them, under their own names, to [`SAVED_MODULES_FILE`] in the output folder;
    /// the adapter's config then lists none.
    Separate,
}

impl SavedModules {
    /// The option's name on the command line and in Python.
    pub fn as_str(self) -> &'static str {
        match self {
            SavedModules::Error => "error",
            SavedModules::Keep => "keep",
            SavedModules::Drop => "drop",
            SavedModules::Separate => "separate",
        }
    }

    /// Parses `"error"`, `"keep"`, `"drop"` or `"separate"`.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "error" => Ok(SavedModules::Error),
            "keep" => Ok(SavedModules::Keep),
            "drop" => Ok(SavedModules::Drop),
            "separate" => Ok(SavedModules::Separate),
            other => Err(CoreError::InvalidArgument(format!(
                "saved_modules must be one of error, keep, drop, separate, got {other:?}"
            ))),
        }
    }

    /// The error of [`SavedModules::Error`] for an adapter whose `modules_to_save` are
    /// `modules`, exported by `command`.
    pub fn refusal(modules: &[String], command: &str) -> CoreError {
        CoreError::InvalidArgument(format!(
            "the adapter has modules_to_save ({}), which vLLM's LoRA loader and llama.cpp's \
             convert_lora_to_gguf.py reject; {command} with saved_modules=\"drop\" leaves them \
             out, \"separate\" writes them to a companion .safetensors file{}",
            modules.join(", "),
            if command == "export-lora" {
                ", \"keep\" writes them into the adapter (PEFT loads them)"
            } else {
                ""
            }
        ))
    }
}

/// The file [`SavedModules::Separate`] writes the saved modules to, in the output folder.
pub const SAVED_MODULES_FILE: &str = "saved_modules.safetensors";

/// What to export, where, and how.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The Uni-LoRA adapter directory.
    pub adapter: PathBuf,
    /// The output folder (created; must not exist unless `overwrite`).
    pub out: PathBuf,
    /// Dtype of the LoRA factors: F32 (exact, the default), BF16 or F16.
    pub dtype: Dtype,
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// What to do with `modules_to_save` tensors (export-lora only).
    pub saved_modules: SavedModules,
}

impl ExportOptions {
    /// Float32 export into `out`, no overwrite.
    pub fn new(adapter: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        ExportOptions {
            adapter: adapter.into(),
            out: out.into(),
            dtype: Dtype::F32,
            overwrite: false,
            saved_modules: SavedModules::Error,
        }
    }
}

/// What an export wrote. With the `python` feature it is the Python class
/// `ExportResult` (frozen, its fields read-only attributes).
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(
        frozen,
        get_all,
        eq,
        subclass,
        name = "ExportResult",
        module = "unilora_rs"
    )
)]
pub struct ExportReport {
    /// The output folder.
    pub out: PathBuf,
    /// Number of LoRA modules written.
    pub modules: usize,
    /// Number of `modules_to_save` tensors written.
    pub saved_tensors: usize,
    /// LoRA parameters written (`D`).
    pub lora_parameters: u64,
    /// Size of the written `adapter_model.safetensors` in bytes.
    pub weights_bytes: u64,
    /// The companion file of the saved modules ([`SavedModules::Separate`]).
    pub saved_file: Option<PathBuf>,
    /// Seconds the export took.
    pub seconds: f64,
}

#[cfg(feature = "python")]
#[pyo3::pymethods]
impl ExportReport {
    fn __repr__(slf: &pyo3::Bound<'_, Self>) -> pyo3::PyResult<String> {
        crate::python::repr(slf.as_any())
    }
}

impl ExportReport {
    /// The report of an export of `adapter` into `out`, whose weights file has
    /// `weights_bytes` bytes, begun at `started`.
    pub fn of(adapter: &Adapter, out: &Path, weights_bytes: u64, started: Instant) -> Self {
        ExportReport {
            out: out.to_path_buf(),
            modules: adapter.config.modules.len(),
            saved_tensors: adapter.extra_tensors().count(),
            lora_parameters: adapter.config.total_size(),
            weights_bytes,
            saved_file: None,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}
