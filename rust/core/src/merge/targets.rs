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
    let resolver = Resolver {
        index: TensorIndex::new(&inputs.shards),
        adapters,
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
        resolver.modules(i, weights[i], prepared, &mut targets)?;
        prepared += adapter.config.modules.len();
    }
    for (i, adapter) in adapters.iter().enumerate() {
        for extra in adapter.extra_tensors() {
            resolver.extra(i, extra, &mut targets)?;
        }
        resolver.task_config(i, &mut targets)?;
    }
    Ok(targets)
}

/// The base's tensors and the adapters whose entries are resolved against them.
struct Resolver<'a, 'b> {
    index: TensorIndex<'b>,
    adapters: &'a [Adapter],
}

impl<'a> Resolver<'a, '_> {
    /// `adapter <dir>: ` before the messages about adapter `i` when there are several.
    fn label(&self, i: usize) -> String {
        if self.adapters.len() > 1 {
            format!("adapter {}: ", self.adapters[i].dir.display())
        } else {
            String::new()
        }
    }

    /// The base tensor of every module of adapter `i`, each merged with the term of
    /// coefficient `weight * alpha / r` (its factors being `prepared + k` for module `k`).
    fn modules(
        &self,
        i: usize,
        weight: f32,
        prepared: usize,
        targets: &mut Targets<'a>,
    ) -> Result<()> {
        let adapter = &self.adapters[i];
        let coef = weight * adapter.config.scaling();
        let mut own: HashMap<(usize, usize), usize> = HashMap::new();
        for (k, module) in adapter.config.modules.iter().enumerate() {
            let what = format!("{}adapted module {:?}", self.label(i), module.name);
            let hit = self
                .index
                .find(&what, &format!("{}.weight", module.name), ".weight")?;
            let info = self.index.info(hit);
            check_module_target(module, info)?;
            if let Some(j) = own.insert(hit, k) {
                return Err(CoreError::Mismatch(format!(
                    "{}adapted modules {:?} and {:?} both resolve to base tensor {:?}",
                    self.label(i),
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
                file: rel_string(&self.index.shards[hit.0].rel),
            });
        }
        Ok(())
    }

    /// A `modules_to_save` tensor of adapter `i`: added when its task lists it as new
    /// and the base lacks it, else written over the one base tensor it names.
    fn extra(&self, i: usize, extra: &'a TensorInfo, targets: &mut Targets<'a>) -> Result<()> {
        let k = targets.extras.len();
        targets.extras.push(Extra {
            adapter: i,
            info: extra,
        });
        let what = format!("{}modules_to_save tensor {:?}", self.label(i), extra.name);
        let task = self.adapters[i].config.task.as_ref();
        let new = task.is_some_and(|t| t.is_new(&extra.name));
        if new && self.index.lookup(&extra.name, "").is_empty() {
            return self.add(&what, k, targets);
        }
        if self.index.lookup(&extra.name, "").is_empty() {
            return Err(CoreError::Mismatch(format!(
                "{what}: the base has no tensor {:?} (nor one unique dotted-suffix match); a \
                 tensor the base lacks, such as a newly trained head, is written only when the \
                 adapter's task lists it in new_tensors (`unilora train` records it)",
                extra.name
            )));
        }
        self.replace(&what, k, targets)
    }

    /// Adds extra `k` (a new floating tensor) to the output, unless another adapter
    /// adds one of the same name.
    fn add(&self, what: &str, k: usize, targets: &mut Targets<'a>) -> Result<()> {
        let extra = targets.extras[k].info;
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
            let other = &self.adapters[targets.extras[j].adapter].dir;
            return Err(CoreError::InvalidArgument(format!(
                "{what}: adapter {} adds a tensor of the same name; a weighted merge \
                 takes each new or saved tensor (a head) from one adapter only",
                other.display()
            )));
        }
        targets.added.push(k);
        Ok(())
    }

    /// Writes extra `k` over the base tensor it names (same shape, both floating),
    /// which no other adapter replaces and no module adapts.
    fn replace(&self, what: &str, k: usize, targets: &mut Targets<'a>) -> Result<()> {
        let extra = targets.extras[k].info;
        let hit = self.index.find(what, &extra.name, "")?;
        let info = self.index.info(hit);
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
                let other = &self.adapters[targets.extras[j].adapter].dir;
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
        Ok(())
    }

    /// The `config.json` keys of adapter `i`'s task, which must agree with those of the
    /// adapters before it.
    fn task_config(&self, i: usize, targets: &mut Targets<'a>) -> Result<()> {
        let task = self.adapters[i].config.task.as_ref();
        for (key, value) in task.map(|t| &t.config).into_iter().flatten() {
            match targets.config.get(key) {
                Some(v) if v != value => {
                    return Err(CoreError::InvalidArgument(format!(
                        "{}task sets config.json key {key:?} to {value}, another adapter to {v}; \
                         a weighted merge needs the adapters' task records to agree",
                        self.label(i)
                    )));
                }
                _ => {
                    targets.config.insert(key.clone(), value.clone());
                }
            }
        }
        Ok(())
    }
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
