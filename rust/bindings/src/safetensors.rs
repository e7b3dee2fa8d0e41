//! Binding of the strict safetensors header reader.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use unilora_core::safetensors::Header;

use crate::errors::IntoPyResult;

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
