//! The batch workspace on disk, and durable writes.
//!
//! ```text
//! <out>/ledger.sqlite          the ledger of every batch in this directory
//! <out>/<batch>/work/          key store (keys.sqlite), staged lines, raw reports (0700)
//! <out>/<batch>/bundles/<thing>/  one credential bundle per device
//! <out>/<batch>/manifest.json, results.csv, report.json
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Workspace {
    pub out: PathBuf,
    pub batch: String,
}

impl Workspace {
    pub fn new(out: &Path, batch: &str) -> Workspace {
        Workspace {
            out: out.to_path_buf(),
            batch: batch.to_string(),
        }
    }
    pub fn dir(&self) -> PathBuf {
        self.out.join(&self.batch)
    }
    pub fn work(&self) -> PathBuf {
        self.dir().join("work")
    }
    pub fn reports_dir(&self, task_id: &str) -> PathBuf {
        self.work().join("reports").join(safe_component(task_id))
    }
    pub fn bundles(&self) -> PathBuf {
        self.dir().join("bundles")
    }
    pub fn bundle_dir(&self, thing_name: &str) -> PathBuf {
        self.bundles().join(safe_component(thing_name))
    }

    /// Creates the directories, the work directory private to the user.
    pub fn create(&self) -> std::io::Result<()> {
        fs::create_dir_all(self.dir())?;
        fs::create_dir_all(self.work())?;
        fs::set_permissions(self.work(), fs::Permissions::from_mode(0o700))?;
        fs::create_dir_all(self.bundles())?;
        Ok(())
    }
}

/// A thing name (or task id) made safe as one path component: anything but
/// `[A-Za-z0-9_-]` is percent-encoded, so `a:b` becomes `a%3Ab`, `..` cannot
/// climb, and two different names never share a directory.
pub fn safe_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// A file written in pieces that appears, complete and durable, when
/// [`DurableFile::commit`] returns: it is written as a temporary file in the
/// same directory, then fsync, rename, fsync of the directory. Until then
/// the destination keeps whatever it held before.
pub struct DurableFile {
    w: std::io::BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl DurableFile {
    pub fn create(dest: &Path, mode: u32) -> std::io::Result<DurableFile> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp",
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("file")
        ));
        let f = create_with_mode(&tmp, mode)?;
        Ok(DurableFile {
            w: std::io::BufWriter::with_capacity(1 << 20, f),
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// Where the file goes.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    pub fn commit(self) -> std::io::Result<()> {
        let f = self.w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&self.tmp, &self.dest)?;
        sync_dir(self.dest.parent().unwrap_or(Path::new(".")))
    }
}

impl Write for DurableFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.w.write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Writes a file so that it is complete and durable when this returns.
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = DurableFile::create(path, mode)?;
    f.write_all(bytes)?;
    f.commit()
}

/// Writes a file without syncing; the caller syncs a whole set at once.
pub fn write_unsynced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<File> {
    let mut f = create_with_mode(path, mode)?;
    f.write_all(bytes)?;
    Ok(f)
}

/// Creates (or truncates) a file with exactly `mode`, whatever the umask or
/// an earlier file of that name had.
fn create_with_mode(path: &Path, mode: u32) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(f)
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names_cannot_escape_or_collide() {
        assert_eq!(safe_component("SN-01_a"), "SN-01_a");
        assert_eq!(safe_component("a:b"), "a%3Ab");
        assert_eq!(safe_component("../x"), "%2E%2E%2Fx");
        assert_ne!(safe_component("a:b"), safe_component("a_b"));
        assert_ne!(safe_component("a%3Ab"), safe_component("a:b"));
    }

    #[test]
    fn durable_write_sets_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_durable(&p, b"secret", 0o600).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"secret");
    }
}
