//! The one-call flow: connect with the claim certificate, create the certificate, register,
//! check the certificate against the device's key, connect once with the new credentials, and
//! optionally store them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::client::{self, Cancel, Config, LogFn, ProgressFn};
use crate::driver::Driver;
use crate::engine::flow::{Flow, FlowSpec, Journaled};
use crate::engine::retry::RetryPolicy;
use crate::engine::{CertificateSource, Settings};
use crate::error::Error;
use crate::keys::signer::ExternalKey;
use crate::keys::{self, DeviceKey, KeyType};
use crate::store::{self, journal::Journal, BlobStorage, FileStorage, SharedBlobs, Storage};

/// How the device gets its certificate.
#[derive(Debug, Clone)]
pub enum Method {
    /// CreateKeysAndCertificate: AWS makes the key (RSA-2048 on AWS) and sends it.
    CreateKeys,
    /// CreateCertificateFromCsr with a key generated here; the key never leaves the device.
    Csr(KeyType),
    /// CreateCertificateFromCsr with a CSR the caller made (e.g. in a secure element).
    ExternalCsr(String),
    /// CreateCertificateFromCsr with a CSR the library builds and has signed by a key it never
    /// sees (a secure element's signing function).
    ExternalKey(ExternalKey),
}

/// Everything the one-call flow needs.
#[derive(Debug, Clone)]
pub struct Request {
    /// Endpoint and claim credentials.
    pub connection: Config,
    pub template: String,
    pub parameters: BTreeMap<String, String>,
    pub method: Method,
    /// Connect once with the new credentials before reporting success (default true).
    pub verify: bool,
    /// Write `certificate.pem`, `private.key` and `device.json` there (0700 directory).
    pub output_dir: Option<PathBuf>,
    /// Where the resume journal lives (0700 directory). With it, a certificate that was created
    /// but not yet registered survives a crash or power loss and is reused by the next call
    /// instead of a new one being minted.
    pub state_dir: Option<PathBuf>,
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// How long an ownership token stays valid after its certificate was created (AWS: one
    /// hour). A journal older than this starts over.
    pub token_lifetime: Duration,
    /// Keep the resume journal and commit the credentials in this store of named blobs instead
    /// of files ([`store::BlobStorage`]); excludes `output_dir` and `state_dir`.
    pub storage: Option<SharedBlobs>,
    /// Provision even when `output_dir` already holds a complete credential set from an
    /// earlier call (default false: that set is returned, marked
    /// [`Provisioned::already_provisioned`], and nothing is sent).
    pub reprovision: bool,
}

impl Request {
    /// A request with the defaults: verify, no output or state directory, no parameters,
    /// [`RetryPolicy::default`], a one-hour token lifetime.
    pub fn new(connection: Config, template: impl Into<String>, method: Method) -> Request {
        Request {
            connection,
            template: template.into(),
            parameters: BTreeMap::new(),
            method,
            verify: true,
            output_dir: None,
            state_dir: None,
            retry: RetryPolicy::default(),
            token_lifetime: Duration::from_secs(3600),
            storage: None,
            reprovision: false,
        }
    }
}

pub use crate::engine::flow::Provisioned;

/// Callbacks and cancellation for [`provision`].
#[derive(Clone, Default)]
pub struct Hooks {
    pub progress: Option<ProgressFn>,
    pub log: Option<LogFn>,
    pub cancel: Option<Arc<Cancel>>,
}

/// Provisions a device in one call.
pub fn provision(request: &Request, hooks: &Hooks) -> Result<Provisioned, Error> {
    let (mut spec, storage) = prepare(request)?;
    spec.settings.deadline_ms = request
        .connection
        .overall_timeout
        .map(client::deadline_after);
    let cancel = hooks.cancel.clone().unwrap_or_default();
    // Credentials already in place are returned even to a cancelled call.
    if cancel.is_cancelled() && spec.existing.is_none() {
        return Err(Error::Cancelled);
    }
    let driver = Driver::new(
        Flow::new(spec),
        storage,
        hooks.progress.clone(),
        hooks.log.clone(),
    );
    client::run_flow(driver, &connection(request), hooks.log.clone(), &cancel)
}

/// The request's connection settings, with the device key's signer for the verification
/// connection when the key is external.
fn connection(request: &Request) -> Config {
    let mut config = request.connection.clone();
    if let Method::ExternalKey(key) = &request.method {
        config.device_signer = Some(key.clone());
    }
    config
}

/// Provisions many devices at once, each as [`provision`] would, as tasks on one runtime in the
/// calling thread instead of a thread and a runtime each: for gateways and test rigs provisioning
/// a fleet, where memory per device in flight matters. Results come in the order of `requests`;
/// `hooks` serve every device (the progress and log callbacks are called from this thread), and
/// cancelling stops them all. Each request needs its own state directory, if any.
pub fn provision_many(requests: &[Request], hooks: &Hooks) -> Vec<Result<Provisioned, Error>> {
    #[cfg(not(feature = "transport"))]
    {
        let _ = hooks;
        let refused = Error::InvalidArgument(client::NO_TRANSPORT.into());
        requests.iter().map(|_| Err(refused.clone())).collect()
    }
    #[cfg(feature = "transport")]
    provision_many_builtin(requests, hooks)
}

#[cfg(feature = "transport")]
fn provision_many_builtin(requests: &[Request], hooks: &Hooks) -> Vec<Result<Provisioned, Error>> {
    let runtime = match client::runtime() {
        Ok(r) => r,
        Err(e) => return requests.iter().map(|_| Err(e.clone())).collect(),
    };
    let cancel = hooks.cancel.clone().unwrap_or_default();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let tasks: Vec<_> = requests
            .iter()
            .map(|request| {
                let prepared = prepare(request);
                let config = connection(request);
                let overall = config.overall_timeout;
                let (progress, log, cancel) =
                    (hooks.progress.clone(), hooks.log.clone(), cancel.clone());
                tokio::task::spawn_local(async move {
                    let (mut spec, storage) = prepared?;
                    spec.settings.deadline_ms = overall.map(client::deadline_after);
                    if cancel.is_cancelled() {
                        return Err(Error::Cancelled);
                    }
                    let driver = Driver::new(Flow::new(spec), storage, progress, log.clone());
                    client::drive(driver, &config, log, &cancel).await
                })
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            results.push(task.await.unwrap_or_else(|e| {
                Err(Error::Internal(format!("the device's task failed: {e}")))
            }));
        }
        results
    })
}

/// Certificate rotation: a provisioned device gets a new certificate with its current one.
///
/// The credentials in `current` (as an earlier provisioning wrote them) take the place of the
/// claim certificate, with the thing name as client id unless the request sets one; the request's
/// method (normally [`Method::Csr`]) and template (a rotation template) make and register the new
/// certificate; the new credentials replace those in `current` only after they connected. Until
/// then the old ones stay untouched and usable. Unless the request names a state directory, the
/// resume journal goes to `current/rotation-journal`, so an interrupted rotation resumes
/// instead of minting another certificate. The old certificate stays ACTIVE in AWS IoT: retiring
/// it is the fleet backend's decision.
///
/// With a blob store ([`Request::storage`]) the current credentials are read from it and
/// replaced there, and `current` is not used.
pub fn rotate(request: &Request, current: &Path, hooks: &Hooks) -> Result<Provisioned, Error> {
    let stored = match &request.storage {
        Some(blobs) => BlobStorage::new(blobs.clone())
            .load_credentials()?
            .ok_or_else(|| {
                Error::Storage(
                    "reading the current credentials: the storage holds no complete set".into(),
                )
            })?,
        None => store::read_credentials(current)
            .map_err(|e| Error::Storage(format!("reading the current credentials: {e}")))?,
    };
    let mut r = request.clone();
    r.connection.cert_pem = stored.certificate_pem;
    r.connection.certificate_name = "device's current certificate".into();
    r.connection.key_pem = stored.private_key_pem;
    // The stored key signs, not a claim signer the request may carry.
    r.connection.claim_signer = None;
    if r.connection.client_id.is_empty() {
        r.connection.client_id = stored.thing_name;
    }
    if r.storage.is_none() && r.output_dir.is_none() {
        r.output_dir = Some(current.to_path_buf());
    }
    if r.storage.is_none() && r.state_dir.is_none() {
        r.state_dir = Some(current.join("rotation-journal"));
    }
    // Never replace working credentials with ones that were not seen to work; and the
    // credentials in place are the ones to replace, not a reason to stop.
    r.verify = true;
    r.reprovision = true;
    provision(&r, hooks)
}

/// Checks `request`, opens its storage (locking the state directory), reads the resume journal,
/// and either finds the credentials of an earlier call in the storage or makes the device key
/// and CSR if the method needs them: what a [`Flow`] for the request needs, with no deadline set
/// yet, and the storage its actions are performed on.
pub fn prepare(request: &Request) -> Result<(FlowSpec, Box<dyn Storage + Send>), Error> {
    if request.storage.is_some() && (request.output_dir.is_some() || request.state_dir.is_some()) {
        return Err(Error::InvalidArgument(
            "a storage and an output or state directory are both set: choose one".into(),
        ));
    }
    if request.output_dir.is_some()
        && matches!(
            request.method,
            Method::ExternalCsr(_) | Method::ExternalKey(_)
        )
    {
        return Err(Error::InvalidArgument(
            "an output directory needs the private key, which an external CSR or signer keeps \
             elsewhere: store the certificate next to the key (in the secure element)"
                .into(),
        ));
    }
    crate::protocol::validate_template_name(&request.template)
        .map_err(|e| Error::InvalidArgument(e.0))?;
    request.connection.validate()?;
    // The lock first: no key is made and no signer called for a flow that cannot run.
    let journal = match &request.state_dir {
        Some(dir) => Some(Journal::open(dir).map_err(|e| {
            if e.source.kind() == std::io::ErrorKind::WouldBlock {
                Error::Busy
            } else {
                Error::Storage(format!("opening the state directory: {e}"))
            }
        })?),
        None => None,
    };
    let mut storage: Box<dyn Storage + Send> = match &request.storage {
        Some(blobs) => Box::new(BlobStorage::new(blobs.clone())),
        None => {
            // Before any key is made or request sent: a directory that cannot hold the
            // credentials would otherwise show only after the certificate is registered.
            let files = FileStorage::new(request.output_dir.clone(), journal);
            files.check()?;
            Box::new(files)
        }
    };
    let journaled = if storage.keeps_journal() {
        match storage.load_journal() {
            Ok(entry) => Journaled::Loaded(entry),
            Err(e) => Journaled::Unreadable(e),
        }
    } else {
        Journaled::Off
    };
    let existing = match &journaled {
        // A pending certificate is the flow's to finish; an unreadable journal its to report.
        Journaled::Loaded(Some(_)) | Journaled::Unreadable(_) => None,
        _ if request.reprovision => None,
        _ => already_provisioned(request, storage.as_mut())?,
    };
    let (source, device_key) = match &request.method {
        // No key or CSR for a flow that ends at start with the credentials in place.
        _ if existing.is_some() => (CertificateSource::CreateKeys, None),
        Method::CreateKeys => (CertificateSource::CreateKeys, None),
        Method::Csr(kind) => {
            let key = DeviceKey::generate(*kind)?;
            let csr = key.csr_pem("fleetprov device")?;
            let secret = key.private_key_pem().clone();
            (
                CertificateSource::Csr {
                    csr_pem: csr,
                    key: Some(secret.clone()),
                },
                Some(secret),
            )
        }
        Method::ExternalKey(key) => (
            CertificateSource::Csr {
                csr_pem: key.csr_pem("fleetprov device")?,
                key: None,
            },
            None,
        ),
        Method::ExternalCsr(csr) => {
            keys::check_csr_pem(csr).map_err(|e| Error::InvalidArgument(format!("CSR: {e}")))?;
            (
                CertificateSource::Csr {
                    csr_pem: csr.clone(),
                    key: None,
                },
                None,
            )
        }
    };
    let connection = &request.connection;
    let spec = FlowSpec {
        host: connection.host.clone(),
        source,
        device_key,
        template: request.template.clone(),
        parameters: request.parameters.clone(),
        settings: Settings {
            format: connection.format,
            step_timeout_ms: u64::try_from(connection.step_timeout.as_millis()).unwrap_or(u64::MAX),
            deadline_ms: None,
        },
        retry: request.retry,
        verify: request.verify,
        // The built-in transport signs the verification connection's handshake with the
        // external key's signer.
        external_key_connects: matches!(request.method, Method::ExternalKey(_)),
        external_public_key: match &request.method {
            Method::ExternalCsr(csr) => Some(
                keys::csr_public_key(csr)
                    .map_err(|e| Error::InvalidArgument(format!("CSR: {e}")))?,
            ),
            Method::ExternalKey(key) => Some(key.public_point().to_vec()),
            Method::CreateKeys | Method::Csr(_) => None,
        },
        token_lifetime_s: request.token_lifetime.as_secs(),
        store_credentials: storage.keeps_credentials(),
        journal: journaled,
        seed: client::random_u64(),
        claim_client_id: Some(connection.client_id.clone()),
        recent_connects: crate::pacing::recent(&crate::pacing::endpoint(
            &connection.host,
            connection.port,
        )),
        existing,
    };
    Ok((spec, storage))
}

/// The credential set an earlier call committed to the storage, when there is one (the caller
/// checked that nothing is pending in the journal). A set whose key does not match its
/// certificate is no set: the flow provisions anew and replaces it.
fn already_provisioned(
    request: &Request,
    storage: &mut dyn Storage,
) -> Result<Option<Provisioned>, Error> {
    if !storage.keeps_credentials() {
        return Ok(None);
    }
    let Some(stored) = storage.load_credentials()? else {
        return Ok(None);
    };
    if keys::certificate_matches_key(&stored.certificate_pem, stored.private_key_pem.expose())
        .is_err()
    {
        return Ok(None);
    }
    Ok(Some(Provisioned {
        thing_name: stored.thing_name,
        certificate_id: stored.certificate_id,
        certificate_pem: stored.certificate_pem,
        private_key_pem: Some(stored.private_key_pem),
        device_configuration: stored.device_configuration,
        stored: request.output_dir.as_ref().map(|dir| store::StoredPaths {
            certificate: dir.join(store::CERTIFICATE_FILE),
            private_key: dir.join(store::PRIVATE_KEY_FILE),
            metadata: dir.join(store::METADATA_FILE),
            dir: dir.clone(),
        }),
        attempts: 0,
        registration_confirmed: true,
        resumed: false,
        already_provisioned: true,
    }))
}
