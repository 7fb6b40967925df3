//! The emulator's data directory: CA, server and claim credentials, templates and the registry.
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of the directory);
//! keys are 0600 and the directory 0700, so a `kill -9` at any moment leaves either the old or
//! the new file, never half of one.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::pki::{self, Ca};
use crate::store::{Store, ACTIVE};
use crate::template::{DEMO_TEMPLATE, ROTATION_TEMPLATE};

/// Where each file of a data directory lives.
#[derive(Debug, Clone)]
pub struct DataPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub claim_cert: PathBuf,
    pub claim_key: PathBuf,
    pub templates: PathBuf,
    pub registry: PathBuf,
    /// The IoT policy of the claim certificate (written with AWS's documented claim policy on
    /// first start; a policy document or the JSON `aws iot get-policy` prints).
    pub claim_policy: PathBuf,
    /// Thing types, thing groups and billing groups that exist (AWS: made beforehand with the
    /// control plane); see [`crate::resources`].
    pub resources: PathBuf,
    /// Policies a template may attach by `PolicyName`: `policies/NAME.json`.
    pub policies: PathBuf,
    /// Changes to the rejections the emulator sends; see `errors.rs`.
    pub errors: PathBuf,
}

impl DataPaths {
    pub fn new(dir: &Path) -> DataPaths {
        DataPaths {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            claim_cert: dir.join("claim.pem"),
            claim_key: dir.join("claim.key"),
            templates: dir.join("templates"),
            registry: dir.join("registry.sqlite3"),
            claim_policy: dir.join("claim-policy.json"),
            resources: dir.join("resources.json"),
            policies: dir.join("policies"),
            errors: dir.join("errors.json"),
        }
    }
}

/// Writes `data` to `path` atomically with permissions `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn make_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// What `prepare` hands back: the CA, the server credentials, the open registry.
pub struct Prepared {
    pub ca: Ca,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub store: Store,
}

/// Creates what is missing in `dir` and opens the registry. Later starts reuse what is there.
pub fn prepare(
    paths: &DataPaths,
    ca_kind: pki::KeyKind,
    region: &str,
    account: &str,
) -> Result<Prepared, String> {
    make_dir(&paths.dir).map_err(|e| err("cannot create the data directory", e))?;
    let ca = if paths.ca_cert.exists() && paths.ca_key.exists() {
        let cert = fs::read_to_string(&paths.ca_cert).map_err(|e| err("ca.pem", e))?;
        let key = fs::read_to_string(&paths.ca_key).map_err(|e| err("ca.key", e))?;
        Ca::from_pem(&cert, &key).map_err(|e| err("cannot load the CA", e))?
    } else {
        let ca = Ca::generate_with(ca_kind).map_err(|e| err("cannot create the CA", e))?;
        // The key first: a ca.pem is only ever present beside its key.
        write_atomic(&paths.ca_key, ca.key_pem().as_bytes(), 0o600)
            .map_err(|e| err("ca.key", e))?;
        write_atomic(&paths.ca_cert, ca.cert_pem().as_bytes(), 0o644)
            .map_err(|e| err("ca.pem", e))?;
        // Anything issued by an earlier CA is useless now.
        let _ = fs::remove_file(&paths.server_cert);
        let _ = fs::remove_file(&paths.claim_cert);
        ca
    };
    let (server_cert_pem, server_key_pem) = match (
        fs::read_to_string(&paths.server_cert),
        fs::read_to_string(&paths.server_key),
    ) {
        (Ok(c), Ok(k)) => (c, k),
        _ => {
            let (c, k) = ca
                .issue_server_cert(&["localhost", "127.0.0.1", "::1"])
                .map_err(|e| err("cannot issue the server certificate", e))?;
            write_atomic(&paths.server_key, k.as_bytes(), 0o600)
                .map_err(|e| err("server.key", e))?;
            write_atomic(&paths.server_cert, c.as_bytes(), 0o644)
                .map_err(|e| err("server.pem", e))?;
            (c, k)
        }
    };
    let store = Store::open(&paths.registry).map_err(|e| err("cannot open the registry", e))?;
    let now = crate::service::now_ms();
    match (
        fs::read_to_string(&paths.claim_cert),
        paths.claim_key.exists(),
    ) {
        (Ok(pem), true) => {
            let der = pki::cert_der_from_pem(&pem).map_err(|e| err("claim.pem", e))?;
            store
                .ensure_certificate(&pki::certificate_id(&der), &pem, ACTIVE, "claim", now)
                .map_err(|e| err("registry", e))?;
        }
        _ => {
            let (issued, key) = ca
                .issue_claim_cert()
                .map_err(|e| err("cannot issue the claim certificate", e))?;
            // Registered before the files appear: a claim.pem on disk is always ACTIVE.
            store
                .ensure_certificate(&issued.id, &issued.pem, ACTIVE, "claim", now)
                .map_err(|e| err("registry", e))?;
            write_atomic(&paths.claim_key, key.as_bytes(), 0o600)
                .map_err(|e| err("claim.key", e))?;
            write_atomic(&paths.claim_cert, issued.pem.as_bytes(), 0o644)
                .map_err(|e| err("claim.pem", e))?;
        }
    }
    make_dir(&paths.templates).map_err(|e| err("templates", e))?;
    for (name, text) in [
        ("DemoTemplate.json", DEMO_TEMPLATE),
        ("RotationTemplate.json", ROTATION_TEMPLATE),
    ] {
        let path = paths.templates.join(name);
        if !path.exists() {
            write_atomic(&path, text.as_bytes(), 0o644).map_err(|e| err(name, e))?;
        }
    }
    if !paths.claim_policy.exists() {
        let text = crate::policy::default_claim_policy(region, account);
        write_atomic(&paths.claim_policy, text.as_bytes(), 0o644)
            .map_err(|e| err("claim-policy.json", e))?;
    }
    let text = fs::read_to_string(&paths.claim_policy).map_err(|e| err("claim-policy.json", e))?;
    crate::policy::Policy::parse("claim", &text)
        .map_err(|e| format!("claim-policy.json is not a valid IoT policy: {e}"))?;
    make_dir(&paths.policies).map_err(|e| err("policies", e))?;
    crate::resources::Resources::load(&paths.resources)?;
    Ok(Prepared {
        ca,
        server_cert_pem,
        server_key_pem,
        store,
    })
}
