//! Which projection an adapter uses (its `projection` key) and the limits of the
//! generators: the names, spec versions and sizes that a config is checked against.

use super::error::ConfigError;

/// Version of the generator specification of the sparse projection (docs/SPEC.md): the
/// spec version of sparse adapters and of their fingerprint text.
pub const SPEC_VERSION: u32 = 1;

/// The largest `d` the generators support.
pub const MAX_D: u64 = 1 << 32;

/// Which projection maps `theta_d` to `theta_D`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProjectionKind {
    /// The sparse spec v1 map (the default).
    Sparse,
    /// The Fastfood map (spec v2).
    Fastfood,
    /// A map stored in the adapter file.
    Explicit,
    /// PEFT's Uni-LoRA map, regenerated with numpy.
    PeftNumpy,
}

impl ProjectionKind {
    /// Every kind, in the order the messages list them.
    pub const ALL: [ProjectionKind; 4] = [
        ProjectionKind::Sparse,
        ProjectionKind::Fastfood,
        ProjectionKind::Explicit,
        ProjectionKind::PeftNumpy,
    ];

    /// The name used in `adapter_config.json` and the APIs.
    pub fn name(self) -> &'static str {
        match self {
            ProjectionKind::Sparse => "sparse",
            ProjectionKind::Fastfood => "fastfood",
            ProjectionKind::Explicit => "explicit",
            ProjectionKind::PeftNumpy => "peft-numpy",
        }
    }

    /// The kind named `name`; the error lists the valid names.
    pub fn parse(name: &str) -> std::result::Result<Self, ConfigError> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| ConfigError::UnknownProjection {
                name: name.to_string(),
                known: Self::names(),
            })
    }

    /// `"sparse", "fastfood", "explicit", "peft-numpy"`.
    pub fn names() -> String {
        Self::ALL
            .iter()
            .map(|k| format!("{:?}", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The spec version of adapters with this projection: 1 for sparse, 2 otherwise.
    pub fn spec_version(self) -> u64 {
        match self {
            ProjectionKind::Sparse => u64::from(SPEC_VERSION),
            _ => 2,
        }
    }

    /// Whether the map is a list of indices and scales bound by `map_sha256`.
    pub fn has_map(self) -> bool {
        matches!(self, ProjectionKind::Explicit | ProjectionKind::PeftNumpy)
    }
}

/// The largest `d` of an explicit map (its indices are int32).
pub const MAX_MAP_D: u64 = 1 << 31;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_their_names() {
        for k in ProjectionKind::ALL {
            assert_eq!(ProjectionKind::parse(k.name()).unwrap(), k);
        }
        assert!(
            ProjectionKind::parse("dense")
                .unwrap_err()
                .to_string()
                .contains("\"peft-numpy\"")
        );
    }
}
