//! Reading a Uni-LoRA adapter directory (docs/SPEC.md, section 3) and rebuilding its
//! LoRA matrices.
//!
//! [`Adapter::open`] checks, in order: the config ([`AdapterConfig::read`], the one
//! validator every reader shares), its fingerprint, then the weights file: `theta_d` is
//! float32 of length `d`, the fingerprint in the file's metadata (when it records one)
//! is the config's, every other tensor belongs to a `modules_to_save` module, the
//! `task`'s new tensors are among them, and `theta_d` is finite. Last, the projection
//! is built ([`Projector::for_config`]): an explicit map is read from the weights file
//! (`theta_d.indices`, `theta_d.scales`) or regenerated, and its SHA-256 must be the
//! config's `map_sha256`.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::codec;
use crate::error::{CoreError, Result};
use crate::format::{AdapterConfig, CONFIG_NAME, ProjectionKind};
use crate::io::pio::read_exact_at;
use crate::projection::{ExplicitMap, Projector, check_vector};
use crate::safetensors::{Dtype, Header, TensorInfo};

/// Name of the adapter's weights file.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// Name of the trainable vector in the weights file.
pub const VECTOR_KEY: &str = "theta_d";
/// The column of every row of an explicit map (int32 `[D]`, flattening order).
pub const MAP_INDICES_KEY: &str = "theta_d.indices";
/// The scale of every row of an explicit map (float32 `[D]`).
pub const MAP_SCALES_KEY: &str = "theta_d.scales";

/// Whether a weights-file tensor is `theta_d` or part of its explicit map.
fn is_vector_tensor(name: &str) -> bool {
    [VECTOR_KEY, MAP_INDICES_KEY, MAP_SCALES_KEY].contains(&name)
}

/// The LoRA factors of one module, float32, row-major.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// `B`, `out x r`.
    pub b: Vec<f32>,
    /// `A`, `r x in`.
    pub a: Vec<f32>,
}

/// How much of an adapter [`Adapter::load`] verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Everything: the config's fingerprint matches, `theta_d` is finite.
    Full,
    /// Everything but those two (for tools that report them, like `inspect`).
    Structure,
}

/// A loaded, verified adapter.
#[derive(Debug)]
pub struct Adapter {
    /// The adapter directory.
    pub dir: PathBuf,
    /// The checked config.
    pub config: AdapterConfig,
    /// `theta_d`.
    pub theta: Vec<f32>,
    /// Path of the weights file.
    pub weights_path: PathBuf,
    /// Header of the weights file (holds the `modules_to_save` tensors too).
    pub weights: Header,
    /// The projection, ready to rebuild the LoRA matrices.
    pub projector: Projector,
    weights_file: File,
}

impl Adapter {
    /// Opens the adapter at `path` (its directory, or its `adapter_config.json`) and
    /// verifies it fully.
    pub fn open(path: &Path) -> Result<Adapter> {
        Adapter::load(path, Verify::Full)
    }

    /// Opens the adapter at `path`, verifying as much as `verify` says.
    pub fn load(path: &Path, verify: Verify) -> Result<Adapter> {
        let (config, dir) = AdapterConfig::read(path)?;
        if verify == Verify::Full {
            config.verify(&dir.join(CONFIG_NAME))?;
        }
        let weights_path = dir.join(WEIGHTS_NAME);
        let (weights_file, weights) = Header::read(&weights_path)?;
        let vector = check_weights(&weights, &weights_path, &config)?;
        let theta = read_theta(&weights_file, &weights, &vector, &weights_path)?;
        if verify == Verify::Full {
            check_vector(&theta, config.d)
                .map_err(|e| CoreError::Vector(format!("{}: {e}", weights_path.display())))?;
        }
        let projector = Projector::for_config(&config, || {
            read_map(&weights_file, &weights, &weights_path, &config)
        })?;
        let adapter = Adapter {
            dir,
            config,
            theta,
            weights_path,
            weights,
            projector,
            weights_file,
        };
        if verify == Verify::Full {
            if let Some(msg) = adapter.map_mismatch() {
                return Err(CoreError::Mismatch(format!(
                    "{}: {msg}",
                    adapter.dir.join(CONFIG_NAME).display()
                )));
            }
        }
        Ok(adapter)
    }

    /// What is wrong with the map's SHA-256, if anything (explicit and regenerated maps).
    pub fn map_mismatch(&self) -> Option<String> {
        let (map, recorded) = (self.projector.map()?, self.config.map_sha256.as_deref()?);
        (map.sha256() != recorded).then(|| {
            let source = match self.config.projection {
                ProjectionKind::PeftNumpy => {
                    "the map regenerated with this numpy differs from the one recorded at \
                     conversion (numpy's generator stream changed?); convert the PEFT adapter \
                     again with --explicit on a numpy that gives the recorded map"
                }
                _ => "the stored map was changed after it was recorded",
            };
            format!(
                "map mismatch: the config records map_sha256 {recorded}, the map has {}; {source}",
                map.sha256()
            )
        })
    }

    /// Rebuilds `B` and `A` of every module (in parallel, in the crate's pool).
    pub fn lora_pairs(&self) -> Result<Vec<LoraPair>> {
        let shapes: Vec<(u64, u64)> = self
            .config
            .matrices()
            .into_iter()
            .map(|(_, rows, cols)| (rows, cols))
            .collect();
        let mut mats = self
            .projector
            .reconstruct(&self.theta, &shapes)?
            .into_iter();
        let mut out = Vec::with_capacity(self.config.modules.len());
        while let (Some(b), Some(a)) = (mats.next(), mats.next()) {
            out.push(LoraPair { b, a });
        }
        Ok(out)
    }

    /// The tensors of the weights file other than `theta_d` and its map
    /// (`modules_to_save` replacements), sorted by offset.
    pub fn extra_tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.weights
            .tensors
            .iter()
            .filter(|t| !is_vector_tensor(&t.name))
    }

    /// Fills `buf` with raw bytes of the weights file's data buffer, starting at
    /// `offset` (relative to the data buffer).
    pub fn read_weights(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_exact_at(&self.weights_file, buf, self.weights.data_start() + offset)
            .map_err(|e| CoreError::io(&self.weights_path, e))
    }

    /// The open weights file.
    pub fn weights_file(&self) -> &File {
        &self.weights_file
    }
}

/// Checks the weights file against its config; returns the `theta_d` entry.
fn check_weights(weights: &Header, path: &Path, config: &AdapterConfig) -> Result<TensorInfo> {
    check_recorded_fingerprint(weights, path, config)?;
    check_map_tensors(weights, path, config)?;
    check_saved_tensors(weights, path, config)?;
    check_new_tensors(weights, path, config)?;
    vector_entry(weights, path, config)
}

/// The fingerprint in the file's metadata, when it records one, is the config's.
fn check_recorded_fingerprint(weights: &Header, path: &Path, config: &AdapterConfig) -> Result<()> {
    let recorded = weights
        .metadata
        .as_ref()
        .and_then(|m| m.get("fingerprint"))
        .and_then(|v| v.as_str());
    if let Some(recorded) = recorded.filter(|fp| *fp != config.fingerprint) {
        return Err(CoreError::Mismatch(format!(
            "{}: the weights file belongs to another adapter: its metadata records fingerprint \
             {recorded}, the config {}",
            path.display(),
            config.fingerprint
        )));
    }
    Ok(())
}

/// The explicit map's tensors are there exactly when the projection is `explicit`.
fn check_map_tensors(weights: &Header, path: &Path, config: &AdapterConfig) -> Result<()> {
    let explicit = config.projection == ProjectionKind::Explicit;
    for key in [MAP_INDICES_KEY, MAP_SCALES_KEY] {
        match (weights.get(key).is_some(), explicit) {
            (false, true) => {
                return Err(CoreError::format(
                    path,
                    format!(
                        "no {key:?} tensor: projection \"explicit\" keeps its map in the weights file"
                    ),
                ));
            }
            (true, false) => {
                return Err(CoreError::format(
                    path,
                    format!(
                        "tensor {key:?} is an explicit map, but the config's projection is {:?}",
                        config.projection.name()
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every tensor other than `theta_d` and its map belongs to a `modules_to_save` module.
fn check_saved_tensors(weights: &Header, path: &Path, config: &AdapterConfig) -> Result<()> {
    for t in weights
        .tensors
        .iter()
        .filter(|t| !is_vector_tensor(&t.name))
    {
        let owned = config.modules_to_save.iter().any(|m| {
            t.name
                .strip_prefix(m.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        });
        if !owned {
            return Err(CoreError::format(
                path,
                format!(
                    "tensor {:?} is not part of modules_to_save ({:?}); the weights file holds \
                     theta_d and the full weights of those modules only",
                    t.name, config.modules_to_save
                ),
            ));
        }
    }
    Ok(())
}

/// The `task`'s new tensors are `modules_to_save` tensors of the file.
fn check_new_tensors(weights: &Header, path: &Path, config: &AdapterConfig) -> Result<()> {
    let Some(task) = &config.task else {
        return Ok(());
    };
    for name in &task.new_tensors {
        if is_vector_tensor(name) || weights.get(name).is_none() {
            return Err(CoreError::format(
                path,
                format!(
                    "task.new_tensors names {name:?}, which is not a modules_to_save tensor \
                     of the weights file"
                ),
            ));
        }
    }
    Ok(())
}

/// The `theta_d` entry: float32 of shape `[d]`.
fn vector_entry(weights: &Header, path: &Path, config: &AdapterConfig) -> Result<TensorInfo> {
    let info = weights
        .get(VECTOR_KEY)
        .ok_or_else(|| CoreError::format(path, format!("no {VECTOR_KEY:?} tensor")))?;
    if info.dtype != Dtype::F32 {
        return Err(CoreError::format(
            path,
            format!("{VECTOR_KEY} has dtype {}, expected F32", info.dtype),
        ));
    }
    if info.shape != [config.d] {
        return Err(CoreError::Vector(format!(
            "{}: {VECTOR_KEY} has shape {:?} but the config says d = {}",
            path.display(),
            info.shape,
            config.d
        )));
    }
    Ok(info.clone())
}

/// The explicit map of the weights file: `theta_d.indices` int32 `[D]`, `theta_d.scales`
/// float32 `[D]` (presence checked by `check_weights`).
fn read_map(
    file: &File,
    weights: &Header,
    path: &Path,
    config: &AdapterConfig,
) -> Result<ExplicitMap> {
    let total = config.total_size();
    let mut raw = Vec::new();
    for (key, dtype) in [(MAP_INDICES_KEY, Dtype::I32), (MAP_SCALES_KEY, Dtype::F32)] {
        let info = weights
            .get(key)
            .ok_or_else(|| CoreError::format(path, format!("no {key:?} tensor")))?;
        if info.dtype != dtype || info.shape != [total] {
            return Err(CoreError::format(
                path,
                format!(
                    "{key} is {} {:?}, expected {dtype} [{total}] (one entry per LoRA parameter)",
                    info.dtype, info.shape
                ),
            ));
        }
        let mut bytes = CoreError::try_zeroed::<u8>(info.nbytes(), "the explicit map")?;
        read_exact_at(file, &mut bytes, weights.data_start() + info.begin)
            .map_err(|e| CoreError::io(path, e))?;
        raw.push(bytes);
    }
    let words = |b: &[u8]| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let indices = words(&raw[0]);
    let scales = words(&raw[1]).into_iter().map(f32::from_bits).collect();
    ExplicitMap::new(indices, scales, config.d)
        .map_err(|e| CoreError::format(path, format!("explicit map: {e}")))
}

fn read_theta(file: &File, weights: &Header, info: &TensorInfo, path: &Path) -> Result<Vec<f32>> {
    let mut bytes = CoreError::try_zeroed::<u8>(info.nbytes(), "theta_d")?;
    read_exact_at(file, &mut bytes, weights.data_start() + info.begin)
        .map_err(|e| CoreError::io(path, e))?;
    let mut theta = CoreError::try_zeroed::<f32>(info.numel(), "theta_d")?;
    codec::decode(Dtype::F32, &bytes, &mut theta)?;
    Ok(theta)
}
