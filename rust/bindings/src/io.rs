//! Bindings of the atomic outputs written from Python: the output folders of the
//! conversion from PEFT (created, checked and committed here, with the same rules as
//! every other output folder) and the temporary names of Python's atomic file writes.

use std::path::PathBuf;

use pyo3::prelude::*;
use unilora_core::CoreError;
use unilora_core::io::atomic::{self, TempPath};

use crate::errors::IntoPyResult;

/// The kinds of output folders written from Python.
fn output_kind(kind: &str) -> PyResult<&'static str> {
    match kind {
        "convert-peft" => Ok("convert-peft"),
        other => Err(CoreError::InvalidArgument(format!(
            "unknown output kind {other:?} (\"convert-peft\")"
        )))
        .py(),
    }
}

/// Checks that `out` may be written as an output folder of `kind` (it does not exist,
/// or `overwrite` and it is empty or an earlier output of `kind`), then creates and
/// returns an empty staging folder next to it, to fill and pass to `commit_folder`.
#[pyfunction]
#[pyo3(signature = (out, kind, *, overwrite=false))]
pub fn staging_folder(out: PathBuf, kind: &str, overwrite: bool) -> PyResult<PathBuf> {
    let kind = output_kind(kind)?;
    atomic::check_output(&out, overwrite, Some(kind)).py()?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| CoreError::io(parent, e))
            .py()?;
    }
    Ok(TempPath::new_folder(&out, kind).py()?.keep())
}

/// Renames a filled staging folder onto `out` (marking it as an output of `kind`);
/// with `overwrite` an earlier output of the same kind is replaced.
#[pyfunction]
#[pyo3(signature = (staging, out, kind, *, overwrite=false))]
pub fn commit_folder(staging: PathBuf, out: PathBuf, kind: &str, overwrite: bool) -> PyResult<()> {
    let kind = output_kind(kind)?;
    TempPath::adopt_folder(&staging, &out, kind)
        .and_then(|t| t.commit(overwrite))
        .py()
}

/// Reserves a temporary file name next to `target` for a writer in Python, named as
/// the core names its own temporaries (this process's id and the machine's tag), after
/// removing the temporaries that ended processes left next to `target`. Nothing is
/// created: the caller creates the file exclusively and renames it onto `target`.
#[pyfunction]
pub fn temp_file_name(target: PathBuf) -> PyResult<PathBuf> {
    Ok(TempPath::new(&target, "tmp").py()?.keep())
}
