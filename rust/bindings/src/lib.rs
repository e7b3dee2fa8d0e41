//! `unilora_rs._core`: the thin pyo3 layer over `unilora-core`.
//!
//! Arguments are checked and converted here, the GIL is released around heavy work and
//! core errors are mapped to Python exceptions. No algorithm lives here.

#![deny(missing_docs)]

mod adapter;
mod convert;
mod errors;
mod foreign;
mod json;
mod merge;
mod peft;
mod projection;

use pyo3::prelude::*;

/// The compiled core of unilora_rs.
#[pymodule]
mod _core {
    #[pymodule_export]
    use crate::projection::{
        fastfood_params, fingerprint, get_num_threads, map_sha256, projection, projection_params,
        reconstruct, reconstruct_backward, set_num_threads, total_size,
    };

    #[pymodule_export]
    use crate::merge::{export_lora, merge, merge_each, merge_weighted, safetensors_header};

    #[pymodule_export]
    use crate::peft::{commit_folder, export_peft, staging_folder};

    #[pymodule_export]
    use unilora_core::merge::{EachReport, MergeReport, MergedTensor};

    #[pymodule_export]
    use unilora_core::export::{ExportReport, PeftExportReport};

    #[pymodule_export]
    use crate::adapter::{
        check_adapter_config, check_adapter_module, load_adapter, lora_factors, read_adapter_config,
    };

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("SPEC_VERSION", unilora_core::SPEC_VERSION)?;
        m.add("MAX_THREADS", unilora_core::parallel::max_threads())?;
        crate::foreign::register();
        if let Some(msg) = unilora_core::parallel::env_warning() {
            let py = m.py();
            let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
            let msg = std::ffi::CString::new(msg).unwrap_or_default();
            PyErr::warn(py, &category, &msg, 1)?;
        }
        Ok(())
    }
}
