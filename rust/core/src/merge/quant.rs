//! Quantized bases: checkpoints that transformers saves from a bitsandbytes model,
//! 8-bit (LLM.int8: `W.weight` int8 `[out, in]` and the row scales `W.SCB`) or 4-bit
//! (NF4 / FP4: `W.weight` packed two codes a byte, `W.weight.absmax` per block, possibly
//! itself 8-bit quantised (`nested_absmax`, `nested_quant_map`), the code book
//! `W.weight.quant_map` and the state `W.weight.quant_state.bitsandbytes__nf4|fp4`,
//! a JSON text). A merge dequantises every such weight to float32 (then adds the update
//! of an adapted one) and writes it in the output dtype (float32 unless `dtype` says
//! otherwise); the quantization state tensors are left out, and `config.json` loses
//! its `quantization_config`, so the output is an ordinary float checkpoint.
//!
//! The arithmetic follows bitsandbytes' own dequantisation: 8-bit
//! `w = (float32(q) * SCB[row]) * (1 / 127)`; 4-bit `w = quant_map[code] * absmax[block]`
//! with a nested `absmax[i] = nested_quant_map[a[i]] * nested_absmax[i / nested_blocksize]
//! + nested_offset`, every operation in float32.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use serde_json::Value;

use crate::codec;
use crate::error::{CoreError, Result};
use crate::io::pio::read_exact_at;
use crate::safetensors::{Dtype, Header, TensorInfo};

/// How to read a dequantised weight.
pub(super) enum Source {
    /// LLM.int8: int8 data at `data` (absolute file offset), one scale per row.
    Int8 { data: u64, cols: u64, scb: Vec<f32> },
    /// 4-bit: packed codes at `data` (absolute), float32 absmax per block of
    /// `blocksize` elements, the 16-entry code book.
    FourBit {
        data: u64,
        blocksize: u64,
        absmax: Vec<f32>,
        map: [f32; 16],
    },
}

/// The quantized weights of a shard (by index into its logical tensor list) and the
/// names of the state tensors a merge leaves out.
#[derive(Default)]
pub(super) struct Quantized {
    pub(super) sources: HashMap<usize, Source>,
    pub(super) dropped: HashSet<String>,
}

impl Quantized {
    /// Whether the shard holds quantized weights.
    pub(super) fn any(&self) -> bool {
        !self.dropped.is_empty()
    }
}

fn read_f32s(file: &File, header: &Header, info: &TensorInfo) -> Result<Vec<f32>> {
    if info.dtype != Dtype::F32 {
        return Err(CoreError::format(
            &header.path,
            format!(
                "quantization state {:?} is {}, expected F32",
                info.name, info.dtype
            ),
        ));
    }
    let mut raw = vec![0u8; info.nbytes() as usize];
    read_exact_at(file, &mut raw, header.data_start() + info.begin)
        .map_err(|e| CoreError::io(&header.path, e))?;
    let mut out = vec![0f32; info.numel() as usize];
    codec::decode(Dtype::F32, &raw, &mut out)?;
    Ok(out)
}

fn read_bytes(file: &File, header: &Header, info: &TensorInfo) -> Result<Vec<u8>> {
    let mut raw = vec![0u8; info.nbytes() as usize];
    read_exact_at(file, &mut raw, header.data_start() + info.begin)
        .map_err(|e| CoreError::io(&header.path, e))?;
    Ok(raw)
}

/// A weight as a merge sees it: its real shape and how to read it dequantised.
type Logical = (Vec<u64>, Source);

/// The shard's header as a merge sees it (every quantized weight a float32 tensor of
/// its real shape, the state tensors gone) and how to read the quantized weights.
pub(super) fn dequantized_view(file: &File, header: &Header) -> Result<(Header, Quantized)> {
    let mut quant = Quantized::default();
    let mut logical: HashMap<String, Logical> = HashMap::new();
    for t in &header.tensors {
        if let Some(prefix) = t.name.strip_suffix(".SCB") {
            let name = format!("{prefix}.weight");
            if let Some(weight) = int8_weight(file, header, t, &name, &mut quant.dropped)? {
                quant.dropped.insert(format!("{prefix}.weight_format"));
                logical.insert(name, weight);
            }
        } else if let Some((name, kind)) = t.name.rsplit_once(".quant_state.bitsandbytes__") {
            let weight = four_bit_weight(file, header, t, name, kind, &mut quant.dropped)?;
            logical.insert(name.to_string(), weight);
        }
    }
    if logical.is_empty() {
        return Ok((header.with_tensors(header.tensors.clone()), quant));
    }
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        if quant.dropped.contains(&t.name) {
            continue;
        }
        match logical.remove(&t.name) {
            Some((shape, source)) => {
                quant.sources.insert(tensors.len(), source);
                tensors.push(TensorInfo {
                    name: t.name.clone(),
                    dtype: Dtype::F32,
                    shape,
                    begin: t.begin,
                    end: t.end,
                });
            }
            None => tensors.push(t.clone()),
        }
    }
    Ok((header.with_tensors(tensors), quant))
}

/// The LLM.int8 weight `name` whose row scales are `scb` (`None` when `name` is not an
/// int8 tensor); the scales join `dropped`.
fn int8_weight(
    file: &File,
    header: &Header,
    scb: &TensorInfo,
    name: &str,
    dropped: &mut HashSet<String>,
) -> Result<Option<Logical>> {
    let bad = |msg: String| CoreError::format(&header.path, msg);
    let Some(w) = header.get(name).filter(|w| w.dtype == Dtype::I8) else {
        return Ok(None);
    };
    let [rows, cols] = w.shape[..] else {
        return Err(bad(format!("8-bit weight {name:?} is not 2-D")));
    };
    let scales = read_f32s(file, header, scb)?;
    if scales.len() as u64 != rows {
        return Err(bad(format!(
            "{:?} has {} scales for {rows} rows of {name:?}",
            scb.name,
            scales.len()
        )));
    }
    dropped.insert(scb.name.clone());
    let data = header.data_start() + w.begin;
    let source = Source::Int8 {
        data,
        cols,
        scb: scales,
    };
    Ok(Some((vec![rows, cols], source)))
}

/// The 4-bit (`kind`: nf4 or fp4) weight `name` described by its quant state tensor
/// `state`; the state tensors join `dropped`.
fn four_bit_weight(
    file: &File,
    header: &Header,
    state: &TensorInfo,
    name: &str,
    kind: &str,
    dropped: &mut HashSet<String>,
) -> Result<Logical> {
    let bad = |msg: String| CoreError::format(&header.path, msg);
    let info = state;
    let state: Value = serde_json::from_slice(&read_bytes(file, header, info)?)
        .map_err(|e| bad(format!("{:?} is not JSON ({e})", info.name)))?;
    let Some(w) = header.get(name).filter(|w| w.dtype == Dtype::U8) else {
        return Err(bad(format!(
            "{:?} has no packed weight {name:?}",
            info.name
        )));
    };
    let shape: Vec<u64> = state["shape"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let blocksize = state["blocksize"].as_u64().unwrap_or(0);
    let numel: u64 = shape.iter().product();
    if shape.len() != 2 || blocksize == 0 || w.nbytes() * 2 < numel {
        return Err(bad(format!(
            "4-bit ({kind}) weight {name:?}: unusable quant state (shape {shape:?}, \
             blocksize {blocksize}, {} packed bytes)",
            w.nbytes()
        )));
    }
    let map_v = read_f32s(file, header, state_part(header, name, "quant_map")?)?;
    let map: [f32; 16] = map_v
        .try_into()
        .map_err(|_| bad(format!("{name:?}: the 4-bit code book must hold 16 values")))?;
    let absmax = absmax(file, header, name, &state, dropped)?;
    if (absmax.len() as u64) < numel.div_ceil(blocksize) {
        return Err(bad(format!("{name:?}: too few absmax values")));
    }
    for suffix in ["absmax", "quant_map"] {
        dropped.insert(format!("{name}.{suffix}"));
    }
    dropped.insert(info.name.clone());
    let data = header.data_start() + w.begin;
    let source = Source::FourBit {
        data,
        blocksize,
        absmax,
        map,
    };
    Ok((shape, source))
}

/// The state tensor `<name>.<suffix>` of the 4-bit weight `name`.
fn state_part<'h>(header: &'h Header, name: &str, suffix: &str) -> Result<&'h TensorInfo> {
    let n = format!("{name}.{suffix}");
    header.get(&n).ok_or_else(|| {
        CoreError::format(&header.path, format!("4-bit weight {name:?} lacks {n:?}"))
    })
}

/// The float32 absmax of every block of the 4-bit weight `name`: stored as is, or
/// itself 8-bit quantised (`nested_absmax`, `nested_quant_map` and the `state`'s
/// nested block size and offset; those tensors join `dropped`).
fn absmax(
    file: &File,
    header: &Header,
    name: &str,
    state: &Value,
    dropped: &mut HashSet<String>,
) -> Result<Vec<f32>> {
    let bad = |msg: String| CoreError::format(&header.path, msg);
    let absmax_info = state_part(header, name, "absmax")?;
    if absmax_info.dtype == Dtype::F32 {
        return read_f32s(file, header, absmax_info);
    }
    let codes = read_bytes(file, header, absmax_info)?;
    let nested_absmax = read_f32s(file, header, state_part(header, name, "nested_absmax")?)?;
    let nested_map = read_f32s(file, header, state_part(header, name, "nested_quant_map")?)?;
    let nested_block = state["nested_blocksize"].as_u64().unwrap_or(0) as usize;
    let offset = state["nested_offset"].as_f64().unwrap_or(0.0) as f32;
    if nested_block == 0 || nested_map.len() < 256 {
        return Err(bad(format!("{name:?}: unusable nested absmax state")));
    }
    let mut out = Vec::with_capacity(codes.len());
    for (i, &c) in codes.iter().enumerate() {
        let scale = *nested_absmax
            .get(i / nested_block)
            .ok_or_else(|| bad(format!("{name:?}: too few nested absmax values")))?;
        out.push(nested_map[c as usize] * scale + offset);
    }
    for suffix in ["nested_absmax", "nested_quant_map"] {
        dropped.insert(format!("{name}.{suffix}"));
    }
    Ok(out)
}

impl Source {
    /// Writes elements `e0 .. e0 + n` (row-major) of the dequantised weight into `out`
    /// as little-endian float32; `raw` is scratch space. Returns the bytes read.
    pub(super) fn read(
        &self,
        file: &File,
        path: &Path,
        e0: u64,
        n: usize,
        raw: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<u64> {
        let mut values = vec![0f32; n];
        match self {
            Source::Int8 { data, cols, scb } => {
                raw.resize(n, 0);
                read_exact_at(file, raw, data + e0).map_err(|e| CoreError::io(path, e))?;
                for (k, (v, &q)) in values.iter_mut().zip(raw.iter()).enumerate() {
                    let row = ((e0 + k as u64) / cols) as usize;
                    *v = (q as i8 as f32 * scb[row]) * (1.0f32 / 127.0);
                }
            }
            Source::FourBit {
                data,
                blocksize,
                absmax,
                map,
            } => {
                let b0 = e0 / 2;
                let b1 = (e0 + n as u64).div_ceil(2);
                raw.resize((b1 - b0) as usize, 0);
                read_exact_at(file, raw, data + b0).map_err(|e| CoreError::io(path, e))?;
                for (k, v) in values.iter_mut().enumerate() {
                    let e = e0 + k as u64;
                    let byte = raw[(e / 2 - b0) as usize];
                    let code = if e % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                    *v = map[code as usize] * absmax[(e / blocksize) as usize];
                }
            }
        }
        codec::encode(Dtype::F32, &values, out)?;
        Ok(raw.len() as u64)
    }
}
