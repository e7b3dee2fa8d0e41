//! `unilora_rs._core`: the thin pyo3 layer over `unilora-core`.
//!
//! Arguments are checked and converted here, the GIL is released around heavy work and
//! core errors are mapped to Python exceptions. No algorithm lives here.
//!
//! One file per area of the core: `projection.rs`, `parallel.rs`, `format.rs`,
//! `adapter.rs` (with `foreign.rs`, the generator of `peft-numpy` maps that the core
//! calls back), `merge.rs` (watched by `control.rs`), `export.rs`, `io.rs` and
//! `safetensors.rs`. `args.rs` converts arguments, `json.rs` converts between Python
//! objects and JSON values, `errors.rs` maps core errors to exceptions. The report
//! classes are the core's own structs (`#[pyclass]` there, with its `python` feature).

#![deny(missing_docs)]

mod adapter;
mod args;
mod control;
mod errors;
mod export;
mod foreign;
mod format;
mod io;
mod json;
mod merge;
mod parallel;
mod projection;
mod safetensors;

use pyo3::prelude::*;

/// The compiled core of unilora_rs.
#[pymodule]
mod _core {
    #[pymodule_export]
    use crate::projection::{
        fastfood_params, map_sha256, projection, projection_params, reconstruct,
        reconstruct_backward, total_size,
    };

    #[pymodule_export]
    use crate::parallel::{get_num_threads, set_num_threads, thread_env_warning};

    #[pymodule_export]
    use crate::format::{
        check_adapter_config, check_adapter_module, fingerprint, read_adapter_config,
    };

    #[pymodule_export]
    use crate::adapter::{load_adapter, lora_factors};

    #[pymodule_export]
    use crate::merge::{merge, merge_each, merge_weighted};

    #[pymodule_export]
    use crate::export::{export_lora, export_peft};

    #[pymodule_export]
    use crate::io::{commit_folder, staging_folder, temp_file_name};

    #[pymodule_export]
    use crate::safetensors::safetensors_header;

    #[pymodule_export]
    use unilora_core::merge::{EachReport, MergeReport, MergedTensor};

    #[pymodule_export]
    use unilora_core::export::{ExportReport, PeftExportReport};

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("SPEC_VERSION", unilora_core::SPEC_VERSION)?;
        m.add("MAX_THREADS", unilora_core::parallel::max_threads())?;
        crate::foreign::register();
        Ok(())
    }
}
