//! Writing an export's output folder: staged next to the target and renamed into place
//! when complete, its safetensors files written in order and synced.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{Map, Value};

use super::{ExportOptions, PEFT_PREFIX};
use crate::adapter::Adapter;
use crate::error::{CoreError, Result};
use crate::io::atomic::{self, TempPath};
use crate::io::fs::check_disjoint;
use crate::safetensors::{Dtype, TensorInfo, build_header};

/// Opens the adapter of `opts` and writes an output folder of `kind` from it, atomically:
/// `write(adapter, dir)` writes the weights into the staging folder and returns their
/// size and the `adapter_config.json` to write next to them.
pub(crate) fn export_folder(
    opts: &ExportOptions,
    kind: &'static str,
    write: impl FnOnce(&Adapter, &Path) -> Result<(u64, Value)>,
) -> Result<(Adapter, u64)> {
    check_disjoint(&opts.out, &opts.adapter, "adapter")?;
    atomic::check_output(&opts.out, opts.overwrite, Some(kind))?;
    let adapter = Adapter::open(&opts.adapter)?;
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    }
    let staging = TempPath::new_folder(&opts.out, kind)?;
    let (weights_bytes, config) = write(&adapter, staging.path())?;
    let mut text = serde_json::to_vec_pretty(&config)
        .map_err(|e| CoreError::InvalidArgument(format!("cannot serialise the config: {e}")))?;
    text.push(b'\n');
    write_synced(&staging.path().join("adapter_config.json"), &text)?;
    staging.commit(opts.overwrite)?;
    Ok((adapter, weights_bytes))
}

/// Appends the adapter's `modules_to_save` tensors, named as PEFT names them
/// (`base_model.model.<tensor>`), to `tensors`; returns them in that order.
pub(crate) fn saved_tensors(adapter: &Adapter, tensors: &mut Vec<TensorSpec>) -> Vec<TensorInfo> {
    let extras: Vec<TensorInfo> = adapter.extra_tensors().cloned().collect();
    for t in &extras {
        tensors.push((format!("{PEFT_PREFIX}{}", t.name), t.dtype, t.shape.clone()));
    }
    extras
}

/// A tensor to write: name, dtype, shape.
pub(crate) type TensorSpec = (String, Dtype, Vec<u64>);

/// Writes a safetensors file (metadata `format = pt`) holding `tensors`, in order; the
/// bytes of tensor `k` come from `data(k, buf)`, `buf` being sized for them. Synced;
/// returns the file size.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize, &mut [u8]) -> Result<()>,
) -> Result<u64> {
    let spec: Vec<(&str, Dtype, &[u64])> = tensors
        .iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect();
    let mut meta = Map::new();
    meta.insert("format".into(), Value::from("pt"));
    let (header, offsets) = build_header(&spec, Some(&meta))?;
    let io = |e| CoreError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, &file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    let mut buf = Vec::new();
    for (k, &(begin, end)) in offsets.iter().enumerate() {
        buf.resize((end - begin) as usize, 0);
        data(k, &mut buf)?;
        w.write_all(&buf).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    file.sync_all().map_err(io)?;
    Ok(8 + header.len() as u64 + offsets.last().map_or(0, |o| o.1))
}

pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let io = |e| CoreError::io(path, e);
    let mut f = File::create(path).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}
