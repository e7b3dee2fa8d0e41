//! Atomic outputs: a temporary sibling of the target, renamed into place when complete
//! and marked as ours, so that an existing output is replaced only when it is an earlier
//! output of the same kind; cleanup of the temporaries that dead processes left.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{CoreError, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The file that marks a folder as an output of ours: an existing output folder is
/// replaced (with `overwrite`) only when it holds this file naming the same kind of
/// output, or when it is empty.
pub const OUTPUT_MARKER: &str = ".unilora-output";

/// A temporary sibling of `target` (`.<name>.unilora-<tag>-<pid>-<n>-<host>`, where
/// `<host>` names the machine's boot and the PID namespace, see [`host_tag`]; without it
/// where that cannot be told), removed on drop unless [`TempPath::commit`] renamed it
/// into place.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    target: PathBuf,
    done: bool,
    kind: Option<&'static str>,
}

impl TempPath {
    /// Reserves a temporary name next to `target` (nothing is created yet), after
    /// removing the temporaries that dead processes left next to it
    /// ([`remove_stale_temps`]).
    pub fn new(target: &Path, tag: &str) -> Result<TempPath> {
        let name = target.file_name().ok_or_else(|| {
            CoreError::InvalidArgument(format!("output {} has no file name", target.display()))
        })?;
        remove_stale_temps(target);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = format!(
            ".{}.unilora-{tag}-{}-{n}",
            name.to_string_lossy(),
            std::process::id()
        );
        if let Some(host) = host_tag() {
            tmp_name.push('-');
            tmp_name.push_str(host);
        }
        let path = target.with_file_name(tmp_name);
        Ok(TempPath {
            path,
            target: target.to_path_buf(),
            done: false,
            kind: None,
        })
    }

    /// Creates a temporary folder for an output folder of the given kind (`"merge"`,
    /// `"export-lora"`); [`TempPath::commit`] writes the [`OUTPUT_MARKER`] into it.
    pub fn new_folder(target: &Path, kind: &'static str) -> Result<TempPath> {
        let mut temp = TempPath::new(target, "tmp")?;
        fs::create_dir(&temp.path).map_err(|e| CoreError::io(&temp.path, e))?;
        temp.kind = Some(kind);
        Ok(temp)
    }

    /// Hands the temporary folder over to another writer (it is no longer removed on
    /// drop); [`TempPath::adopt_folder`] takes it back to commit it.
    pub fn keep(mut self) -> PathBuf {
        self.done = true;
        std::mem::take(&mut self.path)
    }

    /// A temporary folder made by [`TempPath::new_folder`] for `target` and filled by
    /// another writer, to commit as an output of `kind`. It must be a sibling of
    /// `target` named as this type names them.
    pub fn adopt_folder(path: &Path, target: &Path, kind: &'static str) -> Result<TempPath> {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
        let ours = path.parent() == target.parent()
            && name.is_some_and(|n| {
                path.file_name().is_some_and(|p| {
                    p.to_string_lossy()
                        .starts_with(&format!(".{n}.unilora-tmp-"))
                })
            })
            && fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
        if !ours {
            return Err(CoreError::InvalidArgument(format!(
                "{} is not a staging folder for {}",
                path.display(),
                target.display()
            )));
        }
        Ok(TempPath {
            path: path.to_path_buf(),
            target: target.to_path_buf(),
            done: false,
            kind: Some(kind),
        })
    }

    /// The temporary path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary file or folder onto the target. With `overwrite`, an
    /// existing target is replaced (a folder is first moved aside, then removed once
    /// the new one is in place) if [`check_output`] allows it; without it the target
    /// must not exist.
    pub fn commit(mut self, overwrite: bool) -> Result<()> {
        if let Some(kind) = self.kind {
            write_marker(&self.path, kind)?;
        }
        check_output(&self.target, overwrite, self.kind)?;
        let exists = fs::symlink_metadata(&self.target).is_ok();
        if exists && self.kind.is_some() {
            let old = TempPath::new(&self.target, "old")?;
            fs::rename(&self.target, &old.path).map_err(|e| CoreError::io(&self.target, e))?;
            if let Err(e) = fs::rename(&self.path, &self.target) {
                let _ = fs::rename(&old.path, &self.target);
                return Err(CoreError::io(&self.target, e));
            }
            self.done = true;
            drop(old); // removes the previous output
        } else {
            if exists && fs::metadata(&self.target).is_ok_and(|m| m.is_dir()) {
                return Err(CoreError::InvalidArgument(format!(
                    "output {} is a folder; the output of a single-file merge is a file",
                    self.target.display()
                )));
            }
            fs::rename(&self.path, &self.target).map_err(|e| CoreError::io(&self.target, e))?;
            self.done = true;
        }
        sync_parent(&self.target);
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.done {
            remove_any(&self.path);
        }
    }
}

fn remove_any(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        let _ = fs::remove_dir_all(path);
    } else {
        let _ = fs::remove_file(path);
    }
}

/// Checks that `out` may be written: it must not exist unless `overwrite`; an existing
/// folder output (`kind` given) must be empty or an earlier output of the same kind
/// (it holds the [`OUTPUT_MARKER`]), so that no file of the user's is ever deleted.
pub fn check_output(out: &Path, overwrite: bool, kind: Option<&str>) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !overwrite {
        return Err(already_exists(out));
    }
    let Some(kind) = kind else {
        return Ok(());
    };
    let is_dir = meta.is_dir();
    if is_dir && fs::read_dir(out).is_ok_and(|mut d| d.next().is_none()) {
        return Ok(());
    }
    if is_dir && marker_kind(out).as_deref() == Some(kind) {
        return Ok(());
    }
    Err(CoreError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "output exists and is not an earlier output of `unilora {kind}` (no {OUTPUT_MARKER} \
                 file naming it), so --overwrite leaves it alone: remove it yourself or choose \
                 another output"
            ),
        ),
    })
}

fn marker_kind(dir: &Path) -> Option<String> {
    let text = fs::read(dir.join(OUTPUT_MARKER)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    value.get("output")?.as_str().map(str::to_string)
}

fn write_marker(dir: &Path, kind: &str) -> Result<()> {
    let path = dir.join(OUTPUT_MARKER);
    let text = serde_json::json!({
        "output": kind,
        "written_by": format!("unilora_rs {}", env!("CARGO_PKG_VERSION")),
    });
    let io = |e| CoreError::io(&path, e);
    let mut file = File::create(&path).map_err(io)?;
    file.write_all(format!("{text}\n").as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// How long a temporary must have gone unmodified before [`remove_stale_temps`] may
/// remove it.
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the temporaries (see [`TempPath`]) next to `target` whose process has ended
/// (a zombie counts as ended): a merge killed by a signal it could not handle (SIGKILL)
/// leaves them behind. A temporary of a running process (this one included) is kept,
/// and so is an `old` one (a previous output being replaced) while the target itself is
/// missing. A temporary named by a process of this machine's boot and PID namespace
/// (its [`host_tag`] is ours) goes as soon as that process has ended; any other one (of
/// another machine or container sharing the file system, where its process id means
/// nothing here, or named without a host tag) only once neither it nor anything
/// directly in it was modified within [`STALE_AFTER`]. Best effort: errors are ignored.
/// Only on Unix, where a process id can be checked.
pub fn remove_stale_temps(target: &Path) {
    #[cfg(unix)]
    {
        let (Some(name), Some(parent)) = (target.file_name(), target.parent()) else {
            return;
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let prefix = format!(".{}.unilora-", name.to_string_lossy());
        let Ok(entries) = fs::read_dir(parent) else {
            return;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            let parts: Vec<&str> = rest.split('-').collect();
            let (tag, pid, n, host) = match *parts.as_slice() {
                [tag, pid, n] => (tag, pid, n, None),
                [tag, pid, n, host] => (tag, pid, n, Some(host)),
                _ => continue,
            };
            let (Ok(pid), Ok(_)) = (pid.parse::<i32>(), n.parse::<u64>()) else {
                continue;
            };
            let ours = host.is_some() && host == host_tag();
            let ended = || {
                if ours {
                    !process_alive(pid)
                } else {
                    !process_alive(pid) && untouched_for(&entry.path(), STALE_AFTER)
                }
            };
            let stale = match tag {
                "tmp" => ended(),
                "old" => fs::symlink_metadata(target).is_ok() && ended(),
                _ => false,
            };
            if stale {
                remove_any(&entry.path());
            }
        }
    }
}

/// Whether neither `path` nor anything directly in it was modified within `age`.
#[cfg(unix)]
fn untouched_for(path: &Path, age: std::time::Duration) -> bool {
    let recent = |p: &Path| {
        fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .map_or(true, |t| t.elapsed().map_or(true, |e| e < age))
    };
    if recent(path) {
        return false;
    }
    match fs::read_dir(path) {
        Ok(entries) => !entries.flatten().any(|e| recent(&e.path())),
        Err(_) => true,
    }
}

/// Whether process `pid` is running: it exists and, where `/proc` says so, is no
/// zombie (a killed process its parent has not waited for yet has ended its work).
#[cfg(unix)]
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return true; // not a process id of ours: keep the file
    }
    // SAFETY: kill with signal 0 only checks that the process exists; it takes plain
    // integers and touches no memory.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    // `/proc/<pid>/stat` is `pid (comm) S ...`: the state follows the last ')'
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|state| !matches!(state, 'Z' | 'X' | 'x')),
        Err(_) => true,
    }
}

/// A short tag of this machine's boot and this process's PID namespace (a hash of
/// `/proc/sys/kernel/random/boot_id` and the `/proc/self/ns/pid` link), naming the
/// temporaries of [`TempPath`]: a process with the same tag sees the writer's process
/// id as its own, so [`remove_stale_temps`] can trust a check of it. `None` where these
/// cannot be read (not Linux).
pub fn host_tag() -> Option<&'static str> {
    static TAG: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let pid_ns = fs::read_link("/proc/self/ns/pid").ok()?;
        let text = format!("{}\n{}", boot.trim(), pid_ns.display());
        let digest = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
        Some(digest[..4].iter().map(|b| format!("{b:02x}")).collect())
    })
    .as_deref()
}

/// The error for an output that exists while overwriting was not asked for.
pub fn already_exists(path: &Path) -> CoreError {
    CoreError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            ErrorKind::AlreadyExists,
            "output exists (pass overwrite=True or --overwrite to replace it)",
        ),
    }
}

/// Best-effort fsync of the folder holding `path`, so that a rename is durable.
pub fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_paths_clean_up_and_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let t = TempPath::new(&target, "tmp").unwrap();
            fs::create_dir(t.path()).unwrap();
            fs::write(t.path().join("x"), b"1").unwrap();
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let t = TempPath::new_folder(&target, "merge").unwrap();
        t.commit(false).unwrap();
        assert!(target.is_dir());
        let t = TempPath::new_folder(&target, "merge").unwrap();
        assert!(matches!(t.commit(false), Err(CoreError::Io { .. })));
        let t = TempPath::new_folder(&target, "merge").unwrap();
        fs::write(t.path().join("new"), b"1").unwrap();
        t.commit(true).unwrap();
        assert!(target.join("new").exists());
        assert!(target.join(OUTPUT_MARKER).exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// The process id of a child that has exited and been waited for.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn temporaries_of_ended_processes_go_at_once_here_and_after_a_minute_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let host = host_tag().expect("a host tag on Linux");
        assert_eq!(host.len(), 8);
        let (dead, me) = (dead_pid(), std::process::id());
        let name = |tag: &str, pid: u32, host: &str| format!(".out.unilora-{tag}-{pid}-0{host}");
        let gone = [name("tmp", dead, &format!("-{host}"))];
        let kept = [
            name("tmp", me, &format!("-{host}")), // this process is running
            name("tmp", dead, "-0badc0de"),       // another machine's: fresh
            name("tmp", dead, ""),                // no host tag: fresh
            name("old", dead, &format!("-{host}")), // the target is missing
        ];
        for n in gone.iter().chain(&kept) {
            fs::create_dir(dir.path().join(n)).unwrap();
            fs::write(dir.path().join(n).join("model.safetensors"), b"x").unwrap();
        }
        let temp = TempPath::new(&target, "tmp").unwrap();
        let own = temp
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let prefix = format!(".out.unilora-tmp-{me}-");
        let rest = own.strip_prefix(&prefix).unwrap();
        assert_eq!(rest.split_once('-').unwrap().1, host, "{own}");
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = kept.to_vec();
        want.sort();
        assert_eq!(left, want);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_zombie_is_no_running_process() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_alive(pid) {
            assert!(std::time::Instant::now() < deadline, "never seen as ended");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(child); // never waited for until here: a zombie all along
        assert!(process_alive(i32::try_from(std::process::id()).unwrap()));
    }
}
