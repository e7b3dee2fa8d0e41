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

use serde_json::Value;

use crate::adapter::Adapter;
pub use crate::control::Control;
use crate::error::{CoreError, Result};
use crate::fsutil::{self, TempPath};
use crate::safetensors::{Dtype, Header, TensorInfo};

mod folder;
mod plan;
mod rows;
mod targets;
mod write;

use folder::{Selection, check_index, select_weights};
use plan::plan_shard;
use rows::prepare_factors;
use targets::resolve_targets;
use write::{Writer, finish_folder};

/// Default number of elements per tile.
pub const DEFAULT_TILE_ELEMS: usize = 1 << 18;

/// Name of the Hugging Face shard index.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Name of a single-file Hugging Face checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";

/// The kind of output a merge writes (in the folder's [`fsutil::OUTPUT_MARKER`]).
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
    /// output: see [`fsutil::check_output`]).
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
}

/// An input safetensors file.
struct Shard {
    rel: PathBuf,
    path: PathBuf,
    file: File,
    header: Header,
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

/// The opened inputs of a merge.
struct Inputs {
    adapter: Adapter,
    is_dir: bool,
    shards: Vec<Shard>,
    /// The shard index (path and parsed value), when the base folder uses one.
    index: Option<(PathBuf, Value)>,
    /// Weights files of the folder that are not merged and not copied.
    left_out: Vec<PathBuf>,
    warning: Option<String>,
}

/// What happens to the base tensors that the adapter touches.
struct Targets<'a> {
    actions: HashMap<(usize, usize), Action>,
    merged: Vec<MergedTensor>,
    replaced: Vec<String>,
    extras: Vec<&'a TensorInfo>,
    /// Extras (indices into `extras`) that the base lacks, appended to the last shard.
    added: Vec<usize>,
}

/// Merges the adapter into the base checkpoint (see the module docs).
///
/// Every adapted module must match exactly one base tensor (`<name>.weight`, else a
/// unique dotted-suffix match), and so must every `modules_to_save` tensor unless the
/// adapter's `task` lists it as new (it is then added); a missing or ambiguous target, a shape or dtype
/// mismatch, a corrupt file, an unsafe shard name, an output that overlaps an input,
/// or an existing output without `overwrite` is an error, and nothing is written.
pub fn merge(opts: &MergeOptions, control: &Control) -> Result<MergeReport> {
    check_options(opts)?;
    let inputs = open_inputs(opts)?;
    let targets = resolve_targets(&inputs)?;
    let mut report = MergeReport {
        out: opts.out.clone(),
        merged: targets.merged.clone(),
        replaced: targets.replaced.clone(),
        added: targets
            .added
            .iter()
            .map(|&k| targets.extras[k].name.clone())
            .collect(),
        left_out: inputs.left_out.iter().map(|p| rel_string(p)).collect(),
        warnings: inputs.warning.iter().cloned().collect(),
        ..Default::default()
    };
    let mut plans = Vec::with_capacity(inputs.shards.len());
    let last = inputs.shards.len() - 1;
    for (s, shard) in inputs.shards.iter().enumerate() {
        let added: &[usize] = if s == last { &targets.added } else { &[] };
        let new = added
            .iter()
            .map(|&k| (k, targets.extras[k]))
            .collect::<Vec<_>>();
        plans.push(plan_shard(
            s,
            shard,
            &targets.actions,
            &new,
            opts,
            &mut report,
        )?);
    }
    control.set_total(plans.iter().map(|p| p.data_len).sum());
    let prepared = prepare_factors(&inputs.adapter)?;
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    }
    let staging = if inputs.is_dir {
        TempPath::new_folder(&opts.out, OUTPUT_KIND)?
    } else {
        TempPath::new(&opts.out, "tmp")?
    };
    let writer = Writer {
        opts,
        adapter: &inputs.adapter,
        extras: &targets.extras,
        prepared: &prepared,
        scale: inputs.adapter.config.scaling(),
        control,
    };
    for (shard, plan) in inputs.shards.iter().zip(&plans) {
        if control.is_cancelled() {
            return Err(CoreError::Interrupted);
        }
        report.bytes_written += writer.write_shard(shard, plan, staging.path(), inputs.is_dir)?;
        report.shards.push(rel_string(&shard.rel));
    }
    if inputs.is_dir && !control.is_cancelled() {
        finish_folder(opts, &inputs, &targets, &plans, staging.path(), &mut report)?;
    }
    if control.is_cancelled() {
        return Err(CoreError::Interrupted);
    }
    staging.commit(opts.overwrite)?;
    Ok(report)
}

// ------------------------------------------------------------------ check the options

fn check_options(opts: &MergeOptions) -> Result<()> {
    fs::metadata(&opts.base).map_err(|e| CoreError::io(&opts.base, e))?;
    fsutil::check_disjoint(&opts.out, &opts.base, "base")?;
    fsutil::check_disjoint(&opts.out, &opts.adapter, "adapter")?;
    let folder = opts.base.is_dir();
    fsutil::check_output(&opts.out, opts.overwrite, folder.then_some(OUTPUT_KIND))?;
    match opts.dtype {
        Some(dt) if !matches!(dt, Dtype::BF16 | Dtype::F16 | Dtype::F32) => Err(CoreError::Dtype(
            format!("output dtype {dt} is not one of bf16, f16, f32"),
        )),
        _ => Ok(()),
    }
}

// ------------------------------------------------------------------ open the inputs

fn open_inputs(opts: &MergeOptions) -> Result<Inputs> {
    let adapter = Adapter::open(&opts.adapter)?;
    let is_dir = opts.base.is_dir();
    let selection = if is_dir {
        select_weights(&opts.base)?
    } else {
        let name = opts
            .base
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
            opts.base.join(&rel)
        } else {
            opts.base.clone()
        };
        let (file, header) = Header::read(&path)?;
        shards.push(Shard {
            rel,
            path,
            file,
            header,
        });
    }
    if let Some((index_path, value)) = &selection.index {
        check_index(&shards, index_path, value)?;
    }
    Ok(Inputs {
        adapter,
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
