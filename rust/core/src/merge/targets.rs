//! Resolving the targets: the base tensor of every adapted module and
//! `modules_to_save` tensor, with shape and dtype checks.

use std::collections::HashMap;

use serde_json::Map;

use super::inputs::{Inputs, Shard};
use super::rel_string;
use super::report::MergedTensor;
use super::types::{Action, Extra, Targets, Term};
use crate::adapter::Adapter;
use crate::error::{CoreError, Result};
use crate::format::{AdapterModule, ModuleKind};
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

/// Finds the base tensor of every adapted module and `modules_to_save` tensor of every
/// adapter, and checks shapes and dtypes. Adapter `i`'s updates get the coefficient
/// `weights[i] * alpha_i / r_i`; a weight adapted by several adapters gets one term each,
/// in adapter order. Saved tensors, new tensors and task config keys of different
/// adapters must not collide (see [`super::merge_weighted`]).
pub(super) fn resolve_targets<'a>(
    inputs: &Inputs,
    adapters: &'a [Adapter],
    weights: &[f32],
) -> Result<Targets<'a>> {
    let index = TensorIndex::new(&inputs.shards);
    let several = adapters.len() > 1;
    let label = |i: usize| {
        if several {
            format!("adapter {}: ", adapters[i].dir.display())
        } else {
            String::new()
        }
    };
    let mut targets = Targets {
        actions: HashMap::new(),
        terms: Vec::new(),
        merged: Vec::new(),
        replaced: Vec::new(),
        extras: Vec::new(),
        added: Vec::new(),
        config: Map::new(),
    };
    let mut prepared = 0;
    for (i, adapter) in adapters.iter().enumerate() {
        let coef = weights[i] * adapter.config.scaling();
        let mut own: HashMap<(usize, usize), usize> = HashMap::new();
        for (k, module) in adapter.config.modules.iter().enumerate() {
            let what = format!("{}adapted module {:?}", label(i), module.name);
            let hit = index.find(&what, &format!("{}.weight", module.name), ".weight")?;
            let info = index.info(hit);
            check_module_target(module, info)?;
            if let Some(j) = own.insert(hit, k) {
                return Err(CoreError::Mismatch(format!(
                    "{}adapted modules {:?} and {:?} both resolve to base tensor {:?}",
                    label(i),
                    adapter.config.modules[j].name,
                    module.name,
                    info.name
                )));
            }
            let term = Term {
                prepared: prepared + k,
                coef,
            };
            match targets.actions.get(&hit) {
                Some(Action::Merge(j)) => targets.terms[*j].push(term),
                _ => {
                    targets
                        .actions
                        .insert(hit, Action::Merge(targets.terms.len()));
                    targets.terms.push(vec![term]);
                }
            }
            targets.merged.push(MergedTensor {
                module: module.name.clone(),
                tensor: info.name.clone(),
                file: rel_string(&inputs.shards[hit.0].rel),
            });
        }
        prepared += adapter.config.modules.len();
    }
    for (i, adapter) in adapters.iter().enumerate() {
        let task = adapter.config.task.as_ref();
        for extra in adapter.extra_tensors() {
            let k = targets.extras.len();
            targets.extras.push(Extra {
                adapter: i,
                info: extra,
            });
            let what = format!("{}modules_to_save tensor {:?}", label(i), extra.name);
            let new = task.is_some_and(|t| t.is_new(&extra.name));
            if new && index.lookup(&extra.name, "").is_empty() {
                if !extra.dtype.is_float() {
                    return Err(CoreError::Dtype(format!(
                        "{what} is {}; only floating tensors can be added",
                        extra.dtype
                    )));
                }
                if let Some(&j) = targets
                    .added
                    .iter()
                    .find(|&&j| targets.extras[j].info.name == extra.name)
                {
                    let other = &adapters[targets.extras[j].adapter].dir;
                    return Err(CoreError::InvalidArgument(format!(
                        "{what}: adapter {} adds a tensor of the same name; a weighted merge \
                         takes each new or saved tensor (a head) from one adapter only",
                        other.display()
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
            match targets.actions.insert(hit, Action::Replace(k)) {
                Some(Action::Replace(j)) => {
                    let other = &adapters[targets.extras[j].adapter].dir;
                    return Err(CoreError::InvalidArgument(format!(
                        "{what}: adapter {} also replaces base tensor {:?}; a weighted merge \
                         takes each new or saved tensor (a head) from one adapter only",
                        other.display(),
                        info.name
                    )));
                }
                Some(_) => {
                    return Err(CoreError::Mismatch(format!(
                        "base tensor {:?} is both an adapted module and a modules_to_save tensor",
                        info.name
                    )));
                }
                None => {}
            }
            targets.replaced.push(info.name.clone());
        }
        for (key, value) in task.map(|t| &t.config).into_iter().flatten() {
            match targets.config.get(key) {
                Some(v) if v != value => {
                    return Err(CoreError::InvalidArgument(format!(
                        "{}task sets config.json key {key:?} to {value}, another adapter to {v}; \
                         a weighted merge needs the adapters' task records to agree",
                        label(i)
                    )));
                }
                _ => {
                    targets.config.insert(key.clone(), value.clone());
                }
            }
        }
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
