//! Finishing an output folder: the base folder's other files copied, the shard index
//! and `config.json` updated for what the merge changed, everything synced.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::inputs::{Inputs, Shard};
use super::options::MergeOptions;
use super::rel_string;
use super::report::MergeReport;
use super::types::{Action, Extra, Plan, Targets};
use crate::error::{CoreError, Result};
use crate::io::atomic::OUTPUT_MARKER;
use crate::io::fs::{copy_tree, read_regular};
use crate::safetensors::{Dtype, byte_size};

/// Copies the folder's other files into the staging folder, writes the shard index
/// and the updated `config.json`, and syncs them.
pub(super) fn finish_folder(
    opts: &MergeOptions,
    inputs: &Inputs,
    targets: &Targets<'_>,
    plans: &[Plan],
    staging: &Path,
    report: &mut MergeReport,
) -> Result<()> {
    let mut not_copied: BTreeSet<PathBuf> = inputs.shards.iter().map(|s| s.rel.clone()).collect();
    not_copied.extend(inputs.left_out.iter().cloned());
    not_copied.insert(PathBuf::from(OUTPUT_MARKER));
    let index_rel = inputs
        .index
        .as_ref()
        .and_then(|(p, _)| p.strip_prefix(&opts.base).ok().map(Path::to_path_buf));
    not_copied.extend(index_rel.clone());
    let skip = |rel: &Path| {
        not_copied.contains(rel)
            || rel
                .components()
                .next()
                .is_some_and(|c| c.as_os_str() == ".git" || c.as_os_str() == ".cache")
    };
    let copied = copy_tree(&opts.base, staging, &skip)?;
    report.other_files = copied.iter().map(|p| rel_string(p)).collect();
    let quantized = inputs.shards.iter().any(|s| s.quant.any());
    update_config(opts, targets, quantized, staging, report)?;
    if let (Some((index_path, value)), Some(index_rel)) = (&inputs.index, &index_rel) {
        let last = inputs
            .shards
            .last()
            .map(|s| rel_string(&s.rel))
            .unwrap_or_default();
        let added: Vec<(&str, &str)> = targets
            .added
            .iter()
            .map(|&k| (targets.extras[k].info.name.as_str(), last.as_str()))
            .collect();
        write_index(
            index_path,
            value,
            &inputs.shards,
            &targets.extras,
            &added,
            plans,
            &staging.join(index_rel),
        )?;
        report.other_files.push(rel_string(index_rel));
        report.other_files.sort();
    }
    if opts.fsync {
        for rel in &report.other_files {
            let p = staging.join(rel);
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| CoreError::io(&p, e))?;
        }
    }
    Ok(())
}

/// The shard index of the output: the input's bytes, or, when a dtype change or added
/// tensors altered the sizes, the input with a new `metadata.total_size` (and the added
/// tensors, `(name, file)`, in its `weight_map`).
fn write_index(
    index_path: &Path,
    value: &Value,
    shards: &[Shard],
    extras: &[Extra<'_>],
    added: &[(&str, &str)],
    plans: &[Plan],
    dst: &Path,
) -> Result<()> {
    let sizes_changed = plans
        .iter()
        .zip(shards)
        .any(|(p, s)| p.data_len != s.header.file_len - s.header.data_start());
    let quantized = shards.iter().any(|s| s.quant.any());
    if !sizes_changed && added.is_empty() && !quantized {
        fs::copy(index_path, dst).map_err(|e| CoreError::io(dst, e))?;
        return Ok(());
    }
    let total: u64 = plans
        .iter()
        .zip(shards)
        .flat_map(|(p, s)| {
            p.outs.iter().map(move |o| match o.action {
                Action::Add(k) => (o, &extras[k].info.shape),
                _ => (o, &s.header.tensors[o.src].shape),
            })
        })
        .map(|(o, shape)| byte_size(o.dtype, shape).unwrap_or(0))
        .sum();
    let mut value = value.clone();
    if let Some(map) = value.get_mut("weight_map").and_then(Value::as_object_mut) {
        map.retain(|name, _| !shards.iter().any(|s| s.quant.dropped.contains(name)));
        for (name, file) in added {
            map.insert((*name).to_string(), Value::from(*file));
        }
    }
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("total_size".into(), Value::from(total));
    } else if let Some(obj) = value.as_object_mut() {
        let mut meta = Map::new();
        meta.insert("total_size".into(), Value::from(total));
        obj.insert("metadata".into(), Value::Object(meta));
    }
    let mut text = serde_json::to_vec_pretty(&value)
        .map_err(|e| CoreError::format(index_path, format!("cannot serialise ({e})")))?;
    text.push(b'\n');
    fs::write(dst, text).map_err(|e| CoreError::io(dst, e))
}

/// Name of a Hugging Face model folder's configuration file.
pub(super) const MODEL_CONFIG_NAME: &str = "config.json";

/// Sets the adapters' `task.config` keys, and the dtype when the output dtype changed,
/// in the staged copy of the base's `config.json` (written whole, then synced with the
/// other files). A folder without `config.json` gets a warning when there was
/// something to set.
fn update_config(
    opts: &MergeOptions,
    targets: &Targets<'_>,
    quantized: bool,
    staging: &Path,
    report: &mut MergeReport,
) -> Result<()> {
    let mut updates: Map<String, Value> = targets.config.clone();
    let path = staging.join(MODEL_CONFIG_NAME);
    if updates.is_empty() && opts.dtype.is_none() && !quantized {
        return Ok(());
    }
    if !path.is_file() {
        if !updates.is_empty() {
            report.warnings.push(format!(
                "the base folder has no {MODEL_CONFIG_NAME}: the adapter's task keys ({}) were \
                 not written",
                updates.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        return Ok(());
    }
    let text = read_regular(&path)?;
    let mut value = crate::format::json::parse_json(&text)
        .map_err(|msg| CoreError::format(opts.base.join(MODEL_CONFIG_NAME), msg))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(CoreError::format(
            opts.base.join(MODEL_CONFIG_NAME),
            "expected a JSON object",
        ));
    };
    if quantized {
        // The weights are dequantised: the output is an ordinary float checkpoint.
        obj.remove("quantization_config");
    }
    if let Some(dt) = opts.dtype.or(quantized.then_some(Dtype::F32)) {
        let name = Value::from(dt.torch_name());
        if obj.contains_key("torch_dtype") {
            updates.insert("torch_dtype".into(), name.clone());
        }
        updates.insert("dtype".into(), name);
    }
    report.config_keys = updates.keys().cloned().collect();
    obj.extend(updates);
    let mut out = serde_json::to_vec_pretty(&value)
        .map_err(|e| CoreError::format(&path, format!("cannot serialise ({e})")))?;
    out.push(b'\n');
    fs::write(&path, out).map_err(|e| CoreError::io(&path, e))?;
    if !report.other_files.iter().any(|f| f == MODEL_CONFIG_NAME) {
        report.other_files.push(MODEL_CONFIG_NAME.into());
        report.other_files.sort();
    }
    Ok(())
}
