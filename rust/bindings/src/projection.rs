//! Bindings of the projections: the sparse generator's map and constants, the Fastfood
//! constants, `reconstruct` and its backward with a generated projection, and the
//! SHA-256 of an explicit map.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use unilora_core::projection::fastfood::{Fastfood, WORDS_PER_BLOCK};
use unilora_core::{BACKWARD_T_CHUNK, Projection, ProjectionKind, Projector};

use crate::args::{Shapes, invalid, outputs, uint, vector};
use crate::errors::IntoPyResult;

/// `(seed, total, d)` given as Python integers.
fn dims_of(
    seed: &Bound<'_, PyAny>,
    total: &Bound<'_, PyAny>,
    d: &Bound<'_, PyAny>,
) -> PyResult<(u64, u64, u64)> {
    Ok((
        uint(seed, "seed", 0)?,
        uint(total, "total", 0)?,
        uint(d, "d", 0)?,
    ))
}

/// The projection of `(seed, total, d)` given as Python integers.
fn projection_of(
    seed: &Bound<'_, PyAny>,
    total: &Bound<'_, PyAny>,
    d: &Bound<'_, PyAny>,
) -> PyResult<Projection> {
    let (seed, total, d) = dims_of(seed, total, d)?;
    Projection::new(seed, total, d).py()
}

/// A generated projection (`"sparse"` or `"fastfood"`) of `total` rows onto `d` columns.
fn generated(projection: &str, seed: u64, total: u64, d: u64) -> PyResult<Projector> {
    let kind = ProjectionKind::parse(projection)
        .map_err(|e| invalid(e.to_string()))
        .and_then(|k| match k {
            ProjectionKind::Sparse | ProjectionKind::Fastfood => Ok(k),
            other => Err(invalid(format!(
                "projection {:?} is a stored map, not a generator: give \"sparse\" or \"fastfood\"",
                other.name()
            ))),
        })?;
    Projector::generated(kind, seed, total, d).py()
}

/// The explicit map of `total` rows onto `d` columns: `(idx, scale)`.
///
/// `idx` is int32 when `d <= 2**31 - 1`, else int64; `scale` is float32.
#[pyfunction]
#[pyo3(signature = (seed, total, d))]
pub fn projection<'py>(
    py: Python<'py>,
    seed: &Bound<'py, PyAny>,
    total: &Bound<'py, PyAny>,
    d: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyArray1<f32>>)> {
    let proj = projection_of(seed, total, d)?;
    let d = proj.d();
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

/// Every constant of one projection that a kernel needs, as a dict: the round keys,
/// the half widths, the balance and its two scales, the multiply-high division by `d`
/// for 32-bit domains and the backward pass's chunk length.
#[pyfunction]
#[pyo3(signature = (seed, total, d))]
pub fn projection_params<'py>(
    py: Python<'py>,
    seed: &Bound<'py, PyAny>,
    total: &Bound<'py, PyAny>,
    d: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = projection_of(seed, total, d)?;
    let (seed, total, d) = (p.seed(), p.total(), p.d());
    let (wl, wr) = p.widths();
    let b = p.balance();
    let div = p.narrow_divisor();
    let out = PyDict::new(py);
    out.set_item("seed", seed)?;
    out.set_item("total", total)?;
    out.set_item("d", d)?;
    out.set_item("keys", p.round_keys().to_vec())?;
    out.set_item("wl", wl)?;
    out.set_item("wr", wr)?;
    out.set_item("q", b.q)?;
    out.set_item("rem", b.rem)?;
    out.set_item("scale_hi", b.scale_hi)?;
    out.set_item("scale_lo", b.scale_lo)?;
    out.set_item("narrow", div.is_some())?;
    out.set_item("div_magic", div.map_or(0, |m| m.magic))?;
    out.set_item("div_shift1", div.map_or(0, |m| m.shift1))?;
    out.set_item("div_shift2", div.map_or(0, |m| m.shift2))?;
    out.set_item("t_chunk", BACKWARD_T_CHUNK)?;
    Ok(out)
}

/// `D`: the number of elements of all matrices of `shapes` together.
#[pyfunction]
pub fn total_size(shapes: &Bound<'_, PyAny>) -> PyResult<u64> {
    unilora_core::total_size(&Shapes::extract(shapes)?.dims).py()
}

/// Reconstructs float32 matrices of `shapes` from `theta_d` (float32; float64 is
/// converted), in parallel with the GIL released, with the `projection` generated from
/// the seed (`"sparse"`, spec v1, or `"fastfood"`). Returns a list, or a dict for named
/// shapes; with `out` (the same structure of C-contiguous float32 arrays) the result
/// is written there and `out`'s arrays are returned.
#[pyfunction]
#[pyo3(signature = (vector, seed, shapes, *, out = None, projection = "sparse"))]
pub fn reconstruct<'py>(
    py: Python<'py>,
    vector: &Bound<'py, PyAny>,
    seed: &Bound<'py, PyAny>,
    shapes: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    projection: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let seed = uint(seed, "seed", 0)?;
    let shapes = Shapes::extract(shapes)?;
    let vec = self::vector(vector, "vector")?;
    let slice = vec.as_slice();
    let dims = &shapes.dims;
    let total = unilora_core::total_size(dims).py()?;
    let projector = generated(projection, seed, total, slice.len() as u64)?;
    if let Some(out) = out {
        let (items, mut views) = outputs(out, &shapes)?;
        let mut bufs: Vec<&mut [f32]> = views
            .iter_mut()
            .map(|v| v.as_slice_mut().map_err(|e| invalid(e.to_string())))
            .collect::<PyResult<_>>()?;
        py.detach(|| projector.reconstruct_into(slice, dims, &mut bufs))
            .py()?;
        return shapes.arrange(py, items);
    }
    let outs = py.detach(|| projector.reconstruct(slice, dims)).py()?;
    let arrays = outs
        .into_iter()
        .zip(dims)
        .map(|(buf, &(rows, cols))| {
            let arr = Array2::from_shape_vec((rows as usize, cols as usize), buf)
                .map_err(|e| invalid(e.to_string()))?;
            Ok(arr.into_pyarray(py).into_any())
        })
        .collect::<PyResult<Vec<_>>>()?;
    shapes.arrange(py, arrays)
}

/// The backward pass of `reconstruct`: `P^T grad` for the flattened gradient of
/// `theta_D` (float32, length `D`; float64 is converted); returns float32 `[d]`.
/// Deterministic (a fixed summation order), GIL released.
#[pyfunction]
#[pyo3(signature = (grad, seed, d, *, projection = "sparse"))]
pub fn reconstruct_backward<'py>(
    py: Python<'py>,
    grad: &Bound<'py, PyAny>,
    seed: &Bound<'py, PyAny>,
    d: &Bound<'py, PyAny>,
    projection: &str,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let (seed, d) = (uint(seed, "seed", 0)?, uint(d, "d", 0)?);
    let grad = vector(grad, "grad")?;
    let slice = grad.as_slice();
    let projector = generated(projection, seed, slice.len() as u64, d)?;
    let out = py.detach(|| projector.backward(slice, d)).py()?;
    Ok(out.into_pyarray(py))
}

/// The constants of a Fastfood projection that a kernel needs, as a dict: `n` (the block
/// length), `bits` (`log2 n`), `blocks`, `keys` (uint32 `[blocks, 11]`: per block the
/// four round keys of `Π`, the sign key and the six Gaussian keys) and `scales`
/// (float32 `[blocks]`, `c_b`). The scales cost one pass over the Gaussian diagonals
/// (O(D), in parallel, GIL released).
#[pyfunction]
#[pyo3(signature = (seed, total, d))]
pub fn fastfood_params<'py>(
    py: Python<'py>,
    seed: &Bound<'py, PyAny>,
    total: &Bound<'py, PyAny>,
    d: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let (seed, total, d) = dims_of(seed, total, d)?;
    let ff = Fastfood::new(seed, total, d).py()?;
    let (keys, scales) = py.detach(|| ff.block_table()).py()?;
    let width = WORDS_PER_BLOCK;
    let keys = Array2::from_shape_vec((keys.len() / width, width), keys)
        .map_err(|e| invalid(e.to_string()))?;
    let out = PyDict::new(py);
    out.set_item("seed", ff.seed())?;
    out.set_item("total", ff.total())?;
    out.set_item("d", ff.d())?;
    out.set_item("n", ff.n())?;
    out.set_item("bits", ff.bits())?;
    out.set_item("blocks", ff.blocks())?;
    out.set_item("keys", keys.into_pyarray(py))?;
    out.set_item("scales", scales.into_pyarray(py))?;
    Ok(out)
}

/// The SHA-256 of an explicit map (`"sha256:<hex>"`): the indices (int32, as
/// little-endian u32) followed by the scales (float32), as adapters record it.
#[pyfunction]
pub fn map_sha256(
    indices: PyReadonlyArray1<'_, i32>,
    scales: PyReadonlyArray1<'_, f32>,
) -> PyResult<String> {
    let idx: Vec<u32> = indices.as_array().iter().map(|&j| j as u32).collect();
    let scales = scales.as_array().to_vec();
    Ok(unilora_core::projection::map_sha256(&idx, &scales))
}
