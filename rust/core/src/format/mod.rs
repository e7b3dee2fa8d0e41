//! The adapter format (docs/SPEC.md, sections 2 and 3): what `adapter_config.json`
//! holds and the one validator every reader shares.
//!
//! * [`kind`]: which projection an adapter uses, and the generators' limits;
//! * [`config`]: the checked configuration; [`module`]: one entry of its module list;
//!   [`task`]: its optional record of what the trained model is for; [`error`]: why a
//!   config is refused, one kind per rule;
//! * [`fingerprint`]: the hash that binds an adapter to its seed, `d` and module list;
//! * [`json`]: JSON text with errors that name the key at fault.

pub mod config;
pub mod error;
pub mod fingerprint;
pub mod json;
pub mod kind;
pub mod module;
pub mod task;

pub use config::{AdapterConfig, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION};
pub use error::ConfigError;
pub use kind::{MAX_D, MAX_MAP_D, ProjectionKind, SPEC_VERSION};
pub use module::{AdapterModule, ModuleKind};
pub use task::Task;
