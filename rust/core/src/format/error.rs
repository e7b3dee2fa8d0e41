//! Why an adapter config is refused: one error kind per rule of the validator, each with
//! its message (the way pydantic-core's error types name each failure), so that the
//! messages live in one place and callers can tell the rules apart. Every kind carries
//! what its message shows (the value found, and what was expected), so this module
//! depends on none of the validators that use it.

use std::borrow::Cow;

/// A rule of `adapter_config.json` (docs/SPEC.md, section 3) that a config, or one of
/// its entries, breaks. The message names the key at fault and the value found there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key holds a value of the wrong type or outside its range.
    #[error("{key} must be {expected}, got {got}")]
    Invalid {
        /// The key (`rank`, `task.type`, `modules[3]`, ...).
        key: Cow<'static, str>,
        /// What it must be (`a positive integer`, ...).
        expected: Cow<'static, str>,
        /// The value found, as JSON text (or that the key is missing).
        got: String,
    },
    /// An error of one entry of a list (`modules[3] ("name")`, `task.new_tensors`).
    #[error("{at}: {error}")]
    In {
        /// Which entry.
        at: String,
        /// What is wrong with it.
        error: Box<ConfigError>,
    },
    /// The config is not a JSON object.
    #[error("not a unilora_rs adapter config: expected a JSON object, got {got}")]
    NotAnObject {
        /// The value found, as JSON text.
        got: String,
    },
    /// `format` is not the adapter format's name.
    #[error("not a unilora_rs adapter (format = {got}, expected {expected:?})")]
    NotUnilora {
        /// The `format` value found.
        got: String,
        /// The format's name.
        expected: &'static str,
    },
    /// The config is a PEFT adapter's (it has a `peft_type` and not our `format`).
    #[error("{}", peft_adapter_message(.peft_type))]
    PeftAdapter {
        /// PEFT's `peft_type` (`"UNILORA"`, `"LORA"`, ...), as JSON text.
        peft_type: String,
    },
    /// `format_version` is newer than this reader's.
    #[error(
        "format_version {version} is newer than this unilora_rs ({newest}); upgrade unilora_rs"
    )]
    NewerFormat {
        /// The `format_version` found.
        version: u64,
        /// The newest version this reader understands.
        newest: u64,
    },
    /// `projection` names none of the projections.
    #[error("projection {name:?} is not one of {known}")]
    UnknownProjection {
        /// The name found.
        name: String,
        /// The projections' names, quoted and comma-separated.
        known: String,
    },
    /// `spec_version` is a version this reader knows, but not the projection's.
    #[error(
        "unsupported generator spec_version {got} for projection {projection:?}, which is \
         spec_version {want} (sparse adapters are spec_version 1, the other projections 2)"
    )]
    SpecVersionMismatch {
        /// The `spec_version` found.
        got: u64,
        /// The projection's name.
        projection: &'static str,
        /// The projection's spec version.
        want: u64,
    },
    /// `spec_version` is not a version this reader knows.
    #[error(
        "unsupported generator spec_version {got} (this unilora_rs reads spec_version 1 and \
         {newest})"
    )]
    UnsupportedSpecVersion {
        /// The value found, as JSON text (or that the key is missing).
        got: String,
        /// The newest spec version this reader understands.
        newest: u64,
    },
    /// `map_sha256` is given for a projection that has no map.
    #[error(
        "map_sha256 ({got}) belongs to the map projections (explicit, peft-numpy), not to \
         projection {projection:?}"
    )]
    StrayMapSha256 {
        /// The value found, as JSON text.
        got: String,
        /// The projection's name.
        projection: &'static str,
    },
    /// `d` is beyond what a map projection's int32 indices reach.
    #[error(
        "vector_length (d) = {d} is larger than 2^31, the limit of projection {projection:?} \
         (its indices are int32)"
    )]
    MapTooLarge {
        /// The config's `d`.
        d: u64,
        /// The projection's name.
        projection: &'static str,
    },
    /// `modules` is an empty list.
    #[error("an adapter needs at least one module (modules is empty)")]
    NoModules,
    /// Two entries of `modules` name the same module.
    #[error("module {name:?} is listed twice")]
    DuplicateModule {
        /// The module's name.
        name: String,
    },
    /// A module entry has a key that module entries do not have.
    #[error("unknown key {key:?} (a module has {})", known.join(", "))]
    UnknownModuleKey {
        /// The key found.
        key: String,
        /// The keys of a module entry.
        known: &'static [&'static str],
    },
    /// A module's `kind` is neither `linear` nor `conv1d`.
    #[error("kind {got} is not one of \"linear\", \"conv1d\"")]
    UnknownModuleKind {
        /// The value found, as JSON text.
        got: String,
    },
    /// A name holds a control character, which would make the fingerprint text
    /// ambiguous.
    #[error(
        "the name holds the control character {0:?}, which the fingerprint cannot encode \
         unambiguously; names must be free of tabs, line breaks and other control characters"
    )]
    ControlCharacter(char),
    /// The rank is larger than the smaller side of a module's weight.
    #[error(
        "rank {rank} is larger than module {module:?} (in_features {in_features}, out_features \
         {out_features}): B @ A has rank at most {smaller}; choose rank <= {smaller} or leave the \
         module out"
    )]
    RankAboveModule {
        /// The config's rank.
        rank: u64,
        /// The module's name.
        module: String,
        /// The module's input features.
        in_features: u64,
        /// The module's output features.
        out_features: u64,
        /// The smaller of the two.
        smaller: u64,
    },
    /// The LoRA parameter count `D` does not fit in 64 bits.
    #[error("the LoRA parameter count D of the listed modules does not fit in 64 bits")]
    TotalOverflow,
    /// `d` is larger than the LoRA parameter count `D`.
    #[error("d = {d} is larger than D = {total} (the LoRA parameter count of the listed modules)")]
    DAboveTotal {
        /// The config's `d`.
        d: u64,
        /// `D`.
        total: u64,
    },
    /// A config read from a file records no fingerprint.
    #[error(
        "no fingerprint: an adapter config records the fingerprint that binds theta_d to its \
         seed, d and module list"
    )]
    NoFingerprint,
    /// The `task` entry has a key that task entries do not have.
    #[error("task: unknown key {key:?} (the keys are {})", known.join(", "))]
    UnknownTaskKey {
        /// The key found.
        key: String,
        /// The keys of a task entry.
        known: &'static [&'static str],
    },
    /// An entry of `task.new_tensors` is not a non-empty string.
    #[error("task.new_tensors must hold non-empty strings, got {got}")]
    NewTensorName {
        /// The value found, as JSON text.
        got: String,
    },
    /// `task.new_tensors` names a tensor twice.
    #[error("task.new_tensors lists {name:?} twice")]
    DuplicateNewTensor {
        /// The tensor's name.
        name: String,
    },
}

/// What to do with a PEFT adapter: convert a Uni-LoRA one; another kind has no
/// conversion (`peft_type` is JSON text).
fn peft_adapter_message(peft_type: &str) -> String {
    if peft_type == "\"UNILORA\"" {
        "a PEFT Uni-LoRA adapter (peft_type \"UNILORA\"), not a unilora_rs one: convert it \
         with `unilora convert-peft PEFT_ADAPTER OUT` (unilora_rs.convert_peft) and use OUT"
            .to_string()
    } else {
        format!(
            "a PEFT adapter (peft_type {peft_type}), not a unilora_rs adapter: `unilora \
             convert-peft` converts PEFT's Uni-LoRA adapters (peft_type \"UNILORA\") only; \
             use PEFT itself for this one"
        )
    }
}

impl ConfigError {
    /// `key` must be `expected`, and holds `got` (as messages show it).
    pub fn invalid(
        key: impl Into<Cow<'static, str>>,
        expected: impl Into<Cow<'static, str>>,
        got: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    /// This error, found in entry `at` of a list.
    pub fn at(self, at: impl Into<String>) -> Self {
        ConfigError::In {
            at: at.into(),
            error: Box::new(self),
        }
    }
}
