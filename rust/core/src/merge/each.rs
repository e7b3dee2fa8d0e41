//! One merged checkpoint per adapter, in one pass over the base: every tile of a base
//! tensor is read once and written, merged by each adapter as [`super::merge`] would
//! merge it alone, to every output. Each output is bit for bit the output of merging
//! its adapter alone (same headers, same arithmetic, same folder files).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use super::finish::finish_folder;
use super::inputs::{Inputs, check_options, open_all};
use super::options::{MergeOptions, MultiMergeOptions};
use super::report::{EachReport, MergeReport};
use super::targets::resolve_targets;
use super::types::{Action, Plan, Targets};
use super::write::{Scratch, Target, Writer, grow, open_output};
use super::{Control, new_report, plan_shards, prepare_all, rel_string, stage, terms_of};
use crate::adapter::Adapter;
use crate::error::{CoreError, Result};
use crate::io::atomic::TempPath;
use crate::parallel;

/// The output path of each adapter in `out_dir`: the adapter folder's name, plus
/// `.safetensors` when the base is a single file.
fn outputs(opts: &MultiMergeOptions, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let file_base = !opts.base.is_dir();
    let mut seen = HashSet::new();
    let mut outs = Vec::with_capacity(opts.adapters.len());
    for adapter in &opts.adapters {
        let dir = crate::io::fs::resolve(adapter)?;
        let dir = if dir.is_file() {
            dir.parent().map(Path::to_path_buf).unwrap_or(dir)
        } else {
            dir
        };
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                CoreError::InvalidArgument(format!(
                    "{}: an adapter folder has no name",
                    adapter.display()
                ))
            })?;
        if !seen.insert(name.clone()) {
            return Err(CoreError::InvalidArgument(format!(
                "two adapters are named {name:?}; --out-dir names each output after its adapter \
                 folder, so the names must differ"
            )));
        }
        outs.push(out_dir.join(if file_base {
            format!("{name}.safetensors")
        } else {
            name
        }));
    }
    Ok(outs)
}

/// One output of the pass.
struct Output<'a> {
    opts: MergeOptions,
    targets: Targets<'a>,
    plans: Vec<Plan>,
    report: MergeReport,
}

/// Merges each adapter alone into the base, writing `out_dir/<adapter folder name>`
/// (`.safetensors` added for a file base) for each, in one pass over the base: each
/// base shard is read once. Every output equals, byte for byte, what [`super::merge`]
/// of its adapter writes. All outputs are checked before anything is written; they
/// appear (each renamed into place) only when all are complete.
pub fn merge_each(
    opts: &MultiMergeOptions,
    out_dir: &Path,
    control: &Control,
) -> Result<EachReport> {
    let started = Instant::now();
    let singles = checked_options(opts, out_dir)?;
    let (adapters, inputs) = open_all(opts)?;
    let outputs = plan_outputs(singles, &inputs, &adapters)?;
    control.set_total(
        outputs
            .iter()
            .flat_map(|o| o.plans.iter().map(|p| p.data_len))
            .sum(),
    );
    let prepared = adapters
        .iter()
        .map(|a| prepare_all(std::slice::from_ref(a)))
        .collect::<Result<Vec<_>>>()?;
    let terms: Vec<_> = outputs
        .iter()
        .zip(&prepared)
        .map(|(o, p)| terms_of(&o.targets, p))
        .collect();
    let reads: Vec<AtomicU64> = adapters.iter().map(|_| AtomicU64::new(0)).collect();
    let base_read = AtomicU64::new(0);
    let writers: Vec<Writer<'_>> = outputs
        .iter()
        .enumerate()
        .map(|(k, o)| Writer {
            opts: &o.opts,
            adapters: &adapters[k..k + 1],
            extras: &o.targets.extras,
            terms: &terms[k],
            control,
            read: &reads[k],
        })
        .collect();
    let stagings = outputs
        .iter()
        .map(|o| stage(&o.opts, inputs.is_dir))
        .collect::<Result<Vec<_>>>()?;
    let pass = Pass {
        inputs: &inputs,
        outputs: &outputs,
        writers: &writers,
        base_read: &base_read,
        control,
    };
    let written = pass.write_all(&stagings)?;
    let mut results = finish_outputs(outputs, &inputs, &stagings, &written, &reads, control)?;
    if control.is_cancelled() {
        return Err(CoreError::Interrupted);
    }
    for staging in stagings {
        staging.commit(opts.overwrite)?;
    }
    let bytes_read =
        base_read.load(Ordering::Relaxed) + results.iter().map(|r| r.bytes_read).sum::<u64>();
    let seconds = started.elapsed().as_secs_f64();
    for result in &mut results {
        result.seconds = seconds;
    }
    Ok(EachReport {
        results,
        bytes_read,
        seconds,
    })
}

/// The options of merging each adapter alone, each checked (output paths named after
/// the adapters, see [`outputs`]).
fn checked_options(opts: &MultiMergeOptions, out_dir: &Path) -> Result<Vec<MergeOptions>> {
    let outs = outputs(opts, out_dir)?;
    let mut singles = Vec::with_capacity(outs.len());
    for (k, out) in outs.iter().enumerate() {
        let single = opts.single(k, out.clone());
        check_options(&single, &opts.adapters)?;
        singles.push(single);
    }
    Ok(singles)
}

/// The targets, shard plans and initial report of each output (adapter `k` alone).
fn plan_outputs<'a>(
    singles: Vec<MergeOptions>,
    inputs: &Inputs,
    adapters: &'a [Adapter],
) -> Result<Vec<Output<'a>>> {
    let mut outputs = Vec::with_capacity(adapters.len());
    for (k, single) in singles.into_iter().enumerate() {
        let targets = resolve_targets(inputs, &adapters[k..k + 1], &[1.0])?;
        let mut report = new_report(&single, inputs, &targets);
        let plans = plan_shards(&single, inputs, &targets, &mut report)?;
        outputs.push(Output {
            opts: single,
            targets,
            plans,
            report,
        });
    }
    Ok(outputs)
}

/// Completes each output's report and, for a folder base, its folder (each staged in
/// `stagings`, `written` bytes of safetensors files, `reads` bytes read).
fn finish_outputs(
    outputs: Vec<Output<'_>>,
    inputs: &Inputs,
    stagings: &[TempPath],
    written: &[u64],
    reads: &[AtomicU64],
    control: &Control,
) -> Result<Vec<MergeReport>> {
    let mut reports = Vec::with_capacity(outputs.len());
    for (k, mut o) in outputs.into_iter().enumerate() {
        o.report.bytes_written = written[k];
        o.report.shards = inputs.shards.iter().map(|s| rel_string(&s.rel)).collect();
        if inputs.is_dir && !control.is_cancelled() {
            finish_folder(
                &o.opts,
                inputs,
                &o.targets,
                &o.plans,
                stagings[k].path(),
                &mut o.report,
            )?;
        }
        o.report.bytes_read = reads[k].load(Ordering::Relaxed);
        reports.push(o.report);
    }
    Ok(reports)
}

/// A piece of the pass: elements `e0 .. e1` of base tensor `t` (whole rows of 2-D
/// tensors), or, for output `k`, elements of its added tensor `t` (an index into its
/// plan's outputs past the base tensors).
enum Piece {
    Base {
        t: usize,
        e0: u64,
        e1: u64,
    },
    Added {
        k: usize,
        t: usize,
        e0: u64,
        e1: u64,
    },
}

struct Pass<'a> {
    inputs: &'a Inputs,
    outputs: &'a [Output<'a>],
    writers: &'a [Writer<'a>],
    base_read: &'a AtomicU64,
    control: &'a Control,
}

impl Pass<'_> {
    /// Writes every shard of every output into its staging output; returns each
    /// output's bytes of safetensors files.
    fn write_all(&self, stagings: &[TempPath]) -> Result<Vec<u64>> {
        let mut written = vec![0u64; self.outputs.len()];
        for s in 0..self.inputs.shards.len() {
            if self.control.is_cancelled() {
                return Err(CoreError::Interrupted);
            }
            let staged: Vec<&Path> = stagings.iter().map(|t| t.path()).collect();
            for (k, n) in self.write_shard(s, &staged)?.into_iter().enumerate() {
                written[k] += n;
            }
        }
        Ok(written)
    }

    /// Writes shard `s` of every output; returns each output file's size.
    fn write_shard(&self, s: usize, staged: &[&Path]) -> Result<Vec<u64>> {
        let shard = &self.inputs.shards[s];
        let mut files: Vec<(File, PathBuf, u64)> = Vec::with_capacity(self.outputs.len());
        for (o, staging) in self.outputs.iter().zip(staged) {
            files.push(open_output(
                shard,
                &o.plans[s],
                staging,
                self.inputs.is_dir,
            )?);
        }
        let tile = self.writers[0].opts.tile_elems;
        let tile = if tile == 0 {
            super::DEFAULT_TILE_ELEMS as u64
        } else {
            tile as u64
        };
        let mut pieces = Vec::new();
        for (t, info) in shard.header.tensors.iter().enumerate() {
            let numel = info.numel();
            let step = match info.shape.as_slice() {
                [_, cols] if *cols > 0 => (tile / cols).max(1) * cols,
                _ => tile,
            };
            let mut e0 = 0;
            while e0 < numel {
                let e1 = (e0 + step).min(numel);
                pieces.push(Piece::Base { t, e0, e1 });
                e0 = e1;
            }
        }
        let own = shard.header.tensors.len();
        for (k, o) in self.outputs.iter().enumerate() {
            for t in own..o.plans[s].outs.len() {
                if let Action::Add(x) = o.plans[s].outs[t].action {
                    let numel = o.targets.extras[x].info.numel();
                    let mut e0 = 0;
                    while e0 < numel {
                        let e1 = (e0 + tile).min(numel);
                        pieces.push(Piece::Added { k, t, e0, e1 });
                        e0 = e1;
                    }
                }
            }
        }
        let targets: Vec<Target<'_>> = files
            .iter()
            .map(|(file, path, data)| Target {
                file,
                path,
                data: *data,
            })
            .collect();
        parallel::install(|| {
            pieces
                .par_iter()
                .try_for_each_init(Scratch::default, |scratch, piece| {
                    self.piece(s, piece, &targets, scratch)
                })
        })?;
        let mut sizes = Vec::with_capacity(files.len());
        for ((file, path, data), o) in files.iter().zip(self.outputs) {
            if o.opts.fsync {
                file.sync_all().map_err(|e| CoreError::io(path, e))?;
            }
            sizes.push(data + o.plans[s].data_len);
        }
        Ok(sizes)
    }

    fn piece(
        &self,
        s: usize,
        piece: &Piece,
        targets: &[Target<'_>],
        scratch: &mut Scratch,
    ) -> Result<()> {
        if self.control.is_cancelled() {
            return Err(CoreError::Interrupted);
        }
        let shard = &self.inputs.shards[s];
        match *piece {
            Piece::Added { k, t, e0, e1 } => {
                let out = &self.outputs[k].plans[s].outs[t];
                self.writers[k].emit(shard, out, &[], e0..e1, &targets[k], scratch)
            }
            Piece::Base { t, e0, e1 } => {
                let info = &shard.header.tensors[t];
                let n = (e1 - e0) as usize;
                let size = (info.dtype.bits() / 8) as usize;
                let mut input = std::mem::take(&mut scratch.input);
                let buf = grow(&mut input, n * size);
                let result = shard
                    .read_elems(t, e0, buf, &mut scratch.raw)
                    .and_then(|read| {
                        self.base_read.fetch_add(read, Ordering::Relaxed);
                        for (k, o) in self.outputs.iter().enumerate() {
                            let out = &o.plans[s].outs[t];
                            self.writers[k].emit(shard, out, buf, e0..e1, &targets[k], scratch)?;
                        }
                        Ok(())
                    });
                scratch.input = input;
                result
            }
        }
    }
}
