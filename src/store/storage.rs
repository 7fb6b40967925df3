//! The storage port: what the driver performs the flow's storage actions on. [`FileStorage`] is the default (files 0600 in 0700 directories, atomic,
//! fsynced); [`BlobStorage`] keeps the same records as named blobs in a store of the
//! firmware's own (a secure element's slots, a flash partition, an encrypted filesystem).

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::journal::{self, Entry, Journal};
use super::{
    metadata_json, parse_metadata, Credentials, Stored, StoredPaths, CERTIFICATE_FILE,
    METADATA_FILE, PRIVATE_KEY_FILE,
};
use crate::error::Error;
use crate::secret::Secret;

/// The resume journal's blob name in a [`BlobStorage`].
pub const JOURNAL_BLOB: &str = "journal";

/// Where a flow keeps its resume journal and commits its credentials.
pub trait Storage {
    /// The resume journal, if there is one. One that cannot be read is an error (it may hold
    /// the only copy of a key, so it is never dropped silently).
    fn load_journal(&mut self) -> Result<Option<Entry>, Error>;
    /// The complete credential set an earlier commit left, if there is one; an incomplete set
    /// (a commit cut short) is `None`.
    fn load_credentials(&mut self) -> Result<Option<Stored>, Error>;
    /// Replaces the journal, atomically and durably.
    fn save_journal(&mut self, entry: &Entry) -> Result<(), Error>;
    /// Removes the journal; none is fine.
    fn remove_journal(&mut self) -> Result<(), Error>;
    /// Commits a credential set: a reader sees the old set, the new one whole, or none.
    fn commit(&mut self, set: &Stored) -> Result<Option<StoredPaths>, Error>;
    /// Whether a journal is kept at all.
    fn keeps_journal(&self) -> bool;
    /// Whether credentials are committed at all.
    fn keeps_credentials(&self) -> bool;
}

fn credentials(set: &Stored) -> Credentials<'_> {
    Credentials {
        thing_name: &set.thing_name,
        certificate_id: &set.certificate_id,
        certificate_pem: &set.certificate_pem,
        private_key_pem: &set.private_key_pem,
        device_configuration: &set.device_configuration,
    }
}

/// The default storage: credentials in an output directory ([`super::write_credentials`]), the
/// journal in a locked state directory ([`Journal`]). Either may be absent.
#[derive(Debug, Default)]
pub struct FileStorage {
    output_dir: Option<PathBuf>,
    journal: Option<Journal>,
}

impl FileStorage {
    /// Storage in `output_dir` and the state directory `journal` holds open.
    pub fn new(output_dir: Option<PathBuf>, journal: Option<Journal>) -> FileStorage {
        FileStorage {
            output_dir,
            journal,
        }
    }

    /// The output directory.
    pub fn output_dir(&self) -> Option<&Path> {
        self.output_dir.as_deref()
    }
}

/// Where the credentials go when a commit into `dir` fails and no journal keeps them:
/// `<dir>.fleetprov-recovery.json` next to it.
pub fn recovery_path(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(dir.with_file_name(format!("{name}.fleetprov-recovery.json")))
}

/// The recovery file's content: the credential set.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recovery {
    thing_name: String,
    certificate_id: String,
    certificate_pem: String,
    private_key_pem: Zeroizing<String>,
    #[serde(default)]
    device_configuration: std::collections::BTreeMap<String, String>,
}

impl FileStorage {
    /// Checks that the output directory can be written (see [`super::check_writable`]), before
    /// anything is sent.
    pub fn check(&self) -> Result<(), Error> {
        match &self.output_dir {
            Some(dir) => super::check_writable(dir).map_err(|e| {
                Error::Storage(format!(
                    "the output directory {} cannot hold the credentials: {e}",
                    dir.display()
                ))
            }),
            None => Ok(()),
        }
    }

    /// Saves a set whose commit failed next to the output directory (0600), for the next call.
    fn save_recovery(dir: &Path, set: &Stored) -> Result<PathBuf, String> {
        let path = recovery_path(dir).ok_or("the output directory has no name")?;
        let wire = Recovery {
            thing_name: set.thing_name.clone(),
            certificate_id: set.certificate_id.clone(),
            certificate_pem: set.certificate_pem.clone(),
            private_key_pem: Zeroizing::new(set.private_key_pem.expose().to_owned()),
            device_configuration: set.device_configuration.clone(),
        };
        let bytes = Zeroizing::new(serde_json::to_vec_pretty(&wire).map_err(|e| e.to_string())?);
        super::write_atomic(&path, &bytes, 0o600)
            .map(|()| path.clone())
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Commits the set a failed commit left in the recovery file, if there is one.
    fn recover(dir: &Path) -> Result<Option<Stored>, Error> {
        let Some(path) = recovery_path(dir) else {
            return Ok(None);
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Storage(format!("{}: {e}", path.display()))),
        };
        let wire: Recovery = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Storage(format!(
                "{}: unreadable recovery file ({:?} error); move it away to start over",
                path.display(),
                e.classify()
            ))
        })?;
        let set = Stored {
            thing_name: wire.thing_name,
            certificate_id: wire.certificate_id,
            certificate_pem: wire.certificate_pem,
            private_key_pem: Secret::new(wire.private_key_pem.to_string()),
            device_configuration: wire.device_configuration,
        };
        super::write_credentials(dir, &credentials(&set)).map_err(|e| {
            Error::Storage(format!(
                "the credentials kept in {} still cannot be stored: {e}",
                path.display()
            ))
        })?;
        std::fs::remove_file(&path)
            .map_err(|e| Error::Storage(format!("{}: {e}", path.display())))?;
        Ok(Some(set))
    }
}

impl Storage for FileStorage {
    fn load_journal(&mut self) -> Result<Option<Entry>, Error> {
        match &self.journal {
            Some(j) => j
                .load()
                .map_err(|e| Error::Storage(format!("reading the resume journal: {e}"))),
            None => Ok(None),
        }
    }

    fn load_credentials(&mut self) -> Result<Option<Stored>, Error> {
        let Some(dir) = self.output_dir.as_deref() else {
            return Ok(None);
        };
        match super::read_credentials(dir) {
            Ok(stored) => Ok(Some(stored)),
            Err(_) => FileStorage::recover(dir),
        }
    }

    fn save_journal(&mut self, entry: &Entry) -> Result<(), Error> {
        match &self.journal {
            Some(j) => j.save(entry).map_err(|e| Error::Storage(e.to_string())),
            None => Ok(()),
        }
    }

    fn remove_journal(&mut self) -> Result<(), Error> {
        match &self.journal {
            Some(j) => j.remove().map_err(|e| Error::Storage(e.to_string())),
            None => Ok(()),
        }
    }

    fn commit(&mut self, set: &Stored) -> Result<Option<StoredPaths>, Error> {
        let Some(dir) = &self.output_dir else {
            return Ok(None);
        };
        match super::write_credentials(dir, &credentials(set)) {
            Ok(paths) => Ok(Some(paths)),
            // The journal keeps everything for the next call.
            Err(e) if self.journal.is_some() => Err(Error::Storage(e.to_string())),
            // Nothing else does: keep the set next to the output for the next call.
            Err(e) => Err(Error::Storage(match FileStorage::save_recovery(dir, set) {
                Ok(path) => format!(
                    "{e}; the credentials were saved to {} (0600): the next call with this \
                     output directory stores them",
                    path.display()
                ),
                Err(why) => format!(
                    "{e}; saving them for a later call failed too ({why}): the certificate is \
                     registered but its key is lost"
                ),
            })),
        }
    }

    fn keeps_journal(&self) -> bool {
        self.journal.is_some()
    }

    fn keeps_credentials(&self) -> bool {
        self.output_dir.is_some()
    }
}

/// A store of named blobs: the firmware's own (a secure element, a flash partition, a TEE).
///
/// The names are [`JOURNAL_BLOB`], [`PRIVATE_KEY_FILE`] (secret), [`CERTIFICATE_FILE`] and
/// [`METADATA_FILE`]. Errors are texts for the user; they must not hold the data.
pub trait Blobs {
    /// The blob's content, or `None` when there is no such blob.
    fn load(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String>;
    /// Replaces the blob atomically: after a crash or power loss at any point, a later load
    /// gives the old content or the new, never a mix.
    fn store(&self, name: &str, data: &[u8]) -> Result<(), String>;
    /// Removes the blob; no such blob is fine.
    fn remove(&self, name: &str) -> Result<(), String>;
}

/// A [`Blobs`] store shared by every flow of a configuration.
#[derive(Clone)]
pub struct SharedBlobs(pub std::sync::Arc<dyn Blobs + Send + Sync>);

impl std::fmt::Debug for SharedBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBlobs")
    }
}

impl Blobs for SharedBlobs {
    fn load(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        self.0.load(name)
    }
    fn store(&self, name: &str, data: &[u8]) -> Result<(), String> {
        self.0.store(name, data)
    }
    fn remove(&self, name: &str) -> Result<(), String> {
        self.0.remove(name)
    }
}

/// The journal and credentials kept as named blobs in a [`Blobs`] store.
///
/// A commit removes `device.json`, stores `private.key` and `certificate.pem`, and stores
/// `device.json` last: with each store atomic, a present `device.json` always means a complete,
/// matching set, and a commit cut short at any point leaves none (the journal still holds the
/// credentials, and the next call finishes the job).
#[derive(Debug)]
pub struct BlobStorage<B> {
    blobs: B,
}

impl<B> BlobStorage<B> {
    pub fn new(blobs: B) -> BlobStorage<B> {
        BlobStorage { blobs }
    }
}

fn failed(what: &str, name: &str, e: String) -> Error {
    Error::Storage(format!("{what} {name:?}: {e}"))
}

impl<B: Blobs> BlobStorage<B> {
    fn load_text(&mut self, name: &str) -> Result<Option<Zeroizing<String>>, Error> {
        let Some(bytes) = self
            .blobs
            .load(name)
            .map_err(|e| failed("loading", name, e))?
        else {
            return Ok(None);
        };
        match std::str::from_utf8(&bytes) {
            Ok(text) => Ok(Some(Zeroizing::new(text.to_owned()))),
            Err(_) => Err(failed("loading", name, "not UTF-8".into())),
        }
    }
}

impl<B: Blobs> Storage for BlobStorage<B> {
    fn load_journal(&mut self) -> Result<Option<Entry>, Error> {
        let Some(bytes) = self
            .blobs
            .load(JOURNAL_BLOB)
            .map_err(|e| failed("loading", JOURNAL_BLOB, e))?
        else {
            return Ok(None);
        };
        journal::parse(&bytes).map(Some).map_err(|reason| {
            Error::Storage(format!(
                "reading the resume journal: unreadable ({reason}); remove the {JOURNAL_BLOB:?} \
                 blob to start over"
            ))
        })
    }

    fn load_credentials(&mut self) -> Result<Option<Stored>, Error> {
        let Some(meta) = self.load_text(METADATA_FILE)? else {
            return Ok(None);
        };
        let Ok(meta) = parse_metadata(meta.as_bytes()) else {
            return Ok(None);
        };
        let (Some(certificate), Some(key)) = (
            self.load_text(CERTIFICATE_FILE)?,
            self.load_text(PRIVATE_KEY_FILE)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(Stored {
            thing_name: meta.thing_name,
            certificate_id: meta.certificate_id,
            certificate_pem: certificate.to_string(),
            private_key_pem: Secret::new(key.to_string()),
            device_configuration: meta.device_configuration,
        }))
    }

    fn save_journal(&mut self, entry: &Entry) -> Result<(), Error> {
        let bytes = journal::serialize(entry);
        self.blobs
            .store(JOURNAL_BLOB, &bytes)
            .map_err(|e| failed("storing", JOURNAL_BLOB, e))
    }

    fn remove_journal(&mut self) -> Result<(), Error> {
        self.blobs
            .remove(JOURNAL_BLOB)
            .map_err(|e| failed("removing", JOURNAL_BLOB, e))
    }

    fn commit(&mut self, set: &Stored) -> Result<Option<StoredPaths>, Error> {
        let metadata = metadata_json(&credentials(set));
        self.blobs
            .remove(METADATA_FILE)
            .map_err(|e| failed("removing", METADATA_FILE, e))?;
        self.blobs
            .store(PRIVATE_KEY_FILE, set.private_key_pem.expose().as_bytes())
            .map_err(|e| failed("storing", PRIVATE_KEY_FILE, e))?;
        self.blobs
            .store(CERTIFICATE_FILE, set.certificate_pem.as_bytes())
            .map_err(|e| failed("storing", CERTIFICATE_FILE, e))?;
        self.blobs
            .store(METADATA_FILE, &metadata)
            .map_err(|e| failed("storing", METADATA_FILE, e))?;
        Ok(None)
    }

    fn keeps_journal(&self) -> bool {
        true
    }

    fn keeps_credentials(&self) -> bool {
        true
    }
}
