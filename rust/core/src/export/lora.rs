//! Exact export of a Uni-LoRA adapter as a standard PEFT LoRA adapter.
//!
//! The reconstructed factors are written as `base_model.model.<module>.lora_A.weight`
//! (`r x in`) and `base_model.model.<module>.lora_B.weight` (`out x r`) in
//! `adapter_model.safetensors`, next to an `adapter_config.json` with `peft_type =
//! "LORA"`, the same `r` and `lora_alpha = alpha` (so PEFT's scaling `lora_alpha / r` is
//! the adapter's), and `target_modules` listing exactly the adapted modules. This is the
//! layout PEFT's `PeftModel.from_pretrained`, vLLM and llama.cpp's LoRA converter read.
//! In float32 (the default) the export is exact: the LoRA model computes the same
//! function as the Uni-LoRA one.
//!
//! An adapter with `modules_to_save` is refused unless the caller says what to do with
//! them ([`SavedModules`]): vLLM's LoRA loader and llama.cpp's converter reject saved
//! modules, PEFT loads them.

use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::write::{TensorSpec, export_folder, saved_tensors, write_safetensors};
use super::{ExportOptions, ExportReport, PEFT_PREFIX, SAVED_MODULES_FILE, SavedModules};
use crate::adapter::Adapter;
use crate::codec;
use crate::error::{CoreError, Result};
use crate::format::ModuleKind;
use crate::safetensors::{Dtype, TensorInfo};

/// The kind of output an export writes (in the folder's
/// [`OUTPUT_MARKER`](crate::io::atomic::OUTPUT_MARKER)).
pub const OUTPUT_KIND: &str = "export-lora";

/// The `adapter_config.json` of the PEFT LoRA equivalent of `adapter` (listing its
/// `modules_to_save` when `with_saved`).
pub fn peft_config(adapter: &Adapter, with_saved: bool) -> Value {
    let config = &adapter.config;
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 2f64.powi(53) {
        Value::from(config.alpha as i64)
    } else {
        Value::from(config.alpha)
    };
    let all_conv = config.modules.iter().all(|m| m.kind == ModuleKind::Conv1d);
    let targets: Vec<Value> = config
        .modules
        .iter()
        .map(|m| Value::from(m.name.clone()))
        .collect();
    let to_save = if config.modules_to_save.is_empty() || !with_saved {
        Value::Null
    } else {
        Value::from(config.modules_to_save.clone())
    };
    json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "fan_in_fan_out": all_conv,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": to_save,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Writes the PEFT LoRA equivalent of the adapter at `opts.adapter` into `opts.out`.
pub fn export_lora(opts: &ExportOptions) -> Result<ExportReport> {
    let started = Instant::now();
    if !matches!(opts.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(CoreError::Dtype(format!(
            "export dtype {} is not one of bf16, f16, f32",
            opts.dtype
        )));
    }
    let mode = opts.saved_modules;
    let (adapter, weights_bytes) = export_folder(opts, OUTPUT_KIND, |adapter, dir| {
        let has_saved = adapter.extra_tensors().next().is_some();
        if has_saved && mode == SavedModules::Error {
            return Err(SavedModules::refusal(
                &adapter.config.modules_to_save,
                "export-lora",
            ));
        }
        let keep = mode == SavedModules::Keep;
        let bytes = write_lora_weights(adapter, opts.dtype, keep, dir)?;
        if has_saved && mode == SavedModules::Separate {
            write_saved_modules(adapter, &dir.join(SAVED_MODULES_FILE))?;
        }
        Ok((bytes, peft_config(adapter, keep)))
    })?;
    let mut report = ExportReport::of(&adapter, &opts.out, weights_bytes, started);
    match mode {
        SavedModules::Keep => {}
        SavedModules::Separate if report.saved_tensors > 0 => {
            report.saved_file = Some(opts.out.join(SAVED_MODULES_FILE));
        }
        _ => report.saved_tensors = 0,
    }
    Ok(report)
}

/// Writes the adapter's `modules_to_save` tensors, under their own names (the base
/// model's state-dict keys), to the safetensors file `path`; returns its size.
pub fn write_saved_modules(adapter: &Adapter, path: &Path) -> Result<u64> {
    let extras: Vec<TensorInfo> = adapter.extra_tensors().cloned().collect();
    let tensors: Vec<TensorSpec> = extras
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    write_safetensors(path, &tensors, |k, buf| {
        adapter.read_weights(extras[k].begin, buf)
    })
}

/// Writes `adapter_model.safetensors` of the LoRA equivalent into `dir` (with the saved
/// modules when `keep`); returns its size.
fn write_lora_weights(adapter: &Adapter, dtype: Dtype, keep: bool, dir: &Path) -> Result<u64> {
    let pairs = adapter.lora_pairs()?;
    let r = adapter.config.rank;
    let mut tensors = Vec::with_capacity(2 * adapter.config.modules.len());
    for m in &adapter.config.modules {
        tensors.push((
            format!("{PEFT_PREFIX}{}.lora_A.weight", m.name),
            dtype,
            vec![r, m.in_features],
        ));
        tensors.push((
            format!("{PEFT_PREFIX}{}.lora_B.weight", m.name),
            dtype,
            vec![m.out_features, r],
        ));
    }
    let factors = tensors.len();
    let extras = if keep {
        saved_tensors(adapter, &mut tensors)
    } else {
        Vec::new()
    };
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &tensors,
        |k, buf| {
            if k < factors {
                let pair = &pairs[k / 2];
                let mat = if k % 2 == 0 { &pair.a } else { &pair.b };
                codec::encode(dtype, mat, buf)
            } else {
                adapter.read_weights(extras[k - factors].begin, buf)
            }
        },
    )
}
