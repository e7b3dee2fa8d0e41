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

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::adapter::Adapter;
use crate::codec;
use crate::error::{CoreError, Result};
use crate::format::ModuleKind;
use crate::io::atomic::{self, TempPath};
use crate::io::fs::check_disjoint;
use crate::safetensors::{Dtype, TensorInfo, build_header};

/// Prefix PEFT puts before module names in a saved adapter.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What an export does with the adapter's `modules_to_save` tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SavedModules {
    /// Refuse an adapter that has any (the default): vLLM's LoRA loader and llama.cpp's
    /// `convert_lora_to_gguf.py` reject saved modules in a LoRA adapter.
    #[default]
    Error,
    /// Write them into the LoRA adapter, named as PEFT names them (PEFT loads them).
    Keep,
    /// Leave them out: the LoRA adapter then lacks those trained modules.
    Drop,
    /// Write them, under their own names, to [`SAVED_MODULES_FILE`] in the output folder;
    /// the adapter's config then lists none.
    Separate,
}

impl SavedModules {
    /// The option's name on the command line and in Python.
    pub fn as_str(self) -> &'static str {
        match self {
            SavedModules::Error => "error",
            SavedModules::Keep => "keep",
            SavedModules::Drop => "drop",
            SavedModules::Separate => "separate",
        }
    }

    /// Parses `"error"`, `"keep"`, `"drop"` or `"separate"`.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "error" => Ok(SavedModules::Error),
            "keep" => Ok(SavedModules::Keep),
            "drop" => Ok(SavedModules::Drop),
            "separate" => Ok(SavedModules::Separate),
            other => Err(CoreError::InvalidArgument(format!(
                "saved_modules must be one of error, keep, drop, separate, got {other:?}"
            ))),
        }
    }

    /// The error of [`SavedModules::Error`] for an adapter whose `modules_to_save` are
    /// `modules`, exported by `command`.
    pub fn refusal(modules: &[String], command: &str) -> CoreError {
        CoreError::InvalidArgument(format!(
            "the adapter has modules_to_save ({}), which vLLM's LoRA loader and llama.cpp's \
             convert_lora_to_gguf.py reject; {command} with saved_modules=\"drop\" leaves them \
             out, \"separate\" writes them to a companion .safetensors file{}",
            modules.join(", "),
            if command == "export-lora" {
                ", \"keep\" writes them into the adapter (PEFT loads them)"
            } else {
                ""
            }
        ))
    }
}

/// The file [`SavedModules::Separate`] writes the saved modules to, in the output folder.
pub const SAVED_MODULES_FILE: &str = "saved_modules.safetensors";

/// What to export, where, and how.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The Uni-LoRA adapter directory.
    pub adapter: PathBuf,
    /// The output folder (created; must not exist unless `overwrite`).
    pub out: PathBuf,
    /// Dtype of the LoRA factors: F32 (exact, the default), BF16 or F16.
    pub dtype: Dtype,
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// What to do with `modules_to_save` tensors (export-lora only).
    pub saved_modules: SavedModules,
}

impl ExportOptions {
    /// Float32 export into `out`, no overwrite.
    pub fn new(adapter: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        ExportOptions {
            adapter: adapter.into(),
            out: out.into(),
            dtype: Dtype::F32,
            overwrite: false,
            saved_modules: SavedModules::Error,
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, Default)]
pub struct ExportReport {
    /// The output folder.
    pub out: PathBuf,
    /// Number of LoRA modules written.
    pub modules: usize,
    /// Number of `modules_to_save` tensors written.
    pub saved_tensors: usize,
    /// LoRA parameters written (`D`).
    pub lora_parameters: u64,
    /// Size of the written `adapter_model.safetensors` in bytes.
    pub weights_bytes: u64,
    /// The companion file of the saved modules ([`SavedModules::Separate`]).
    pub saved_file: Option<PathBuf>,
}

impl ExportReport {
    /// The report of an export of `adapter` into `out`, whose weights file has
    /// `weights_bytes` bytes.
    pub fn of(adapter: &Adapter, out: &Path, weights_bytes: u64) -> Self {
        ExportReport {
            out: out.to_path_buf(),
            modules: adapter.config.modules.len(),
            saved_tensors: adapter.extra_tensors().count(),
            lora_parameters: adapter.config.total_size(),
            weights_bytes,
            saved_file: None,
        }
    }
}

/// The kind of output an export writes (in the folder's [`atomic::OUTPUT_MARKER`]).
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
    let mut report = ExportReport::of(&adapter, &opts.out, weights_bytes);
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

/// Opens the adapter of `opts` and writes an output folder of `kind` from it, atomically:
/// `write(adapter, dir)` writes the weights into the staging folder and returns their
/// size and the `adapter_config.json` to write next to them.
pub(crate) fn export_folder(
    opts: &ExportOptions,
    kind: &'static str,
    write: impl FnOnce(&Adapter, &Path) -> Result<(u64, Value)>,
) -> Result<(Adapter, u64)> {
    check_disjoint(&opts.out, &opts.adapter, "adapter")?;
    atomic::check_output(&opts.out, opts.overwrite, Some(kind))?;
    let adapter = Adapter::open(&opts.adapter)?;
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    }
    let staging = TempPath::new_folder(&opts.out, kind)?;
    let (weights_bytes, config) = write(&adapter, staging.path())?;
    let mut text = serde_json::to_vec_pretty(&config)
        .map_err(|e| CoreError::InvalidArgument(format!("cannot serialise the config: {e}")))?;
    text.push(b'\n');
    write_synced(&staging.path().join("adapter_config.json"), &text)?;
    staging.commit(opts.overwrite)?;
    Ok((adapter, weights_bytes))
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

/// Appends the adapter's `modules_to_save` tensors, named as PEFT names them
/// (`base_model.model.<tensor>`), to `tensors`; returns them in that order.
pub(crate) fn saved_tensors(adapter: &Adapter, tensors: &mut Vec<TensorSpec>) -> Vec<TensorInfo> {
    let extras: Vec<TensorInfo> = adapter.extra_tensors().cloned().collect();
    for t in &extras {
        tensors.push((format!("{PEFT_PREFIX}{}", t.name), t.dtype, t.shape.clone()));
    }
    extras
}

/// A tensor to write: name, dtype, shape.
pub(crate) type TensorSpec = (String, Dtype, Vec<u64>);

/// Writes a safetensors file (metadata `format = pt`) holding `tensors`, in order; the
/// bytes of tensor `k` come from `data(k, buf)`, `buf` being sized for them. Synced;
/// returns the file size.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize, &mut [u8]) -> Result<()>,
) -> Result<u64> {
    let spec: Vec<(&str, Dtype, &[u64])> = tensors
        .iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect();
    let mut meta = Map::new();
    meta.insert("format".into(), Value::from("pt"));
    let (header, offsets) = build_header(&spec, Some(&meta))?;
    let io = |e| CoreError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, &file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    let mut buf = Vec::new();
    for (k, &(begin, end)) in offsets.iter().enumerate() {
        buf.resize((end - begin) as usize, 0);
        data(k, &mut buf)?;
        w.write_all(&buf).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    file.sync_all().map_err(io)?;
    Ok(8 + header.len() as u64 + offsets.last().map_or(0, |o| o.1))
}

pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let io = |e| CoreError::io(path, e);
    let mut f = File::create(path).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}
