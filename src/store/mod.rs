//! Credential files: the key 0600, the directory 0700, every file replaced atomically.
//!
//! A credential set is `private.key`, `certificate.pem` and `device.json` in one directory.
//! `device.json` is written last and removed first, so a present `device.json` means the
//! three files belong together, even after a crash or power loss at any point.

#[cfg(test)]
mod tests;

pub mod journal;
mod storage;

pub use storage::{BlobStorage, Blobs, FileStorage, SharedBlobs, Storage, JOURNAL_BLOB};

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::secret::Secret;

/// The private key's file name in a credential directory (mode 0600).
pub const PRIVATE_KEY_FILE: &str = "private.key";
/// The certificate's file name in a credential directory (mode 0644).
pub const CERTIFICATE_FILE: &str = "certificate.pem";
/// The metadata file's name in a credential directory (mode 0644); never holds the key.
pub const METADATA_FILE: &str = "device.json";

/// What [`write_credentials`] stores.
pub struct Credentials<'a> {
    /// The thing's name, as RegisterThing returned it (may be empty).
    pub thing_name: &'a str,
    /// The certificate's id (the hex SHA-256 of its DER).
    pub certificate_id: &'a str,
    /// The device certificate, PEM.
    pub certificate_pem: &'a str,
    /// The device's private key, PEM; written to `private.key` only.
    pub private_key_pem: &'a Secret,
    /// The `deviceConfiguration` the provisioning template returned.
    pub device_configuration: &'a BTreeMap<String, String>,
}

/// Where [`write_credentials`] put the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPaths {
    /// The credential directory, as given.
    pub dir: PathBuf,
    /// `dir/certificate.pem`.
    pub certificate: PathBuf,
    /// `dir/private.key`.
    pub private_key: PathBuf,
    /// `dir/device.json`.
    pub metadata: PathBuf,
}

/// A file operation that failed: the path it was about and the OS error.
#[derive(Debug)]
pub struct StoreError {
    /// The file or directory the failed operation was about.
    pub path: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError {
        path: path.to_path_buf(),
        source,
    }
}

/// `device.json`: field order as written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Metadata<'a> {
    thing_name: &'a str,
    certificate_id: &'a str,
    device_configuration: &'a BTreeMap<String, String>,
}

/// A credential set: as committed, or read back from a store.
#[derive(Debug, Clone)]
pub struct Stored {
    pub thing_name: String,
    pub certificate_id: String,
    pub certificate_pem: String,
    pub private_key_pem: Secret,
    pub device_configuration: BTreeMap<String, String>,
}

/// Reads the credential set in `dir`. Without `device.json` the set is incomplete (a write was
/// interrupted) and this is an error of kind `NotFound` for `device.json`.
pub fn read_credentials(dir: &Path) -> Result<Stored, StoreError> {
    let meta_path = dir.join(METADATA_FILE);
    let meta = fs::read(&meta_path).map_err(at(&meta_path))?;
    let meta = parse_metadata(&meta)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        .map_err(at(&meta_path))?;
    let cert_path = dir.join(CERTIFICATE_FILE);
    let certificate_pem = fs::read_to_string(&cert_path).map_err(at(&cert_path))?;
    let key_path = dir.join(PRIVATE_KEY_FILE);
    let key = fs::read(&key_path).map_err(at(&key_path))?;
    let key = String::from_utf8(key)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
        .map_err(at(&key_path))?;
    Ok(Stored {
        thing_name: meta.thing_name,
        certificate_id: meta.certificate_id,
        certificate_pem,
        private_key_pem: Secret::new(key),
        device_configuration: meta.device_configuration,
    })
}

/// `device.json` as read back.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta {
    pub(crate) thing_name: String,
    pub(crate) certificate_id: String,
    #[serde(default)]
    pub(crate) device_configuration: BTreeMap<String, String>,
}

pub(crate) fn parse_metadata(bytes: &[u8]) -> Result<Meta, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("not a device.json: {e}"))
}

/// `device.json`'s content for `c`: thingName, certificateId and deviceConfiguration.
pub(crate) fn metadata_json(c: &Credentials<'_>) -> Vec<u8> {
    // Serializing plain strings and a map cannot fail.
    let mut metadata = serde_json::to_vec_pretty(&Metadata {
        thing_name: c.thing_name,
        certificate_id: c.certificate_id,
        device_configuration: c.device_configuration,
    })
    .unwrap_or_default();
    metadata.push(b'\n');
    metadata
}

/// Writes a credential set into `dir`: `private.key` (0600), `certificate.pem` (0644) and
/// `device.json` (0644: thingName, certificateId and deviceConfiguration, never the key).
///
/// `dir` (and any missing parent) is created with mode 0700; an existing `dir` with any other
/// mode (group or other bits, say) is set to 0700. Temporary files that an earlier process
/// left behind when it died mid-write are removed first.
///
/// Two phases, so that a failure leaves the previous set as it was:
/// 1. each file is written to a temporary file in `dir` (created exclusively, with its final
///    mode from the start) and fsynced. An error here (a directory in the way, a full disk)
///    removes the temporary files and changes nothing else.
/// 2. an existing `device.json` is removed, then the key and the certificate are renamed into
///    place, then `device.json`, with the directory fsynced between the steps. A present
///    `device.json` therefore always means a complete, matching set. An error here (only an
///    I/O error can still happen) removes the remaining temporary files and leaves the
///    directory without `device.json`: marked incomplete, never mixed.
pub fn write_credentials(dir: &Path, c: &Credentials<'_>) -> Result<StoredPaths, StoreError> {
    ensure_private_dir(dir).map_err(at(dir))?;
    let paths = StoredPaths {
        dir: dir.to_path_buf(),
        certificate: dir.join(CERTIFICATE_FILE),
        private_key: dir.join(PRIVATE_KEY_FILE),
        metadata: dir.join(METADATA_FILE),
    };
    let metadata = metadata_json(c);
    remove_stale_temp_files(dir);

    // Phase 1: stage. Dropping a staged file removes it.
    let key = stage(
        &paths.private_key,
        c.private_key_pem.expose().as_bytes(),
        0o600,
    )
    .map_err(at(&paths.private_key))?;
    let cert = stage(&paths.certificate, c.certificate_pem.as_bytes(), 0o644)
        .map_err(at(&paths.certificate))?;
    let meta = stage(&paths.metadata, &metadata, 0o644).map_err(at(&paths.metadata))?;

    // Phase 2: commit.
    match fault("remove", &paths.metadata).and_then(|()| fs::remove_file(&paths.metadata)) {
        Ok(()) => sync_dir(dir).map_err(at(dir))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(&paths.metadata)(e)),
    }
    key.commit().map_err(at(&paths.private_key))?;
    cert.commit().map_err(at(&paths.certificate))?;
    sync_dir(dir).map_err(at(dir))?;
    meta.commit().map_err(at(&paths.metadata))?;
    sync_dir(dir).map_err(at(dir))?;
    Ok(paths)
}

/// Replaces `path` with `data` atomically: a new temporary file in the same directory is
/// created exclusively (`O_EXCL`) with permission bits `mode` set at creation, written,
/// fsynced, renamed over `path`, and the directory fsynced. Readers see the old content or the
/// new, never a mix. On error the temporary file is removed and `path` is untouched.
///
/// The umask can only narrow the mode given at creation; the still-empty file is then set to
/// exactly `mode & 0o777`, so the result does not depend on the umask and is never wider than
/// `mode`. A directory at `path` is an error (`IsADirectory`) before anything is written.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let staged = stage(path, data, mode)?;
    let dir = staged.dir.clone();
    staged.commit()?;
    sync_dir(&dir)
}

/// Checks, before anything irreversible happens, that credentials can be written into `dir`:
/// creates it as [`ensure_private_dir`] does and creates and removes a probe file in it; then
/// removes again the directories it had to create, so that the check leaves no trace.
pub fn check_writable(dir: &Path) -> io::Result<()> {
    // The directories that do not exist yet, deepest first.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && fs::symlink_metadata(d).is_err())
        .collect();
    let checked = ensure_private_dir(dir).and_then(|()| {
        let (probe, file) = create_temp(dir, std::ffi::OsStr::new("probe"), 0o600)?;
        drop(file);
        fs::remove_file(&probe)
    });
    for d in missing {
        let _ = fs::remove_dir(d);
    }
    checked
}

/// Creates `dir` and any missing parents with mode 0700. An existing `dir` is left as it is
/// (never `chmod`ed: it may be a mount point or a link the firmware set up), but one that group
/// or others may enter is refused (`PermissionDenied`, saying its mode): keys are kept only where
/// no one else can read them. Fails if `dir` is empty, is not a directory, or cannot be created.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty directory path",
        ));
    }
    if fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        return Err(io::Error::new(
            os_kind(libc::ENOTDIR),
            "it exists and is not a directory",
        ));
    }
    let existed = fs::metadata(dir).is_ok_and(|m| m.is_dir());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(os_kind(libc::ENOTDIR), "not a directory"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let why = if existed {
            format!(
                "the directory is open to group or others (mode {mode:04o}); keys are kept only \
                 in a directory of mode 0700: chmod 700 it, or choose another"
            )
        } else {
            // Made just now with 0700: something (an ACL default, a filesystem without modes)
            // widened it.
            format!("the directory was created with mode {mode:04o}, not 0700")
        };
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    }
    Ok(())
}

/// The error kind the OS's `errno` maps to (`NotADirectory` for ENOTDIR, ...), for errors of
/// our own with a message: those kinds are named in std only from Rust 1.83.
fn os_kind(errno: i32) -> io::ErrorKind {
    io::Error::from_raw_os_error(errno).kind()
}

/// A temporary file holding the next content of `target`; removed on drop unless committed.
struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl Staged {
    /// Renames the temporary file over the target (the caller fsyncs the directory).
    fn commit(mut self) -> io::Result<()> {
        fault("rename", &self.target)?;
        fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `data` to a new temporary file next to `path`, with mode `mode`, and fsyncs it.
fn stage(path: &Path, data: &[u8], mode: u32) -> io::Result<Staged> {
    let mode = mode & 0o777;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(io::Error::new(
                os_kind(libc::EISDIR),
                "a directory is in the way",
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let (tmp, mut file) = create_temp(&dir, name, mode)?;
    let staged = Staged {
        tmp,
        target: path.to_path_buf(),
        dir,
        committed: false,
    };
    fault("write", path)?;
    if file.metadata()?.permissions().mode() & 0o7777 != mode {
        // The umask narrowed the mode given at creation. The file is still empty.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    file.write_all(data)?;
    file.sync_all()?;
    Ok(staged)
}

/// Creates `.NAME.PID.SEQ.tmp` in `dir` exclusively (never following or reusing an existing
/// file), with permission bits `mode`.
fn create_temp(dir: &Path, name: &std::ffi::OsStr, mode: u32) -> io::Result<(PathBuf, File)> {
    // usize, not u64: targets without 64-bit atomics (armv5, MIPS32, RISC-V 32) build it too.
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    process_start();
    let mut last = None;
    for _ in 0..100 {
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            // A leftover of an earlier process with the same pid.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary file name")))
}

/// fsyncs a directory, so that renames and removals in it are durable. File systems that
/// cannot sync a directory (EINVAL) are accepted as they are.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    fault("sync", dir)?;
    match File::open(dir)?.sync_all() {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
        other => other,
    }
}

/// When this process first wrote a file here; temporary files older than that (with some
/// slack for coarse file system clocks) cannot be this process's.
fn process_start() -> SystemTime {
    static START: OnceLock<SystemTime> = OnceLock::new();
    *START.get_or_init(SystemTime::now)
}

/// Removes temporary credential files left by a process that died while writing them: their
/// owner (the pid in the name) is gone, or they predate this process's first write. Best
/// effort: errors are ignored, and files of other names are never touched.
fn remove_stale_temp_files(dir: &Path) {
    let start = process_start()
        .checked_sub(Duration::from_secs(2))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let proc_fs = Path::new("/proc/self").exists();
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_file_owner) else {
            continue;
        };
        let owner_gone = proc_fs && !Path::new("/proc").join(pid.to_string()).exists();
        let predates_us = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < start);
        if owner_gone || predates_us {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The pid in the name of one of our temporary credential files (`.private.key.PID.SEQ.tmp`).
fn temp_file_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let rest = [PRIVATE_KEY_FILE, CERTIFICATE_FILE, METADATA_FILE]
        .iter()
        .find_map(|target| rest.strip_prefix(target)?.strip_prefix('.'))?;
    let (pid, seq) = rest.strip_suffix(".tmp")?.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(seq) {
        return None;
    }
    pid.parse().ok()
}

/// Test hook: fails the named step (`write`, `rename`, `remove`, `sync`) for a path whose
/// file name is the one set with [`tests::inject_fault`].
#[cfg(test)]
fn fault(step: &str, path: &Path) -> io::Result<()> {
    tests::fault(step, path)
}

#[cfg(not(test))]
#[inline(always)]
fn fault(_step: &str, _path: &Path) -> io::Result<()> {
    Ok(())
}
