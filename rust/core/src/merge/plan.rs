//! Planning a shard: its output header, where each tensor goes and what happens to
//! it, and the independent pieces of work (byte copies and tiles) that write it.

use std::collections::HashMap;

use super::COPY_CHUNK;
use super::inputs::Shard;
use super::options::MergeOptions;
use super::report::MergeReport;
use super::types::{Action, OutTensor, Plan, Work};
use crate::error::Result;
use crate::safetensors::{BuiltHeader, Dtype, TensorInfo, build_header};

/// The output layout of shard `s` and its pieces of work; counts copies and casts into
/// `report`. `added` are the adapter's new tensors (index into the extras, tensor)
/// appended after the shard's own.
pub(super) fn plan_shard(
    s: usize,
    shard: &Shard,
    actions: &HashMap<(usize, usize), Action>,
    added: &[(usize, &TensorInfo)],
    opts: &MergeOptions,
    report: &mut MergeReport,
) -> Result<Plan> {
    let tensors = &shard.header.tensors;
    let out_dtype = |dtype: Dtype| match opts.dtype {
        Some(dt) if dtype.is_float() => dt,
        _ => dtype,
    };
    let dtypes: Vec<Dtype> = tensors
        .iter()
        .chain(added.iter().map(|(_, t)| *t))
        .map(|t| out_dtype(t.dtype))
        .collect();
    let (header, offsets) = shard_header(shard, &dtypes, added)?;
    let mut plan = Plan {
        data_len: offsets.last().map_or(0, |o| o.1),
        outs: Vec::with_capacity(tensors.len()),
        work: Vec::new(),
        header,
    };
    for (t, info) in tensors.iter().enumerate() {
        report.largest_tensor_bytes = report.largest_tensor_bytes.max(info.nbytes());
        let quantized = shard.quant.sources.contains_key(&t);
        report.dequantized += usize::from(quantized);
        let action = match actions.get(&(s, t)) {
            Some(a) => *a,
            None if dtypes[t] != info.dtype || quantized => Action::Cast,
            None => Action::Copy,
        };
        let out = OutTensor {
            src: t,
            dtype: dtypes[t],
            begin: offsets[t].0,
            action,
        };
        push_work(&mut plan, shard, info, &out, opts.tile(), report);
        plan.outs.push(out);
    }
    for (j, &(k, info)) in added.iter().enumerate() {
        let t = tensors.len() + j;
        push_tiles(&mut plan.work, plan.outs.len(), info.numel(), opts.tile());
        plan.outs.push(OutTensor {
            src: usize::MAX,
            dtype: dtypes[t],
            begin: offsets[t].0,
            action: Action::Add(k),
        });
    }
    report.tensors += tensors.len() + added.len();
    plan.work = split_copies(plan.work);
    Ok(plan)
}

/// The output header of `shard` with its tensors in `dtypes` (the shard's, then the
/// `added` ones) and each tensor's data offsets: the input header byte for byte when
/// nothing changes, else a new one.
fn shard_header(
    shard: &Shard,
    dtypes: &[Dtype],
    added: &[(usize, &TensorInfo)],
) -> Result<BuiltHeader> {
    let tensors = &shard.header.tensors;
    let same = dtypes.iter().zip(tensors).all(|(d, t)| *d == t.dtype) && !shard.quant.any();
    if same && added.is_empty() {
        let offsets = tensors.iter().map(|t| (t.begin, t.end)).collect();
        return Ok((shard.header.raw.clone(), offsets));
    }
    let spec: Vec<(&str, Dtype, &[u64])> = tensors
        .iter()
        .chain(added.iter().map(|(_, t)| *t))
        .zip(dtypes)
        .map(|(t, d)| (t.name.as_str(), *d, t.shape.as_slice()))
        .collect();
    build_header(&spec, shard.header.metadata.as_ref())
}

/// The pieces of work that write base tensor `info` of `shard` as `out` says (a byte
/// copy, or tiles of `tile` elements, whole rows for a merged weight); counts copies
/// and casts into `report`.
fn push_work(
    plan: &mut Plan,
    shard: &Shard,
    info: &TensorInfo,
    out: &OutTensor,
    tile: u64,
    report: &mut MergeReport,
) {
    let t = plan.outs.len();
    match out.action {
        Action::Copy => {
            report.copied += 1;
            let src = shard.header.data_start() + info.begin;
            let dst = plan.header.len() as u64 + 8 + out.begin;
            push_copy(&mut plan.work, src, dst, info.nbytes());
        }
        Action::Cast => {
            report.cast += 1;
            push_tiles(&mut plan.work, t, info.numel(), tile);
        }
        Action::Merge(_) => {
            let cols = info.shape[1];
            let step = (tile / cols).max(1) * cols;
            push_tiles(&mut plan.work, t, info.numel(), step);
        }
        Action::Replace(_) | Action::Add(_) => push_tiles(&mut plan.work, t, info.numel(), tile),
    }
}

/// A byte copy, joined with the previous one when both ranges continue it.
fn push_copy(work: &mut Vec<Work>, src: u64, dst: u64, len: u64) {
    match work.last_mut() {
        Some(Work::Copy {
            src: s0,
            dst: d0,
            len: l0,
        }) if *s0 + *l0 == src && *d0 + *l0 == dst => *l0 += len,
        _ if len > 0 => work.push(Work::Copy { src, dst, len }),
        _ => {}
    }
}

/// Tiles of `step` elements over the `numel` elements of output tensor `t`.
fn push_tiles(work: &mut Vec<Work>, t: usize, numel: u64, step: u64) {
    let mut e0 = 0;
    while e0 < numel {
        let e1 = (e0 + step).min(numel);
        work.push(Work::Tile { t, e0, e1 });
        e0 = e1;
    }
}

/// Splits long copies into [`COPY_CHUNK`] pieces.
fn split_copies(work: Vec<Work>) -> Vec<Work> {
    let mut split = Vec::with_capacity(work.len());
    for w in work {
        match w {
            Work::Copy { src, dst, len } => {
                let mut off = 0;
                while off < len {
                    let n = COPY_CHUNK.min(len - off);
                    split.push(Work::Copy {
                        src: src + off,
                        dst: dst + off,
                        len: n,
                    });
                    off += n;
                }
            }
            tile => split.push(tile),
        }
    }
    split
}
