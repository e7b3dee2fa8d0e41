//! Bindings of the adapter config validator and the fingerprint. The Python layer checks
//! every adapter config through these, so it accepts and rejects exactly what the Rust
//! merge and export do, with the same messages.

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use unilora_core::format::{AdapterModule, CONFIG_NAME, ConfigError};
use unilora_core::{AdapterConfig, CoreError};

use crate::args::{Shapes, uint};
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
pub(crate) fn config_dict<'py>(
    py: Python<'py>,
    config: &AdapterConfig,
) -> PyResult<Bound<'py, PyDict>> {
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

/// The adapter fingerprint over the spec version, `seed`, `d` and the shapes (named by
/// a dict's keys, or `"0"`, `"1"`, ... for a list); a name with a control character is
/// refused, as in adapter configs.
#[pyfunction]
#[pyo3(signature = (seed, d, shapes))]
pub fn fingerprint(
    seed: &Bound<'_, PyAny>,
    d: &Bound<'_, PyAny>,
    shapes: &Bound<'_, PyAny>,
) -> PyResult<String> {
    let (seed, d) = (uint(seed, "seed", 0)?, uint(d, "d", 1)?);
    let shapes = Shapes::extract(shapes)?;
    let labels = shapes.labels();
    let named: Vec<(&str, u64, u64)> = labels
        .iter()
        .zip(&shapes.dims)
        .map(|(n, &(r, c))| (n.as_str(), r, c))
        .collect();
    unilora_core::checked_fingerprint(seed, d, &named)
        .map_err(|e| CoreError::InvalidArgument(e.to_string()))
        .py()
}
