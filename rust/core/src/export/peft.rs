//! Export of an adapter in the format of PEFT's Uni-LoRA tuner (`peft_type =
//! "UNILORA"`, PEFT 0.21), with saved indices and scales, so that
//! `PeftModel.from_pretrained` gives this adapter's outputs.
//!
//! PEFT's file holds `base_model.unilora_theta_d` (float32 `[d]`) and, per module,
//! `base_model.model.<name>.unilora_indices_A` (int64 `[r, in]`),
//! `...unilora_indices_B` (int64 `[out, r]`) and the matching float32
//! `unilora_scales_A` / `unilora_scales_B`; its layer computes
//! `A = theta_d[indices_A] * scales_A`, `B = theta_d[indices_B] * scales_B` and adds
//! `x A^T B^T`. The sparse projection and explicit maps are exactly that (one column and
//! one scale per LoRA parameter), so they are written as they are. What PEFT cannot
//! hold is reported ([`PeftExportReport::notes`]) or refused:
//!
//! * the Fastfood projection is dense: refused (`export-lora` writes the equivalent
//!   LoRA adapter instead);
//! * PEFT's Uni-LoRA has no alpha: a factor `alpha / r` other than 1 is folded into the
//!   scales of `B` (one more float32 rounding);
//! * PEFT keeps `theta_d` and the scales float32 on a bf16 or fp16 base only with its
//!   default `autocast_adapter_dtype=True`; with `False` it casts them to the base dtype
//!   (relative error up to 2^-9 in bf16), while this adapter keeps them float32;
//! * the `task` entry (architectures, labels) has no place in PEFT's config: load the
//!   base with the matching head class.

use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::write::{TensorSpec, export_folder, saved_tensors, write_safetensors};
use super::{ExportOptions, ExportReport, PEFT_PREFIX};
use crate::adapter::Adapter;
use crate::error::{CoreError, Result};
use crate::format::{AdapterConfig, ModuleKind};
use crate::projection::{Projection, Projector};
use crate::safetensors::Dtype;

/// The kind of output (in the folder's marker file).
pub const PEFT_OUTPUT_KIND: &str = "export-peft";
/// The name of `theta_d` in PEFT's Uni-LoRA file.
pub const PEFT_VECTOR_KEY: &str = "base_model.unilora_theta_d";

/// What an export to PEFT's Uni-LoRA format wrote. With the `python` feature it is the
/// Python class `PeftExportResult`, a subclass of `ExportResult` (whose fields are those
/// of [`PeftExportReport::export`]) with `notes`.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(
        frozen,
        eq,
        extends = ExportReport,
        name = "PeftExportResult",
        module = "unilora_rs"
    )
)]
pub struct PeftExportReport {
    /// The folder, modules, saved tensors, `D` (the indices written) and file size.
    pub export: ExportReport,
    /// What PEFT's format changes or leaves out, one sentence each.
    pub notes: Vec<String>,
}

#[cfg(feature = "python")]
#[pyo3::pymethods]
impl PeftExportReport {
    /// What PEFT's format changes or leaves out, one sentence each.
    #[getter(notes)]
    fn py_notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    fn __repr__(slf: &pyo3::Bound<'_, Self>) -> pyo3::PyResult<String> {
        crate::python::repr(slf.as_any())
    }
}

#[cfg(feature = "python")]
impl<'py> pyo3::IntoPyObject<'py> for PeftExportReport {
    type Target = PeftExportReport;
    type Output = pyo3::Bound<'py, PeftExportReport>;
    type Error = pyo3::PyErr;

    /// A `PeftExportResult` whose `ExportResult` part is [`PeftExportReport::export`].
    fn into_pyobject(self, py: pyo3::Python<'py>) -> pyo3::PyResult<Self::Output> {
        let base = pyo3::PyClassInitializer::from(self.export.clone());
        pyo3::Bound::new(py, base.add_subclass(self))
    }
}

/// The map as PEFT needs it: one column and one scale per row of `theta_D`.
fn map_of(adapter: &Adapter) -> Result<(Vec<u64>, Vec<f32>)> {
    let config = &adapter.config;
    match &adapter.projector {
        Projector::Sparse { seed } => {
            Projection::new(*seed, config.total_size(), config.d)?.materialize()
        }
        Projector::Explicit(map) => Ok((
            map.indices().iter().map(|&j| u64::from(j)).collect(),
            map.scales().to_vec(),
        )),
        Projector::Fastfood(_) => Err(CoreError::InvalidArgument(format!(
            "{}: projection \"fastfood\" is dense, and PEFT's Uni-LoRA format holds one \
             theta_d index and scale per LoRA parameter, so it cannot express it; \
             `unilora export-lora` writes the equivalent LoRA adapter instead",
            adapter.dir.display()
        ))),
    }
}

/// PEFT's `adapter_config.json` for the adapter.
fn peft_unilora_config(adapter: &Adapter) -> Value {
    let config = &adapter.config;
    let targets: Vec<&str> = config.modules.iter().map(|m| m.name.as_str()).collect();
    let to_save = (!config.modules_to_save.is_empty()).then(|| config.modules_to_save.clone());
    json!({
        "peft_type": "UNILORA",
        "task_type": null,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": null,
        "inference_mode": true,
        "r": config.rank,
        "theta_d_length": config.d,
        "proj_seed": config.seed,
        "target_modules": targets,
        "unilora_dropout": 0.0,
        "fan_in_fan_out": config.modules.iter().all(|m| m.kind == ModuleKind::Conv1d),
        "bias": "none",
        "modules_to_save": to_save,
        "init_theta_d_bound": config.init_range,
        "init_weights": true,
        "save_indices": true,
        "layers_to_transform": null,
        "layers_pattern": null,
    })
}

/// Writes the adapter at `opts.adapter` in PEFT's Uni-LoRA format into `opts.out`
/// (float32; `opts.dtype` must be F32).
pub fn export_peft(opts: &ExportOptions) -> Result<PeftExportReport> {
    let started = Instant::now();
    if opts.dtype != Dtype::F32 {
        return Err(CoreError::Dtype(format!(
            "PEFT's Uni-LoRA format is float32 (theta_d and scales), got {}",
            opts.dtype
        )));
    }
    let (adapter, weights_bytes) = export_folder(opts, PEFT_OUTPUT_KIND, |adapter, dir| {
        let bytes = write_weights(adapter, &dir.join("adapter_model.safetensors"))?;
        Ok((bytes, peft_unilora_config(adapter)))
    })?;
    Ok(PeftExportReport {
        export: ExportReport::of(&adapter, &opts.out, weights_bytes, started),
        notes: notes(&adapter.config),
    })
}

/// Rows of `theta_D` that one tensor of PEFT's file holds, and whether it holds their
/// indices (else their scales).
type Rows = (Range<u64>, bool);

/// Writes PEFT's `adapter_model.safetensors` to `path`: `theta_d`, every module's
/// indices and scales of `A` and `B`, then the saved modules. Returns its size.
fn write_weights(adapter: &Adapter, path: &Path) -> Result<u64> {
    let config = &adapter.config;
    let (idx, mut scales) = map_of(adapter)?;
    let mut tensors = vec![(PEFT_VECTOR_KEY.to_string(), Dtype::F32, vec![config.d])];
    let rows = module_tensors(config, &mut scales, &mut tensors);
    let first_saved = tensors.len();
    let extras = saved_tensors(adapter, &mut tensors);
    write_safetensors(path, &tensors, |k, buf| {
        if k == 0 {
            put_f32(buf, &adapter.theta);
        } else if k < first_saved {
            let (range, is_index) = &rows[k - 1];
            let range = range.start as usize..range.end as usize;
            if *is_index {
                for (dst, &j) in buf.chunks_exact_mut(8).zip(&idx[range]) {
                    dst.copy_from_slice(&(j as i64).to_le_bytes());
                }
            } else {
                put_f32(buf, &scales[range]);
            }
        } else {
            adapter.read_weights(extras[k - first_saved].begin, buf)?;
        }
        Ok(())
    })
}

/// Appends every module's `unilora_indices_A`, `unilora_scales_A`, `unilora_indices_B`
/// and `unilora_scales_B` to `tensors`, and returns the rows of `theta_D` each holds
/// (per module `B` (`out x r`) then `A` (`r x in`), as the map lists them). A scaling
/// `alpha / r` other than 1 is folded into the scales of `B`.
fn module_tensors(
    config: &AdapterConfig,
    scales: &mut [f32],
    tensors: &mut Vec<TensorSpec>,
) -> Vec<Rows> {
    let (s, r) = (config.scaling(), config.rank);
    let mut rows = Vec::with_capacity(4 * config.modules.len());
    let mut offset = 0u64;
    for m in &config.modules {
        let b = offset..offset + m.out_features * r;
        let a = b.end..b.end + r * m.in_features;
        if s != 1.0 {
            for x in &mut scales[b.start as usize..b.end as usize] {
                *x *= s;
            }
        }
        let prefix = format!("{PEFT_PREFIX}{}.unilora_", m.name);
        for (which, range, shape) in [
            ("A", a.clone(), vec![r, m.in_features]),
            ("B", b.clone(), vec![m.out_features, r]),
        ] {
            tensors.push((
                format!("{prefix}indices_{which}"),
                Dtype::I64,
                shape.clone(),
            ));
            rows.push((range.clone(), true));
            tensors.push((format!("{prefix}scales_{which}"), Dtype::F32, shape));
            rows.push((range, false));
        }
        offset = a.end;
    }
    rows
}

/// What PEFT's format changes or leaves out for an adapter with `config`.
fn notes(config: &AdapterConfig) -> Vec<String> {
    let mut notes = Vec::new();
    if config.scaling() != 1.0 {
        notes.push(format!(
            "PEFT's Uni-LoRA has no alpha: alpha / r = {} is folded into the scales of B (one \
             more float32 rounding)",
            config.scaling()
        ));
    }
    notes.push(
        "theta_d and the scales are float32; PEFT keeps them so on a bf16 or fp16 base with \
         its default autocast_adapter_dtype=True (with False it rounds them to the base \
         dtype)"
            .to_string(),
    );
    if config.task.is_some() {
        notes.push(
            "the task entry (architectures, labels) has no place in PEFT's config: load the \
             base model with the matching head class"
                .to_string(),
        );
    }
    notes
}

fn put_f32(buf: &mut [u8], values: &[f32]) {
    for (dst, x) in buf.chunks_exact_mut(4).zip(values) {
        dst.copy_from_slice(&x.to_le_bytes());
    }
}
