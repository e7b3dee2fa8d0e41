//! The adapter configuration, `adapter_config.json` (docs/SPEC.md, section 3), and its
//! one validator.
//!
//! Every reader goes through [`AdapterConfig::from_value`]: the Rust merge and export,
//! and, through `unilora_rs._core`, the Python loader, `inspect` and the torch layer's
//! `from_pretrained`. So they all accept and reject the same files, with the same
//! message. The checks:
//!
//! * `format` is `"unilora_rs"`, `format_version` is not newer than this reader's;
//!   `projection` is one of [`ProjectionKind`]'s names (absent: `sparse`) and
//!   `spec_version` is its version (1 for `sparse`, 2 for the others); `map_sha256` is a
//!   `sha256:` digest exactly when the projection is a map (`explicit`, `peft-numpy`,
//!   whose `d` is at most 2^31);
//! * `seed` is a u64, `vector_length` (`d`) is in `[1, 2^32]`, `rank` is a positive
//!   integer, `alpha` a finite number, `init_range` a positive finite number;
//! * `modules` is a non-empty list of objects with exactly the keys `name`,
//!   `in_features`, `out_features` and (optionally) `kind`; names are distinct,
//!   non-empty and free of control characters (so the fingerprint text is unambiguous);
//!   sizes are integers in `[1, 2^64 - 1]`; `kind` is `linear` or `conv1d`;
//! * the rank is at most every module's `min(in_features, out_features)`, the LoRA
//!   parameter count `D` fits in 64 bits and `d <= D`;
//! * the informative keys have the right types (`target_modules`, `exclude_modules`:
//!   null, a string or a list of strings; `modules_to_save`: a list of non-empty
//!   strings; `base_model_name_or_path`, `library_version`: a string or null);
//! * a config read from a file records a fingerprint ([`AdapterConfig::read`]); whether
//!   it matches is [`AdapterConfig::verify`];
//! * `task`, when present, is checked by [`Task::from_value`]. Other top-level keys are
//!   not checked and are kept as they are ([`AdapterConfig::extra`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::error::ConfigError;
use super::fingerprint::{canonical_text_v2, fingerprint, hash_text};
use super::json::{finite, parse_json, shown, uint};
use super::kind::{MAX_D, MAX_MAP_D, ProjectionKind};
use super::module::AdapterModule;
use super::task::Task;
use crate::error::{CoreError, Result};
use crate::io::fs::read_regular;

/// Name of the adapter's configuration file.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The `format` value of an adapter config.
pub const FORMAT_NAME: &str = "unilora_rs";
/// The newest `format_version` this reader understands.
pub const FORMAT_VERSION: u64 = 1;
/// The newest generator spec version this reader understands (docs/SPEC.md): 1 is the
/// sparse projection, 2 adds Fastfood and explicit maps.
pub const ADAPTER_SPEC_VERSION: u64 = 2;
/// The `init_range` of a config that does not record one.
pub const DEFAULT_INIT_RANGE: f64 = 0.02;

const CONFIG_KEYS: [&str; 18] = [
    "format",
    "format_version",
    "spec_version",
    "projection",
    "map_sha256",
    "seed",
    "vector_length",
    "rank",
    "alpha",
    "modules",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "base_model_name_or_path",
    "init_range",
    "fingerprint",
    "library_version",
    "task",
];

/// A checked adapter configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// `format_version` of the file (0 when absent).
    pub format_version: u64,
    /// The generator spec version (1 for the sparse projection, 2 for the others).
    pub spec_version: u64,
    /// Which projection maps `theta_d` to `theta_D` (`projection`; absent: sparse).
    pub projection: ProjectionKind,
    /// The SHA-256 of the map (`explicit`, `peft-numpy`), as `"sha256:<hex>"`.
    pub map_sha256: Option<String>,
    /// Seed of the projection.
    pub seed: u64,
    /// `d`, the length of `theta_d` (`vector_length`).
    pub d: u64,
    /// The LoRA rank `r`.
    pub rank: u64,
    /// LoRA alpha (the update is scaled by `alpha / r`).
    pub alpha: f64,
    /// Modules in flattening order.
    pub modules: Vec<AdapterModule>,
    /// Names of the modules whose full weights the weights file holds.
    pub modules_to_save: Vec<String>,
    /// The matching rule the module list was resolved from (informative).
    pub target_modules: Value,
    /// The exclusion rule (informative).
    pub exclude_modules: Value,
    /// The base model recorded in the config.
    pub base_model_name_or_path: Option<String>,
    /// Half-width of the uniform init of `theta_d` (informative).
    pub init_range: f64,
    /// The recorded fingerprint (empty when the config records none).
    pub fingerprint: String,
    /// The unilora_rs version that wrote the file (informative).
    pub library_version: Option<String>,
    /// What the trained model is for (`task`), when recorded.
    pub task: Option<Task>,
    /// The other top-level keys, unchecked, in file order (kept when the config is
    /// written back by [`AdapterConfig::to_value`]).
    pub extra: Map<String, Value>,
}

impl AdapterConfig {
    /// Checks a parsed `adapter_config.json` (everything but the fingerprint match).
    pub fn from_value(value: &Value) -> std::result::Result<Self, ConfigError> {
        let Some(obj) = value.as_object() else {
            return Err(ConfigError::NotAnObject {
                got: value.to_string(),
            });
        };
        check_format(obj)?;
        let projection = match obj.get("projection") {
            None | Some(Value::Null) => ProjectionKind::Sparse,
            Some(Value::String(name)) => ProjectionKind::parse(name)?,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "projection",
                    format!("one of {}", ProjectionKind::names()),
                    other.to_string(),
                ));
            }
        };
        check_spec_version(obj.get("spec_version"), projection)?;
        let config = AdapterConfig {
            format_version: match obj.get("format_version") {
                None | Some(Value::Null) => 0,
                v => uint(v, 0, u64::MAX).map_err(|got| {
                    ConfigError::invalid("format_version", "a non-negative integer", got)
                })?,
            },
            spec_version: projection.spec_version(),
            projection,
            map_sha256: map_sha256(obj.get("map_sha256"), projection)?,
            seed: uint(obj.get("seed"), 0, u64::MAX)
                .map_err(|got| ConfigError::invalid("seed", "an integer in [0, 2^64 - 1]", got))?,
            d: uint(obj.get("vector_length"), 1, MAX_D).map_err(|got| {
                ConfigError::invalid("vector_length (d)", "an integer in [1, 2^32]", got)
            })?,
            rank: uint(obj.get("rank"), 1, u64::MAX)
                .map_err(|got| ConfigError::invalid("rank", "a positive integer", got))?,
            alpha: finite(obj.get("alpha"))
                .map_err(|got| ConfigError::invalid("alpha", "a finite number", got))?,
            modules: parse_modules(obj.get("modules"))?,
            modules_to_save: string_list(obj.get("modules_to_save"))?,
            target_modules: rule(obj, "target_modules")?,
            exclude_modules: rule(obj, "exclude_modules")?,
            base_model_name_or_path: optional_string(obj, "base_model_name_or_path")?,
            init_range: init_range(obj.get("init_range"))?,
            fingerprint: match obj.get("fingerprint") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(ConfigError::invalid(
                        "fingerprint",
                        "a string",
                        other.to_string(),
                    ));
                }
            },
            library_version: optional_string(obj, "library_version")?,
            task: Task::from_value(obj.get("task"))?,
            extra: obj
                .iter()
                .filter(|(k, _)| !CONFIG_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        if config.format_version > FORMAT_VERSION {
            return Err(ConfigError::NewerFormat {
                version: config.format_version,
                newest: FORMAT_VERSION,
            });
        }
        if projection.has_map() && config.d > MAX_MAP_D {
            return Err(ConfigError::MapTooLarge {
                d: config.d,
                projection: projection.name(),
            });
        }
        config.check_sizes()?;
        Ok(config)
    }

    /// Reads and checks the config of the adapter at `path` (its folder, or its
    /// `adapter_config.json`). Returns the config and the adapter folder. A config that
    /// records no fingerprint is refused; whether it matches is [`AdapterConfig::verify`].
    pub fn read(path: &Path) -> Result<(AdapterConfig, PathBuf)> {
        let (dir, config_path) = locate(path)?;
        let text = read_regular(&config_path)?;
        let value = parse_json(&text).map_err(|msg| CoreError::format(&config_path, msg))?;
        let config = AdapterConfig::from_value(&value)
            .map_err(|e| CoreError::format(&config_path, e.to_string()))?;
        if config.fingerprint.is_empty() {
            return Err(CoreError::format(
                &config_path,
                ConfigError::NoFingerprint.to_string(),
            ));
        }
        Ok((config, dir))
    }

    /// `D`: the number of LoRA parameters the adapter represents.
    pub fn total_size(&self) -> u64 {
        self.modules
            .iter()
            .map(|m| self.rank * (m.in_features + m.out_features))
            .sum()
    }

    /// The LoRA scaling `alpha / r`, computed in binary64 and rounded to float32.
    pub fn scaling(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// The matrices of `theta_D` in flattening order, named as the fingerprint names
    /// them: per module `<name>.lora_B` (`out x r`), then `<name>.lora_A` (`r x in`).
    pub fn matrices(&self) -> Vec<(String, u64, u64)> {
        self.modules
            .iter()
            .flat_map(|m| {
                [
                    (format!("{}.lora_B", m.name), m.out_features, self.rank),
                    (format!("{}.lora_A", m.name), self.rank, m.in_features),
                ]
            })
            .collect()
    }

    /// The fingerprint recomputed from seed, `d` and the module list (and, for spec v2,
    /// the projection and its map's SHA-256).
    pub fn expected_fingerprint(&self) -> String {
        let matrices = self.matrices();
        let named: Vec<(&str, u64, u64)> = matrices
            .iter()
            .map(|(n, r, c)| (n.as_str(), *r, *c))
            .collect();
        match self.projection {
            ProjectionKind::Sparse => fingerprint(self.seed, self.d, &named),
            kind => hash_text(&canonical_text_v2(
                kind.name(),
                self.map_sha256.as_deref(),
                self.seed,
                self.d,
                &named,
            )),
        }
    }

    /// Fails with [`CoreError::Mismatch`] when the recorded fingerprint is not the one
    /// seed, `d` and the module list give (`source` names the config in the message).
    pub fn verify(&self, source: &Path) -> Result<()> {
        match self.fingerprint_mismatch() {
            None => Ok(()),
            Some(msg) => Err(CoreError::Mismatch(format!("{}: {msg}", source.display()))),
        }
    }

    /// What is wrong with the recorded fingerprint, if anything.
    pub fn fingerprint_mismatch(&self) -> Option<String> {
        let expected = self.expected_fingerprint();
        (self.fingerprint != expected).then(|| {
            format!(
                "adapter fingerprint mismatch: the config records {:?} but projection {:?}, seed={}, \
                 d={} and the {} listed modules give {expected}; the projection, seed, d or module \
                 list was changed after training, so theta_d would rebuild the wrong matrices",
                self.fingerprint,
                self.projection.name(),
                self.seed,
                self.d,
                self.modules.len()
            )
        })
    }

    /// The JSON object of this config, as `adapter_config.json` holds it (the known
    /// keys, then the [`AdapterConfig::extra`] ones).
    pub fn to_value(&self) -> Value {
        let mut value = json!({
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "spec_version": self.spec_version,
            "seed": self.seed,
            "vector_length": self.d,
            "rank": self.rank,
            "alpha": self.alpha,
            "modules": self.modules.iter().map(AdapterModule::to_value).collect::<Vec<_>>(),
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "modules_to_save": self.modules_to_save,
            "base_model_name_or_path": self.base_model_name_or_path,
            "init_range": self.init_range,
            "fingerprint": self.fingerprint,
            "library_version": self.library_version,
        });
        if let Some(obj) = value.as_object_mut() {
            if self.projection != ProjectionKind::Sparse {
                obj.insert("projection".into(), self.projection.name().into());
            }
            if let Some(map) = &self.map_sha256 {
                obj.insert("map_sha256".into(), map.as_str().into());
            }
            if let Some(task) = &self.task {
                obj.insert("task".into(), task.to_value());
            }
            obj.extend(self.extra.clone());
        }
        value
    }

    /// Rank against every layer, `D` in 64 bits, `d <= D`.
    fn check_sizes(&self) -> std::result::Result<(), ConfigError> {
        let mut total = 0u64;
        for m in &self.modules {
            let smaller = m.in_features.min(m.out_features);
            if self.rank > smaller {
                return Err(ConfigError::RankAboveModule {
                    rank: self.rank,
                    module: m.name.clone(),
                    in_features: m.in_features,
                    out_features: m.out_features,
                    smaller,
                });
            }
            total = m
                .in_features
                .checked_add(m.out_features)
                .and_then(|n| n.checked_mul(self.rank))
                .and_then(|n| n.checked_add(total))
                .ok_or(ConfigError::TotalOverflow)?;
        }
        if self.d > total {
            return Err(ConfigError::DAboveTotal { d: self.d, total });
        }
        Ok(())
    }
}

/// The adapter folder and config path of `path` (a folder, or its config file).
fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_dir() {
        return Ok((path.to_path_buf(), path.join(CONFIG_NAME)));
    }
    if path.file_name().is_some_and(|n| n == CONFIG_NAME) {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        return Ok((dir, path.to_path_buf()));
    }
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(CoreError::InvalidArgument(format!(
            "{}: an adapter is a directory holding {CONFIG_NAME} and adapter_model.safetensors",
            path.display()
        )));
    }
    Err(CoreError::io(path, std::io::ErrorKind::NotFound.into()))
}

fn check_format(obj: &Map<String, Value>) -> std::result::Result<(), ConfigError> {
    let fmt = obj.get("format");
    if fmt.and_then(Value::as_str) != Some(FORMAT_NAME) {
        if let Some(peft_type) = obj.get("peft_type").filter(|_| fmt.is_none()) {
            return Err(ConfigError::PeftAdapter {
                peft_type: peft_type.to_string(),
            });
        }
        return Err(ConfigError::NotUnilora {
            got: shown(fmt),
            expected: FORMAT_NAME,
        });
    }
    Ok(())
}

/// `spec_version` is the projection's: 1 for sparse, 2 for the others.
fn check_spec_version(
    value: Option<&Value>,
    projection: ProjectionKind,
) -> std::result::Result<(), ConfigError> {
    let want = projection.spec_version();
    match value.and_then(Value::as_u64) {
        Some(v) if v == want => Ok(()),
        Some(v @ 1..=ADAPTER_SPEC_VERSION) => Err(ConfigError::SpecVersionMismatch {
            got: v,
            projection: projection.name(),
            want,
        }),
        _ => Err(ConfigError::UnsupportedSpecVersion {
            got: shown(value),
            newest: ADAPTER_SPEC_VERSION,
        }),
    }
}

/// `map_sha256`: a `sha256:` digest for a map projection, absent otherwise.
fn map_sha256(
    value: Option<&Value>,
    projection: ProjectionKind,
) -> std::result::Result<Option<String>, ConfigError> {
    let digest = |s: &str| {
        s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    };
    match (value, projection.has_map()) {
        (None | Some(Value::Null), false) => Ok(None),
        (Some(Value::String(s)), true) if digest(s) => Ok(Some(s.clone())),
        (_, true) => Err(ConfigError::invalid(
            "map_sha256",
            format!(
                "\"sha256:\" followed by 64 lower-case hex digits for projection {:?} (the \
                 map's checksum, recorded when it was made)",
                projection.name()
            ),
            shown(value),
        )),
        (Some(other), false) => Err(ConfigError::StrayMapSha256 {
            got: other.to_string(),
            projection: projection.name(),
        }),
    }
}

fn parse_modules(value: Option<&Value>) -> std::result::Result<Vec<AdapterModule>, ConfigError> {
    let Some(Value::Array(items)) = value else {
        return Err(ConfigError::invalid(
            "modules",
            "a list of module objects",
            shown(value),
        ));
    };
    if items.is_empty() {
        return Err(ConfigError::NoModules);
    }
    let mut seen = HashSet::with_capacity(items.len());
    let mut modules = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        let module = AdapterModule::from_value(item, &format!("modules[{k}]"))?;
        if !seen.insert(module.name.clone()) {
            return Err(ConfigError::DuplicateModule { name: module.name });
        }
        modules.push(module);
    }
    Ok(modules)
}

fn string_list(value: Option<&Value>) -> std::result::Result<Vec<String>, ConfigError> {
    let bad = || {
        ConfigError::invalid(
            "modules_to_save",
            "a list of non-empty strings",
            shown(value),
        )
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn rule(obj: &Map<String, Value>, key: &'static str) -> std::result::Result<Value, ConfigError> {
    match obj.get(key) {
        None => Ok(Value::Null),
        Some(v @ (Value::Null | Value::String(_))) => Ok(v.clone()),
        Some(v @ Value::Array(items)) if items.iter().all(Value::is_string) => Ok(v.clone()),
        Some(other) => Err(ConfigError::invalid(
            key,
            "null, a string or a list of strings",
            other.to_string(),
        )),
    }
}

fn optional_string(
    obj: &Map<String, Value>,
    key: &'static str,
) -> std::result::Result<Option<String>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ConfigError::invalid(
            key,
            "a string or null",
            other.to_string(),
        )),
    }
}

fn init_range(value: Option<&Value>) -> std::result::Result<f64, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(DEFAULT_INIT_RANGE),
        Some(v) => match finite(Some(v)) {
            Ok(x) if x > 0.0 => Ok(x),
            _ => Err(ConfigError::invalid(
                "init_range",
                "a positive finite number",
                v.to_string(),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::module::ModuleKind;

    fn good() -> Value {
        json!({
            "format": "unilora_rs", "format_version": 1, "spec_version": 1, "seed": 7,
            "vector_length": 64, "rank": 4, "alpha": 8.0,
            "modules": [
                {"name": "a.q", "in_features": 16, "out_features": 24, "kind": "linear"},
                {"name": "a.c", "in_features": 8, "out_features": 12, "kind": "conv1d"},
            ],
            "modules_to_save": ["head"], "target_modules": ["q", "c"],
        })
    }

    fn with(key: &str, v: Value) -> Value {
        let mut g = good();
        g[key] = v;
        g
    }

    fn err(v: &Value) -> String {
        AdapterConfig::from_value(v).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_round_trips() {
        let c = AdapterConfig::from_value(&good()).unwrap();
        assert_eq!((c.seed, c.d, c.rank, c.alpha), (7, 64, 4, 8.0));
        assert_eq!(c.modules[1].kind, ModuleKind::Conv1d);
        assert_eq!(c.modules[1].weight_shape(), [8, 12]);
        assert_eq!(c.total_size(), 4 * (40 + 20));
        assert_eq!(c.init_range, DEFAULT_INIT_RANGE);
        assert!(c.fingerprint.is_empty());
        assert_eq!(AdapterConfig::from_value(&c.to_value()).unwrap(), c);
        assert_eq!(c.matrices()[0], ("a.q.lora_B".to_string(), 24, 4));
        assert_eq!(c.matrices()[3], ("a.c.lora_A".to_string(), 4, 8));
    }

    #[test]
    fn other_keys_are_kept_as_they_are() {
        let mut g = good();
        g["task"] = json!({"type": "causal-lm", "config": {}, "new_tensors": ["lm_head.weight"]});
        g["notes"] = json!(null);
        let c = AdapterConfig::from_value(&g).unwrap();
        assert_eq!(c.extra.keys().collect::<Vec<_>>(), ["notes"]);
        assert_eq!(c.task.as_ref().map(|t| t.kind.as_str()), Some("causal-lm"));
        let back = c.to_value();
        assert_eq!(back["task"], g["task"]);
        g["task"] = json!({"type": "translation"});
        assert!(
            AdapterConfig::from_value(&g)
                .unwrap_err()
                .to_string()
                .contains("task.type")
        );
        assert_eq!(AdapterConfig::from_value(&back).unwrap(), c);
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                with("alpha", json!("8")),
                "alpha must be a finite number, got \"8\"",
            ),
            (with("alpha", Value::Null), "alpha must be a finite number"),
            (
                with("rank", json!(0)),
                "rank must be a positive integer, got 0",
            ),
            (
                with("rank", json!(true)),
                "rank must be a positive integer, got true",
            ),
            (
                with("rank", json!(9)),
                "rank 9 is larger than module \"a.c\"",
            ),
            (
                with("rank", json!(1u64 << 40)),
                "rank 1099511627776 is larger",
            ),
            (
                with("seed", json!(-1)),
                "seed must be an integer in [0, 2^64 - 1], got -1",
            ),
            (with("vector_length", json!(0)), "vector_length (d) must be"),
            (
                with("vector_length", json!(241)),
                "d = 241 is larger than D = 240",
            ),
            (
                with("init_range", json!(0.0)),
                "init_range must be a positive",
            ),
            (
                with("target_modules", json!(5)),
                "target_modules must be null",
            ),
            (
                with("modules_to_save", json!("head")),
                "modules_to_save must be a list",
            ),
            (
                with("base_model_name_or_path", json!(5)),
                "base_model_name_or_path must be",
            ),
            (
                with("format_version", json!(2)),
                "format_version 2 is newer",
            ),
            (with("format_version", json!("1")), "format_version must be"),
            (
                with("spec_version", json!(2)),
                "unsupported generator spec_version 2",
            ),
            (with("format", json!("peft")), "not a unilora_rs adapter"),
            (
                json!({"peft_type": "UNILORA", "r": 4}),
                "a PEFT Uni-LoRA adapter (peft_type \"UNILORA\"), not a unilora_rs one: \
                 convert it with `unilora convert-peft",
            ),
            (
                json!({"peft_type": "LORA", "r": 4}),
                "a PEFT adapter (peft_type \"LORA\"), not a unilora_rs adapter",
            ),
            (with("modules", json!([])), "at least one module"),
            (
                with("modules", json!(["a.q"])),
                "modules[0] must be an object",
            ),
            (
                with("fingerprint", json!(3)),
                "fingerprint must be a string",
            ),
            (json!([1]), "expected a JSON object"),
        ];
        for (value, want) in cases {
            let got = err(&value);
            assert!(got.contains(want), "{got:?} does not contain {want:?}");
        }
    }

    #[test]
    fn errors_are_typed() {
        let rank = AdapterConfig::from_value(&with("rank", json!(9))).unwrap_err();
        assert!(matches!(
            rank,
            ConfigError::RankAboveModule { smaller: 8, ref module, .. } if module == "a.c"
        ));
        let bad = json!([{"name": "a.q", "in_features": 0, "out_features": 24}]);
        let module = AdapterConfig::from_value(&with("modules", bad)).unwrap_err();
        let ConfigError::In { at, error } = &module else {
            panic!("{module:?}");
        };
        assert_eq!(at, "modules[0] (\"a.q\")");
        assert!(matches!(**error, ConfigError::Invalid { ref key, .. } if key == "in_features"));
    }

    #[test]
    fn projections_pair_with_their_spec_version_and_map() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let mut ff = good();
        ff["projection"] = json!("fastfood");
        ff["spec_version"] = json!(2);
        let c = AdapterConfig::from_value(&ff).unwrap();
        assert_eq!(
            (c.projection, c.spec_version),
            (ProjectionKind::Fastfood, 2)
        );
        assert_eq!(c.to_value()["projection"], json!("fastfood"));
        assert!(c.to_value().get("map_sha256").is_none());
        let sparse = AdapterConfig::from_value(&good()).unwrap();
        assert!(sparse.to_value().get("projection").is_none());
        // The sparse fingerprint text is spec v1's; the others name the projection.
        assert_ne!(c.expected_fingerprint(), sparse.expected_fingerprint());
        let mut ex = ff.clone();
        ex["projection"] = json!("explicit");
        ex["map_sha256"] = json!(digest);
        let e = AdapterConfig::from_value(&ex).unwrap();
        assert_eq!(e.map_sha256.as_deref(), Some(digest.as_str()));
        let mut other = ex.clone();
        other["map_sha256"] = json!(format!("sha256:{}", "cd".repeat(32)));
        let o = AdapterConfig::from_value(&other).unwrap();
        assert_ne!(e.expected_fingerprint(), o.expected_fingerprint());
        let cases = [
            (
                ("projection", json!("dense")),
                "projection \"dense\" is not one of",
            ),
            (("projection", json!(3)), "projection must be one of"),
            (
                ("spec_version", json!(1)),
                "spec_version 1 for projection \"explicit\"",
            ),
            (
                ("spec_version", json!(3)),
                "unsupported generator spec_version 3",
            ),
            (("map_sha256", Value::Null), "map_sha256 must be"),
            (("map_sha256", json!("sha256:AB")), "map_sha256 must be"),
            (
                ("vector_length", json!((1u64 << 31) + 1)),
                "the limit of projection",
            ),
        ];
        for ((key, value), want) in cases {
            let mut v = ex.clone();
            v[key] = value;
            let got = err(&v);
            assert!(got.contains(want), "{got:?} does not contain {want:?}");
        }
        let mut stray = ff;
        stray["map_sha256"] = json!(digest);
        assert!(err(&stray).contains("belongs to the map projections"));
    }

    #[test]
    fn module_entries_are_strict() {
        let module = |m: Value| with("modules", json!([m]));
        let base = json!({"name": "a.q", "in_features": 16, "out_features": 24});
        let cases = [
            (json!({"bias": true}), "unknown key \"bias\""),
            (
                json!({"in_features": 1.5}),
                "in_features must be an integer in [1, 2^64 - 1], got 1.5",
            ),
            (json!({"in_features": 0}), "in_features must be"),
            (json!({"out_features": "24"}), "out_features must be"),
            (json!({"kind": "Linear"}), "kind \"Linear\" is not one of"),
            (json!({"name": ""}), "name must be a non-empty string"),
            (json!({"name": "a\tb"}), "control character"),
            (json!({"name": "a\nb"}), "control character"),
        ];
        for (patch, want) in cases {
            let mut m = base.clone();
            for (k, v) in patch.as_object().unwrap() {
                m[k] = v.clone();
            }
            let got = err(&module(m));
            assert!(got.contains(want), "{got:?} does not contain {want:?}");
        }
        let twice = with("modules", json!([base.clone(), base]));
        assert!(err(&twice).contains("listed twice"));
        let huge: Value = serde_json::from_str(
            r#"{"name": "x", "in_features": 18446744073709551621, "out_features": 4}"#,
        )
        .unwrap();
        assert!(err(&module(huge)).contains("in_features must be an integer in [1, 2^64 - 1]"));
    }

    #[test]
    fn d_up_to_2_pow_32_and_d_overflow() {
        let big = |fin: u64, rank: u64, d: u64| {
            json!({
                "format": "unilora_rs", "spec_version": 1, "seed": 0, "vector_length": d,
                "rank": rank, "alpha": 1.0,
                "modules": [
                    {"name": "a", "in_features": fin, "out_features": fin},
                    {"name": "b", "in_features": fin, "out_features": fin},
                ],
            })
        };
        AdapterConfig::from_value(&big(1 << 20, 1 << 12, 1 << 32)).unwrap();
        assert!(err(&big(1 << 20, 1 << 12, (1 << 32) + 1)).contains("vector_length (d)"));
        assert!(err(&big(u64::MAX / 2, 2, 1)).contains("does not fit in 64 bits"));
    }
}
