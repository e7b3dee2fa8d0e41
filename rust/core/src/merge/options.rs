//! What to merge, where, and how: the options of a merge of one adapter and of several.

use std::path::PathBuf;

use crate::safetensors::Dtype;

/// Default number of elements per tile.
pub const DEFAULT_TILE_ELEMS: usize = 1 << 18;

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
    /// output: see [`check_output`](crate::io::atomic::check_output)).
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

    pub(super) fn tile(&self) -> u64 {
        if self.tile_elems == 0 {
            DEFAULT_TILE_ELEMS as u64
        } else {
            self.tile_elems as u64
        }
    }
}

/// A merge of several adapters into one base: [`merge_each`](super::merge_each) (one
/// output per adapter) or [`merge_weighted`](super::merge_weighted) (one output, a
/// weighted sum of their updates).
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
    pub(super) fn single(&self, k: usize, out: PathBuf) -> MergeOptions {
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
