//! The generator of foreign maps (`projection = "peft-numpy"`), registered with the core
//! when the module loads: it calls `unilora_rs.peft_interop.regenerate_map(config)`,
//! which rebuilds PEFT's map with numpy. The core checks the result against the
//! config's `map_sha256`.

use std::sync::Arc;

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use unilora_core::{AdapterConfig, CoreError, ExplicitMap};

use crate::json::to_py;

fn regenerate(config: &AdapterConfig) -> Result<ExplicitMap, CoreError> {
    let arrays = Python::attach(|py| -> PyResult<(Vec<u32>, Vec<f32>)> {
        let module = py.import("unilora_rs.peft_interop")?;
        let value = to_py(py, &config.to_value())?;
        let result = module.call_method1("regenerate_map", (value,))?;
        let (idx, scales): (PyReadonlyArray1<'_, i32>, PyReadonlyArray1<'_, f32>) =
            result.extract()?;
        let idx = idx.as_array().iter().map(|&j| j as u32).collect();
        Ok((idx, scales.as_array().to_vec()))
    })
    .map_err(|e| {
        CoreError::InvalidArgument(format!(
            "regenerating the {:?} map failed: {e}",
            config.projection.name()
        ))
    })?;
    ExplicitMap::new(arrays.0, arrays.1, config.d)
}

/// Registers [`regenerate`] as the core's foreign generator.
pub fn register() {
    unilora_core::projection::set_foreign_generator(Arc::new(regenerate));
}
