//! `unilora-core`: the pure-Rust engine of unilora_rs.
//!
//! * [`projection`]: the frozen, portable Uni-LoRA projection generator (spec v1):
//!   an exactly balanced, isometric sparse map from `theta_d` to `theta_D` with O(1)
//!   random access and an enumerable inverse.
//! * [`reconstruct`]: rebuilds LoRA matrices from the trainable vector, in parallel,
//!   without materialising an index array.
//! * [`fingerprint`]: the hash that binds an adapter to its seed, `d` and module list.

#![deny(missing_docs)]

pub mod error;
pub mod fingerprint;
mod kernel;
pub mod parallel;
pub mod projection;
pub mod reconstruct;

pub use error::{CoreError, Result};
pub use fingerprint::fingerprint;
pub use projection::{Projection, SPEC_VERSION};
pub use reconstruct::{
    check_vector, reconstruct, reconstruct_backward, reconstruct_into, total_size,
};
