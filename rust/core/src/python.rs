//! What the report types need on the Python side, with the `python` feature (which only
//! the binding crate enables): a `__repr__` that shows the fields the way a dataclass
//! shows itself. The classes themselves are the report structs, made `#[pyclass]` where
//! they are defined, so that each field list is written once.

use pyo3::prelude::*;
use pyo3::types::{PyTuple, PyType};

/// `Name(field=value, ...)` over the read-only attributes of `obj`'s class (for a
/// report class: its fields), those of the classes it extends first, each class's in
/// alphabetical order (a class's dictionary keeps no declaration order).
pub(crate) fn repr(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = obj.py();
    let descriptor = py.import("types")?.getattr("GetSetDescriptorType")?;
    let class: Bound<'_, PyType> = obj.get_type();
    let mro = class.getattr("__mro__")?.cast_into::<PyTuple>()?;
    let mut fields = Vec::new();
    for base in mro.iter().rev() {
        let items = base.getattr("__dict__")?.call_method0("items")?;
        let mut names = Vec::new();
        for item in items.try_iter()? {
            let (name, value): (String, Bound<'_, PyAny>) = item?.extract()?;
            if !name.starts_with('_') && value.is_instance(&descriptor)? {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            fields.push(format!("{name}={}", obj.getattr(name.as_str())?.repr()?));
        }
    }
    Ok(format!("{}({})", class.name()?, fields.join(", ")))
}
