//! Writing: each shard's pieces of work in parallel into the staging output.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::Control;
use super::inputs::Shard;
use super::options::MergeOptions;
use super::rows::{Rows, Term, merge_rows};
use super::types::{Action, Extra, OutTensor, Plan, Work};
use crate::adapter::Adapter;
use crate::codec;
use crate::error::{CoreError, Result};
use crate::io::pio::{copy_range, preallocate, read_exact_at, write_all_at};
use crate::parallel;
use crate::safetensors::Dtype;

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
        let changed = matches!(out.action, Action::Merge(_)) || src_dtype != out.dtype;
        if changed
            && codec::any_non_finite(out.dtype, output)
            && !codec::any_non_finite(src_dtype, input)
        {
            let name = match out.action {
                Action::Replace(k) | Action::Add(k) => self.extras[k].info.name.as_str(),
                _ => shard.header.tensors[out.src].name.as_str(),
            };
            return Err(became_non_finite(name, out, src_dtype));
        }
        write_all_at(dst.file, output, at).map_err(|e| CoreError::io(dst.path, e))?;
        self.control.add((n * out_size) as u64);
        Ok(())
    }
}

/// The error for output tensor `name` holding Inf or NaN where its input is finite: the
/// update (times the weights of a weighted merge) or the output dtype overflows.
fn became_non_finite(name: &str, out: &OutTensor, src: Dtype) -> CoreError {
    let why = match (&out.action, out.dtype) {
        (Action::Merge(_), Dtype::F16) => {
            "the merged values overflow float16 (largest 65504): merge to bf16 or f32, or use \
             smaller weights"
        }
        (Action::Merge(_), _) => {
            "the adapter's update (times its weight in a weighted merge) overflows float32: use \
             smaller weights"
        }
        (_, Dtype::F16) => "its values overflow float16 (largest 65504): use bf16 or f32",
        _ => "its values overflow the output dtype",
    };
    CoreError::InvalidArgument(format!(
        "merging makes {name} ({src} -> {}) hold Inf or NaN where its input is finite: {why}; \
         nothing was written",
        out.dtype
    ))
}
