//! The one-call flow: connect with the claim certificate, create the certificate, register,
//! check the certificate against the device's key, connect once with the new credentials, and
//! optionally store them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{self, Cancel, Client, Config, LogFn, ProgressFn};
use crate::engine::retry::RetryPolicy;
use crate::engine::{CertificateSource, Step};
use crate::error::Error;
use crate::keys::{self, DeviceKey, KeyType};
use crate::secret::Secret;
use crate::store::{self, Credentials, StoredPaths};

/// How the device gets its certificate.
#[derive(Debug, Clone)]
pub enum Method {
    /// CreateKeysAndCertificate: AWS makes the key (RSA-2048 on AWS) and sends it.
    CreateKeys,
    /// CreateCertificateFromCsr with a key generated here; the key never leaves the device.
    Csr(KeyType),
    /// CreateCertificateFromCsr with a CSR the caller made (e.g. in a secure element).
    ExternalCsr(String),
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
        }
    }
}

/// A provisioned device.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub thing_name: String,
    pub certificate_id: String,
    pub certificate_pem: String,
    /// `None` with [`Method::ExternalCsr`]: the key stays where the CSR came from.
    pub private_key_pem: Option<Secret>,
    pub device_configuration: BTreeMap<String, String>,
    /// Where the credentials were written, if they were.
    pub stored: Option<StoredPaths>,
}

/// Callbacks and cancellation for [`provision`].
#[derive(Clone, Default)]
pub struct Hooks {
    pub progress: Option<ProgressFn>,
    pub log: Option<LogFn>,
    pub cancel: Option<Arc<Cancel>>,
}

/// Provisions a device in one call.
pub fn provision(request: &Request, hooks: &Hooks) -> Result<Provisioned, Error> {
    if request.output_dir.is_some() && matches!(request.method, Method::ExternalCsr(_)) {
        return Err(Error::InvalidArgument(
            "output_dir needs the private key, which an external CSR keeps elsewhere".into(),
        ));
    }
    crate::protocol::validate_template_name(&request.template)
        .map_err(|e| Error::InvalidArgument(e.0))?;
    let deadline = request
        .connection
        .overall_timeout
        .map(client::deadline_after);
    let (source, device_key) = match &request.method {
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
    let mut claim = Client::new(request.connection.clone())?;
    claim.set_progress(hooks.progress.clone());
    claim.set_log(hooks.log.clone());
    if let Some(cancel) = &hooks.cancel {
        claim.set_cancel(cancel.clone());
    }
    let (certificate, registered) =
        claim.provision_steps(source, &request.template, &request.parameters, deadline)?;
    drop(claim);
    let private_key = device_key.or_else(|| certificate.private_key.clone());
    let thing_name = registered.thing_name.clone().unwrap_or_default();

    if request.verify
        && let Some(key) = &private_key
    {
        verify(
            request,
            hooks,
            &certificate.certificate_pem,
            key,
            &thing_name,
            deadline,
        )?;
    }

    let stored = match (&request.output_dir, &private_key) {
        (Some(dir), Some(key)) => Some(
            store::write_credentials(
                dir,
                &Credentials {
                    thing_name: &thing_name,
                    certificate_id: &certificate.certificate_id,
                    certificate_pem: &certificate.certificate_pem,
                    private_key_pem: key,
                    device_configuration: &registered.device_configuration,
                },
            )
            .map_err(|e| Error::Storage(e.to_string()))?,
        ),
        _ => None,
    };
    Ok(Provisioned {
        thing_name,
        certificate_id: certificate.certificate_id,
        certificate_pem: certificate.certificate_pem,
        private_key_pem: private_key,
        device_configuration: registered.device_configuration,
        stored,
    })
}

/// Connects once with the new credentials (client id: the thing name, as AWS policies expect).
fn verify(
    request: &Request,
    hooks: &Hooks,
    cert_pem: &str,
    key: &Secret,
    thing_name: &str,
    deadline: Option<u64>,
) -> Result<(), Error> {
    let progress = |s: Step| {
        if let Some(p) = &hooks.progress {
            p(s);
        }
    };
    progress(Step::Verifying);
    let mut config = request.connection.clone();
    config.cert_pem = cert_pem.to_owned();
    config.key_pem = key.clone();
    if !thing_name.is_empty() {
        config.client_id = thing_name.to_owned();
    }
    if let Some(d) = deadline {
        let left = d.saturating_sub(client::clock_ms());
        config.overall_timeout = Some(std::time::Duration::from_millis(left.max(1)));
    }
    let mut device = Client::new(config)?;
    device.set_log(hooks.log.clone());
    if let Some(cancel) = &hooks.cancel {
        device.set_cancel(cancel.clone());
    }
    device.connect().map_err(|e| match e {
        Error::Tls(m) | Error::Connection(m) => {
            Error::Connection(format!("the new certificate could not connect: {m}"))
        }
        other => other,
    })?;
    device.disconnect();
    progress(Step::Verified);
    Ok(())
}
