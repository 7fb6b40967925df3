//! Credential files: written atomically, the key 0600, the directory 0700.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::secret::Secret;

/// What `write_credentials` stores.
pub struct Credentials<'a> {
    pub thing_name: &'a str,
    pub certificate_id: &'a str,
    pub certificate_pem: &'a str,
    pub private_key_pem: &'a Secret,
    pub device_configuration: &'a BTreeMap<String, String>,
}

/// Where the files went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPaths {
    pub dir: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub metadata: PathBuf,
}

/// A file operation that failed: the path and the OS error.
#[derive(Debug)]
pub struct StoreError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for StoreError {}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes `data` to `path` atomically: a new temporary file in the same directory created with
/// `mode` (never wider, not even for a moment), written, fsynced, renamed over `path`, then the
/// directory fsynced. On error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut attempt = 0u32;
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1
            }
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        // The umask may have narrowed the mode; never widen it beyond `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `private.key` (0600), `certificate.pem` (0644) and `device.json` (0644; thing name,
/// certificate id and device configuration, never the key) into `dir` (0700), each atomically,
/// key first and `device.json` last: a present `device.json` means a complete set.
pub fn write_credentials(dir: &Path, c: &Credentials<'_>) -> Result<StoredPaths, StoreError> {
    ensure_private_dir(dir).map_err(at(dir))?;
    let paths = StoredPaths {
        dir: dir.to_path_buf(),
        certificate: dir.join("certificate.pem"),
        private_key: dir.join("private.key"),
        metadata: dir.join("device.json"),
    };
    write_atomic(
        &paths.private_key,
        c.private_key_pem.expose().as_bytes(),
        0o600,
    )
    .map_err(at(&paths.private_key))?;
    write_atomic(&paths.certificate, c.certificate_pem.as_bytes(), 0o644)
        .map_err(at(&paths.certificate))?;
    let metadata = serde_json::json!({
        "thingName": c.thing_name,
        "certificateId": c.certificate_id,
        "deviceConfiguration": c.device_configuration,
    });
    let mut text = serde_json::to_vec_pretty(&metadata).unwrap_or_default();
    text.push(b'\n');
    write_atomic(&paths.metadata, &text, 0o644).map_err(at(&paths.metadata))?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);

    impl Tmp {
        fn new(tag: &str) -> Tmp {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "fleetprov-store-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    fn creds<'a>(
        key: &'a Secret,
        config: &'a BTreeMap<String, String>,
        cert: &'a str,
    ) -> Credentials<'a> {
        Credentials {
            thing_name: "thing-1",
            certificate_id: "abc",
            certificate_pem: cert,
            private_key_pem: key,
            device_configuration: config,
        }
    }

    #[test]
    fn files_modes_and_contents() {
        let t = Tmp::new("modes");
        let dir = t.0.join("a/b/creds");
        let key = Secret::new("-----BEGIN PRIVATE KEY-----\nSECRET\n".into());
        let config = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let p = write_credentials(&dir, &creds(&key, &config, "CERT-1")).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&p.private_key), 0o600);
        assert_eq!(mode(&p.certificate), 0o644);
        assert_eq!(fs::read_to_string(&p.private_key).unwrap(), key.expose());
        assert_eq!(fs::read_to_string(&p.certificate).unwrap(), "CERT-1");
        let meta = fs::read_to_string(&p.metadata).unwrap();
        assert!(!meta.contains("SECRET"));
        let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
        assert_eq!(v["thingName"], "thing-1");
        assert_eq!(v["deviceConfiguration"]["k"], "v");
        assert!(leftovers(&dir).is_empty());

        // Replacing an existing set is atomic per file and leaves nothing behind.
        let key2 = Secret::new("KEY-2".into());
        write_credentials(&dir, &creds(&key2, &config, "CERT-2")).unwrap();
        assert_eq!(fs::read_to_string(&p.private_key).unwrap(), "KEY-2");
        assert_eq!(mode(&p.private_key), 0o600);
        assert!(leftovers(&dir).is_empty());
    }

    #[test]
    fn loose_directory_is_tightened() {
        let t = Tmp::new("loose");
        let dir = t.0.join("creds");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let key = Secret::new("K".into());
        write_credentials(&dir, &creds(&key, &BTreeMap::new(), "C")).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn failures_leave_nothing_half_written() {
        let t = Tmp::new("fail");
        // A directory path under a regular file cannot be created, even by root.
        let file = t.0.join("plain");
        fs::write(&file, b"x").unwrap();
        let key = Secret::new("K".into());
        let e = write_credentials(&file.join("creds"), &creds(&key, &BTreeMap::new(), "C"))
            .unwrap_err();
        assert!(e.to_string().contains("plain"), "{e}");
        // A target that is a directory: the rename fails, the temp file is removed, the earlier
        // files stay as they were.
        let dir = t.0.join("creds");
        write_credentials(&dir, &creds(&key, &BTreeMap::new(), "OLD")).unwrap();
        fs::remove_file(dir.join("certificate.pem")).unwrap();
        fs::create_dir(dir.join("certificate.pem")).unwrap();
        fs::write(dir.join("certificate.pem/x"), b"x").unwrap();
        let key2 = Secret::new("NEW".into());
        assert!(write_credentials(&dir, &creds(&key2, &BTreeMap::new(), "C2")).is_err());
        assert!(leftovers(&dir).is_empty());
    }
}
