//! Bindings of the adapter reader: an adapter opened and verified as the Rust merge does,
//! and its LoRA factors rebuilt.

use std::path::PathBuf;

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use unilora_core::CoreError;
use unilora_core::adapter::{Adapter, Verify};

use crate::errors::IntoPyResult;
use crate::format::config_dict;

/// An explicit map as `(indices int32, scales float32, sha256)`.
type MapArrays<'py> = (Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<f32>>, String);

/// `(config, theta_d, map)`.
type Loaded<'py> = (
    Bound<'py, PyDict>,
    Bound<'py, PyArray1<f32>>,
    Option<MapArrays<'py>>,
);

/// Opens the adapter at `path` as the Rust merge does: the config, the weights file
/// (fingerprint in its metadata, tensors belonging to `modules_to_save`, `theta_d`
/// float32 of length `d`) and the projection (an explicit map is read from the file or
/// regenerated). With `verify` the config's fingerprint and the map's SHA-256 must
/// match and `theta_d` must be finite; without, those are left to the caller
/// (`inspect`).
///
/// Returns `(config, theta_d, map)` with the config as `read_adapter_config` gives it
/// and `map` `(indices, scales, sha256)` for explicit and regenerated maps, else `None`.
#[pyfunction]
#[pyo3(signature = (path, *, verify=true))]
pub fn load_adapter<'py>(py: Python<'py>, path: PathBuf, verify: bool) -> PyResult<Loaded<'py>> {
    let how = if verify {
        Verify::Full
    } else {
        Verify::Structure
    };
    let adapter = py.detach(|| Adapter::load(&path, how)).py()?;
    let config = config_dict(py, &adapter.config)?;
    let map = adapter.projector.map().map(|m| {
        let idx: Vec<i32> = m.indices().iter().map(|&j| j as i32).collect();
        (
            idx.into_pyarray(py),
            m.scales().to_vec().into_pyarray(py),
            m.sha256().to_string(),
        )
    });
    Ok((config, adapter.theta.into_pyarray(py), map))
}

/// `(B, A)` of one module: `out x r` and `r x in` float32.
type Factors<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>);

/// Rebuilds every module's LoRA factors from the adapter at `path` (verified as the
/// merge verifies it), with the adapter's projection: the factors `export_lora` writes.
///
/// Returns `[(B, A), ...]` in the adapter's module order, `B` `out x r` and `A`
/// `r x in` (float32, unscaled: the LoRA scaling is `alpha / r`).
#[pyfunction]
pub fn lora_factors<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Vec<Factors<'py>>> {
    let (adapter, pairs) = py
        .detach(|| {
            let adapter = Adapter::open(&path)?;
            let pairs = adapter.lora_pairs()?;
            Ok::<_, CoreError>((adapter, pairs))
        })
        .py()?;
    let r = adapter.config.rank as usize;
    let mut out = Vec::with_capacity(pairs.len());
    for (m, pair) in adapter.config.modules.iter().zip(pairs) {
        let (rows, cols) = (m.out_features as usize, m.in_features as usize);
        let b = pair.b.into_pyarray(py).reshape([rows, r])?;
        let a = pair.a.into_pyarray(py).reshape([r, cols])?;
        out.push((b, a));
    }
    Ok(out)
}
