//! The error type of the core crate.

use std::path::PathBuf;

/// Result alias of the core crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in `unilora-core`. Each variant carries a message
/// that names the offending value, so callers can show it as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A bad argument: `d = 0`, `d > D`, an empty shape list, a non-positive dimension…
    #[error("{0}")]
    InvalidArgument(String),
    /// The trainable vector has the wrong length or holds NaN/Inf.
    #[error("{0}")]
    Vector(String),
    /// An unsupported or mismatched dtype.
    #[error("{0}")]
    Dtype(String),
    /// A malformed file: corrupt safetensors header, bad JSON, header size bomb…
    #[error("{path}: {msg}")]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Adapter and base (or adapter and its own config) do not agree: missing or
    /// ambiguous target tensor, shape mismatch, fingerprint mismatch.
    #[error("{0}")]
    Mismatch(String),
    /// An I/O error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operation was cancelled (e.g. by a Python KeyboardInterrupt).
    #[error("interrupted")]
    Interrupted,
    /// A bug, not a bad input: a worker thread panicked. The message carries the
    /// panic's text.
    #[error("internal error: {0}")]
    Internal(String),
    /// An output buffer could not be allocated.
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// How many bytes were asked for.
        bytes: u128,
        /// What the memory was for.
        what: &'static str,
    },
}

impl CoreError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// A zero-filled vector of `n` elements, or [`CoreError::OutOfMemory`] instead of
    /// aborting the process when the allocation fails. Like `vec![0; n]`, fresh pages
    /// come zeroed from the system, so nothing is written here. Large buffers ask for
    /// transparent huge pages (as numpy does), so that filling them takes one page
    /// fault per 2 MiB instead of one per 4 KiB.
    pub fn try_zeroed<T: ZeroValid>(n: u64, what: &'static str) -> Result<Vec<T>> {
        let oom = || CoreError::OutOfMemory {
            bytes: u128::from(n) * std::mem::size_of::<T>() as u128,
            what,
        };
        let n = usize::try_from(n).map_err(|_| oom())?;
        let layout = std::alloc::Layout::array::<T>(n).map_err(|_| oom())?;
        if layout.size() == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
        if ptr.is_null() {
            return Err(oom());
        }
        advise_huge_pages(ptr.cast(), layout.size());
        // SAFETY: `ptr` comes from the global allocator with the layout of `[T; n]`, its
        // bytes are all zero, which is a valid `T` (the `ZeroValid` contract), and
        // length == capacity == n.
        Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
    }

    /// The error for a thread that panicked with `payload` while doing `what`.
    pub fn from_panic(what: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        CoreError::Internal(format!("{what} panicked ({text}); please report this"))
    }

    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        CoreError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Asks the kernel to back the whole pages of `[ptr, ptr + len)` with transparent huge
/// pages (a hint; errors are ignored). Only for buffers of at least 4 MiB.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const MIN: usize = 4 << 20;
        const PAGE: usize = 4096;
        if len >= MIN {
            let start = (ptr as usize).next_multiple_of(PAGE);
            let end = (ptr as usize + len) / PAGE * PAGE;
            // SAFETY: [start, end) lies inside the live allocation at `ptr`; madvise
            // with MADV_HUGEPAGE changes no contents, only how pages are backed.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// Types for which the all-zero bit pattern is a valid value (`0`, `0.0`).
///
/// # Safety
/// Implement only for types whose all-zero bytes form a valid value.
pub unsafe trait ZeroValid: Copy {}

// SAFETY: all-zero bytes are 0.0 / 0 for these primitive types.
unsafe impl ZeroValid for f32 {}
// SAFETY: as above.
unsafe impl ZeroValid for u8 {}
// SAFETY: as above.
unsafe impl ZeroValid for u32 {}
// SAFETY: as above.
unsafe impl ZeroValid for u64 {}
