//! Files and paths of the readers and writers: opening regular files only, path
//! resolution and overlap checks, shard names that must stay inside their folder, and
//! copying a folder's files.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use crate::error::{CoreError, Result};

/// Opens `path` for reading if it is a regular file (following links). A FIFO, socket
/// or device is refused without blocking (the open does not wait for a writer), and a
/// folder gives "is a directory".
pub fn open_regular(path: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| CoreError::io(path, e))?;
    let meta = file.metadata().map_err(|e| CoreError::io(path, e))?;
    if meta.is_dir() {
        return Err(CoreError::io(path, ErrorKind::IsADirectory.into()));
    }
    if !meta.is_file() {
        return Err(CoreError::io(
            path,
            std::io::Error::new(
                ErrorKind::InvalidInput,
                "not a regular file (a FIFO, socket or device); give a file",
            ),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: `file` is an open descriptor; F_GETFL / F_SETFL take and return plain
        // integers and touch no memory of ours.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(file)
}

/// The bytes of the regular file `path` (see [`open_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| CoreError::io(path, e))?;
    Ok(bytes)
}

/// Makes `path` absolute and resolves symbolic links in its longest existing prefix;
/// the remaining components are appended as they are (`..` among them is applied
/// lexically).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| CoreError::io(path, e))?;
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(canon) = existing.canonicalize() {
            let mut out = canon;
            for comp in rest.iter().rev() {
                if comp == ".." {
                    out.pop();
                } else if comp != "." {
                    out.push(comp);
                }
            }
            return Ok(out);
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return Ok(abs),
        }
    }
}

/// Fails when `out` is `input`, lies inside it, or contains it.
pub fn check_disjoint(out: &Path, input: &Path, what: &str) -> Result<()> {
    let (o, i) = (resolve(out)?, resolve(input)?);
    if o == i {
        return Err(CoreError::InvalidArgument(format!(
            "output {} is the {what} itself: write the result somewhere else",
            out.display()
        )));
    }
    if o.starts_with(&i) {
        return Err(CoreError::InvalidArgument(format!(
            "output {} lies inside the {what} {}: write the result somewhere else",
            out.display(),
            input.display()
        )));
    }
    if i.starts_with(&o) {
        return Err(CoreError::InvalidArgument(format!(
            "output {} contains the {what} {}: replacing it would destroy the input",
            out.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Checks a file name read from a shard index: relative, made of normal components
/// only (no `..`, no root, no drive, no backslash), so that it stays inside its folder.
pub fn check_relative_name(name: &str, index: &Path) -> Result<PathBuf> {
    let bad = |why: &str| {
        CoreError::format(
            index,
            format!("shard name {name:?} {why}: shard files must lie inside the model folder"),
        )
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.contains('\\') || name.contains('\0') {
        return Err(bad("contains a backslash or NUL"));
    }
    let path = Path::new(name);
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad("contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(bad("is absolute")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad("names no file"));
    }
    Ok(out)
}

/// Copies the regular files under `src` (recursively, following links) into `dst`,
/// except those for which `skip(relative path)` is true. Returns the relative paths
/// copied, sorted.
pub fn copy_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut copied = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| CoreError::io(&dir, e))?
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| CoreError::io(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel_child = rel.join(entry.file_name());
            let from = entry.path();
            let meta = fs::metadata(&from).map_err(|e| CoreError::io(&from, e))?;
            if meta.is_dir() {
                let to = dst.join(&rel_child);
                fs::create_dir_all(&to).map_err(|e| CoreError::io(&to, e))?;
                stack.push(rel_child);
            } else if meta.is_file() && !skip(&rel_child) {
                let to = dst.join(&rel_child);
                fs::copy(&from, &to).map_err(|e| CoreError::io(&to, e))?;
                copied.push(rel_child);
            }
        }
    }
    copied.sort();
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_must_stay_inside() {
        let idx = Path::new("model.safetensors.index.json");
        assert_eq!(
            check_relative_name("model-1.safetensors", idx).unwrap(),
            PathBuf::from("model-1.safetensors")
        );
        assert_eq!(
            check_relative_name("./sub/a.safetensors", idx).unwrap(),
            PathBuf::from("sub/a.safetensors")
        );
        for bad in [
            "../x.safetensors",
            "/etc/passwd",
            "a/../../b",
            "",
            "..\\x",
            "sub/..",
            ".",
        ] {
            let e = check_relative_name(bad, idx).unwrap_err();
            assert!(matches!(e, CoreError::Format { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn disjointness() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        fs::create_dir(&base).unwrap();
        assert!(check_disjoint(&base, &base, "base").is_err());
        assert!(check_disjoint(&base.join("out"), &base, "base").is_err());
        assert!(check_disjoint(&base.join("a/../../base"), &base, "base").is_err());
        assert!(check_disjoint(dir.path(), &base, "base").is_err());
        check_disjoint(&dir.path().join("out"), &base, "base").unwrap();
        check_disjoint(&dir.path().join("base2"), &base, "base").unwrap();
    }
}
