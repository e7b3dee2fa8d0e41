//! Reading a Uni-LoRA adapter directory (docs/SPEC.md, section 3) and rebuilding its
//! LoRA matrices.
//!
//! The reader checks what the Python loader checks: format name and versions, a
//! non-empty list of distinct modules with positive sizes, `1 <= d <= D`, the
//! fingerprint recomputed from seed, `d` and the module list, and a finite float32
//! `theta_d` of length `d`.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::convert;
use crate::error::{CoreError, Result};
use crate::fingerprint::fingerprint;
use crate::reconstruct::{check_vector, reconstruct};
use crate::safetensors::{Dtype, Header, TensorInfo, read_exact_at};

/// Name of the adapter's configuration file.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// Name of the adapter's weights file.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// Name of the trainable vector in the weights file.
pub const VECTOR_KEY: &str = "theta_d";
/// The `format` value of an adapter config.
pub const FORMAT_NAME: &str = "unilora_rs";
/// The newest `format_version` this reader understands.
pub const FORMAT_VERSION: u64 = 1;

/// How a module stores its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear`: weight `[out, in]`, update `B @ A`.
    Linear,
    /// GPT-2 style `Conv1D`: weight `[in, out]`, update `(B @ A)^T`.
    Conv1d,
}

/// One adapted module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterModule {
    /// Qualified module name in the base model (the weight is `<name>.weight`).
    pub name: String,
    /// Input features.
    pub in_features: u64,
    /// Output features.
    pub out_features: u64,
    /// Weight layout.
    pub kind: ModuleKind,
}

impl AdapterModule {
    /// Shape of the base weight: `[out, in]` for linear, `[in, out]` for conv1d.
    pub fn weight_shape(&self) -> [u64; 2] {
        match self.kind {
            ModuleKind::Linear => [self.out_features, self.in_features],
            ModuleKind::Conv1d => [self.in_features, self.out_features],
        }
    }
}

/// The LoRA factors of one module, float32, row-major.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// `B`, `out x r`.
    pub b: Vec<f32>,
    /// `A`, `r x in`.
    pub a: Vec<f32>,
}

#[derive(Deserialize)]
struct RawModule {
    name: String,
    in_features: u64,
    out_features: u64,
    #[serde(default = "default_kind")]
    kind: String,
}

fn default_kind() -> String {
    "linear".into()
}

#[derive(Deserialize)]
struct RawConfig {
    format: Option<String>,
    #[serde(default)]
    format_version: u64,
    spec_version: Option<u64>,
    seed: u64,
    vector_length: u64,
    rank: u64,
    alpha: f64,
    modules: Vec<RawModule>,
    #[serde(default)]
    modules_to_save: Vec<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    fingerprint: String,
}

/// A loaded, verified adapter.
#[derive(Debug)]
pub struct Adapter {
    /// The adapter directory.
    pub dir: PathBuf,
    /// Seed of the projection.
    pub seed: u64,
    /// `d`, the length of `theta_d`.
    pub d: u64,
    /// The LoRA rank `r`.
    pub rank: u64,
    /// LoRA alpha (the update is scaled by `alpha / r`).
    pub alpha: f64,
    /// Modules in flattening order.
    pub modules: Vec<AdapterModule>,
    /// Names of the modules whose full weights the weights file holds.
    pub modules_to_save: Vec<String>,
    /// The base model recorded in the config.
    pub base_model_name_or_path: Option<String>,
    /// The verified fingerprint.
    pub fingerprint: String,
    /// `theta_d`.
    pub theta: Vec<f32>,
    /// Path of the weights file.
    pub weights_path: PathBuf,
    /// Header of the weights file (holds the `modules_to_save` tensors too).
    pub weights: Header,
    weights_file: File,
}

impl Adapter {
    /// Opens the adapter at `path` (its directory, or its `adapter_config.json`).
    pub fn open(path: &Path) -> Result<Adapter> {
        let (dir, config_path) = if path.is_dir() {
            (path.to_path_buf(), path.join(CONFIG_NAME))
        } else if path.file_name().is_some_and(|n| n == CONFIG_NAME) {
            (
                path.parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                path.to_path_buf(),
            )
        } else if path.exists() {
            return Err(CoreError::InvalidArgument(format!(
                "{}: an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}",
                path.display()
            )));
        } else {
            return Err(CoreError::io(path, std::io::ErrorKind::NotFound.into()));
        };
        let text = std::fs::read(&config_path).map_err(|e| CoreError::io(&config_path, e))?;
        let value: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| CoreError::format(&config_path, format!("invalid JSON ({e})")))?;
        let fmt = value.get("format").and_then(|v| v.as_str());
        if fmt != Some(FORMAT_NAME) {
            return Err(CoreError::format(
                &config_path,
                format!("not a unilora_rs adapter (format = {fmt:?}, expected {FORMAT_NAME:?})"),
            ));
        }
        let raw: RawConfig = serde_json::from_value(value).map_err(|e| {
            CoreError::format(&config_path, format!("malformed adapter config ({e})"))
        })?;
        let bad = |msg: String| CoreError::format(&config_path, msg);
        debug_assert_eq!(raw.format.as_deref(), Some(FORMAT_NAME));
        if raw.format_version > FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is newer than this unilora_rs ({FORMAT_VERSION}); upgrade unilora_rs",
                raw.format_version
            )));
        }
        if raw.spec_version != Some(1) {
            return Err(bad(format!(
                "unsupported generator spec_version {:?}",
                raw.spec_version
            )));
        }
        if raw.rank == 0 {
            return Err(bad("rank must be a positive integer".into()));
        }
        if !raw.alpha.is_finite() {
            return Err(bad(format!("alpha = {} is not finite", raw.alpha)));
        }
        if raw.modules.is_empty() {
            return Err(bad("an adapter needs at least one module".into()));
        }
        let mut modules = Vec::with_capacity(raw.modules.len());
        let mut seen = std::collections::HashSet::new();
        for m in raw.modules {
            let kind = match m.kind.as_str() {
                "linear" => ModuleKind::Linear,
                "conv1d" => ModuleKind::Conv1d,
                other => {
                    return Err(bad(format!(
                        "module {:?}: kind {other:?} is not one of linear, conv1d",
                        m.name
                    )));
                }
            };
            if m.name.is_empty() || m.in_features == 0 || m.out_features == 0 {
                return Err(bad(format!("module {:?}: empty name or zero size", m.name)));
            }
            if !seen.insert(m.name.clone()) {
                return Err(bad(format!("module {:?} is listed twice", m.name)));
            }
            modules.push(AdapterModule {
                name: m.name,
                in_features: m.in_features,
                out_features: m.out_features,
                kind,
            });
        }
        let mut adapter_shapes = Vec::with_capacity(2 * modules.len());
        for m in &modules {
            adapter_shapes.push((format!("{}.lora_B", m.name), m.out_features, raw.rank));
            adapter_shapes.push((format!("{}.lora_A", m.name), raw.rank, m.in_features));
        }
        let named: Vec<(&str, u64, u64)> = adapter_shapes
            .iter()
            .map(|(n, r, c)| (n.as_str(), *r, *c))
            .collect();
        let expected = fingerprint(raw.seed, raw.vector_length, &named);
        if raw.fingerprint != expected {
            return Err(CoreError::Mismatch(format!(
                "{}: adapter fingerprint mismatch: the config records {:?} but seed={}, d={} and the {} \
                 listed modules give {expected}; the seed, d or module list was changed after training, \
                 so theta_d would rebuild the wrong matrices",
                config_path.display(),
                raw.fingerprint,
                raw.seed,
                raw.vector_length,
                modules.len()
            )));
        }
        let weights_path = dir.join(WEIGHTS_NAME);
        let (weights_file, weights) = Header::read(&weights_path)?;
        let info = weights
            .get(VECTOR_KEY)
            .ok_or_else(|| CoreError::format(&weights_path, format!("no {VECTOR_KEY:?} tensor")))?
            .clone();
        if info.dtype != Dtype::F32 {
            return Err(CoreError::format(
                &weights_path,
                format!("{VECTOR_KEY} has dtype {}, expected F32", info.dtype),
            ));
        }
        if info.shape != [raw.vector_length] {
            return Err(CoreError::Vector(format!(
                "{}: {VECTOR_KEY} has shape {:?} but the config says d = {}",
                weights_path.display(),
                info.shape,
                raw.vector_length
            )));
        }
        let mut bytes = vec![0u8; info.nbytes() as usize];
        read_exact_at(&weights_file, &mut bytes, weights.data_start() + info.begin)
            .map_err(|e| CoreError::io(&weights_path, e))?;
        let mut theta = vec![0f32; raw.vector_length as usize];
        convert::decode(Dtype::F32, &bytes, &mut theta)?;
        check_vector(&theta, raw.vector_length)
            .map_err(|e| CoreError::Vector(format!("{}: {e}", weights_path.display())))?;
        let adapter = Adapter {
            dir,
            seed: raw.seed,
            d: raw.vector_length,
            rank: raw.rank,
            alpha: raw.alpha,
            modules,
            modules_to_save: raw.modules_to_save,
            base_model_name_or_path: raw.base_model_name_or_path,
            fingerprint: expected,
            theta,
            weights_path,
            weights,
            weights_file,
        };
        let total = adapter.total_size();
        if adapter.d > total {
            return Err(CoreError::InvalidArgument(format!(
                "d = {} is larger than D = {total} (the LoRA parameter count of the listed modules)",
                adapter.d
            )));
        }
        Ok(adapter)
    }

    /// The LoRA scaling `alpha / r`, computed in binary64 and rounded to float32.
    pub fn scaling(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// `D`: the number of LoRA parameters the adapter represents.
    pub fn total_size(&self) -> u64 {
        self.modules
            .iter()
            .map(|m| self.rank * (m.in_features + m.out_features))
            .sum()
    }

    /// The matrix shapes of `theta_D` in flattening order (`B` then `A` per module).
    pub fn matrix_shapes(&self) -> Vec<(u64, u64)> {
        self.modules
            .iter()
            .flat_map(|m| [(m.out_features, self.rank), (self.rank, m.in_features)])
            .collect()
    }

    /// Rebuilds `B` and `A` of every module (in parallel, in the crate's pool).
    pub fn lora_pairs(&self) -> Result<Vec<LoraPair>> {
        let mut mats = reconstruct(&self.theta, self.seed, &self.matrix_shapes())?.into_iter();
        let mut out = Vec::with_capacity(self.modules.len());
        while let (Some(b), Some(a)) = (mats.next(), mats.next()) {
            out.push(LoraPair { b, a });
        }
        Ok(out)
    }

    /// The tensors of the weights file other than `theta_d` (`modules_to_save`
    /// replacements), sorted by offset.
    pub fn extra_tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.weights.tensors.iter().filter(|t| t.name != VECTOR_KEY)
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
