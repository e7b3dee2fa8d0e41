//! Conversions between Python objects and JSON values, for the adapter config
//! validator (which checks JSON values, whether they come from a file or from Python).

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// The JSON value of a Python object made of dicts (string keys), lists, tuples,
/// strings, numbers, booleans and `None`. `key` names the object in messages. An
/// integer beyond 64 bits becomes a float, as a JSON parser reads it; a NaN or
/// infinite float, which JSON cannot hold, is an error naming its key.
pub fn to_json(obj: &Bound<'_, PyAny>, key: &str) -> Result<Value, String> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() || obj.hasattr("__index__").unwrap_or(false) {
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        return obj
            .extract::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("{key} = {obj} is too large"));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_string()));
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in dict.iter() {
            let Ok(k) = k.cast::<PyString>().map(|s| s.to_string()) else {
                return Err(format!("{key}: keys must be strings, got {k}"));
            };
            let path = if key.is_empty() {
                k.clone()
            } else {
                format!("{key}.{k}")
            };
            map.insert(k, to_json(&v, &path)?);
        }
        return Ok(Value::Object(map));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for (i, item) in obj.try_iter().map_err(|e| e.to_string())?.enumerate() {
            let item = item.map_err(|e| e.to_string())?;
            items.push(to_json(&item, &format!("{key}[{i}]"))?);
        }
        return Ok(Value::Array(items));
    }
    if obj.is_instance_of::<PyFloat>() || obj.hasattr("__float__").unwrap_or(false) {
        let x = obj.extract::<f64>().map_err(|e| format!("{key}: {e}"))?;
        return Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| format!("{key} = {x} is not finite"));
    }
    let type_name = obj
        .get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string());
    Err(format!(
        "{key}: a value of type {type_name} cannot be stored in JSON"
    ))
}

/// The Python object of a JSON value (dicts keep the key order).
pub fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}
