//! One entry of an adapter's `modules` list: the adapted module's name, sizes and
//! weight layout (docs/SPEC.md, section 3).

use serde_json::{Value, json};

use super::error::ConfigError;
use super::fingerprint::check_name;
use super::json::{shown, uint};

const MODULE_KEYS: [&str; 4] = ["name", "in_features", "out_features", "kind"];

/// How a module stores its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear`: weight `[out, in]`, update `B @ A`.
    Linear,
    /// GPT-2 style `Conv1D`: weight `[in, out]`, update `(B @ A)^T`.
    Conv1d,
}

impl ModuleKind {
    /// The name used in `adapter_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Linear => "linear",
            ModuleKind::Conv1d => "conv1d",
        }
    }
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

    /// Parses and checks one entry of `modules` (`label` names it in messages, e.g.
    /// `modules[3]`).
    pub fn from_value(value: &Value, label: &str) -> std::result::Result<Self, ConfigError> {
        let Some(obj) = value.as_object() else {
            return Err(ConfigError::invalid(
                label.to_string(),
                "an object {name, in_features, out_features, kind}",
                value.to_string(),
            ));
        };
        let name = match obj.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            other => {
                let error = ConfigError::invalid("name", "a non-empty string", shown(other));
                return Err(error.at(label));
            }
        };
        let label = format!("{label} ({name:?})");
        check_name(&name).map_err(|e| e.at(&label))?;
        if let Some(key) = obj.keys().find(|k| !MODULE_KEYS.contains(&k.as_str())) {
            let known = &MODULE_KEYS;
            return Err(ConfigError::UnknownModuleKey {
                key: key.clone(),
                known,
            }
            .at(label));
        }
        let size = |key: &'static str| {
            uint(obj.get(key), 1, u64::MAX).map_err(|got| {
                ConfigError::invalid(key, "an integer in [1, 2^64 - 1]", got).at(&label)
            })
        };
        let (in_features, out_features) = (size("in_features")?, size("out_features")?);
        let kind = match obj.get("kind") {
            None => ModuleKind::Linear,
            Some(Value::String(s)) if s == "linear" => ModuleKind::Linear,
            Some(Value::String(s)) if s == "conv1d" => ModuleKind::Conv1d,
            Some(other) => {
                let got = other.to_string();
                return Err(ConfigError::UnknownModuleKind { got }.at(label));
            }
        };
        Ok(AdapterModule {
            name,
            in_features,
            out_features,
            kind,
        })
    }

    /// The JSON object of this module.
    pub fn to_value(&self) -> Value {
        json!({
            "name": self.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "kind": self.kind.name(),
        })
    }
}
