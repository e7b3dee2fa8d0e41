//! Conversion of Python arguments, with the package's own errors for bad input.
//!
//! Every failure here is an `InvalidArgumentError`, `VectorError` or `DtypeError` (all
//! `UniLoraError`s), never a bare `OverflowError` or `TypeError` from the conversion.

use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray2, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyMapping, PySequence, PyString};
use unilora_core::CoreError;
use unilora_core::safetensors::Dtype;

use crate::errors::{IntoPyResult, to_pyerr};

/// An `InvalidArgumentError` with `msg`.
pub(crate) fn invalid(msg: String) -> PyErr {
    to_pyerr(CoreError::InvalidArgument(msg))
}

fn dtype_error(msg: String) -> PyErr {
    to_pyerr(CoreError::Dtype(msg))
}

/// An integer in `[minimum, 2^64 - 1]` (Python `int` or anything with `__index__`,
/// but not `bool`).
pub(crate) fn uint(obj: &Bound<'_, PyAny>, name: &str, minimum: u64) -> PyResult<u64> {
    let value = index(obj)
        .ok_or_else(|| invalid(format!("{name} must be an integer, got {}", type_name(obj))))?;
    match value.extract::<u64>() {
        Ok(v) if v >= minimum => Ok(v),
        _ => Err(invalid(format!(
            "{name} must be in [{minimum}, 2**64 - 1], got {}",
            repr(&value)
        ))),
    }
}

/// `obj.__index__()` for integers other than `bool`.
fn index<'py>(obj: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    if obj.is_instance_of::<PyBool>() {
        return None;
    }
    obj.call_method0("__index__").ok()
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

fn repr(obj: &Bound<'_, PyAny>) -> String {
    obj.repr().map_or_else(|_| "?".into(), |r| r.to_string())
}

/// Matrix shapes: a sequence of `(rows, cols)` pairs, or a mapping name -> pair (the
/// names are `str(key)`, in the mapping's order).
pub(crate) struct Shapes {
    pub names: Option<Vec<String>>,
    pub dims: Vec<(u64, u64)>,
}

impl Shapes {
    pub(crate) fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut names = None;
        let mut dims = Vec::new();
        if let Ok(map) = obj.cast::<PyMapping>() {
            let mut keys = Vec::new();
            for item in map.items()?.iter() {
                let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
                dims.push(shape(&value, &repr(&key))?);
                keys.push(key.str()?.to_string());
            }
            names = Some(keys);
        } else if let Some(seq) = obj
            .cast::<PySequence>()
            .ok()
            .filter(|_| !obj.is_instance_of::<PyString>() && !obj.is_instance_of::<PyBytes>())
        {
            for (k, item) in seq.try_iter()?.enumerate() {
                dims.push(shape(&item?, &format!("#{k}"))?);
            }
        } else {
            return Err(invalid(format!(
                "shapes must be a list of (rows, cols) pairs or a dict name -> (rows, cols), \
                 got {}",
                type_name(obj)
            )));
        }
        if dims.is_empty() {
            return Err(invalid(
                "shapes is empty: give at least one (rows, cols) matrix shape".into(),
            ));
        }
        Ok(Self { names, dims })
    }

    /// The names used by the fingerprint: the mapping's keys, or `0, 1, 2, ...`.
    pub(crate) fn labels(&self) -> Vec<String> {
        match &self.names {
            Some(n) => n.clone(),
            None => (0..self.dims.len()).map(|k| k.to_string()).collect(),
        }
    }

    /// `values` (one per shape) as a list, or as a dict keyed by the names.
    pub(crate) fn arrange<'py>(
        &self,
        py: Python<'py>,
        values: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match &self.names {
            Some(names) => {
                let dict = PyDict::new(py);
                for (name, value) in names.iter().zip(values) {
                    dict.set_item(name, value)?;
                }
                Ok(dict.into_any())
            }
            None => Ok(pyo3::types::PyList::new(py, values)?.into_any()),
        }
    }
}

fn shape(obj: &Bound<'_, PyAny>, label: &str) -> PyResult<(u64, u64)> {
    let pair = obj
        .cast::<PySequence>()
        .ok()
        .filter(|s| {
            !obj.is_instance_of::<PyString>()
                && !obj.is_instance_of::<PyBytes>()
                && s.len().ok() == Some(2)
        })
        .ok_or_else(|| {
            invalid(format!(
                "shape {label} must be a (rows, cols) pair, got {}",
                repr(obj)
            ))
        })?;
    let mut out = [0u64; 2];
    for (k, o) in out.iter_mut().enumerate() {
        let dim = pair.get_item(k)?;
        let value = index(&dim).ok_or_else(|| {
            invalid(format!(
                "shape {label} = {}: dimensions must be integers",
                repr(obj)
            ))
        })?;
        if value.lt(1)? {
            return Err(invalid(format!(
                "shape {label} = {}: every dimension must be at least 1",
                repr(obj)
            )));
        }
        *o = value.extract::<u64>().map_err(|_| {
            invalid(format!(
                "shape {label} = {}: dimensions must be below 2**64",
                repr(obj)
            ))
        })?;
    }
    Ok((out[0], out[1]))
}

/// A float32 vector read from Python: borrowed when it is a contiguous float32 array,
/// else converted (float64 is rounded to float32; other dtypes are refused).
pub(crate) enum Vector<'py> {
    Borrowed(PyReadonlyArray1<'py, f32>),
    Owned(Vec<f32>),
}

impl Vector<'_> {
    pub(crate) fn as_slice(&self) -> &[f32] {
        match self {
            // A borrowed vector is contiguous (checked when it was made).
            Vector::Borrowed(a) => a.as_slice().unwrap_or(&[]),
            Vector::Owned(v) => v,
        }
    }
}

/// Converts `obj` (an array or anything `numpy.asarray` accepts) to a 1-D float32
/// vector; `what` names the argument and the error messages' expected dtype.
pub(crate) fn vector<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Vector<'py>> {
    let py = obj.py();
    let arr = match obj.cast::<PyUntypedArray>() {
        Ok(a) => a.clone(),
        Err(_) => py
            .import("numpy")?
            .getattr("asarray")?
            .call1((obj,))?
            .cast_into::<PyUntypedArray>()?,
    };
    if arr.ndim() != 1 {
        return Err(invalid(format!(
            "{name} must be 1-D, got shape {:?}",
            arr.shape()
        )));
    }
    let dtype = arr.dtype();
    if let Ok(a) = arr.cast::<PyArray1<f32>>() {
        let ro = a.try_readonly().map_err(|e| invalid(e.to_string()))?;
        if ro.as_slice().is_ok() {
            return Ok(Vector::Borrowed(ro));
        }
        return Ok(Vector::Owned(ro.as_array().iter().copied().collect()));
    }
    if let Ok(a) = arr.cast::<PyArray1<f64>>() {
        let ro = a.try_readonly().map_err(|e| invalid(e.to_string()))?;
        return Ok(Vector::Owned(
            ro.as_array().iter().map(|&x| x as f32).collect(),
        ));
    }
    Err(dtype_error(format!(
        "{name} has dtype {}; expected float32 (float64 is converted)",
        dtype.str()?
    )))
}

/// The `out=` objects as given, and a write borrow of each.
pub(crate) type Outputs<'py> = (Vec<Bound<'py, PyAny>>, Vec<PyReadwriteArray2<'py, f32>>);

/// The `out=` arrays: one writable, C-contiguous float32 array per shape, given in the
/// same structure as the result (a list, or a dict keyed by the shapes' names).
pub(crate) fn outputs<'py>(obj: &Bound<'py, PyAny>, shapes: &Shapes) -> PyResult<Outputs<'py>> {
    let n = shapes.dims.len();
    let items: Vec<Bound<'py, PyAny>> = match (&shapes.names, obj.cast::<PyMapping>()) {
        (Some(names), Ok(map)) => {
            if map.len()? != n {
                return Err(invalid(format!(
                    "out has {} arrays for {n} shapes",
                    map.len()?
                )));
            }
            names
                .iter()
                .map(|name| {
                    map.get_item(name)
                        .map_err(|_| invalid(format!("out has no array named {name:?}")))
                })
                .collect::<PyResult<_>>()?
        }
        _ => {
            let seq = obj
                .cast::<PySequence>()
                .ok()
                .filter(|_| !obj.is_instance_of::<PyString>())
                .ok_or_else(|| {
                    invalid(format!(
                        "out must be a list (or a dict, for named shapes) of float32 arrays, \
                         got {}",
                        type_name(obj)
                    ))
                })?;
            let items: Vec<_> = seq.try_iter()?.collect::<PyResult<_>>()?;
            if items.len() != n {
                return Err(invalid(format!(
                    "out has {} arrays for {n} shapes",
                    items.len()
                )));
            }
            items
        }
    };
    let mut views = Vec::with_capacity(n);
    for (k, (item, &(rows, cols))) in items.iter().zip(&shapes.dims).enumerate() {
        let arr = item.cast::<PyArray2<f32>>().map_err(|_| {
            let got = item
                .cast::<PyUntypedArray>()
                .map(|a| {
                    format!(
                        "an array of dtype {} and {} dimensions",
                        a.dtype()
                            .str()
                            .map_or_else(|_| "?".into(), |s| s.to_string()),
                        a.ndim()
                    )
                })
                .unwrap_or_else(|_| type_name(item));
            dtype_error(format!("out #{k} must be a 2-D float32 array, got {got}"))
        })?;
        if arr.shape() != [rows as usize, cols as usize] {
            return Err(invalid(format!(
                "out #{k} has shape {:?}, expected ({rows}, {cols})",
                arr.shape()
            )));
        }
        if !arr.is_c_contiguous() {
            return Err(invalid(format!("out #{k} must be C-contiguous")));
        }
        let rw = arr.try_readwrite().map_err(|e| {
            invalid(format!(
                "out #{k} cannot be written ({e}): it must be writable and must not overlap \
                 the vector or another output"
            ))
        })?;
        views.push(rw);
    }
    Ok((items, views))
}

/// An output dtype (`bf16`, `f16`, `f32` or an alias), or `None` to keep each tensor's.
pub(crate) fn output_dtype(dtype: Option<&str>) -> PyResult<Option<Dtype>> {
    dtype.map(Dtype::parse_target).transpose().py()
}
