//! `unilora-core`: the pure-Rust engine of unilora_rs. The modules, from the bottom up
//! (each uses only those above it):
//!
//! * [`error`], [`parallel`] (the crate's thread pool) and [`control`] (progress,
//!   cancellation and the loop that watches long work).
//! * [`io`]: positional reads and writes, regular files and paths, atomic outputs.
//! * [`safetensors`]: a strict safetensors header reader (size bombs, bad offsets) and writer;
//!   [`codec`]: element conversions between tensor bytes and float32.
//! * [`format`](mod@format): `adapter_config.json` and its one validator, the projection kinds and
//!   their limits, the fingerprint that binds an adapter to its seed, `d` and module
//!   list, and the optional record of what the trained model is for.
//! * [`projection`]: the maps from `theta_d` to `theta_D` and the one place that
//!   dispatches on them ([`Projector`]): the frozen, portable sparse generator (spec v1:
//!   an exactly balanced, isometric map with O(1) random access and an enumerable
//!   inverse, its Feistel network and CPU kernels), the paper's dense Fastfood map
//!   (spec v2) and explicit maps bound by their SHA-256; [`reconstruct`](fn@reconstruct)
//!   rebuilds LoRA matrices in parallel without materialising an index array.
//! * [`adapter`]: reading and verifying an adapter directory.
//! * [`merge`](mod@merge): the streaming, tiled merge of an adapter into a safetensors checkpoint
//!   (also of several adapters: one output each in one pass over the base, or their
//!   weighted sum; bitsandbytes-quantized bases are dequantised).
//! * [`export`]: exact export as a standard PEFT LoRA adapter, or in the format of
//!   PEFT's Uni-LoRA tuner (saved indices and scales).
//!
//! With the `python` feature, which only the binding crate enables, the reports of a
//! merge and an export are also the Python classes the binding returns (`#[pyclass]`
//! on the structs themselves, so each field list is written once); without it the
//! crate has no pyo3 at all.

#![deny(missing_docs)]

pub mod adapter;
pub mod codec;
pub mod control;
pub mod error;
pub mod export;
pub mod format;
pub mod io;
pub mod merge;
pub mod parallel;
pub mod projection;
#[cfg(feature = "python")]
mod python;
pub mod safetensors;

pub use adapter::Adapter;
pub use error::{CoreError, Result};
pub use export::{
    ExportOptions, ExportReport, PeftExportReport, SavedModules, export_lora, export_peft,
};
pub use format::fingerprint::{checked_fingerprint, fingerprint};
pub use format::{AdapterConfig, ProjectionKind, SPEC_VERSION};
pub use merge::{
    Control, EachReport, MergeOptions, MergeReport, MultiMergeOptions, merge, merge_each,
    merge_weighted,
};
pub use projection::{
    BACKWARD_T_CHUNK, ExplicitMap, Projection, Projector, check_vector, reconstruct,
    reconstruct_backward, reconstruct_into, total_size,
};
