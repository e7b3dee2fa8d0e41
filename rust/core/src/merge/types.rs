//! The data passed between a merge's steps: what happens to each base tensor
//! ([`Targets`], from `targets.rs`), and each output shard's layout and pieces of work
//! ([`Plan`], from `plan.rs`), which `write.rs` carries out.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::report::MergedTensor;
use crate::safetensors::{Dtype, TensorInfo};

#[derive(Clone, Copy, Debug)]
pub(super) enum Action {
    Copy,
    Cast,
    Merge(usize),
    /// Written from the adapter's extra tensor `k` over a base tensor.
    Replace(usize),
    /// Written from the adapter's extra tensor `k`; the base has no such tensor.
    Add(usize),
}

pub(super) struct OutTensor {
    /// The base tensor (index in the shard's header); unused for [`Action::Add`].
    pub(super) src: usize,
    pub(super) dtype: Dtype,
    pub(super) begin: u64,
    pub(super) action: Action,
}

pub(super) enum Work {
    Copy { src: u64, dst: u64, len: u64 },
    Tile { t: usize, e0: u64, e1: u64 },
}

/// The output of one shard: its header, the size of its data, where each tensor goes
/// and what happens to it, and the independent pieces of work that write it.
pub(super) struct Plan {
    pub(super) header: Vec<u8>,
    pub(super) data_len: u64,
    pub(super) outs: Vec<OutTensor>,
    pub(super) work: Vec<Work>,
}

/// One term of a merged weight: the factors `prepared` (an index into the prepared
/// modules of all adapters, in order) times `coef`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Term {
    pub(super) prepared: usize,
    pub(super) coef: f32,
}

/// A `modules_to_save` tensor of adapter `adapter` (an index into the adapters).
#[derive(Clone, Copy)]
pub(super) struct Extra<'a> {
    pub(super) adapter: usize,
    pub(super) info: &'a TensorInfo,
}

/// What happens to the base tensors that the adapters touch.
pub(super) struct Targets<'a> {
    pub(super) actions: HashMap<(usize, usize), Action>,
    /// The terms of each merged weight ([`Action::Merge`] indexes them).
    pub(super) terms: Vec<Vec<Term>>,
    pub(super) merged: Vec<MergedTensor>,
    pub(super) replaced: Vec<String>,
    pub(super) extras: Vec<Extra<'a>>,
    /// Extras (indices into `extras`) that the base lacks, appended to the last shard.
    pub(super) added: Vec<usize>,
    /// Keys to set in the output's `config.json` (the adapters' `task.config`).
    pub(super) config: Map<String, Value>,
}
