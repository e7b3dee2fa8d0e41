//! Resolving the targets: the base tensor of every adapted module and
//! `modules_to_save` tensor, with shape and dtype checks.

use std::collections::HashMap;

use super::{Action, Inputs, MergedTensor, Shard, Targets, rel_string};
use crate::adapter::{AdapterModule, ModuleKind};
use crate::error::{CoreError, Result};
use crate::safetensors::{Dtype, TensorInfo};

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
pub(super) fn resolve_targets(inputs: &Inputs) -> Result<Targets<'_>> {
    let index = TensorIndex::new(&inputs.shards);
    let adapter = &inputs.adapter;
    let mut targets = Targets {
        actions: HashMap::new(),
        merged: Vec::with_capacity(adapter.config.modules.len()),
        replaced: Vec::new(),
        extras: adapter.extra_tensors().collect(),
        added: Vec::new(),
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
    let task = adapter.config.task.as_ref();
    for (k, extra) in targets.extras.iter().enumerate() {
        let what = format!("modules_to_save tensor {:?}", extra.name);
        if task.is_some_and(|t| t.is_new(&extra.name)) && index.lookup(&extra.name, "").is_empty() {
            if !extra.dtype.is_float() {
                return Err(CoreError::Dtype(format!(
                    "{what} is {}; only floating tensors can be added",
                    extra.dtype
                )));
            }
            targets.added.push(k);
            continue;
        }
        if index.lookup(&extra.name, "").is_empty() {
            return Err(CoreError::Mismatch(format!(
                "{what}: the base has no tensor {:?} (nor one unique dotted-suffix match); a \
                 tensor the base lacks, such as a newly trained head, is written only when the \
                 adapter's task lists it in new_tensors (`unilora train` records it)",
                extra.name
            )));
        }
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
