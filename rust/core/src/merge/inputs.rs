//! The inputs of a merge: the options checked against the file system, and the base
//! opened (its weights files chosen as `folder.rs` says, each header read and viewed
//! with its quantized weights dequantised) along with the adapters.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::folder::{Selection, select_weights};
use super::options::{MergeOptions, MultiMergeOptions};
use super::{OUTPUT_KIND, SINGLE_NAME, quant};
use crate::adapter::Adapter;
use crate::error::{CoreError, Result};
use crate::io::atomic;
use crate::io::fs::{check_disjoint, check_relative_name};
use crate::io::pio::read_exact_at;
use crate::safetensors::{Dtype, Header};

/// An input safetensors file. `header` is the merge's view of it: a quantized
/// weight is a float32 tensor of its real shape, its state tensors are gone
/// (`quant.rs`).
pub(super) struct Shard {
    pub(super) rel: PathBuf,
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) header: Header,
    pub(super) quant: quant::Quantized,
}

impl Shard {
    /// Fills `buf` with elements `e0 ..` of tensor `t` (as many as fit), in the view's
    /// dtype: raw bytes, or float32 dequantised from a quantized weight. Returns the
    /// bytes read from the file.
    pub(super) fn read_elems(
        &self,
        t: usize,
        e0: u64,
        buf: &mut [u8],
        raw: &mut Vec<u8>,
    ) -> Result<u64> {
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

/// The opened base of a merge.
pub(super) struct Inputs {
    pub(super) is_dir: bool,
    pub(super) shards: Vec<Shard>,
    /// The shard index (path and parsed value), when the base folder uses one.
    pub(super) index: Option<(PathBuf, Value)>,
    /// Weights files of the folder that are not merged and not copied.
    pub(super) left_out: Vec<PathBuf>,
    pub(super) warning: Option<String>,
}

/// Checks the options of a merge of `adapters` into `opts.out` before anything is
/// opened: the base exists, the output overlaps no input and may be written, the dtype
/// is one a merge writes.
pub(super) fn check_options(opts: &MergeOptions, adapters: &[PathBuf]) -> Result<()> {
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

/// Opens the base: a file, or the weights a model folder holds.
pub(super) fn open_inputs(base: &Path) -> Result<Inputs> {
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

/// Opens every adapter of `opts` (at least one) and the base.
pub(super) fn open_all(opts: &MultiMergeOptions) -> Result<(Vec<Adapter>, Inputs)> {
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

/// Every tensor the index maps to a shard is in that shard.
fn check_index(shards: &[Shard], index_path: &Path, value: &Value) -> Result<()> {
    let by_rel: HashMap<&Path, &Shard> = shards.iter().map(|s| (s.rel.as_path(), s)).collect();
    for (tensor, shard) in value["weight_map"].as_object().into_iter().flatten() {
        let rel = check_relative_name(shard.as_str().unwrap_or_default(), index_path)?;
        let file = by_rel[rel.as_path()];
        if file.header.get(tensor).is_none() && !file.quant.dropped.contains(tensor) {
            return Err(CoreError::format(
                index_path,
                format!("weight_map maps {tensor:?} to {shard} but that file has no such tensor"),
            ));
        }
    }
    Ok(())
}
