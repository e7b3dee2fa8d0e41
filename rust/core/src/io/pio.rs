//! Positional I/O: reads and writes at an offset (no shared cursor, so threads share one
//! open file), space reservation, and in-kernel range copies between files.

use std::fs::File;
use std::path::Path;

use crate::error::{CoreError, Result};

/// Reads exactly `buf.len()` bytes at `offset` (a positional read: no shared cursor).
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0usize;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            ) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Writes all of `buf` at `offset` (a positional write: no shared cursor).
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0usize;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_write(
                file,
                &buf[done..],
                offset + done as u64,
            ) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reserves `len` bytes for `file` where the file system supports it, so that a full
/// disk is reported before any work is done; elsewhere only sets the length.
pub fn preallocate(file: &File, len: u64, path: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if len > 0 {
            let Ok(len_off) = libc::off_t::try_from(len) else {
                return Err(CoreError::InvalidArgument(format!(
                    "{}: {len} bytes is too large",
                    path.display()
                )));
            };
            // SAFETY: `file` is an open descriptor for the call's duration; the call
            // takes plain integers and touches no memory of ours.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_off) };
            match rc {
                0 => return Ok(()),
                libc::EOPNOTSUPP | libc::EINVAL => {}
                errno => {
                    return Err(CoreError::io(
                        path,
                        std::io::Error::from_raw_os_error(errno),
                    ));
                }
            }
        }
    }
    file.set_len(len).map_err(|e| CoreError::io(path, e))
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` (in the kernel with
/// `copy_file_range` where available, else through a buffer). `on_progress` is called
/// with each chunk's byte count; returning `false` from `keep_going` stops the copy
/// with [`CoreError::Interrupted`].
#[allow(clippy::too_many_arguments)]
pub fn copy_range(
    src: &File,
    src_path: &Path,
    src_off: u64,
    dst: &File,
    dst_path: &Path,
    dst_off: u64,
    len: u64,
    keep_going: &dyn Fn() -> bool,
    on_progress: &dyn Fn(u64),
) -> Result<()> {
    const CHUNK: u64 = 32 << 20;
    let mut done = 0u64;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        while done < len {
            if !keep_going() {
                return Err(CoreError::Interrupted);
            }
            let want = (len - done).min(CHUNK) as usize;
            let mut off_in = (src_off + done) as libc::loff_t;
            let mut off_out = (dst_off + done) as libc::loff_t;
            // SAFETY: both descriptors are open for the call's duration; the offset
            // pointers refer to live locals; the kernel reads/writes no other memory.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n > 0 {
                done += n as u64;
                on_progress(n as u64);
                continue;
            }
            if n == 0 {
                return Err(CoreError::io(
                    src_path,
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(
                    libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM,
                ) => break,
                _ => {
                    let path = if err.raw_os_error() == Some(libc::ENOSPC) {
                        dst_path
                    } else {
                        src_path
                    };
                    return Err(CoreError::io(path, err));
                }
            }
        }
    }
    let mut buf = vec![0u8; (len - done).min(8 << 20) as usize];
    while done < len {
        if !keep_going() {
            return Err(CoreError::Interrupted);
        }
        let n = ((len - done) as usize).min(buf.len());
        read_exact_at(src, &mut buf[..n], src_off + done)
            .map_err(|e| CoreError::io(src_path, e))?;
        write_all_at(dst, &buf[..n], dst_off + done).map_err(|e| CoreError::io(dst_path, e))?;
        done += n as u64;
        on_progress(n as u64);
    }
    Ok(())
}
