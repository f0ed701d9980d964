//! Careful file I/O, one copy for the whole workspace (host, plots, xtask).
//!
//! Outputs are written into a hidden temporary beside their destination (`.NAME.tmp-PID-XXXXXX`),
//! fsynced, and renamed into place; an existing output is swapped out with one atomic exchange.
//! Temporaries of processes that no longer run are removed by the next writer of the same name.
//! Inputs are opened only when they are regular files, so a FIFO cannot hang a reader.

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

/// What may be replaced at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// An existing destination is an error.
    Never,
    /// Only a folder holding this marker file (an earlier output of the same tool) is replaced.
    FolderWith(&'static str),
    /// Whatever is there: for a tool's own cache entries, never for user paths.
    Always,
}

/// A temporary folder that becomes `dest` on [`StagedDir::commit`], and disappears if dropped before.
pub struct StagedDir {
    tmp: tempfile::TempDir,
    dest: PathBuf,
    replace: Replace,
}

impl StagedDir {
    /// Refuses at once when `dest` exists and may not be replaced, so no work is wasted.
    pub fn new(dest: &Path, replace: Replace) -> Result<Self> {
        check_replaceable(dest, replace)?;
        let (parent, name) = split(dest)?;
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        clear_stale(&parent, &name);
        let tmp = tempfile::Builder::new()
            .prefix(&tmp_prefix(&name))
            .tempdir_in(&parent)
            .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
        Ok(StagedDir { tmp, dest: dest.to_path_buf(), replace })
    }

    /// Where to write the folder's contents.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Flushes every file to disk, then moves the folder into place: a crash at any moment leaves
    /// either the old output or the new one, complete.
    pub fn commit(self) -> Result<PathBuf> {
        sync_tree(self.tmp.path()).context("flushing the output to disk")?;
        let parent = split(&self.dest)?.0;
        let tmp = self.tmp.keep();
        let moved = if fs::symlink_metadata(&self.dest).is_ok() {
            // Checked again: something may have appeared while this run was writing.
            check_replaceable(&self.dest, self.replace).and_then(|()| exchange(&tmp, &self.dest))
        } else {
            rename_new(&tmp, &self.dest)
        };
        if let Err(e) = moved {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        sync_dir(&parent)?;
        // After an exchange the old output sits at the temporary path.
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("removing the replaced output, now at {}", tmp.display()))?;
        }
        Ok(self.dest)
    }
}

/// Writes a whole file atomically: a reader sees the old content or the new one, never a part.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let (parent, name) = split(path)?;
    clear_stale(&parent, &name);
    let mut tmp = tempfile::Builder::new()
        .prefix(&tmp_prefix(&name))
        .tempfile_in(&parent)
        .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
    tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all()).with_context(|| format!("writing {}", path.display()))?;
    // tempfile creates files readable by their owner only; outputs are for sharing.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("renaming to {}", path.display()))?;
    sync_dir(&parent)
}

/// A scratch folder beside `dest` (hidden, removed when dropped), for work whose result is then
/// moved to `dest` with [`place_file`].
pub fn work_dir(dest: &Path) -> Result<tempfile::TempDir> {
    let (parent, name) = split(dest)?;
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    clear_stale(&parent, &name);
    tempfile::Builder::new().prefix(&tmp_prefix(&name)).tempdir_in(&parent).with_context(|| format!("creating a temporary folder in {}", parent.display()))
}

/// A scratch folder beside `dest` (hidden) that lasts until this process exits, for what a whole
/// process shares, such as a test run's imported model. A `TempDir` kept in a static is never
/// dropped and would outlive the process; this folder is removed by an exit hook instead, and, if
/// the process is killed, by the next caller with the same `dest`.
pub fn process_dir(dest: &Path) -> Result<PathBuf> {
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static HOOK: Once = Once::new();
    extern "C" fn remove_all() {
        for dir in DIRS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = fs::remove_dir_all(dir);
        }
    }
    extern "C" {
        fn atexit(hook: extern "C" fn()) -> std::ffi::c_int;
    }
    let dir = work_dir(dest)?.keep();
    DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(dir.clone());
    // SAFETY: registers a plain function with the C runtime; it runs once, at exit().
    HOOK.call_once(|| unsafe {
        atexit(remove_all);
    });
    Ok(dir)
}

/// Moves a finished file to `dest` on the same filesystem, flushed first: `dest` is whole or absent.
pub fn place_file(src: &Path, dest: &Path) -> Result<()> {
    File::open(src).and_then(|f| f.sync_all()).with_context(|| format!("flushing {}", src.display()))?;
    fs::rename(src, dest).with_context(|| format!("moving {} to {}", src.display(), dest.display()))?;
    sync_dir(&split(dest)?.0)
}

/// Whether `name`, as a file listed by an index or manifest, stays inside the folder that lists it: a
/// non-empty relative path of plain names (no `..`, no root, no `.`).
pub fn names_a_file_inside(name: &str) -> bool {
    !name.is_empty() && Path::new(name).components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Opens `path` for reading only if it is a regular file (symlinks to one are fine). Opening is
/// non-blocking, so a FIFO is refused instead of waiting forever for a writer.
pub fn open_regular(path: &Path) -> Result<File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("reading the metadata of {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file ({}): scalpel reads only regular files", path.display(), kind_of(&meta));
    }
    Ok(file)
}

/// The whole content of a regular file.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path)?.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

/// The whole content of a regular UTF-8 text file.
pub fn read_regular_string(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))
}

fn kind_of(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a plain file"
    }
}

fn split(dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest.file_name().with_context(|| format!("{} needs a file or folder name", dest.display()))?;
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((parent.to_path_buf(), name.to_string_lossy().into_owned()))
}

/// `.NAME.tmp-PID-`: the PID lets a later run tell a dead writer's leftovers from a live one's.
fn tmp_prefix(name: &str) -> String {
    format!(".{name}.tmp-{}-", std::process::id())
}

fn check_replaceable(dest: &Path, replace: Replace) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(dest) else { return Ok(()) };
    match replace {
        Replace::Never => bail!("{} already exists: choose another output or pass --force to replace it", dest.display()),
        Replace::FolderWith(marker) => {
            if !meta.is_dir() || !dest.join(marker).is_file() {
                bail!(
                    "{} exists and is not an earlier output (a folder with {marker}): --force replaces only those; choose another output",
                    dest.display()
                );
            }
            Ok(())
        }
        Replace::Always => Ok(()),
    }
}

/// Removes `.NAME.tmp-PID-*` entries whose process no longer runs, and says so.
fn clear_stale(parent: &Path, name: &str) {
    // Without /proc every process would look dead: then remove nothing.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(parent) else { return };
    let prefix = format!(".{name}.tmp-");
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else { continue };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        if removed.is_ok() {
            eprintln!("removed {}, left behind by an earlier run (process {pid}) that did not finish", path.display());
        }
    }
}

/// Swaps `tmp` and `dest` in one step; where the filesystem cannot, falls back to two renames.
fn exchange(tmp: &Path, dest: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, tmp, CWD, dest, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(()),
        Err(e) if unsupported(e) => {
            let old = PathBuf::from(format!("{}.old", tmp.display()));
            fs::rename(dest, &old).with_context(|| format!("moving the old {} aside", dest.display()))?;
            if let Err(e) = fs::rename(tmp, dest) {
                let _ = fs::rename(&old, dest); // put the old output back
                return Err(e).with_context(|| format!("moving the result to {}", dest.display()));
            }
            fs::remove_dir_all(&old).with_context(|| format!("removing the replaced output, now at {}", old.display()))
        }
        Err(e) => Err(std::io::Error::from(e)).with_context(|| format!("moving the result to {}", dest.display())),
    }
}

/// The filesystem (or kernel) has no renameat2 flags: fall back to plain renames.
fn unsupported(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    e == Errno::INVAL || e == Errno::NOSYS || e == Errno::NOTSUP
}

/// Renames onto a path that must not exist: what appeared meanwhile is never overwritten.
fn rename_new(tmp: &Path, dest: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, tmp, CWD, dest, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::EXIST => bail!("{} appeared while writing: not replacing it", dest.display()),
        Err(e) if unsupported(e) => {
            fs::rename(tmp, dest).with_context(|| format!("moving the result to {}", dest.display()))
        }
        Err(e) => Err(std::io::Error::from(e)).with_context(|| format!("moving the result to {}", dest.display())),
    }
}

/// fsyncs every file under `dir`, then the folders, so a renamed folder never holds empty files after a power loss.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_dir() {
            sync_tree(&entry.path())?;
        } else if t.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        // Some filesystems cannot fsync a folder; the data itself is already on disk.
        Err(e) if e.kind() == ErrorKind::InvalidInput || e.raw_os_error() == Some(rustix::io::Errno::NOTSUP.raw_os_error()) => Ok(()),
        r => r.with_context(|| format!("flushing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: &str = "record.json";

    fn staged_with(dest: &Path, replace: Replace, content: &str) -> Result<PathBuf> {
        let s = StagedDir::new(dest, replace)?;
        fs::write(s.path().join(MARK), content)?;
        s.commit()
    }

    fn hidden(dir: &Path) -> Vec<String> {
        fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect()
    }

    #[test]
    fn a_process_folder_lasts_until_the_process_exits() {
        const CHILD: &str = "SCALPEL_FILES_PROCESS_DIR_DEST";
        if let Ok(dest) = std::env::var(CHILD) {
            // The child: make the folder, put a file in it, say where, and exit.
            let dir = process_dir(Path::new(&dest)).unwrap();
            fs::write(dir.join("model.bin"), "weights").unwrap();
            println!("made {}", dir.display());
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let me = "tests::a_process_folder_lasts_until_the_process_exits";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", me, "--nocapture", "--test-threads", "1"])
            .env(CHILD, root.path().join("shared"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let made = stdout.split_whitespace().skip_while(|w| *w != "made").nth(1).unwrap_or_else(|| panic!("the child made no folder:\n{stdout}"));
        assert!(Path::new(made).starts_with(root.path()), "{made}");
        assert!(!Path::new(made).exists(), "{made} outlived its process");
        assert!(hidden(root.path()).is_empty(), "{:?}", hidden(root.path()));
    }

    #[test]
    fn a_staged_folder_appears_whole_and_replaces_only_an_earlier_output() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        staged_with(&dest, Replace::Never, "one").unwrap();
        assert_eq!(fs::read_to_string(dest.join(MARK)).unwrap(), "one");
        let e = staged_with(&dest, Replace::Never, "two").unwrap_err().to_string();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        staged_with(&dest, Replace::FolderWith(MARK), "two").unwrap();
        assert_eq!(fs::read_to_string(dest.join(MARK)).unwrap(), "two");
        assert!(hidden(root.path()).is_empty(), "{:?}", hidden(root.path()));
    }

    #[test]
    fn force_never_replaces_a_file_or_a_foreign_folder() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("model.safetensors");
        fs::write(&file, "weights").unwrap();
        let e = staged_with(&file, Replace::FolderWith(MARK), "x").unwrap_err().to_string();
        assert!(e.contains("not an earlier output"), "{e}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "weights");
        let foreign = root.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("keep"), "mine").unwrap();
        assert!(staged_with(&foreign, Replace::FolderWith(MARK), "x").is_err());
        assert_eq!(fs::read_to_string(foreign.join("keep")).unwrap(), "mine");
    }

    #[test]
    fn an_exchange_swaps_both_folders_or_falls_back_to_replacing() {
        let root = tempfile::tempdir().unwrap();
        let (new, dest) = (root.path().join("new"), root.path().join("dest"));
        fs::create_dir(&new).unwrap();
        fs::write(new.join(MARK), "new").unwrap();
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join(MARK), "old").unwrap();
        exchange(&new, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join(MARK)).unwrap(), "new");
        // With RENAME_EXCHANGE the old output is kept at the other name, for the caller to remove.
        if new.exists() {
            assert_eq!(fs::read_to_string(new.join(MARK)).unwrap(), "old");
        } else {
            eprintln!("this filesystem has no RENAME_EXCHANGE: the two-rename fallback ran");
        }
        assert!(!root.path().join("new.old").exists());
    }

    #[test]
    fn a_dropped_stage_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let s = StagedDir::new(&root.path().join("out"), Replace::Never).unwrap();
        fs::write(s.path().join("half"), "x").unwrap();
        drop(s);
        assert!(fs::read_dir(root.path()).unwrap().next().is_none());
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        // A process that has exited: its PID is free (or reused by a live process, then kept, which is safe).
        let dead = std::process::Command::new("true").spawn().unwrap();
        let pid = dead.id();
        let mut child = dead;
        child.wait().unwrap();
        let stale = root.path().join(format!(".out.tmp-{pid}-abc"));
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("big"), "x").unwrap();
        let stale_file = root.path().join(format!(".fig.png.tmp-{pid}-abc"));
        fs::write(&stale_file, "x").unwrap();
        let live = root.path().join(format!(".out.tmp-{}-xyz", std::process::id()));
        fs::create_dir(&live).unwrap();
        staged_with(&root.path().join("out"), Replace::Never, "one").unwrap();
        write_file(&root.path().join("fig.png"), b"png").unwrap();
        assert!(!stale.exists() && !stale_file.exists());
        assert!(live.exists(), "a running process's folder was removed");
        assert_eq!(fs::read(root.path().join("fig.png")).unwrap(), b"png");
    }

    #[test]
    fn write_file_replaces_content_and_is_world_readable() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("a.txt");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(hidden(root.path()).is_empty());
    }

    #[test]
    fn only_regular_files_are_opened() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("model.safetensors");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o644), 0).unwrap();
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file") && e.contains("FIFO"), "{e}");
        assert!(open_regular(root.path()).unwrap_err().to_string().contains("folder"));
        fs::write(root.path().join("f"), "x").unwrap();
        assert_eq!(read_regular(&root.path().join("f")).unwrap(), b"x");
    }
}
