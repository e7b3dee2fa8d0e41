//! What a model folder holds: the weights transformers loads from it, the shard
//! index, and the other weights files (left out of a merge's output).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{INDEX_NAME, SINGLE_NAME, rel_string};
use crate::error::{CoreError, Result};
use crate::io::fs::{check_relative_name, read_regular};

/// The weights of a model folder: which files to merge, the shard index if any, and
/// the other weights files (left out of the output).
#[derive(Default)]
pub(super) struct Selection {
    pub(super) files: Vec<PathBuf>,
    pub(super) index: Option<(PathBuf, Value)>,
    pub(super) left_out: Vec<PathBuf>,
    pub(super) warning: Option<String>,
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
pub(super) fn select_weights(base: &Path) -> Result<Selection> {
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
        let rel = check_relative_name(&name, &config)?;
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
    let Ok(value) = serde_json::from_slice::<Value>(&read_regular(&path)?) else {
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
    let value: Value = serde_json::from_slice(&read_regular(path)?)
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
        names.insert(check_relative_name(shard, path)?);
    }
    if names.is_empty() {
        return Err(CoreError::format(path, "\"weight_map\" is empty"));
    }
    Ok((names.into_iter().collect(), value))
}
