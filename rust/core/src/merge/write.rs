//! Writing: each shard's pieces of work in parallel into the staging output, then the
//! folder's other files and its shard index.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::rel_string;
use super::rows::{Rows, Term, merge_rows};
use super::{
    Action, Control, Extra, Inputs, MergeOptions, MergeReport, OutTensor, Plan, Shard, Targets,
    Work,
};
use crate::adapter::Adapter;
use crate::codec;
use crate::error::{CoreError, Result};
use crate::io::atomic::OUTPUT_MARKER;
use crate::io::fs::{copy_tree, read_regular};
use crate::io::pio::{copy_range, preallocate, read_exact_at, write_all_at};
use crate::parallel;
use crate::safetensors::{Dtype, byte_size};

/// What the writers of all shards of one output share.
pub(super) struct Writer<'a> {
    pub(super) opts: &'a MergeOptions,
    pub(super) adapters: &'a [Adapter],
    pub(super) extras: &'a [Extra<'a>],
    /// The terms of each merged weight ([`Action::Merge`] indexes them).
    pub(super) terms: &'a [Vec<Term<'a>>],
    pub(super) control: &'a Control,
    /// Bytes of tensor data read from the inputs.
    pub(super) read: &'a AtomicU64,
}

impl Writer<'_> {
    /// Writes `shard` as `plan` says into the staging output; returns its size.
    pub(super) fn write_shard(
        &self,
        shard: &Shard,
        plan: &Plan,
        staging: &Path,
        is_dir: bool,
    ) -> Result<u64> {
        let (dst, dst_path, dst_data) = open_output(shard, plan, staging, is_dir)?;
        let total_len = dst_data + plan.data_len;
        let job = ShardJob {
            writer: self,
            shard,
            outs: &plan.outs,
            dst: &dst,
            dst_path: &dst_path,
            dst_data,
        };
        parallel::install(|| {
            plan.work
                .par_iter()
                .try_for_each_init(Scratch::default, |scratch, w| job.run(w, scratch))
        })?;
        if self.opts.fsync {
            dst.sync_all().map_err(|e| CoreError::io(&dst_path, e))?;
        }
        Ok(total_len)
    }
}

/// Creates the output file of `shard` in the staging output, sized for `plan`, with its
/// header written; returns it, its path and where its data begins.
pub(super) fn open_output(
    shard: &Shard,
    plan: &Plan,
    staging: &Path,
    is_dir: bool,
) -> Result<(File, PathBuf, u64)> {
    let dst_path = if is_dir {
        staging.join(&shard.rel)
    } else {
        staging.to_path_buf()
    };
    if let Some(parent) = dst_path.parent() {
        fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    }
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&dst_path)
        .map_err(|e| CoreError::io(&dst_path, e))?;
    let dst_data = 8 + plan.header.len() as u64;
    preallocate(&dst, dst_data + plan.data_len, &dst_path)?;
    let mut head = Vec::with_capacity(dst_data as usize);
    head.extend_from_slice(&(plan.header.len() as u64).to_le_bytes());
    head.extend_from_slice(&plan.header);
    write_all_at(&dst, &head, 0).map_err(|e| CoreError::io(&dst_path, e))?;
    Ok((dst, dst_path, dst_data))
}

// ------------------------------------------------------------------ finish the folder

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

/// Reusable buffers of one worker.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) input: Vec<u8>,
    /// Packed bytes of a quantized weight.
    pub(super) raw: Vec<u8>,
    pub(super) extra: Vec<u8>,
    pub(super) output: Vec<u8>,
    pub(super) values: Vec<f32>,
}

pub(super) fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// The writer of one shard's pieces of work.
struct ShardJob<'a> {
    writer: &'a Writer<'a>,
    shard: &'a Shard,
    outs: &'a [OutTensor],
    dst: &'a File,
    dst_path: &'a Path,
    dst_data: u64,
}

impl ShardJob<'_> {
    fn run(&self, work: &Work, scratch: &mut Scratch) -> Result<()> {
        if self.writer.control.is_cancelled() {
            return Err(CoreError::Interrupted);
        }
        match *work {
            Work::Copy { src, dst, len } => {
                self.writer.read.fetch_add(len, Ordering::Relaxed);
                copy_range(
                    &self.shard.file,
                    &self.shard.path,
                    src,
                    self.dst,
                    self.dst_path,
                    dst,
                    len,
                    &|| !self.writer.control.is_cancelled(),
                    &|n| self.writer.control.add(n),
                )
            }
            Work::Tile { t, e0, e1 } => {
                let out = &self.outs[t];
                let n = (e1 - e0) as usize;
                let target = Target {
                    file: self.dst,
                    path: self.dst_path,
                    data: self.dst_data,
                };
                let mut buffer = std::mem::take(&mut scratch.input);
                let result = match out.action {
                    Action::Replace(_) | Action::Add(_) => Ok(&[][..]),
                    _ => {
                        let info = &self.shard.header.tensors[out.src];
                        let size = (info.dtype.bits() / 8) as usize;
                        let input = grow(&mut buffer, n * size);
                        self.shard
                            .read_elems(out.src, e0, input, &mut scratch.raw)
                            .map(|read| {
                                self.writer.read.fetch_add(read, Ordering::Relaxed);
                                &*input
                            })
                    }
                }
                .and_then(|input| {
                    self.writer
                        .emit(self.shard, out, input, e0..e1, &target, scratch)
                });
                scratch.input = buffer;
                result
            }
        }
    }
}

/// Where an output file's tensor data begins.
pub(super) struct Target<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
    pub(super) data: u64,
}

impl Writer<'_> {
    /// Writes elements `elems` of output tensor `out` into `dst`. `base` holds
    /// those elements of its base tensor (`out.src` of `shard`), read by the caller;
    /// a replaced or added tensor is read here from its adapter instead.
    pub(super) fn emit(
        &self,
        shard: &Shard,
        out: &OutTensor,
        base: &[u8],
        elems: std::ops::Range<u64>,
        dst: &Target<'_>,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let (e0, n) = (elems.start, (elems.end - elems.start) as usize);
        let Scratch {
            extra: extra_buf,
            output,
            values,
            ..
        } = scratch;
        let (src_dtype, input) = match out.action {
            Action::Replace(k) | Action::Add(k) => {
                let extra = self.extras[k];
                let adapter = &self.adapters[extra.adapter];
                let size = (extra.info.dtype.bits() / 8) as usize;
                let input = grow(extra_buf, n * size);
                let off = adapter.weights.data_start() + extra.info.begin + e0 * size as u64;
                read_exact_at(adapter.weights_file(), input, off)
                    .map_err(|e| CoreError::io(&adapter.weights_path, e))?;
                self.read.fetch_add(input.len() as u64, Ordering::Relaxed);
                (extra.info.dtype, &*input)
            }
            _ => (shard.header.tensors[out.src].dtype, base),
        };
        let out_size = (out.dtype.bits() / 8) as usize;
        let at = dst.data + out.begin + e0 * out_size as u64;
        if let Action::Copy = out.action {
            write_all_at(dst.file, input, at).map_err(|e| CoreError::io(dst.path, e))?;
            self.control.add(input.len() as u64);
            return Ok(());
        }
        let output = grow(output, n * out_size);
        match out.action {
            Action::Merge(j) => {
                let terms = &self.terms[j];
                merge_rows(
                    terms,
                    Rows {
                        input,
                        src: src_dtype,
                        output,
                        dst: out.dtype,
                        row0: (e0 / terms[0].0.cols as u64) as usize,
                    },
                );
            }
            _ => codec::cast(src_dtype, input, out.dtype, output, grow(values, n))?,
        }
        write_all_at(dst.file, output, at).map_err(|e| CoreError::io(dst.path, e))?;
        self.control.add((n * out_size) as u64);
        Ok(())
    }
}

// ------------------------------------------------------------------ config.json

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
