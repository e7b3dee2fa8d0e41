//! Bindings of the adapter config validator and the adapter reader. The Python layer
//! checks every adapter config through these, so it accepts and rejects exactly what
//! the Rust merge and export do, with the same messages.

use std::path::{Path, PathBuf};

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use unilora_core::adapter::{Adapter, Verify};
use unilora_core::format::{AdapterModule, CONFIG_NAME, ConfigError};
use unilora_core::{AdapterConfig, CoreError};

use crate::errors::IntoPyResult;
use crate::json::{to_json, to_py};

/// A validator message as the error of a file (`source`) or of an argument.
fn config_error(msg: impl ToString, source: Option<&Path>) -> CoreError {
    match source {
        Some(path) => CoreError::format(path, msg.to_string()),
        None => CoreError::InvalidArgument(msg.to_string()),
    }
}

/// The checked config as a dict, plus `expected_fingerprint`, `total_size` and
/// `matrices` (`(name, rows, cols)` of `theta_D` in flattening order).
fn config_dict<'py>(py: Python<'py>, config: &AdapterConfig) -> PyResult<Bound<'py, PyDict>> {
    let dict = to_py(py, &config.to_value())?.cast_into::<PyDict>()?;
    dict.set_item("expected_fingerprint", config.expected_fingerprint())?;
    dict.set_item("total_size", config.total_size())?;
    dict.set_item("matrices", config.matrices())?;
    Ok(dict)
}

/// Reads and checks the `adapter_config.json` of the adapter at `path` (its folder or
/// the file); with `verify`, a fingerprint mismatch raises `MismatchError`.
///
/// Returns the checked config (see `check_adapter_config`).
#[pyfunction]
#[pyo3(signature = (path, *, verify=true))]
pub fn read_adapter_config<'py>(
    py: Python<'py>,
    path: PathBuf,
    verify: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let (config, dir) = py.detach(|| AdapterConfig::read(&path)).py()?;
    if verify {
        config.verify(&dir.join(CONFIG_NAME)).py()?;
    }
    config_dict(py, &config)
}

/// Checks an adapter config given as a dict, with the rules `adapter_config.json` is
/// read with. An empty fingerprint is filled in, unless `source` (the file the dict was
/// read from) is given: then, as for a file, it is an error, and so are the other
/// problems (`FormatError` instead of `InvalidArgumentError`).
///
/// With `verify`, a fingerprint that does not match raises `MismatchError`.
///
/// Returns the checked config with every key, plus `expected_fingerprint`,
/// `total_size` and `matrices` (`(name, rows, cols)` in flattening order).
#[pyfunction]
#[pyo3(signature = (config, *, source=None, verify=false))]
pub fn check_adapter_config<'py>(
    py: Python<'py>,
    config: &Bound<'py, PyAny>,
    source: Option<PathBuf>,
    verify: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let source = source.as_deref();
    let value = to_json(config, "")
        .map_err(|m| config_error(m, source))
        .py()?;
    let mut checked = AdapterConfig::from_value(&value)
        .map_err(|m| config_error(m, source))
        .py()?;
    if checked.fingerprint.is_empty() {
        if source.is_some() {
            return Err(config_error(ConfigError::NoFingerprint, source)).py();
        }
        checked.fingerprint = checked.expected_fingerprint();
    }
    if let Some(msg) = checked.fingerprint_mismatch().filter(|_| verify) {
        let msg = match source {
            Some(path) => format!("{}: {msg}", path.display()),
            None => msg,
        };
        return Err(CoreError::Mismatch(msg)).py();
    }
    config_dict(py, &checked)
}

/// Checks one module entry `{name, in_features, out_features, kind}` with the rules of
/// `adapter_config.json`; returns it with `kind` filled in.
#[pyfunction]
pub fn check_adapter_module<'py>(
    py: Python<'py>,
    module: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let value = to_json(module, "module")
        .map_err(CoreError::InvalidArgument)
        .py()?;
    let module = AdapterModule::from_value(&value, "module")
        .map_err(|e| CoreError::InvalidArgument(e.to_string()))
        .py()?;
    to_py(py, &module.to_value())
}

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
