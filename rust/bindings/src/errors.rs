//! Mapping of core errors to Python exceptions.
//!
//! The exception classes live in `unilora_rs/errors.py` (so they can inherit from both
//! `UniLoraError` and `ValueError`/`TypeError`); they are looked up once and cached.
//! I/O errors become Python's own `OSError` subclasses, chosen by errno.

use pyo3::exceptions::{PyKeyboardInterrupt, PyMemoryError, PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use unilora_core::CoreError;

fn class(
    py: Python<'_>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
) -> PyResult<Py<PyType>> {
    cell.get_or_try_init(py, || {
        let module = py.import("unilora_rs.errors")?;
        Ok::<_, PyErr>(module.getattr(name)?.cast_into::<PyType>()?.unbind())
    })
    .map(|c| c.clone_ref(py))
}

macro_rules! error_class {
    ($fn_name:ident, $py_name:literal) => {
        fn $fn_name(py: Python<'_>) -> PyResult<Py<PyType>> {
            static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            class(py, &CELL, $py_name)
        }
    };
}

error_class!(invalid_argument, "InvalidArgumentError");
error_class!(vector_error, "VectorError");
error_class!(dtype_error, "DtypeError");
error_class!(format_error, "FormatError");
error_class!(mismatch_error, "MismatchError");
error_class!(internal_error, "InternalError");

/// Converts a core error into the matching Python exception.
pub fn to_pyerr(err: CoreError) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        let cls = match &err {
            CoreError::InvalidArgument(_) => invalid_argument(py),
            CoreError::Vector(_) => vector_error(py),
            CoreError::Dtype(_) => dtype_error(py),
            CoreError::Format { .. } => format_error(py),
            CoreError::Mismatch(_) => mismatch_error(py),
            CoreError::Internal(_) => internal_error(py),
            CoreError::Io { path, source } => {
                let errno = source.raw_os_error().unwrap_or(match source.kind() {
                    std::io::ErrorKind::NotFound => 2,
                    std::io::ErrorKind::PermissionDenied => 13,
                    std::io::ErrorKind::AlreadyExists => 17,
                    std::io::ErrorKind::StorageFull => 28,
                    std::io::ErrorKind::NotADirectory => 20,
                    std::io::ErrorKind::IsADirectory => 21,
                    std::io::ErrorKind::InvalidInput => 22,
                    _ => 5,
                });
                return PyOSError::new_err((errno, source.to_string(), path.display().to_string()));
            }
            CoreError::Interrupted => return PyKeyboardInterrupt::new_err("interrupted"),
            CoreError::OutOfMemory { .. } => return PyMemoryError::new_err(msg),
            _ => return PyRuntimeError::new_err(msg),
        };
        match cls {
            Ok(cls) => PyErr::from_type(cls.into_bound(py), msg),
            Err(e) => e,
        }
    })
}

/// Extension: `core_result.map_err(to_pyerr)` in one call.
pub trait IntoPyResult<T> {
    /// Converts the core result into a Python result.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, CoreError> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}
