//! The resume journal: a certificate that was created but whose provisioning has not finished.
//!
//! As soon as the service returns a new certificate, its key, PEM, ownership token and the
//! token's expiry are written to `journal.json` in the state directory (0600 in a 0700
//! directory, atomically, fsynced) before RegisterThing is sent. A later provisioning call that
//! finds the journal resumes with that certificate instead of minting another, so a crash,
//! power loss or lost connection never leaves an orphaned certificate behind while its token is
//! still good. Once RegisterThing is accepted the journal also records the registration; it is
//! removed after the new credentials have connected and been committed.
//!
//! `journal.lock` in the same directory is held (an advisory `flock`) for as long as a
//! [`Journal`] is open, so two processes cannot provision from one state directory at once.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::protocol::{CreatedCertificate, Registered};
use crate::secret::Secret;

use super::{ensure_private_dir, write_atomic, StoreError};

/// The journal's file name in the state directory (mode 0600).
pub const JOURNAL_FILE: &str = "journal.json";
/// The lock file's name in the state directory (mode 0600, empty).
pub const LOCK_FILE: &str = "journal.lock";

const VERSION: u32 = 1;

/// What the journal holds.
#[derive(Clone, PartialEq)]
pub struct Entry {
    /// The endpoint the certificate was created on.
    pub host: String,
    pub certificate: CreatedCertificate,
    /// The device's private key (the CSR's key or CreateKeysAndCertificate's); `None` when the
    /// key lives in a secure element.
    pub private_key: Option<Secret>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// When the ownership token stops being accepted (seconds since the Unix epoch).
    pub token_expires_unix: u64,
    /// RegisterThing's accepted reply, once it came.
    pub registered: Option<Registered>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("host", &self.host)
            .field("certificate_id", &self.certificate.certificate_id)
            .field("private_key", &self.private_key)
            .field("ownership_token", &self.certificate.ownership_token)
            .field("created_unix", &self.created_unix)
            .field("token_expires_unix", &self.token_expires_unix)
            .field("registered", &self.registered)
            .finish()
    }
}

impl Entry {
    /// Whether the token is still good `margin_s` seconds from now.
    pub fn token_valid(&self, now_unix: u64, margin_s: u64) -> bool {
        now_unix.saturating_add(margin_s) < self.token_expires_unix
    }
}

/// The file's layout. Secret fields are wiped when it is dropped.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    version: u32,
    host: String,
    certificate_id: String,
    certificate_pem: String,
    private_key_pem: Option<Zeroizing<String>>,
    ownership_token: Zeroizing<String>,
    created_unix: u64,
    token_expires_unix: u64,
    registered: Option<WireRegistered>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRegistered {
    thing_name: Option<String>,
    device_configuration: BTreeMap<String, String>,
}

/// An open state directory, locked against other processes.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    // Held for the lock; closing it releases the lock.
    _lock: File,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError {
        path: path.to_path_buf(),
        source,
    }
}

/// Seconds since the Unix epoch, by the system clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Journal {
    /// Opens (creating, 0700) the state directory and locks it. Fails with
    /// `io::ErrorKind::WouldBlock` if another process or handle holds it.
    pub fn open(dir: &Path) -> Result<Journal, StoreError> {
        ensure_private_dir(dir).map_err(at(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(at(&lock_path))?;
        match crate::ffi::os::try_lock_exclusive(&lock) {
            Ok(true) => {}
            Ok(false) => {
                return Err(StoreError {
                    path: lock_path,
                    source: io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "another provisioning holds this state directory",
                    ),
                });
            }
            Err(e) => return Err(at(&lock_path)(e)),
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The journal file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// The journal, if there is one. A file that cannot be read or parsed is an error (and is
    /// left where it is: it may hold the only copy of a key).
    pub fn load(&self) -> Result<Option<Entry>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(at(&path)(e)),
        };
        parse(&bytes).map(Some).map_err(|reason| StoreError {
            path: path.clone(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable resume journal ({reason}); move it away to start over"),
            ),
        })
    }

    /// Writes the journal atomically (0600, fsynced, then the directory fsynced).
    pub fn save(&self, entry: &Entry) -> Result<(), StoreError> {
        let path = self.path();
        let bytes = serialize(entry);
        write_atomic(&path, &bytes, 0o600).map_err(at(&path))
    }

    /// Removes the journal (durably); no journal is fine.
    pub fn remove(&self) -> Result<(), StoreError> {
        let path = self.path();
        match fs::remove_file(&path) {
            Ok(()) => super::sync_dir(&self.dir).map_err(at(&self.dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(at(&path)(e)),
        }
    }
}

pub(crate) fn serialize(entry: &Entry) -> Zeroizing<Vec<u8>> {
    let wire = Wire {
        version: VERSION,
        host: entry.host.clone(),
        certificate_id: entry.certificate.certificate_id.clone(),
        certificate_pem: entry.certificate.certificate_pem.clone(),
        private_key_pem: entry
            .private_key
            .as_ref()
            .map(|k| Zeroizing::new(k.expose().to_owned())),
        ownership_token: Zeroizing::new(entry.certificate.ownership_token.expose().to_owned()),
        created_unix: entry.created_unix,
        token_expires_unix: entry.token_expires_unix,
        registered: entry.registered.as_ref().map(|r| WireRegistered {
            thing_name: r.thing_name.clone(),
            device_configuration: r.device_configuration.clone(),
        }),
    };
    // Serializing plain strings, numbers and maps cannot fail.
    Zeroizing::new(serde_json::to_vec_pretty(&wire).unwrap_or_default())
}

/// Parses a journal file. Errors name what is wrong, never the content.
pub fn parse(bytes: &[u8]) -> Result<Entry, String> {
    let wire: Wire = serde_json::from_slice(bytes).map_err(|e| {
        // serde_json's messages quote offending values only for unknown variants/fields,
        // which a journal has none of; report the position only, to be safe.
        format!(
            "not a journal: {:?} error at line {}",
            e.classify(),
            e.line()
        )
    })?;
    if wire.version != VERSION {
        return Err(format!("version {} is not {VERSION}", wire.version));
    }
    if wire.certificate_id.is_empty() || !wire.certificate_pem.contains("BEGIN CERTIFICATE") {
        return Err("no certificate".into());
    }
    if wire.ownership_token.is_empty() {
        return Err("no ownership token".into());
    }
    if wire.private_key_pem.as_ref().is_some_and(|k| {
        !(k.trim_start().starts_with("-----BEGIN ") && k.contains("PRIVATE KEY-----"))
    }) {
        return Err("the private key is not PEM".into());
    }
    Ok(Entry {
        host: wire.host.clone(),
        certificate: CreatedCertificate {
            certificate_id: wire.certificate_id.clone(),
            certificate_pem: wire.certificate_pem.clone(),
            private_key: None,
            ownership_token: Secret::new(wire.ownership_token.to_string()),
        },
        private_key: wire
            .private_key_pem
            .as_ref()
            .map(|k| Secret::new(k.to_string())),
        created_unix: wire.created_unix,
        token_expires_unix: wire.token_expires_unix,
        registered: wire.registered.as_ref().map(|r| Registered {
            thing_name: r.thing_name.clone(),
            device_configuration: r.device_configuration.clone(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n";
    const TOKEN: &str = "TOKEN-abcdef-0123456789";

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("fleetprov-journal-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn entry() -> Entry {
        Entry {
            host: "example.iot".into(),
            certificate: CreatedCertificate {
                certificate_id: "ab12".into(),
                certificate_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                    .into(),
                private_key: None,
                ownership_token: Secret::new(TOKEN.into()),
            },
            private_key: Some(Secret::new(KEY.into())),
            created_unix: 1000,
            token_expires_unix: 4600,
            registered: None,
        }
    }

    #[test]
    fn save_load_remove_round_trip_with_private_modes() {
        let d = dir("round").join("state");
        let j = Journal::open(&d).unwrap();
        assert_eq!(j.load().unwrap(), None);
        let mut e = entry();
        j.save(&e).unwrap();
        assert_eq!(j.load().unwrap(), Some(e.clone()));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&j.path()), 0o600);
        e.registered = Some(Registered {
            thing_name: Some("dev-1".into()),
            device_configuration: [("a".to_string(), "b".to_string())].into(),
        });
        j.save(&e).unwrap();
        assert_eq!(j.load().unwrap(), Some(e));
        j.remove().unwrap();
        assert_eq!(j.load().unwrap(), None);
        j.remove().unwrap();
        // No temporary files were left behind.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![LOCK_FILE.to_string()]);
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused_until_the_first_closes() {
        let d = dir("lock");
        let first = Journal::open(&d).unwrap();
        let err = Journal::open(&d).unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::WouldBlock);
        drop(first);
        Journal::open(&d).unwrap();
    }

    #[test]
    fn unreadable_journals_are_errors_that_keep_the_file_and_show_no_secret() {
        let d = dir("bad");
        let j = Journal::open(&d).unwrap();
        let good = String::from_utf8(serialize(&entry()).to_vec()).unwrap();
        let rows: Vec<(String, &str)> = vec![
            ("".into(), "not a journal"),
            ("{".into(), "not a journal"),
            (good[..good.len() / 2].to_string(), "not a journal"),
            (
                good.replace("\"version\": 1", "\"version\": 2"),
                "version 2",
            ),
            (good.replace("ab12", ""), "no certificate"),
            (good.replace(TOKEN, ""), "no ownership token"),
            (good.replace("-----BEGIN PRIVATE KEY-----", "xx"), "not PEM"),
            (
                good.replace("\"host\"", "\"extra\": 1, \"host\""),
                "not a journal",
            ),
            (good.replace("1000", "\"1000\""), "not a journal"),
        ];
        for (text, want) in rows {
            fs::write(j.path(), &text).unwrap();
            let err = j.load().map(|_| ()).expect_err(&text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(
                !err.contains("SECRETKEYBYTES") && !err.contains(TOKEN),
                "{err}"
            );
            assert_eq!(
                fs::read_to_string(j.path()).unwrap(),
                text,
                "the file is kept"
            );
        }
        fs::write(j.path(), b"\xff\xfe").unwrap();
        assert!(j.load().is_err());
    }

    #[test]
    fn debug_shows_no_secret_and_token_validity_has_a_margin() {
        let e = entry();
        let shown = format!("{e:?}");
        assert!(
            !shown.contains("SECRETKEYBYTES") && !shown.contains(TOKEN),
            "{shown}"
        );
        assert!(e.token_valid(4000, 60));
        assert!(!e.token_valid(4540, 60));
        assert!(!e.token_valid(5000, 0));
    }
}
