//! Bindings of the projection generator, `reconstruct` and `fingerprint`.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::prelude::*;
use unilora_core::{Projection, parallel};

use crate::errors::IntoPyResult;

/// The explicit map of `total` rows onto `d` columns: `(idx, scale)`.
///
/// `idx` is int32 when `d <= 2**31 - 1`, else int64; `scale` is float32.
#[pyfunction]
#[pyo3(signature = (seed, total, d))]
pub fn projection<'py>(
    py: Python<'py>,
    seed: u64,
    total: u64,
    d: u64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyArray1<f32>>)> {
    let proj = Projection::new(seed, total, d).py()?;
    let (idx, scale) = py.detach(|| proj.materialize()).py()?;
    let scale = scale.into_pyarray(py);
    if d <= i32::MAX as u64 {
        let idx32: Vec<i32> = idx.into_iter().map(|j| j as i32).collect();
        Ok((idx32.into_pyarray(py).into_any(), scale))
    } else {
        let idx64: Vec<i64> = idx.into_iter().map(|j| j as i64).collect();
        Ok((idx64.into_pyarray(py).into_any(), scale))
    }
}

/// Reconstructs float32 matrices of `shapes` from the float32 vector `theta_d`.
///
/// Runs with the GIL released, in parallel; returns one C-contiguous array per shape.
#[pyfunction]
#[pyo3(signature = (vector, seed, shapes))]
pub fn reconstruct<'py>(
    py: Python<'py>,
    vector: PyReadonlyArray1<'py, f32>,
    seed: u64,
    shapes: Vec<(u64, u64)>,
) -> PyResult<Vec<Bound<'py, PyArray2<f32>>>> {
    let slice = vector.as_slice()?;
    let outs = py
        .detach(|| unilora_core::reconstruct(slice, seed, &shapes))
        .py()?;
    outs.into_iter()
        .zip(&shapes)
        .map(|(buf, &(rows, cols))| {
            let arr = Array2::from_shape_vec((rows as usize, cols as usize), buf)
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
            Ok(arr.into_pyarray(py))
        })
        .collect()
}

/// The adapter fingerprint over the spec version, `seed`, `d` and named shapes.
#[pyfunction]
#[pyo3(signature = (seed, d, shapes))]
pub fn fingerprint(seed: u64, d: u64, shapes: Vec<(String, u64, u64)>) -> String {
    let named: Vec<(&str, u64, u64)> = shapes
        .iter()
        .map(|(n, r, c)| (n.as_str(), *r, *c))
        .collect();
    unilora_core::fingerprint(seed, d, &named)
}

/// Sets the number of worker threads (0 restores the default).
#[pyfunction]
pub fn set_num_threads(n: usize) {
    parallel::set_num_threads(n);
}

/// The number of worker threads the next parallel call will use.
#[pyfunction]
pub fn get_num_threads() -> usize {
    parallel::num_threads()
}

/// The backward pass of `reconstruct`: `P^T grad` for the flattened gradient of
/// `theta_D` (float32, length `D`); returns float32 `[d]`. Deterministic, GIL released.
#[pyfunction]
#[pyo3(signature = (grad, seed, d))]
pub fn reconstruct_backward<'py>(
    py: Python<'py>,
    grad: PyReadonlyArray1<'py, f32>,
    seed: u64,
    d: u64,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let slice = grad.as_slice()?;
    let out = py
        .detach(|| unilora_core::reconstruct_backward(slice, seed, d))
        .py()?;
    Ok(out.into_pyarray(py))
}
