//! File-system primitives of the readers and writers, below every format:
//!
//! * [`pio`]: positional reads and writes, space reservation, in-kernel range copies;
//! * [`fs`]: opening regular files only, path resolution and overlap checks, shard
//!   names that stay inside their folder, copying a folder's files;
//! * [`atomic`]: outputs that appear only when complete (a temporary sibling renamed
//!   into place, marked as ours) and cleanup of temporaries that dead processes left.

pub mod atomic;
pub mod fs;
pub mod pio;
