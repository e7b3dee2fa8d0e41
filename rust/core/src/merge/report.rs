//! What a merge did: the report of one output, and of a pass with one output per
//! adapter. With the `python` feature they are the Python classes `MergeResult`,
//! `MergedTensor` and `MergeEachResult` (frozen, their fields read-only attributes).

use std::path::PathBuf;

/// One adapted module and the base tensor it was merged into.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(frozen, get_all, eq, hash, module = "unilora_rs")
)]
pub struct MergedTensor {
    /// The adapter's module name.
    pub module: String,
    /// The base tensor name.
    pub tensor: String,
    /// The file (relative to the base folder, or the base file name) holding it.
    pub file: String,
}

#[cfg(feature = "python")]
#[pyo3::pymethods]
impl MergedTensor {
    fn __repr__(slf: &pyo3::Bound<'_, Self>) -> pyo3::PyResult<String> {
        crate::python::repr(slf.as_any())
    }
}

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(frozen, get_all, eq, name = "MergeResult", module = "unilora_rs")
)]
pub struct MergeReport {
    /// The output path.
    pub out: PathBuf,
    /// The merged tensors, in adapter module order (each module exactly once).
    pub merged: Vec<MergedTensor>,
    /// Base tensors replaced by the adapter's `modules_to_save` tensors.
    pub replaced: Vec<String>,
    /// Tensors the base lacks, written from the adapter (its `task.new_tensors`, e.g.
    /// a trained classification head), in the output's last safetensors file.
    pub added: Vec<String>,
    /// Keys set in the output's `config.json` (the adapter's `task.config`, and
    /// `dtype` / `torch_dtype` when the output dtype changed).
    pub config_keys: Vec<String>,
    /// Tensors whose dtype was changed (besides merged and replaced ones).
    pub cast: usize,
    /// Tensors copied byte for byte.
    pub copied: usize,
    /// Tensors in the output.
    pub tensors: usize,
    /// The safetensors files written (relative names).
    pub shards: Vec<String>,
    /// Other files copied from the base folder (relative names).
    pub other_files: Vec<String>,
    /// Weights files of the base folder that transformers does not load from it, left
    /// out of the output (relative names).
    pub left_out: Vec<String>,
    /// Things the caller should tell the user (e.g. why files were left out).
    pub warnings: Vec<String>,
    /// Bytes of all safetensors files written.
    pub bytes_written: u64,
    /// Size in bytes of the largest base tensor.
    pub largest_tensor_bytes: u64,
    /// Bytes of tensor data read from the inputs (base and adapters).
    pub bytes_read: u64,
    /// Quantized base weights (bitsandbytes 8-bit / 4-bit) written dequantised.
    pub dequantized: usize,
    /// Seconds the merge took.
    pub seconds: f64,
}

impl MergeReport {
    /// Number of base tensors that received a LoRA update.
    pub fn merged_count(&self) -> usize {
        self.merged.len()
    }
}

#[cfg(feature = "python")]
#[pyo3::pymethods]
impl MergeReport {
    /// Number of base tensors that received a LoRA update.
    #[getter(merged_count)]
    fn py_merged_count(&self) -> usize {
        self.merged_count()
    }

    fn __repr__(slf: &pyo3::Bound<'_, Self>) -> pyo3::PyResult<String> {
        crate::python::repr(slf.as_any())
    }
}

/// What [`merge_each`](super::merge_each) did.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(frozen, get_all, eq, name = "MergeEachResult", module = "unilora_rs")
)]
pub struct EachReport {
    /// One report per adapter, in the order given (`bytes_read` counts only what
    /// that output read from its adapter).
    pub results: Vec<MergeReport>,
    /// Bytes of tensor data read from the base (each byte once) and the adapters.
    pub bytes_read: u64,
    /// Seconds the pass took (every result records it too).
    pub seconds: f64,
}

#[cfg(feature = "python")]
#[pyo3::pymethods]
impl EachReport {
    fn __repr__(slf: &pyo3::Bound<'_, Self>) -> pyo3::PyResult<String> {
        crate::python::repr(slf.as_any())
    }
}
