//! The projections that map `theta_d` to `theta_D`, and the one place that dispatches
//! on an adapter's `projection` key ([`Projector`]):
//!
//! * `sparse` (the default, spec v1): the balanced one-non-zero-per-row map of
//!   [`sparse`], computed from the seed (its Feistel network in [`feistel`], the
//!   multiply-high division in [`fastdiv`], the CPU gather and backward kernels in
//!   [`kernel`], the parallel forward and backward over many matrices in
//!   [`reconstruct`](mod@reconstruct));
//! * `fastfood` (spec v2): the dense Fastfood map of [`fastfood`], from the seed;
//! * `explicit` (spec v2): a map stored in the adapter file, one column and one float32
//!   scale per row of `theta_D` ([`ExplicitMap`]);
//! * `peft-numpy` (spec v2): the map of PEFT's Uni-LoRA tuner, which numpy's generator
//!   produces; it is regenerated on load by a [`ForeignGenerator`] that the host
//!   registers (the Python package does, with numpy).
//!
//! Explicit and regenerated maps are bound to the adapter by the SHA-256 of the map
//! ([`ExplicitMap::sha256`]), recorded in the config and checked on every load, so a
//! generator whose stream changed is detected instead of giving another model.
//! [`shapes`] holds the size checks they all share.

pub mod explicit;
pub mod fastdiv;
pub mod fastfood;
pub mod feistel;
pub mod kernel;
pub mod reconstruct;
pub mod shapes;
pub mod sparse;

pub use explicit::{ExplicitMap, ForeignGenerator, map_sha256, set_foreign_generator};
pub use fastfood::Fastfood;
pub use feistel::{ROUNDS, mix32, splitmix64};
pub use reconstruct::{BACKWARD_T_CHUNK, reconstruct, reconstruct_backward, reconstruct_into};
pub use shapes::{check_vector, total_size};
pub use sparse::Projection;

use explicit::foreign_map;
use shapes::{check_dims, check_outputs, zeroed_outputs};

use crate::error::{CoreError, Result};
use crate::format::config::AdapterConfig;
use crate::format::kind::ProjectionKind;

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
                check_dims(total, d)?;
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
                check_rows(shapes, ff.total())?;
                check_outputs(shapes, outs)?;
                ff.reconstruct_into(vector, outs)
            }
            Projector::Explicit(map) => {
                check_rows(shapes, map.indices().len() as u64)?;
                check_outputs(shapes, outs)?;
                map.reconstruct_into(vector, outs)
            }
        }
    }

    /// Every matrix of `shapes`, rebuilt from `vector`.
    pub fn reconstruct(&self, vector: &[f32], shapes: &[(u64, u64)]) -> Result<Vec<Vec<f32>>> {
        let mut outs = zeroed_outputs(shapes)?;
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
                check_rows(&[(grad.len() as u64, 1)], map.indices().len() as u64)?;
                map.backward(grad, d)
            }
        }
    }
}

/// Checks that `shapes` hold as many values as the projection has rows.
fn check_rows(shapes: &[(u64, u64)], rows: u64) -> Result<()> {
    let total = total_size(shapes)?;
    if total != rows {
        return Err(CoreError::InvalidArgument(format!(
            "the shapes hold D = {total} values, the projection has {rows} rows"
        )));
    }
    Ok(())
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
