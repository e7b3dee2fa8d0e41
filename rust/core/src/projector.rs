//! The projection an adapter uses (its `projection` key), and the one place that
//! dispatches on it.
//!
//! * `sparse` (the default, spec v1): the balanced one-non-zero-per-row map of
//!   [`crate::projection`], computed from the seed.
//! * `fastfood` (spec v2): the dense Fastfood map of [`crate::fastfood`], from the seed.
//! * `explicit` (spec v2): a map stored in the adapter file, one column and one float32
//!   scale per row of `theta_D` ([`ExplicitMap`]).
//! * `peft-numpy` (spec v2): the map of PEFT's Uni-LoRA tuner, which numpy's generator
//!   produces; it is regenerated on load by a [`ForeignGenerator`] that the host
//!   registers (the Python package does, with numpy).
//!
//! Explicit and regenerated maps are bound to the adapter by the SHA-256 of the map
//! ([`ExplicitMap::sha256`]), recorded in the config and checked on every load, so a
//! generator whose stream changed is detected instead of giving another model.

use std::sync::{Arc, RwLock};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};
use crate::fastfood::Fastfood;
use crate::format::config::AdapterConfig;
use crate::format::kind::ProjectionKind;
use crate::parallel;
use crate::reconstruct::{self, check_vector, cut_pieces, total_size};

/// A projection given row by row: `theta_D[i] = theta_d[indices[i]] * scales[i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExplicitMap {
    indices: Vec<u32>,
    scales: Vec<f32>,
    sha256: String,
}

impl ExplicitMap {
    /// Checks and wraps a map onto `d` columns: equal lengths, indices below `d`,
    /// finite scales.
    pub fn new(indices: Vec<u32>, scales: Vec<f32>, d: u64) -> Result<Self> {
        if indices.len() != scales.len() {
            return Err(CoreError::InvalidArgument(format!(
                "the map has {} indices but {} scales",
                indices.len(),
                scales.len()
            )));
        }
        if let Some(pos) = indices.iter().position(|&j| u64::from(j) >= d) {
            return Err(CoreError::InvalidArgument(format!(
                "map index {} at row {pos} is not below d = {d}",
                indices[pos]
            )));
        }
        if let Some(pos) = scales.iter().position(|s| !s.is_finite()) {
            return Err(CoreError::InvalidArgument(format!(
                "map scale {} at row {pos} is not finite",
                scales[pos]
            )));
        }
        let sha256 = map_sha256(&indices, &scales);
        Ok(ExplicitMap {
            indices,
            scales,
            sha256,
        })
    }

    /// The column of every row.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// The scale of every row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// `"sha256:"` + the hex SHA-256 of the indices (little-endian u32) followed by the
    /// scales (little-endian binary32): the checksum of docs/SPEC.md section 1.5.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// The SHA-256 of a map, as [`ExplicitMap::sha256`] gives it.
pub fn map_sha256(indices: &[u32], scales: &[f32]) -> String {
    let mut h = Sha256::new();
    for chunk in indices.chunks(1 << 14) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|j| j.to_le_bytes()).collect();
        h.update(&bytes);
    }
    for chunk in scales.chunks(1 << 14) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
        h.update(&bytes);
    }
    crate::format::fingerprint::hex_digest(&h.finalize())
}

/// Regenerates the map of a foreign generator (`peft-numpy`) for a checked config.
pub type ForeignGenerator = dyn Fn(&AdapterConfig) -> Result<ExplicitMap> + Send + Sync;

static FOREIGN: RwLock<Option<Arc<ForeignGenerator>>> = RwLock::new(None);

/// Registers the generator of foreign maps (the Python package registers numpy's).
pub fn set_foreign_generator(generator: Arc<ForeignGenerator>) {
    *FOREIGN.write().unwrap_or_else(|e| e.into_inner()) = Some(generator);
}

/// The map of a `peft-numpy` config, from the registered generator.
fn foreign_map(config: &AdapterConfig) -> Result<ExplicitMap> {
    let generator = FOREIGN.read().unwrap_or_else(|e| e.into_inner()).clone();
    match generator {
        Some(generate) => generate(config),
        None => Err(CoreError::InvalidArgument(format!(
            "projection {:?} is regenerated with numpy by the unilora_rs Python package, and \
             this program has no such generator; use unilora_rs from Python, or convert the \
             PEFT adapter with `unilora convert-peft --explicit` to keep the map in the file",
            config.projection.name()
        ))),
    }
}

/// A projection ready to rebuild `theta_D`.
#[derive(Clone, Debug)]
pub enum Projector {
    /// The sparse spec v1 map of this seed.
    Sparse {
        /// The seed.
        seed: u64,
    },
    /// The Fastfood map.
    Fastfood(Fastfood),
    /// An explicit (stored or regenerated) map.
    Explicit(ExplicitMap),
}

impl Projector {
    /// The projection of a generated kind (`sparse` or `fastfood`) of `total` rows onto
    /// `d` columns.
    pub fn generated(kind: ProjectionKind, seed: u64, total: u64, d: u64) -> Result<Self> {
        match kind {
            ProjectionKind::Sparse => {
                crate::projection::check_dims(total, d)?;
                Ok(Projector::Sparse { seed })
            }
            ProjectionKind::Fastfood => Ok(Projector::Fastfood(Fastfood::new(seed, total, d)?)),
            other => Err(CoreError::InvalidArgument(format!(
                "projection {:?} is a map, not a generator: it needs its indices and scales",
                other.name()
            ))),
        }
    }

    /// The projection of a checked adapter config: generated from the seed, `stored`
    /// (the map of the weights file, for `explicit`), or regenerated (`peft-numpy`).
    pub fn for_config(
        config: &AdapterConfig,
        stored: impl FnOnce() -> Result<ExplicitMap>,
    ) -> Result<Self> {
        match config.projection {
            ProjectionKind::Explicit => Ok(Projector::Explicit(stored()?)),
            ProjectionKind::PeftNumpy => Ok(Projector::Explicit(foreign_map(config)?)),
            kind => Projector::generated(kind, config.seed, config.total_size(), config.d),
        }
    }

    /// The explicit map, when this projection is one.
    pub fn map(&self) -> Option<&ExplicitMap> {
        match self {
            Projector::Explicit(map) => Some(map),
            _ => None,
        }
    }

    /// Fills `outs` (one buffer per shape, in order) with the matrices of `shapes`
    /// rebuilt from `vector` (`theta_d`). Results never depend on the thread count.
    pub fn reconstruct_into(
        &self,
        vector: &[f32],
        shapes: &[(u64, u64)],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        match self {
            Projector::Sparse { seed } => {
                reconstruct::reconstruct_into(vector, *seed, shapes, outs)
            }
            Projector::Fastfood(ff) => {
                self.check_total(shapes, ff.total())?;
                reconstruct::check_outputs(shapes, outs)?;
                ff.reconstruct_into(vector, outs)
            }
            Projector::Explicit(map) => {
                self.check_total(shapes, map.indices.len() as u64)?;
                reconstruct::check_outputs(shapes, outs)?;
                check_vector(vector, vector.len() as u64)?;
                if let Some(&j) = map
                    .indices
                    .iter()
                    .max()
                    .filter(|&&j| j as usize >= vector.len())
                {
                    return Err(CoreError::Vector(format!(
                        "the map uses column {j}, but the vector has length {}",
                        vector.len()
                    )));
                }
                let mut pieces = cut_pieces(outs, 1 << 16);
                parallel::install(|| {
                    pieces.par_iter_mut().for_each(|(start, buf)| {
                        let rows = *start as usize..*start as usize + buf.len();
                        let (idx, scale) = (&map.indices[rows.clone()], &map.scales[rows]);
                        for ((o, &j), &s) in buf.iter_mut().zip(idx).zip(scale) {
                            *o = vector[j as usize] * s;
                        }
                    });
                });
                Ok(())
            }
        }
    }

    /// Every matrix of `shapes`, rebuilt from `vector`.
    pub fn reconstruct(&self, vector: &[f32], shapes: &[(u64, u64)]) -> Result<Vec<Vec<f32>>> {
        total_size(shapes)?;
        let mut outs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(r, c)| CoreError::try_zeroed(r * c, "the reconstructed matrices"))
            .collect::<Result<_>>()?;
        {
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
            self.reconstruct_into(vector, shapes, &mut views)?;
        }
        Ok(outs)
    }

    /// The backward pass, `P^T grad` (length `d`) for the gradient of the flattened
    /// `theta_D`. Deterministic: a fixed summation order for every kind (for an explicit
    /// map, rows in increasing order).
    pub fn backward(&self, grad: &[f32], d: u64) -> Result<Vec<f32>> {
        match self {
            Projector::Sparse { seed } => reconstruct::reconstruct_backward(grad, *seed, d),
            Projector::Fastfood(ff) => {
                if ff.d() != d {
                    return Err(CoreError::InvalidArgument(format!(
                        "d = {d}, but the projection has {} columns",
                        ff.d()
                    )));
                }
                ff.backward(grad)
            }
            Projector::Explicit(map) => {
                self.check_total(&[(grad.len() as u64, 1)], map.indices.len() as u64)?;
                let mut acc: Vec<f32> = CoreError::try_zeroed(d, "the gradient of theta_d")?;
                for ((&g, &j), &s) in grad.iter().zip(&map.indices).zip(&map.scales) {
                    let slot = acc.get_mut(j as usize).ok_or_else(|| {
                        CoreError::InvalidArgument(format!("the map uses column {j}, d = {d}"))
                    })?;
                    *slot += g * s;
                }
                Ok(acc)
            }
        }
    }

    fn check_total(&self, shapes: &[(u64, u64)], rows: u64) -> Result<()> {
        let total = total_size(shapes)?;
        if total != rows {
            return Err(CoreError::InvalidArgument(format!(
                "the shapes hold D = {total} values, the projection has {rows} rows"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_maps_rebuild_and_transpose() {
        let map =
            ExplicitMap::new(vec![2, 0, 2, 1, 0], vec![0.5, 1.0, -2.0, 0.25, 3.0], 3).unwrap();
        let p = Projector::Explicit(map.clone());
        let theta = [1.0f32, 2.0, 4.0];
        let mats = p.reconstruct(&theta, &[(1, 2), (3, 1)]).unwrap();
        assert_eq!(mats, vec![vec![2.0, 1.0], vec![-8.0, 0.5, 3.0]]);
        let grad = [1.0f32, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(p.backward(&grad, 3).unwrap(), vec![4.0, 0.25, -1.5]);
        assert!(p.reconstruct(&theta, &[(2, 2)]).is_err());
        assert_eq!(map.sha256(), map_sha256(map.indices(), map.scales()));
        assert!(map.sha256().starts_with("sha256:") && map.sha256().len() == 71);
        assert!(ExplicitMap::new(vec![3], vec![1.0], 3).is_err());
        assert!(ExplicitMap::new(vec![0], vec![f32::NAN], 3).is_err());
        assert!(ExplicitMap::new(vec![0, 1], vec![1.0], 3).is_err());
    }

    #[test]
    fn a_foreign_map_needs_its_generator() {
        let config = AdapterConfig::from_value(&serde_json::json!({
            "format": "unilora_rs", "spec_version": 2, "projection": "peft-numpy",
            "map_sha256": format!("sha256:{}", "0".repeat(64)), "seed": 1, "vector_length": 4,
            "rank": 1, "alpha": 1.0, "modules": [{"name": "m", "in_features": 4, "out_features": 4}],
        }))
        .unwrap();
        // No generator is registered in the core's own tests (the Python package registers one).
        let err = Projector::for_config(&config, || unreachable!())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("regenerated with numpy") && err.contains("--explicit"),
            "{err}"
        );
    }

    #[test]
    fn generated_projections() {
        let sparse = Projector::generated(ProjectionKind::Sparse, 1, 100, 10).unwrap();
        let theta: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let via = sparse.reconstruct(&theta, &[(10, 10)]).unwrap();
        assert_eq!(via, crate::reconstruct(&theta, 1, &[(10, 10)]).unwrap());
        assert!(Projector::generated(ProjectionKind::Explicit, 1, 100, 10).is_err());
        assert!(Projector::generated(ProjectionKind::Fastfood, 1, 100, 101).is_err());
    }
}
