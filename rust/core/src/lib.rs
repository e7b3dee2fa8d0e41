//! `unilora-core`: the pure-Rust engine of unilora_rs.
//!
//! * [`projection`]: the frozen, portable Uni-LoRA projection generator (spec v1):
//!   an exactly balanced, isometric sparse map from `theta_d` to `theta_D` with O(1)
//!   random access and an enumerable inverse.
//! * [`fastfood`]: the paper's dense Fastfood projection (spec v2): Walsh–Hadamard
//!   blocks with sign, permutation and Gaussian diagonals from the seed, O(D log n).
//! * [`feistel`]: the keyed Feistel network behind the projection; [`fastdiv`]: division
//!   by a constant with a multiply-high; [`kernel`]: the CPU gather and backward kernels.
//! * [`projector`]: which projection an adapter uses (sparse, Fastfood, or an explicit
//!   map bound by its SHA-256) and the one place that dispatches on it.
//! * [`reconstruct`]: rebuilds LoRA matrices from the trainable vector, in parallel,
//!   without materialising an index array.
//! * [`format`]: `adapter_config.json` and its one validator, the projection kinds and
//!   their limits, the fingerprint that binds an adapter to its seed, `d` and module
//!   list, and the optional record of what the trained model is for.
//! * [`adapter`]: reading and verifying an adapter directory.
//! * [`io`]: positional reads and writes, regular files and paths, atomic outputs.
//! * [`safetensors`]: a strict safetensors header reader (size bombs, bad offsets) and writer;
//!   [`codec`]: element conversions between tensor bytes and float32.
//! * [`merge`]: the streaming, tiled merge of an adapter into a safetensors checkpoint
//!   (also of several adapters: one output each in one pass over the base, or their
//!   weighted sum; bitsandbytes-quantized bases are dequantised)
//!   ([`control`]: its progress, cancellation and the loop that watches it).
//! * [`export`]: exact export as a standard PEFT LoRA adapter; [`export_peft`]: export
//!   in the format of PEFT's Uni-LoRA tuner (saved indices and scales).

#![deny(missing_docs)]

pub mod adapter;
pub mod codec;
pub mod control;
pub mod error;
pub mod export;
pub mod export_peft;
pub mod fastdiv;
pub mod fastfood;
pub mod feistel;
pub mod format;
pub mod io;
pub mod kernel;
pub mod merge;
pub mod parallel;
pub mod projection;
pub mod projector;
pub mod reconstruct;
pub mod safetensors;

pub use adapter::Adapter;
pub use error::{CoreError, Result};
pub use export::{ExportOptions, ExportReport, SavedModules, export_lora};
pub use export_peft::{PeftExportReport, export_peft};
pub use format::fingerprint::fingerprint;
pub use format::{AdapterConfig, ProjectionKind, SPEC_VERSION};
pub use merge::{
    Control, EachReport, MergeOptions, MergeReport, MultiMergeOptions, merge, merge_each,
    merge_weighted,
};
pub use projection::Projection;
pub use projector::{ExplicitMap, Projector};
pub use reconstruct::{
    BACKWARD_T_CHUNK, check_vector, reconstruct, reconstruct_backward, reconstruct_into, total_size,
};
