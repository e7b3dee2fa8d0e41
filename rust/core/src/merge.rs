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
//! A model folder means what transformers loads from it ([`select_weights`]): the file
//! `config.json` names in `transformers_weights`, else `model.safetensors`, else the
//! shard index `model.safetensors.index.json` and its shards. Other weights files in
//! the folder are left out of the output (with a warning in the report), so that the
//! output never holds unmerged weights that a loader could pick instead.
//!
//! [`merge`] runs in named steps: check the options, open the inputs, resolve the
//! targets, plan each shard, write each shard, finish the folder. The work is
//! streamed: each output file is written to a temporary sibling, header first (the
//! input header byte for byte when no dtype changes), then tensors at their offsets.
//! Untouched tensors are copied as raw bytes (in the kernel where possible); adapted,
//! replaced and cast tensors are processed in independent tiles of rows, in parallel,
//! each tile read with one positional read and written with one positional write.
//! Neither `B @ A` nor a whole tensor or shard is ever held in memory. Output appears
//! only when complete (renamed into place, after `fsync`); the inputs are opened
//! read-only and never modified.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::adapter::{Adapter, AdapterModule, ModuleKind};
pub use crate::control::Control;
use crate::convert;
use crate::error::{CoreError, Result};
use crate::fsutil::{self, TempPath};
use crate::parallel;
use crate::safetensors::{
    Dtype, Header, TensorInfo, build_header, byte_size, read_exact_at, write_all_at,
};

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
    /// A `.safetensors` file, or a model folder (see [`select_weights`]).
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
    Replace(usize),
}

struct OutTensor {
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
}

/// Merges the adapter into the base checkpoint (see the module docs).
///
/// Every adapted module must match exactly one base tensor (`<name>.weight`, else a
/// unique dotted-suffix match); a missing or ambiguous target, a shape or dtype
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
        left_out: inputs.left_out.iter().map(|p| rel_string(p)).collect(),
        warnings: inputs.warning.iter().cloned().collect(),
        ..Default::default()
    };
    let mut plans = Vec::with_capacity(inputs.shards.len());
    for (s, shard) in inputs.shards.iter().enumerate() {
        plans.push(plan_shard(s, shard, &targets.actions, opts, &mut report)?);
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
        finish_folder(opts, &inputs, &plans, staging.path(), &mut report)?;
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

/// The weights of a model folder: which files to merge, the shard index if any, and
/// the other weights files (left out of the output).
#[derive(Default)]
struct Selection {
    files: Vec<PathBuf>,
    index: Option<(PathBuf, Value)>,
    left_out: Vec<PathBuf>,
    warning: Option<String>,
}

/// Where a folder's weights are, before reading them.
enum Chosen {
    Single(PathBuf),
    Index(PathBuf),
    AllFiles,
}

/// Chooses the weights of the model folder `base` the way transformers (5.x,
/// `_get_resolved_checkpoint_files`) does for a local folder: the file that
/// `config.json` names in `transformers_weights`; else `model.safetensors`; else
/// `model.safetensors.index.json`. Beyond transformers: a folder with one other
/// `*.safetensors.index.json` uses it, and a folder with neither an index nor
/// `model.safetensors` merges all its `.safetensors` files. Every other top-level
/// weights file is left out, with a warning.
fn select_weights(base: &Path) -> Result<Selection> {
    let (chosen, why) = choose_weights(base)?;
    let mut selection = Selection::default();
    match chosen {
        Chosen::Single(rel) => selection.files.push(rel),
        Chosen::Index(rel) => {
            let path = base.join(&rel);
            let (files, value) = read_index(&path)?;
            selection.files = files;
            selection.index = Some((path, value));
        }
        Chosen::AllFiles => {
            selection.files = weights_files(base, ".safetensors")?;
            if selection.files.is_empty() {
                return Err(CoreError::InvalidArgument(format!(
                    "{}: no .safetensors file and no {INDEX_NAME} in this folder",
                    base.display()
                )));
            }
        }
    }
    let index_rel = selection
        .index
        .as_ref()
        .map(|(p, _)| p.strip_prefix(base).unwrap_or(p));
    let mut left_out = weights_files(base, ".safetensors")?;
    left_out.extend(weights_files(base, ".safetensors.index.json")?);
    left_out.retain(|p| !selection.files.contains(p) && Some(p.as_path()) != index_rel);
    left_out.sort();
    if !left_out.is_empty() {
        let names: Vec<String> = left_out.iter().map(|p| rel_string(p)).collect();
        selection.warning = Some(format!(
            "{}: {why}, so that is what was merged; {} not copied to the output, so that no \
             unmerged weights remain there",
            base.display(),
            names.join(", ")
        ));
    }
    selection.left_out = left_out;
    Ok(selection)
}

fn choose_weights(base: &Path) -> Result<(Chosen, String)> {
    if let Some(name) = explicit_weights(base)? {
        let config = base.join("config.json");
        let rel = fsutil::check_relative_name(&name, &config)?;
        let why =
            format!("transformers loads {name} (config.json names it in \"transformers_weights\")");
        return if name.ends_with(".safetensors.index.json") {
            Ok((Chosen::Index(rel), why))
        } else if name.ends_with(".safetensors") {
            Ok((Chosen::Single(rel), why))
        } else {
            Err(CoreError::format(
                config,
                format!(
                    "\"transformers_weights\": {name:?} is neither a .safetensors file nor a \
                     .safetensors.index.json index"
                ),
            ))
        };
    }
    if base.join(SINGLE_NAME).is_file() {
        let why =
            format!("transformers loads {SINGLE_NAME} from this folder (before any shard index)");
        return Ok((Chosen::Single(SINGLE_NAME.into()), why));
    }
    if base.join(INDEX_NAME).is_file() {
        let why = format!("transformers loads {INDEX_NAME} and the shards it names");
        return Ok((Chosen::Index(INDEX_NAME.into()), why));
    }
    let mut indexes = weights_files(base, ".safetensors.index.json")?;
    if indexes.len() > 1 {
        let names: Vec<String> = indexes.iter().map(|p| rel_string(p)).collect();
        return Err(CoreError::InvalidArgument(format!(
            "{}: several shard indexes ({}); keep one",
            base.display(),
            names.join(", ")
        )));
    }
    match indexes.pop() {
        Some(rel) => {
            let why = format!("the folder's shard index is {}", rel_string(&rel));
            Ok((Chosen::Index(rel), why))
        }
        None => Ok((Chosen::AllFiles, String::new())),
    }
}

/// The `transformers_weights` entry of the folder's `config.json`, if it has one (a
/// missing or unreadable `config.json` names nothing).
fn explicit_weights(base: &Path) -> Result<Option<String>> {
    let path = base.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let Ok(value) = serde_json::from_slice::<Value>(&fsutil::read_regular(&path)?) else {
        return Ok(None);
    };
    match value.get("transformers_weights") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(CoreError::format(
            &path,
            format!("\"transformers_weights\" must be a file name, got {other}"),
        )),
    }
}

/// The regular files directly in `base` whose names end with `suffix`, sorted.
fn weights_files(base: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(base)
        .map_err(|e| CoreError::io(base, e))?
        .filter_map(|e| e.ok())
        .map(|e| PathBuf::from(e.file_name()))
        .filter(|n| {
            let name = n.to_string_lossy();
            name.ends_with(suffix)
                && (suffix != ".safetensors" || !name.ends_with(".index.json"))
                && base.join(n).is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The shard files an index names (relative, checked to stay inside the folder,
/// sorted) and the parsed index.
fn read_index(path: &Path) -> Result<(Vec<PathBuf>, Value)> {
    let value: Value = serde_json::from_slice(&fsutil::read_regular(path)?)
        .map_err(|e| CoreError::format(path, format!("invalid JSON ({e})")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| CoreError::format(path, "no \"weight_map\" object"))?;
    let mut names = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            CoreError::format(path, format!("weight_map[{tensor:?}] is not a string"))
        })?;
        names.insert(fsutil::check_relative_name(shard, path)?);
    }
    if names.is_empty() {
        return Err(CoreError::format(path, "\"weight_map\" is empty"));
    }
    Ok((names.into_iter().collect(), value))
}

/// Every tensor the index maps to a shard is in that shard.
fn check_index(shards: &[Shard], index_path: &Path, value: &Value) -> Result<()> {
    let by_rel: HashMap<&Path, &Shard> = shards.iter().map(|s| (s.rel.as_path(), s)).collect();
    for (tensor, shard) in value["weight_map"].as_object().into_iter().flatten() {
        let rel = fsutil::check_relative_name(shard.as_str().unwrap_or_default(), index_path)?;
        if by_rel[rel.as_path()].header.get(tensor).is_none() {
            return Err(CoreError::format(
                index_path,
                format!("weight_map maps {tensor:?} to {shard} but that file has no such tensor"),
            ));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ resolve the targets

/// Every base tensor by name, for finding what an adapter entry refers to.
struct TensorIndex<'a> {
    shards: &'a [Shard],
    names: HashMap<&'a str, Vec<(usize, usize)>>,
}

impl<'a> TensorIndex<'a> {
    fn new(shards: &'a [Shard]) -> Self {
        let mut names: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (t, info) in shard.header.tensors.iter().enumerate() {
                names.entry(info.name.as_str()).or_default().push((s, t));
            }
        }
        TensorIndex { shards, names }
    }

    fn info(&self, (s, t): (usize, usize)) -> &'a TensorInfo {
        &self.shards[s].header.tensors[t]
    }

    /// The one base tensor that `target` names: the exact name, else the single tensor
    /// whose name ends with `.` + `target` or that `target` ends with (`.` + its name),
    /// among names ending with `suffix`. None or several is a [`CoreError::Mismatch`]
    /// about `what` (e.g. `adapted module "x"`).
    fn find(&self, what: &str, target: &str, suffix: &str) -> Result<(usize, usize)> {
        let hits = self.lookup(target, suffix);
        match hits.as_slice() {
            &[hit] => Ok(hit),
            [] => Err(CoreError::Mismatch(format!(
                "{what}: the base has no tensor {target:?} (nor one unique dotted-suffix match)"
            ))),
            _ => {
                let list: Vec<String> = hits
                    .iter()
                    .map(|&(s, t)| {
                        let file = rel_string(&self.shards[s].rel);
                        format!("{} in {file}", self.info((s, t)).name)
                    })
                    .collect();
                Err(CoreError::Mismatch(format!(
                    "{what} is ambiguous in the base: {}",
                    list.join(", ")
                )))
            }
        }
    }

    fn lookup(&self, name: &str, suffix: &str) -> Vec<(usize, usize)> {
        if let Some(hits) = self.names.get(name) {
            return hits.clone();
        }
        let dotted_suffix = |long: &str, short: &str| {
            long.len() > short.len()
                && long.ends_with(short)
                && long.as_bytes()[long.len() - short.len() - 1] == b'.'
        };
        let mut hits: Vec<(usize, usize)> = self
            .names
            .iter()
            .filter(|(key, _)| {
                key.ends_with(suffix)
                    && key.len() > suffix.len()
                    && (dotted_suffix(key, name) || dotted_suffix(name, key))
            })
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        hits.sort_unstable();
        hits
    }
}

/// Finds the base tensor of every adapted module and `modules_to_save` tensor, and
/// checks shapes and dtypes.
fn resolve_targets(inputs: &Inputs) -> Result<Targets<'_>> {
    let index = TensorIndex::new(&inputs.shards);
    let adapter = &inputs.adapter;
    let mut targets = Targets {
        actions: HashMap::new(),
        merged: Vec::with_capacity(adapter.config.modules.len()),
        replaced: Vec::new(),
        extras: adapter.extra_tensors().collect(),
    };
    for (k, module) in adapter.config.modules.iter().enumerate() {
        let what = format!("adapted module {:?}", module.name);
        let hit = index.find(&what, &format!("{}.weight", module.name), ".weight")?;
        let info = index.info(hit);
        check_module_target(module, info)?;
        if let Some(Action::Merge(j)) = targets.actions.insert(hit, Action::Merge(k)) {
            return Err(CoreError::Mismatch(format!(
                "adapted modules {:?} and {:?} both resolve to base tensor {:?}",
                adapter.config.modules[j].name, module.name, info.name
            )));
        }
        targets.merged.push(MergedTensor {
            module: module.name.clone(),
            tensor: info.name.clone(),
            file: rel_string(&inputs.shards[hit.0].rel),
        });
    }
    for (k, extra) in targets.extras.iter().enumerate() {
        let what = format!("modules_to_save tensor {:?}", extra.name);
        let hit = index.find(&what, &extra.name, "")?;
        let info = index.info(hit);
        if info.shape != extra.shape {
            return Err(CoreError::Mismatch(format!(
                "{what}: the adapter holds shape {:?}, base tensor {:?} has {:?}",
                extra.shape, info.name, info.shape
            )));
        }
        if !info.dtype.is_float() || !extra.dtype.is_float() {
            return Err(CoreError::Dtype(format!(
                "{what}: {} in the adapter, {} in the base; only floating tensors can be replaced",
                extra.dtype, info.dtype
            )));
        }
        if targets.actions.insert(hit, Action::Replace(k)).is_some() {
            return Err(CoreError::Mismatch(format!(
                "base tensor {:?} is both an adapted module and a modules_to_save tensor",
                info.name
            )));
        }
        targets.replaced.push(info.name.clone());
    }
    Ok(targets)
}

fn check_module_target(module: &AdapterModule, info: &TensorInfo) -> Result<()> {
    let want = module.weight_shape();
    if info.shape != want {
        let layout = match module.kind {
            ModuleKind::Conv1d => "conv1d, in x out",
            ModuleKind::Linear => "linear, out x in",
        };
        return Err(CoreError::Mismatch(format!(
            "adapted module {:?}: base tensor {:?} has shape {:?}, the adapter expects {want:?} \
             ({layout} {}x{})",
            module.name, info.name, info.shape, want[0], want[1]
        )));
    }
    if !matches!(info.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
        return Err(CoreError::Dtype(format!(
            "adapted module {:?}: base tensor {:?} is {}; merging supports BF16, F16 and F32 weights",
            module.name, info.name, info.dtype
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------ plan each shard

/// The output layout of shard `s` and its pieces of work; counts copies and casts into
/// `report`.
fn plan_shard(
    s: usize,
    shard: &Shard,
    actions: &HashMap<(usize, usize), Action>,
    opts: &MergeOptions,
    report: &mut MergeReport,
) -> Result<Plan> {
    let tensors = &shard.header.tensors;
    let dtypes: Vec<Dtype> = tensors
        .iter()
        .map(|t| match opts.dtype {
            Some(dt) if t.dtype.is_float() => dt,
            _ => t.dtype,
        })
        .collect();
    let (header, offsets) = if dtypes.iter().zip(tensors).all(|(d, t)| *d == t.dtype) {
        let offsets = tensors.iter().map(|t| (t.begin, t.end)).collect();
        (shard.header.raw.clone(), offsets)
    } else {
        let spec: Vec<(&str, Dtype, &[u64])> = tensors
            .iter()
            .zip(&dtypes)
            .map(|(t, d)| (t.name.as_str(), *d, t.shape.as_slice()))
            .collect();
        build_header(&spec, shard.header.metadata.as_ref())?
    };
    let mut plan = Plan {
        data_len: offsets.last().map_or(0, |o| o.1),
        outs: Vec::with_capacity(tensors.len()),
        work: Vec::new(),
        header,
    };
    for (t, info) in tensors.iter().enumerate() {
        report.largest_tensor_bytes = report.largest_tensor_bytes.max(info.nbytes());
        let action = match actions.get(&(s, t)) {
            Some(a) => *a,
            None if dtypes[t] != info.dtype => Action::Cast,
            None => Action::Copy,
        };
        let out = OutTensor {
            src: t,
            dtype: dtypes[t],
            begin: offsets[t].0,
            action,
        };
        match action {
            Action::Copy => {
                report.copied += 1;
                let src = shard.header.data_start() + info.begin;
                let dst = plan.header.len() as u64 + 8 + out.begin;
                push_copy(&mut plan.work, src, dst, info.nbytes());
            }
            Action::Cast => {
                report.cast += 1;
                push_tiles(&mut plan.work, plan.outs.len(), info.numel(), opts.tile());
            }
            Action::Merge(_) => {
                let cols = info.shape[1];
                let step = (opts.tile() / cols).max(1) * cols;
                push_tiles(&mut plan.work, plan.outs.len(), info.numel(), step);
            }
            Action::Replace(_) => {
                push_tiles(&mut plan.work, plan.outs.len(), info.numel(), opts.tile())
            }
        }
        plan.outs.push(out);
    }
    report.tensors += tensors.len();
    plan.work = split_copies(plan.work);
    Ok(plan)
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

/// The factors of every module, arranged for row-wise merging (small: `D` floats).
fn prepare_factors(adapter: &Adapter) -> Result<Vec<Prepared>> {
    let pairs = adapter.lora_pairs()?;
    let r = adapter.config.rank as usize;
    Ok(adapter
        .config
        .modules
        .iter()
        .zip(&pairs)
        .map(|(m, p)| Prepared::new(m, &p.b, &p.a, r))
        .collect())
}

// ------------------------------------------------------------------ write each shard

/// What the writers of all shards share.
struct Writer<'a> {
    opts: &'a MergeOptions,
    adapter: &'a Adapter,
    extras: &'a [&'a TensorInfo],
    prepared: &'a [Prepared],
    scale: f32,
    control: &'a Control,
}

impl Writer<'_> {
    /// Writes `shard` as `plan` says into the staging output; returns its size.
    fn write_shard(&self, shard: &Shard, plan: &Plan, staging: &Path, is_dir: bool) -> Result<u64> {
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
        let total_len = dst_data + plan.data_len;
        fsutil::preallocate(&dst, total_len, &dst_path)?;
        let mut head = Vec::with_capacity(dst_data as usize);
        head.extend_from_slice(&(plan.header.len() as u64).to_le_bytes());
        head.extend_from_slice(&plan.header);
        write_all_at(&dst, &head, 0).map_err(|e| CoreError::io(&dst_path, e))?;
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

// ------------------------------------------------------------------ finish the folder

/// Copies the folder's other files into the staging folder, writes the shard index,
/// and syncs them.
fn finish_folder(
    opts: &MergeOptions,
    inputs: &Inputs,
    plans: &[Plan],
    staging: &Path,
    report: &mut MergeReport,
) -> Result<()> {
    let mut not_copied: BTreeSet<PathBuf> = inputs.shards.iter().map(|s| s.rel.clone()).collect();
    not_copied.extend(inputs.left_out.iter().cloned());
    not_copied.insert(PathBuf::from(fsutil::OUTPUT_MARKER));
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
    let copied = fsutil::copy_tree(&opts.base, staging, &skip)?;
    report.other_files = copied.iter().map(|p| rel_string(p)).collect();
    if let (Some((index_path, value)), Some(index_rel)) = (&inputs.index, &index_rel) {
        write_index(
            index_path,
            value,
            &inputs.shards,
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

/// The shard index of the output: the input's bytes, or, when a dtype change altered
/// the sizes, the input with a new `metadata.total_size`.
fn write_index(
    index_path: &Path,
    value: &Value,
    shards: &[Shard],
    plans: &[Plan],
    dst: &Path,
) -> Result<()> {
    let sizes_changed = plans
        .iter()
        .zip(shards)
        .any(|(p, s)| p.data_len != s.header.file_len - s.header.data_start());
    if !sizes_changed {
        fs::copy(index_path, dst).map_err(|e| CoreError::io(dst, e))?;
        return Ok(());
    }
    let total: u64 = plans
        .iter()
        .zip(shards)
        .flat_map(|(p, s)| p.outs.iter().map(move |o| (o, &s.header.tensors[o.src])))
        .map(|(o, t)| byte_size(o.dtype, &t.shape).unwrap_or(0))
        .sum();
    let mut value = value.clone();
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

fn rel_string(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

// ------------------------------------------------------------------ the kernel

/// A module's factors arranged for row-wise merging: output row `t` of the weight is
/// `sum_k coef[t, k] * m[k, :]`.
struct Prepared {
    coef: Vec<f32>,
    m: Vec<f32>,
    r: usize,
    cols: usize,
}

impl Prepared {
    fn new(module: &AdapterModule, b: &[f32], a: &[f32], r: usize) -> Prepared {
        let (out_f, in_f) = (module.out_features as usize, module.in_features as usize);
        match module.kind {
            // W [out, in]: row i = sum_k B[i, k] * A[k, :].
            ModuleKind::Linear => Prepared {
                coef: b.to_vec(),
                m: a.to_vec(),
                r,
                cols: in_f,
            },
            // W [in, out]: row j = sum_k A[k, j] * B[:, k]^T.
            ModuleKind::Conv1d => {
                let mut coef = vec![0f32; in_f * r];
                for k in 0..r {
                    for j in 0..in_f {
                        coef[j * r + k] = a[k * in_f + j];
                    }
                }
                let mut m = vec![0f32; r * out_f];
                for i in 0..out_f {
                    for k in 0..r {
                        m[k * out_f + i] = b[i * r + k];
                    }
                }
                Prepared {
                    coef,
                    m,
                    r,
                    cols: out_f,
                }
            }
        }
    }

    /// Merges the full rows held in `input`, the first being row `row0`: decodes them
    /// (`src` dtype), adds `s * (coef @ m)` and encodes them into `output` (`dst`
    /// dtype), in chunks of 64 columns that stay in registers / L1. The AVX2 build is
    /// used where the CPU has it; both builds perform the same IEEE operations in the
    /// same order (no fused multiply-add), so their results are identical.
    fn merge_rows(
        &self,
        input: &[u8],
        src: Dtype,
        output: &mut [u8],
        dst: Dtype,
        row0: usize,
        s: f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.merge_rows_avx2(input, src, output, dst, row0, s) };
        }
        self.merge_rows_body(input, src, output, dst, row0, s);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn merge_rows_avx2(
        &self,
        input: &[u8],
        src: Dtype,
        output: &mut [u8],
        dst: Dtype,
        row0: usize,
        s: f32,
    ) {
        self.merge_rows_body(input, src, output, dst, row0, s);
    }

    #[inline(always)]
    fn merge_rows_body(
        &self,
        input: &[u8],
        src: Dtype,
        output: &mut [u8],
        dst: Dtype,
        row0: usize,
        s: f32,
    ) {
        const CHUNK: usize = 64;
        let (cols, r) = (self.cols, self.r);
        let (isz, osz) = ((src.bits() / 8) as usize, (dst.bits() / 8) as usize);
        let mut w = [0f32; CHUNK];
        for (i, (in_row, out_row)) in input
            .chunks_exact(cols * isz)
            .zip(output.chunks_exact_mut(cols * osz))
            .enumerate()
        {
            let coef = &self.coef[(row0 + i) * r..][..r];
            let mut j0 = 0;
            while j0 < cols {
                let n = CHUNK.min(cols - j0);
                let mut acc = [0f32; CHUNK];
                for (k, &c) in coef.iter().enumerate() {
                    let mk = &self.m[k * cols + j0..][..n];
                    for (a, &y) in acc[..n].iter_mut().zip(mk) {
                        *a += c * y;
                    }
                }
                convert::decode_unchecked(src, &in_row[j0 * isz..][..n * isz], &mut w[..n]);
                for (x, &a) in w[..n].iter_mut().zip(&acc[..n]) {
                    *x += s * a;
                }
                convert::encode_unchecked(dst, &w[..n], &mut out_row[j0 * osz..][..n * osz]);
                j0 += n;
            }
        }
    }
}

#[derive(Default)]
struct Scratch {
    input: Vec<u8>,
    output: Vec<u8>,
    values: Vec<f32>,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
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
            Work::Copy { src, dst, len } => fsutil::copy_range(
                &self.shard.file,
                &self.shard.path,
                src,
                self.dst,
                self.dst_path,
                dst,
                len,
                &|| !self.writer.control.is_cancelled(),
                &|n| self.writer.control.add(n),
            ),
            Work::Tile { t, e0, e1 } => self.tile(t, e0, e1, scratch),
        }
    }

    fn tile(&self, t: usize, e0: u64, e1: u64, scratch: &mut Scratch) -> Result<()> {
        let out = &self.outs[t];
        let info = &self.shard.header.tensors[out.src];
        let n = (e1 - e0) as usize;
        let (src_dtype, src_file, src_path, src_off) = match out.action {
            Action::Replace(k) => {
                let extra = self.writer.extras[k];
                let off = self.writer.adapter.weights.data_start() + extra.begin;
                (
                    extra.dtype,
                    self.writer.adapter.weights_file(),
                    self.writer.adapter.weights_path.as_path(),
                    off,
                )
            }
            _ => (
                info.dtype,
                &self.shard.file,
                self.shard.path.as_path(),
                self.shard.header.data_start() + info.begin,
            ),
        };
        let in_size = (src_dtype.bits() / 8) as usize;
        let out_size = (out.dtype.bits() / 8) as usize;
        let input = grow(&mut scratch.input, n * in_size);
        read_exact_at(src_file, input, src_off + e0 * in_size as u64)
            .map_err(|e| CoreError::io(src_path, e))?;
        let output = grow(&mut scratch.output, n * out_size);
        match out.action {
            Action::Merge(k) => {
                let prep = &self.writer.prepared[k];
                prep.merge_rows(
                    input,
                    src_dtype,
                    output,
                    out.dtype,
                    (e0 / prep.cols as u64) as usize,
                    self.writer.scale,
                );
            }
            _ => convert::cast(
                src_dtype,
                input,
                out.dtype,
                output,
                grow(&mut scratch.values, n),
            )?,
        }
        write_all_at(
            self.dst,
            output,
            self.dst_data + out.begin + e0 * out_size as u64,
        )
        .map_err(|e| CoreError::io(self.dst_path, e))?;
        self.writer.control.add((n * out_size) as u64);
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// The run-time selected build (AVX2 here when the CPU has it) and the portable
    /// build give identical bytes, and both equal the plain triple loop.
    #[test]
    fn kernel_builds_agree_with_the_plain_loop() {
        let mut st = 3u64;
        for (kind, fin, fout, r) in [
            (ModuleKind::Linear, 131, 70, 4),
            (ModuleKind::Conv1d, 45, 97, 3),
        ] {
            let module = AdapterModule {
                name: "m".into(),
                in_features: fin,
                out_features: fout,
                kind,
            };
            let (fi, fo) = (fin as usize, fout as usize);
            let b: Vec<f32> = (0..fo * r).map(|_| lcg(&mut st)).collect();
            let a: Vec<f32> = (0..r * fi).map(|_| lcg(&mut st)).collect();
            let prep = Prepared::new(&module, &b, &a, r);
            let [rows, cols] = module.weight_shape().map(|x| x as usize);
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut st)).collect();
            for (src, dst) in [
                (Dtype::F32, Dtype::F32),
                (Dtype::BF16, Dtype::BF16),
                (Dtype::F16, Dtype::F32),
            ] {
                let (isz, osz) = ((src.bits() / 8) as usize, (dst.bits() / 8) as usize);
                let mut input = vec![0u8; rows * cols * isz];
                convert::encode(src, &w, &mut input).unwrap();
                let mut fast = vec![0u8; rows * cols * osz];
                let mut portable = vec![0u8; rows * cols * osz];
                prep.merge_rows(&input, src, &mut fast, dst, 0, 0.75);
                prep.merge_rows_body(&input, src, &mut portable, dst, 0, 0.75);
                assert_eq!(fast, portable);
                let mut w32 = vec![0f32; rows * cols];
                convert::decode(src, &input, &mut w32).unwrap();
                for i in 0..fo {
                    for j in 0..fi {
                        let mut acc = 0f32;
                        for k in 0..r {
                            acc += b[i * r + k] * a[k * fi + j];
                        }
                        let pos = if kind == ModuleKind::Conv1d {
                            j * fo + i
                        } else {
                            i * fi + j
                        };
                        w32[pos] += 0.75 * acc;
                    }
                }
                let mut want = vec![0u8; rows * cols * osz];
                convert::encode(dst, &w32, &mut want).unwrap();
                assert_eq!(fast, want, "{kind:?} {src} -> {dst}");
            }
        }
    }
}
