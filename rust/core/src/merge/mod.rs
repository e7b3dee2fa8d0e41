//! Streaming merge of a Uni-LoRA adapter into a safetensors checkpoint.
//!
//! For every adapted module the base weight `W` becomes `W + (alpha / r) * B @ A`
//! (`(B @ A)^T` for GPT-2 style `conv1d` weights), computed in float32 and rounded once
//! to the output dtype, to nearest, ties to even. Element `(i, j)` is computed as
//!
//! ```text
//! acc = 0.0
//! for k in 0..r:  acc = acc + B[i, k] * A[k, j]      (float32, each operation rounded)
//! W'[i, j] = round(float32(W[i, j]) + s * acc)       (s = float32(alpha / r))
//! ```
//!
//! without fused multiply-adds, so the result is the same on every machine and for
//! every thread count and tile size.
//!
//! A model folder means what transformers loads from it (`folder.rs`): the file
//! `config.json` names in `transformers_weights`, else `model.safetensors`, else the
//! shard index `model.safetensors.index.json` and its shards. Other weights files in
//! the folder are left out of the output (with a warning in the report), so that the
//! output never holds unmerged weights that a loader could pick instead.
//!
//! [`merge`] runs in named steps, one file each, and this module holds only their flow:
//! check the options and open the inputs (`inputs.rs`; `folder.rs` decides what a model
//! folder holds, `quant.rs` dequantises), resolve the targets (`targets.rs`), plan each
//! shard (`plan.rs`), write each shard (`write.rs`, with the fused row kernel in
//! `rows.rs`) and finish the folder (`finish.rs`). The options are in `options.rs`,
//! the reports in `report.rs`, the data passed between the steps in `types.rs`.
//!
//! Several adapters: [`merge_weighted`] writes one checkpoint with `W + sum_i w_i dW_i`
//! (the same steps, with several terms per weight), and [`merge_each`] (`each.rs`)
//! writes one merged checkpoint per adapter in one pass over the base: each tile of a
//! base tensor is read once and written to every output.
//!
//! The work is streamed: each output file is written to a temporary sibling, header
//! first (the input header byte for byte when no dtype changes), then tensors at their
//! offsets. Untouched tensors are copied as raw bytes (in the kernel where possible);
//! adapted, replaced and cast tensors are processed in independent tiles of rows, in
//! parallel, each tile read with one positional read and written with one positional
//! write. Neither `B @ A` nor a whole tensor or shard is ever held in memory. Output
//! appears only when complete (renamed into place, after `fsync`); the inputs are
//! opened read-only and never modified.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::adapter::Adapter;
pub use crate::control::Control;
use crate::error::{CoreError, Result};
use crate::io::atomic::TempPath;

mod each;
mod finish;
mod folder;
mod inputs;
mod options;
mod plan;
mod quant;
mod report;
mod rows;
mod targets;
mod types;
mod write;

pub use each::merge_each;
pub use options::{DEFAULT_TILE_ELEMS, MergeOptions, MultiMergeOptions};
pub use report::{EachReport, MergeReport, MergedTensor};

use finish::finish_folder;
use inputs::{Inputs, check_options, open_all, open_inputs};
use plan::plan_shard;
use rows::{Prepared, prepare_factors};
use targets::resolve_targets;
use types::{Plan, Targets};
use write::Writer;

/// Name of the Hugging Face shard index.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Name of a single-file Hugging Face checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";

/// The kind of output a merge writes (in the folder's
/// [`OUTPUT_MARKER`](crate::io::atomic::OUTPUT_MARKER)).
pub const OUTPUT_KIND: &str = "merge";

/// Copies of more than this many bytes are split, so that progress and cancellation
/// stay responsive.
const COPY_CHUNK: u64 = 64 << 20;

/// Merges the adapter into the base checkpoint (see the module docs).
///
/// Every adapted module must match exactly one base tensor (`<name>.weight`, else a
/// unique dotted-suffix match), and so must every `modules_to_save` tensor unless the
/// adapter's `task` lists it as new (it is then added); a missing or ambiguous target, a shape or dtype
/// mismatch, a corrupt file, an unsafe shard name, an output that overlaps an input,
/// or an existing output without `overwrite` is an error, and nothing is written.
pub fn merge(opts: &MergeOptions, control: &Control) -> Result<MergeReport> {
    let started = Instant::now();
    check_options(opts, std::slice::from_ref(&opts.adapter))?;
    let adapters = [Adapter::open(&opts.adapter)?];
    let inputs = open_inputs(&opts.base)?;
    let mut report = merge_into(opts, &inputs, &adapters, &[1.0], control)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Merges several adapters into one checkpoint `out`: every adapted weight becomes
/// `W + sum_i w_i * (alpha_i / r_i) * B_i @ A_i` (a linear merge of the updates, as
/// mergekit's linear method does for whole weights, streaming). Element by element,
/// in float32 with each operation rounded and no fused multiply-add:
///
/// ```text
/// c_i = float32(w_i) * float32(alpha_i / r_i)
/// w = float32(W);  for i in adapter order: w = w + c_i * acc_i;  W' = round(w)
/// ```
///
/// (`acc_i` as in a single merge), so one adapter with weight 1 gives the bits of
/// [`merge`]. Adapters may adapt different modules. Their `modules_to_save` tensors
/// and task records must not overlap: a base tensor replaced, or a new tensor added,
/// by two adapters, or a `config.json` key two adapters set to different values, is an
/// error (a weighted merge does not average heads).
pub fn merge_weighted(
    opts: &MultiMergeOptions,
    weights: &[f64],
    out: &Path,
    control: &Control,
) -> Result<MergeReport> {
    let started = Instant::now();
    if weights.len() != opts.adapters.len() {
        return Err(CoreError::InvalidArgument(format!(
            "{} weights for {} adapters; give one weight per adapter",
            weights.len(),
            opts.adapters.len()
        )));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(CoreError::InvalidArgument(format!(
            "weights must be finite numbers, got {w}"
        )));
    }
    let single = opts.single(0, out.to_path_buf());
    check_options(&single, &opts.adapters)?;
    let (adapters, inputs) = open_all(opts)?;
    let coefs: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let mut report = merge_into(&single, &inputs, &adapters, &coefs, control)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The steps of a merge into one output, for one adapter (weight 1) or several.
fn merge_into(
    opts: &MergeOptions,
    inputs: &Inputs,
    adapters: &[Adapter],
    weights: &[f32],
    control: &Control,
) -> Result<MergeReport> {
    let targets = resolve_targets(inputs, adapters, weights)?;
    let mut report = new_report(opts, inputs, &targets);
    let plans = plan_shards(opts, inputs, &targets, &mut report)?;
    control.set_total(plans.iter().map(|p| p.data_len).sum());
    let prepared = prepare_all(adapters)?;
    let staging = stage(opts, inputs.is_dir)?;
    let read = AtomicU64::new(0);
    let writer = Writer {
        opts,
        adapters,
        extras: &targets.extras,
        terms: &terms_of(&targets, &prepared),
        control,
        read: &read,
    };
    for (shard, plan) in inputs.shards.iter().zip(&plans) {
        if control.is_cancelled() {
            return Err(CoreError::Interrupted);
        }
        report.bytes_written += writer.write_shard(shard, plan, staging.path(), inputs.is_dir)?;
        report.shards.push(rel_string(&shard.rel));
    }
    if inputs.is_dir && !control.is_cancelled() {
        finish_folder(opts, inputs, &targets, &plans, staging.path(), &mut report)?;
    }
    if control.is_cancelled() {
        return Err(CoreError::Interrupted);
    }
    report.bytes_read = read.load(Ordering::Relaxed);
    staging.commit(opts.overwrite)?;
    Ok(report)
}

/// The report of a merge before anything is written.
fn new_report(opts: &MergeOptions, inputs: &Inputs, targets: &Targets<'_>) -> MergeReport {
    MergeReport {
        out: opts.out.clone(),
        merged: targets.merged.clone(),
        replaced: targets.replaced.clone(),
        added: targets
            .added
            .iter()
            .map(|&k| targets.extras[k].info.name.clone())
            .collect(),
        left_out: inputs.left_out.iter().map(|p| rel_string(p)).collect(),
        warnings: inputs.warning.iter().cloned().collect(),
        ..Default::default()
    }
}

/// The plan of every shard (the added tensors go to the last one).
fn plan_shards(
    opts: &MergeOptions,
    inputs: &Inputs,
    targets: &Targets<'_>,
    report: &mut MergeReport,
) -> Result<Vec<Plan>> {
    let mut plans = Vec::with_capacity(inputs.shards.len());
    let last = inputs.shards.len() - 1;
    for (s, shard) in inputs.shards.iter().enumerate() {
        let added: &[usize] = if s == last { &targets.added } else { &[] };
        let new = added
            .iter()
            .map(|&k| (k, targets.extras[k].info))
            .collect::<Vec<_>>();
        plans.push(plan_shard(s, shard, &targets.actions, &new, opts, report)?);
    }
    Ok(plans)
}

/// The prepared factors of every module of every adapter, in order.
fn prepare_all(adapters: &[Adapter]) -> Result<Vec<Prepared>> {
    let mut all = Vec::new();
    for adapter in adapters {
        all.extend(prepare_factors(adapter)?);
    }
    Ok(all)
}

/// The terms of each merged weight with their factors.
fn terms_of<'p>(targets: &Targets<'_>, prepared: &'p [Prepared]) -> Vec<Vec<rows::Term<'p>>> {
    targets
        .terms
        .iter()
        .map(|ts| ts.iter().map(|t| (&prepared[t.prepared], t.coef)).collect())
        .collect()
}

/// The temporary output next to `opts.out` (its parent folder created).
fn stage(opts: &MergeOptions, is_dir: bool) -> Result<TempPath> {
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    }
    if is_dir {
        TempPath::new_folder(&opts.out, OUTPUT_KIND)
    } else {
        TempPath::new(&opts.out, "tmp")
    }
}

fn rel_string(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

/// [`merge`] with a progress bar on stderr (bytes of tensor data written), for Rust
/// programs; the Python CLI draws its own bar from [`Control::progress`]. The bar is
/// hidden when stderr is not a terminal; the report's warnings are printed under it.
/// Needs the `progress` feature.
#[cfg(feature = "progress")]
pub fn merge_with_progress_bar(opts: &MergeOptions) -> Result<MergeReport> {
    use indicatif::{ProgressBar, ProgressStyle};

    let control = Control::new();
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("merging");
    let result = crate::control::run_watched(
        || merge(opts, &control),
        |_| {
            let (done, total) = control.progress();
            bar.set_length(total);
            bar.set_position(done);
        },
        crate::control::wait_a_poll,
    );
    match &result {
        Ok(report) => {
            for warning in &report.warnings {
                bar.println(format!("warning: {warning}"));
            }
            bar.finish_with_message("merged");
        }
        Err(_) => bar.abandon_with_message("failed"),
    }
    result
}
