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
//! [`merge`] runs in named steps, one file each: check the options and open the inputs
//! (here; `folder.rs` decides what a model folder holds), resolve the targets
//! (`targets.rs`), plan each shard (`plan.rs`), write each shard and finish the folder
//! (`write.rs`, with the fused row kernel in `rows.rs`).
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

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::adapter::Adapter;
pub use crate::control::Control;
use crate::error::{CoreError, Result};
use crate::io::atomic::{self, TempPath};
use crate::io::fs::check_disjoint;
use crate::io::pio::read_exact_at;
use crate::safetensors::{Dtype, Header, TensorInfo};

mod each;
mod folder;
mod plan;
mod quant;
mod rows;
mod targets;
mod write;

pub use each::{EachReport, merge_each};
use folder::{Selection, check_index, select_weights};
use plan::plan_shard;
use rows::{Prepared, prepare_factors};
use targets::resolve_targets;
use write::{Writer, finish_folder};

/// Default number of elements per tile.
pub const DEFAULT_TILE_ELEMS: usize = 1 << 18;

/// Name of the Hugging Face shard index.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Name of a single-file Hugging Face checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";

/// The kind of output a merge writes (in the folder's [`atomic::OUTPUT_MARKER`]).
pub const OUTPUT_KIND: &str = "merge";

/// Copies of more than this many bytes are split, so that progress and cancellation
/// stay responsive.
const COPY_CHUNK: u64 = 64 << 20;

/// What to merge, where, and how.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// A `.safetensors` file, or a model folder (see the module docs).
    pub base: PathBuf,
    /// The adapter directory.
    pub adapter: PathBuf,
    /// The output: a file for a file base, a folder for a folder base.
    pub out: PathBuf,
    /// `None` keeps every tensor's dtype; `Some(BF16 | F16 | F32)` casts every
    /// floating tensor (F16, BF16, F32, F64) of the output to it.
    pub dtype: Option<Dtype>,
    /// Replace an existing output (a folder only if it is empty or an earlier merge
    /// output: see [`atomic::check_output`]).
    pub overwrite: bool,
    /// Elements per tile (0: [`DEFAULT_TILE_ELEMS`]); results do not depend on it.
    pub tile_elems: usize,
    /// `fsync` every output file before renaming it into place.
    pub fsync: bool,
}

impl MergeOptions {
    /// Options with the defaults: keep dtypes, no overwrite, default tiles, fsync.
    pub fn new(
        base: impl Into<PathBuf>,
        adapter: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> Self {
        MergeOptions {
            base: base.into(),
            adapter: adapter.into(),
            out: out.into(),
            dtype: None,
            overwrite: false,
            tile_elems: 0,
            fsync: true,
        }
    }

    fn tile(&self) -> u64 {
        if self.tile_elems == 0 {
            DEFAULT_TILE_ELEMS as u64
        } else {
            self.tile_elems as u64
        }
    }
}

/// A merge of several adapters into one base: [`merge_each`] (one output per adapter)
/// or [`merge_weighted`] (one output, a weighted sum of their updates).
#[derive(Clone, Debug)]
pub struct MultiMergeOptions {
    /// A `.safetensors` file, or a model folder.
    pub base: PathBuf,
    /// The adapter directories.
    pub adapters: Vec<PathBuf>,
    /// As in [`MergeOptions`].
    pub dtype: Option<Dtype>,
    /// As in [`MergeOptions`], for every output.
    pub overwrite: bool,
    /// As in [`MergeOptions`].
    pub tile_elems: usize,
    /// As in [`MergeOptions`].
    pub fsync: bool,
}

impl MultiMergeOptions {
    /// Options with the defaults of [`MergeOptions::new`].
    pub fn new(base: impl Into<PathBuf>, adapters: Vec<PathBuf>) -> Self {
        MultiMergeOptions {
            base: base.into(),
            adapters,
            dtype: None,
            overwrite: false,
            tile_elems: 0,
            fsync: true,
        }
    }

    /// The options of merging adapter `k` alone into `out`.
    fn single(&self, k: usize, out: PathBuf) -> MergeOptions {
        MergeOptions {
            base: self.base.clone(),
            adapter: self.adapters[k].clone(),
            out,
            dtype: self.dtype,
            overwrite: self.overwrite,
            tile_elems: self.tile_elems,
            fsync: self.fsync,
        }
    }
}

/// One adapted module and the base tensor it was merged into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedTensor {
    /// The adapter's module name.
    pub module: String,
    /// The base tensor name.
    pub tensor: String,
    /// The file (relative to the base folder, or the base file name) holding it.
    pub file: String,
}

/// What a merge did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// The output path.
    pub out: PathBuf,
    /// The merged tensors, in adapter module order (each module exactly once).
    pub merged: Vec<MergedTensor>,
    /// Base tensors replaced by the adapter's `modules_to_save` tensors.
    pub replaced: Vec<String>,
    /// Tensors the base lacks, written from the adapter (its `task.new_tensors`, e.g.
    /// a trained classification head), in the output's last safetensors file.
    pub added: Vec<String>,
    /// Keys set in the output's `config.json` (the adapter's `task.config`, and
    /// `dtype` / `torch_dtype` when the output dtype changed).
    pub config_keys: Vec<String>,
    /// Tensors whose dtype was changed (besides merged and replaced ones).
    pub cast: usize,
    /// Tensors copied byte for byte.
    pub copied: usize,
    /// Tensors in the output.
    pub tensors: usize,
    /// The safetensors files written (relative names).
    pub shards: Vec<String>,
    /// Other files copied from the base folder (relative names).
    pub other_files: Vec<String>,
    /// Weights files of the base folder that transformers does not load from it, left
    /// out of the output (relative names).
    pub left_out: Vec<String>,
    /// Things the caller should tell the user (e.g. why files were left out).
    pub warnings: Vec<String>,
    /// Bytes of all safetensors files written.
    pub bytes_written: u64,
    /// Size in bytes of the largest base tensor.
    pub largest_tensor_bytes: u64,
    /// Bytes of tensor data read from the inputs (base and adapters).
    pub bytes_read: u64,
    /// Quantized base weights (bitsandbytes 8-bit / 4-bit) written dequantised.
    pub dequantized: usize,
}

/// An input safetensors file. `header` is the merge's view of it: a quantized
/// weight is a float32 tensor of its real shape, its state tensors are gone
/// (`quant.rs`).
struct Shard {
    rel: PathBuf,
    path: PathBuf,
    file: File,
    header: Header,
    quant: quant::Quantized,
}

impl Shard {
    /// Fills `buf` with elements `e0 ..` of tensor `t` (as many as fit), in the view's
    /// dtype: raw bytes, or float32 dequantised from a quantized weight. Returns the
    /// bytes read from the file.
    fn read_elems(&self, t: usize, e0: u64, buf: &mut [u8], raw: &mut Vec<u8>) -> Result<u64> {
        let info = &self.header.tensors[t];
        let size = info.dtype.bits() / 8;
        match self.quant.sources.get(&t) {
            Some(source) => source.read(
                &self.file,
                &self.path,
                e0,
                buf.len() / size as usize,
                raw,
                buf,
            ),
            None => read_exact_at(
                &self.file,
                buf,
                self.header.data_start() + info.begin + e0 * size,
            )
            .map(|()| buf.len() as u64)
            .map_err(|e| CoreError::io(&self.path, e)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Copy,
    Cast,
    Merge(usize),
    /// Written from the adapter's extra tensor `k` over a base tensor.
    Replace(usize),
    /// Written from the adapter's extra tensor `k`; the base has no such tensor.
    Add(usize),
}

struct OutTensor {
    /// The base tensor (index in the shard's header); unused for [`Action::Add`].
    src: usize,
    dtype: Dtype,
    begin: u64,
    action: Action,
}

enum Work {
    Copy { src: u64, dst: u64, len: u64 },
    Tile { t: usize, e0: u64, e1: u64 },
}

/// The output of one shard: its header, the size of its data, where each tensor goes
/// and what happens to it, and the independent pieces of work that write it.
struct Plan {
    header: Vec<u8>,
    data_len: u64,
    outs: Vec<OutTensor>,
    work: Vec<Work>,
}

/// The opened base of a merge.
struct Inputs {
    is_dir: bool,
    shards: Vec<Shard>,
    /// The shard index (path and parsed value), when the base folder uses one.
    index: Option<(PathBuf, Value)>,
    /// Weights files of the folder that are not merged and not copied.
    left_out: Vec<PathBuf>,
    warning: Option<String>,
}

/// One term of a merged weight: the factors `prepared` (an index into the prepared
/// modules of all adapters, in order) times `coef`.
#[derive(Clone, Copy, Debug)]
struct Term {
    prepared: usize,
    coef: f32,
}

/// A `modules_to_save` tensor of adapter `adapter` (an index into the adapters).
#[derive(Clone, Copy)]
struct Extra<'a> {
    adapter: usize,
    info: &'a TensorInfo,
}

/// What happens to the base tensors that the adapters touch.
struct Targets<'a> {
    actions: HashMap<(usize, usize), Action>,
    /// The terms of each merged weight ([`Action::Merge`] indexes them).
    terms: Vec<Vec<Term>>,
    merged: Vec<MergedTensor>,
    replaced: Vec<String>,
    extras: Vec<Extra<'a>>,
    /// Extras (indices into `extras`) that the base lacks, appended to the last shard.
    added: Vec<usize>,
    /// Keys to set in the output's `config.json` (the adapters' `task.config`).
    config: Map<String, Value>,
}

/// Merges the adapter into the base checkpoint (see the module docs).
///
/// Every adapted module must match exactly one base tensor (`<name>.weight`, else a
/// unique dotted-suffix match), and so must every `modules_to_save` tensor unless the
/// adapter's `task` lists it as new (it is then added); a missing or ambiguous target, a shape or dtype
/// mismatch, a corrupt file, an unsafe shard name, an output that overlaps an input,
/// or an existing output without `overwrite` is an error, and nothing is written.
pub fn merge(opts: &MergeOptions, control: &Control) -> Result<MergeReport> {
    check_options(opts, std::slice::from_ref(&opts.adapter))?;
    let adapters = [Adapter::open(&opts.adapter)?];
    let inputs = open_inputs(&opts.base)?;
    merge_into(opts, &inputs, &adapters, &[1.0], control)
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
    merge_into(&single, &inputs, &adapters, &coefs, control)
}

/// Opens every adapter of `opts` (at least one) and the base.
fn open_all(opts: &MultiMergeOptions) -> Result<(Vec<Adapter>, Inputs)> {
    if opts.adapters.is_empty() {
        return Err(CoreError::InvalidArgument("no adapter to merge".into()));
    }
    let adapters = opts
        .adapters
        .iter()
        .map(|p| Adapter::open(p))
        .collect::<Result<Vec<_>>>()?;
    Ok((adapters, open_inputs(&opts.base)?))
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

// ------------------------------------------------------------------ check the options

fn check_options(opts: &MergeOptions, adapters: &[PathBuf]) -> Result<()> {
    fs::metadata(&opts.base).map_err(|e| CoreError::io(&opts.base, e))?;
    check_disjoint(&opts.out, &opts.base, "base")?;
    for adapter in adapters {
        check_disjoint(&opts.out, adapter, "adapter")?;
    }
    let folder = opts.base.is_dir();
    atomic::check_output(&opts.out, opts.overwrite, folder.then_some(OUTPUT_KIND))?;
    match opts.dtype {
        Some(dt) if !matches!(dt, Dtype::BF16 | Dtype::F16 | Dtype::F32) => Err(CoreError::Dtype(
            format!("output dtype {dt} is not one of bf16, f16, f32"),
        )),
        _ => Ok(()),
    }
}

// ------------------------------------------------------------------ open the inputs

fn open_inputs(base: &Path) -> Result<Inputs> {
    let is_dir = base.is_dir();
    let selection = if is_dir {
        select_weights(base)?
    } else {
        let name = base
            .file_name()
            .map_or_else(|| PathBuf::from(SINGLE_NAME), PathBuf::from);
        Selection {
            files: vec![name],
            ..Default::default()
        }
    };
    let mut shards = Vec::with_capacity(selection.files.len());
    for rel in selection.files {
        let path = if is_dir {
            base.join(&rel)
        } else {
            base.to_path_buf()
        };
        let (file, header) = Header::read(&path)?;
        let (header, quant) = quant::dequantized_view(&file, &header)?;
        shards.push(Shard {
            rel,
            path,
            file,
            header,
            quant,
        });
    }
    if let Some((index_path, value)) = &selection.index {
        check_index(&shards, index_path, value)?;
    }
    Ok(Inputs {
        is_dir,
        shards,
        index: selection.index,
        left_out: selection.left_out,
        warning: selection.warning,
    })
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
