//! The configuration handle: connection, claim credentials, provisioning settings, callbacks.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use super::cancel::*;
use super::error::*;
use super::types::*;
use crate::client::{Cancel, Config, LogFn, LogLevel, MqttVersion, ProgressFn, Roots};
use crate::engine::flow::Progress;
use crate::engine::retry::RetryPolicy;
use crate::error::Error;
use crate::keys::remote::{RemoteKey, Scheme, TlsSigner};
use crate::keys::signer::{ExternalKey, Signer};
use crate::keys::{self, KeyType};
use crate::protocol::{validate_template_name, Format};
use crate::provision::{Hooks, Method, Request};
use crate::secret::Secret;
use crate::store::SharedBlobs;

struct LogCallback {
    cb: unsafe extern "C" fn(*mut c_void, fleetprov_log_level, *const c_char, usize),
    user: UserData,
    max: fleetprov_log_level,
}

struct ProgressCallback {
    cb: unsafe extern "C" fn(*mut c_void, *const fleetprov_progress),
    user: UserData,
}

/// Connection, claim credentials and provisioning settings. Create with fleetprov_config_new(),
/// free with fleetprov_config_free(). Not thread-safe: use one thread at a time. Clients and
/// operations copy what they need, so a config may be changed or freed while they run.
pub struct fleetprov_config {
    host: String,
    port: u16,
    roots: Roots,
    ca_file: Option<PathBuf>,
    cert_pem: Option<String>,
    key_pem: Option<Secret>,
    claim_signer: Option<RemoteKey>,
    client_id: String,
    keep_alive: u16,
    alpn: Option<bool>,
    mqtt_version: MqttVersion,
    format: Format,
    step_timeout_ms: u64,
    overall_timeout_ms: u64,
    pub(crate) template: Option<String>,
    pub(crate) parameters: BTreeMap<String, String>,
    method: fleetprov_method,
    key_type: KeyType,
    csr_pem: Option<String>,
    signer: Option<ExternalKey>,
    verify: bool,
    output_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    pub(crate) storage: Option<SharedBlobs>,
    retry: RetryPolicy,
    token_lifetime_s: u64,
    reprovision: bool,
    cancel: Option<Arc<Cancel>>,
    log: Option<Arc<LogCallback>>,
    progress: Option<Arc<ProgressCallback>>,
    /// The setters whose last call failed, in the order they first failed, and how: using the
    /// config reports the first.
    setter_failures: Vec<(&'static str, Error)>,
}

impl Default for fleetprov_config {
    fn default() -> Self {
        fleetprov_config {
            host: String::new(),
            port: 8883,
            roots: Roots::System,
            ca_file: None,
            cert_pem: None,
            key_pem: None,
            claim_signer: None,
            client_id: String::new(),
            keep_alive: 60,
            alpn: None,
            mqtt_version: MqttVersion::default(),
            format: Format::Json,
            step_timeout_ms: 10_000,
            overall_timeout_ms: 60_000,
            template: None,
            parameters: BTreeMap::new(),
            method: fleetprov_method::FLEETPROV_METHOD_CSR,
            key_type: KeyType::P256,
            csr_pem: None,
            signer: None,
            verify: true,
            output_dir: None,
            state_dir: None,
            storage: None,
            retry: RetryPolicy::default(),
            token_lifetime_s: 3600,
            reprovision: false,
            cancel: None,
            log: None,
            progress: None,
            setter_failures: Vec::new(),
        }
    }
}

impl fleetprov_config {
    /// The built-in transport's connection settings (a host transport uses `connection_with`).
    pub(crate) fn connection(&self) -> Result<Config, Error> {
        self.check_setters()?;
        if cfg!(not(feature = "transport")) {
            return Err(invalid(crate::client::NO_TRANSPORT));
        }
        if let Some(remote) = &self.claim_signer {
            let mut c = self.connection_with(String::new(), Secret::new(String::new()));
            c.claim_signer = Some(remote.clone());
            return Ok(c);
        }
        let cert = self
            .cert_pem
            .clone()
            .ok_or_else(|| invalid("no client certificate: call fleetprov_config_set_claim_*"))?;
        let key = self
            .key_pem
            .clone()
            .ok_or_else(|| invalid("no private key: call fleetprov_config_set_claim_*"))?;
        Ok(self.connection_with(cert, key))
    }

    /// The connection settings with these client credentials.
    pub(crate) fn connection_with(&self, cert: String, key: Secret) -> Config {
        let mut c = Config::new(self.host.clone(), cert, key);
        c.port = self.port;
        c.roots = self.roots.clone();
        c.ca_file = self.ca_file.clone();
        c.client_id = self.client_id.clone();
        c.keep_alive = Duration::from_secs(u64::from(self.keep_alive));
        c.alpn = self.alpn;
        c.mqtt_version = self.mqtt_version;
        c.format = self.format;
        c.step_timeout = Duration::from_millis(self.step_timeout_ms);
        c.overall_timeout =
            (self.overall_timeout_ms > 0).then(|| Duration::from_millis(self.overall_timeout_ms));
        c
    }

    pub(crate) fn hooks(&self) -> Hooks {
        Hooks {
            progress: self.progress.clone().map(|p| -> ProgressFn {
                Arc::new(move |progress: &Progress| {
                    let error = progress.error.as_ref().map(fleetprov_error::new);
                    let view = fleetprov_progress {
                        size: std::mem::size_of::<fleetprov_progress>(),
                        step: progress.step.into(),
                        attempt: progress.attempt,
                        retry_in_ms: progress.retry_in_ms,
                        error: error.as_ref().map_or(ptr::null(), |e| e as *const _),
                    };
                    // SAFETY: the callback and userdata were registered together; the header
                    // states the threads it may be called on; `view` and `error` outlive the call.
                    in_callback(|| unsafe { (p.cb)(p.user.ptr, &view) })
                })
            }),
            log: self.log.clone().map(|l| -> LogFn {
                Arc::new(move |level, line| {
                    let level = match level {
                        LogLevel::Error => fleetprov_log_level::FLEETPROV_LOG_ERROR,
                        LogLevel::Warn => fleetprov_log_level::FLEETPROV_LOG_WARN,
                        LogLevel::Info => fleetprov_log_level::FLEETPROV_LOG_INFO,
                        LogLevel::Debug => fleetprov_log_level::FLEETPROV_LOG_DEBUG,
                    };
                    if level > l.max {
                        return;
                    }
                    let text = cstring(line);
                    // SAFETY: as above; `text` outlives the call.
                    in_callback(|| unsafe {
                        (l.cb)(l.user.ptr, level, text.as_ptr(), text.as_bytes().len())
                    })
                })
            }),
            cancel: self.cancel.clone(),
        }
    }

    /// The one-call request for a host transport: the host holds the claim credentials and the
    /// connection, so none are needed here; the endpoint (if set) names the journal's endpoint.
    /// The failure of an earlier setter, if one failed: a config missing what it was meant to
    /// set would otherwise fail later with a misleading error (a missing CA file as an untrusted
    /// server, a bad template name as "no template").
    fn check_setters(&self) -> Result<(), Error> {
        match self.setter_failures.first() {
            None => Ok(()),
            Some((setter, Error::InvalidArgument(m))) => Err(invalid(format!(
                "{setter}() failed earlier, so the config lacks what it was to set: {m}"
            ))),
            Some((_, e)) => Err(e.clone()),
        }
    }

    pub(crate) fn host_request(&self) -> Result<Request, Error> {
        self.check_setters()?;
        let mut connection = self.connection_with(String::new(), Secret::new(String::new()));
        if connection.host.is_empty() {
            connection.host = "host-transport".into();
        }
        self.request_with(connection)
    }

    pub(crate) fn request(&self) -> Result<Request, Error> {
        self.request_with(self.connection()?)
    }

    pub(crate) fn request_with(&self, connection: Config) -> Result<Request, Error> {
        self.check_setters()?;
        let template = self
            .template
            .clone()
            .ok_or_else(|| invalid("no template: call fleetprov_config_set_template"))?;
        let method = match self.method {
            fleetprov_method::FLEETPROV_METHOD_CSR => Method::Csr(self.key_type),
            fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS => Method::CreateKeys,
            fleetprov_method::FLEETPROV_METHOD_EXTERNAL_CSR => Method::ExternalCsr(
                self.csr_pem
                    .clone()
                    .ok_or_else(|| invalid("no CSR: call fleetprov_config_set_csr_pem"))?,
            ),
            fleetprov_method::FLEETPROV_METHOD_EXTERNAL_SIGNER => Method::ExternalKey(
                self.signer
                    .clone()
                    .ok_or_else(|| invalid("no signer: call fleetprov_config_set_signer"))?,
            ),
        };
        let mut request = Request::new(connection, template, method);
        request.parameters = self.parameters.clone();
        request.verify = self.verify;
        request.output_dir = self.output_dir.clone();
        request.state_dir = self.state_dir.clone();
        request.storage = self.storage.clone();
        request.retry = self.retry;
        request.token_lifetime = Duration::from_secs(self.token_lifetime_s);
        request.reprovision = self.reprovision;
        Ok(request)
    }
}

/// Runs a setter's body under the panic boundary and remembers a failure on the config (until
/// the same setter succeeds), so that using the config returns the first failed setter's error
/// and message rather than a later, misleading one.
pub(crate) fn remember(
    config: *mut fleetprov_config,
    setter: &'static str,
    body: impl FnOnce() -> Result<(), Error>,
) -> fleetprov_result {
    let mut failure = None;
    let result = guard(|| {
        body().map_err(|e| {
            failure = Some(e.clone());
            e
        })
    });
    // SAFETY: NULL or a live config used by this thread only, per the header; the body's
    // borrow of it has ended.
    if let Some(config) = unsafe { config.as_mut() } {
        if result == fleetprov_result::FLEETPROV_OK {
            config.setter_failures.retain(|(s, _)| *s != setter);
        } else {
            let failure = failure.unwrap_or(Error::Panicked);
            match config
                .setter_failures
                .iter_mut()
                .find(|(s, _)| *s == setter)
            {
                Some(entry) => entry.1 = failure,
                None => config.setter_failures.push((setter, failure)),
            }
        }
    }
    result
}

/// # Safety
/// `config` is NULL or a live config used by this thread only.
pub(crate) unsafe fn config_mut<'a>(
    config: *mut fleetprov_config,
) -> Result<&'a mut fleetprov_config, Error> {
    // SAFETY: per the contract above.
    unsafe { config.as_mut() }.ok_or_else(|| invalid("config is NULL"))
}

/// # Safety
/// `config` is NULL or a live config.
pub(crate) unsafe fn config_ref<'a>(
    config: *const fleetprov_config,
) -> Result<&'a fleetprov_config, Error> {
    // SAFETY: per the contract above.
    unsafe { config.as_ref() }.ok_or_else(|| invalid("config is NULL"))
}

/// An optional directory: NULL is none, "" is an invalid argument.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string valid for the call.
unsafe fn dir_arg(path: *const c_char) -> Result<Option<PathBuf>, Error> {
    // SAFETY: per the contract above.
    match unsafe { opt_str_arg(path, "path")? } {
        Some("") => Err(invalid("path is empty")),
        other => Ok(other.map(PathBuf::from)),
    }
}

fn read_file(path: &str, what: &str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read {what} {path:?}: {e}")))
}

/// Creates a configuration with defaults: port 8883, system roots, keep-alive 60 s, JSON,
/// 10 s per step, 60 s overall, FLEETPROV_METHOD_CSR with a P-256 key, verification on, no
/// output directory. Writes it to `*out`.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_new(out: *mut *mut fleetprov_config) -> fleetprov_result {
    guard(|| {
        let config = Box::into_raw(Box::default());
        // SAFETY: `out` is NULL or valid for writes per the header.
        let written = unsafe { write_out(out, config) };
        if written.is_err() {
            // SAFETY: just created above and not handed out.
            drop(unsafe { Box::from_raw(config) });
        }
        written
    })
}

/// Frees a configuration (wiping the private key), releasing callback userdata once no client
/// or operation uses it any more. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_free(config: *mut fleetprov_config) {
    guard_value((), || {
        if !config.is_null() {
            // SAFETY: created by fleetprov_config_new and freed once, per the header.
            drop(unsafe { Box::from_raw(config) });
        }
    })
}

/// Sets the endpoint: `host` (also the TLS server name, e.g.
/// "abc123-ats.iot.eu-west-1.amazonaws.com") and `port` (8883; 443 turns ALPN on).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_endpoint(
    config: *mut fleetprov_config,
    host: *const c_char,
    port: u16,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_endpoint", || {
        // SAFETY: pointers per the header.
        let (config, host) = unsafe { (config_mut(config)?, str_arg(host, "host")?) };
        if host.is_empty() || port == 0 {
            return Err(invalid("host must not be empty and port must not be 0"));
        }
        config.host = host.to_owned();
        config.port = port;
        Ok(())
    })
}

/// Trusts the CA certificates in the PEM file at `path` (e.g. AmazonRootCA1.pem) instead of the
/// system's roots. The file is read now.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_ca_file(
    config: *mut fleetprov_config,
    path: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_ca_file", || {
        // SAFETY: pointers per the header.
        let (config, path) = unsafe { (config_mut(config)?, str_arg(path, "path")?) };
        let pem = read_file(path, "CA file")?;
        keys::parse_certificate_pem(&pem).map_err(|e| invalid(format!("CA file: {e}")))?;
        config.roots = Roots::Pem(pem);
        config.ca_file = Some(PathBuf::from(path));
        Ok(())
    })
}

/// Trusts the CA certificates in `pem` (copied) instead of the system's roots.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_ca_pem(
    config: *mut fleetprov_config,
    pem: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_ca_pem", || {
        // SAFETY: pointers per the header.
        let (config, pem) = unsafe { (config_mut(config)?, str_arg(pem, "pem")?) };
        keys::parse_certificate_pem(pem).map_err(|e| invalid(format!("CA: {e}")))?;
        config.roots = Roots::Pem(pem.to_owned());
        config.ca_file = None;
        Ok(())
    })
}

/// Trusts the operating system's root certificates (the default).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_use_system_roots(
    config: *mut fleetprov_config,
) -> fleetprov_result {
    remember(config, "fleetprov_config_use_system_roots", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        if !crate::client::tls::SYSTEM_ROOTS {
            return Err(Error::InvalidArgument(
                crate::client::tls::NO_SYSTEM_ROOTS.into(),
            ));
        }
        config.roots = Roots::System;
        config.ca_file = None;
        Ok(())
    })
}

fn set_claim(config: &mut fleetprov_config, cert: String, key: Secret) -> Result<(), Error> {
    keys::parse_certificate_pem(&cert).map_err(|e| invalid(format!("claim certificate: {e}")))?;
    keys::parse_private_key_pem(key.expose()).map_err(|e| invalid(format!("claim key: {e}")))?;
    keys::certificate_matches_key(&cert, key.expose()).map_err(|e| match e {
        keys::KeyError::Mismatch => invalid("the claim certificate does not match the claim key"),
        other => invalid(format!("claim credentials: {other}")),
    })?;
    config.cert_pem = Some(cert);
    config.key_pem = Some(key);
    config.claim_signer = None;
    Ok(())
}

/// Sets the claim certificate and key from PEM files (read now; the key is checked to match).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_claim_files(
    config: *mut fleetprov_config,
    cert_path: *const c_char,
    key_path: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_claim_files", || {
        // SAFETY: pointers per the header.
        let (config, cert_path, key_path) = unsafe {
            (
                config_mut(config)?,
                str_arg(cert_path, "cert_path")?,
                str_arg(key_path, "key_path")?,
            )
        };
        let cert = read_file(cert_path, "claim certificate file")?;
        let key = Secret::new(read_file(key_path, "claim key file")?);
        set_claim(config, cert, key)
    })
}

/// Sets the claim certificate and key from PEM text (copied; the key copy is wiped on free).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_claim_pem(
    config: *mut fleetprov_config,
    cert_pem: *const c_char,
    key_pem: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_claim_pem", || {
        // SAFETY: pointers per the header.
        let (config, cert, key) = unsafe {
            (
                config_mut(config)?,
                str_arg(cert_pem, "cert_pem")?,
                str_arg(key_pem, "key_pem")?,
            )
        };
        set_claim(config, cert.to_owned(), Secret::new(key.to_owned()))
    })
}

/// Sets the MQTT client id (at most 128 bytes; default: a random "fleetprov-…" id). AWS IoT
/// policies often require it to match something, e.g. the serial number.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_client_id(
    config: *mut fleetprov_config,
    client_id: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_client_id", || {
        // SAFETY: pointers per the header.
        let (config, id) = unsafe { (config_mut(config)?, str_arg(client_id, "client_id")?) };
        if id.len() > 128 {
            return Err(invalid("client_id is longer than 128 bytes"));
        }
        config.client_id = id.to_owned();
        Ok(())
    })
}

/// Sets the MQTT keep-alive in seconds (5 to 1200; default 60).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_keep_alive(
    config: *mut fleetprov_config,
    seconds: u16,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_keep_alive", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        if !(5..=1200).contains(&seconds) {
            return Err(invalid("keep-alive must be between 5 and 1200 seconds"));
        }
        config.keep_alive = seconds;
        Ok(())
    })
}

/// Offers ALPN "x-amzn-mqtt-ca" (required by AWS IoT on port 443) or not. Default: on exactly
/// when the port is 443.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_alpn(
    config: *mut fleetprov_config,
    enabled: bool,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_alpn", || {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.alpn = Some(enabled);
        Ok(())
    })
}

/// Sets the MQTT version of the built-in transport: a fleetprov_mqtt_version value. Default
/// FLEETPROV_MQTT_5, which AWS IoT Core speaks on every endpoint: its refusals (CONNACK,
/// SUBACK, PUBACK, DISCONNECT) carry a reason code, which errors report
/// (fleetprov_error_mqtt_reason_code()); over MQTT 3.1.1 AWS IoT closes the connection without
/// saying why. The host API (fleetprov_host_*) uses the host's MQTT stack, whatever its version.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_mqtt_version(
    config: *mut fleetprov_config,
    version: i32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_mqtt_version", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.mqtt_version = match fleetprov_mqtt_version::from_c(version)? {
            fleetprov_mqtt_version::FLEETPROV_MQTT_3_1_1 => MqttVersion::V311,
            fleetprov_mqtt_version::FLEETPROV_MQTT_5 => MqttVersion::V5,
        };
        Ok(())
    })
}

/// Sets the payload format: a fleetprov_format value (JSON by default).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_format(
    config: *mut fleetprov_config,
    format: i32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_format", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.format = match fleetprov_format::from_c(format)? {
            fleetprov_format::FLEETPROV_FORMAT_JSON => Format::Json,
            fleetprov_format::FLEETPROV_FORMAT_CBOR => Format::Cbor,
        };
        config
            .format
            .check_available()
            .map_err(Error::InvalidArgument)?;
        Ok(())
    })
}

/// Sets the timeouts in milliseconds: `step_ms` for each step (connecting, SUBACK, each
/// reply; default 10000, must be > 0) and `overall_ms` for a whole operation, the one-call flow
/// included (default 60000; 0 means none).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_timeouts(
    config: *mut fleetprov_config,
    step_ms: u32,
    overall_ms: u32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_timeouts", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        if step_ms == 0 {
            return Err(invalid("the step timeout must be greater than 0"));
        }
        config.step_timeout_ms = u64::from(step_ms);
        config.overall_timeout_ms = u64::from(overall_ms);
        Ok(())
    })
}

/// Sets the provisioning template name (1-36 of [0-9A-Za-z_-], checked now).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_template(
    config: *mut fleetprov_config,
    name: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_template", || {
        // SAFETY: pointers per the header.
        let (config, name) = unsafe { (config_mut(config)?, str_arg(name, "name")?) };
        validate_template_name(name).map_err(|e| invalid(e.0))?;
        config.template = Some(name.to_owned());
        Ok(())
    })
}

/// Adds (or replaces) a template parameter for RegisterThing, e.g. "SerialNumber".
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_parameter(
    config: *mut fleetprov_config,
    key: *const c_char,
    value: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_parameter", || {
        // SAFETY: pointers per the header.
        let (config, key, value) = unsafe {
            (
                config_mut(config)?,
                str_arg(key, "key")?,
                str_arg(value, "value")?,
            )
        };
        if key.is_empty() {
            return Err(invalid("parameter key is empty"));
        }
        config.parameters.insert(key.to_owned(), value.to_owned());
        Ok(())
    })
}

/// Removes every template parameter.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_clear_parameters(
    config: *mut fleetprov_config,
) -> fleetprov_result {
    remember(config, "fleetprov_config_clear_parameters", || {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.parameters.clear();
        Ok(())
    })
}

/// Chooses how the one-call flow gets the certificate: a fleetprov_method value.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_method(
    config: *mut fleetprov_config,
    method: i32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_method", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.method = fleetprov_method::from_c(method)?;
        Ok(())
    })
}

/// Chooses the key generated for FLEETPROV_METHOD_CSR: a fleetprov_key_type value.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_key_type(
    config: *mut fleetprov_config,
    key_type: i32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_key_type", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.key_type = match fleetprov_key_type::from_c(key_type)? {
            fleetprov_key_type::FLEETPROV_KEY_P256 => KeyType::P256,
            fleetprov_key_type::FLEETPROV_KEY_P384 => KeyType::P384,
        };
        Ok(())
    })
}

/// Sets the CSR (PEM, copied) for FLEETPROV_METHOD_EXTERNAL_CSR, e.g. made by a secure element,
/// and selects that method.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_csr_pem(
    config: *mut fleetprov_config,
    csr_pem: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_csr_pem", || {
        // SAFETY: pointers per the header.
        let (config, csr) = unsafe { (config_mut(config)?, str_arg(csr_pem, "csr_pem")?) };
        keys::check_csr_pem(csr).map_err(|e| invalid(format!("CSR: {e}")))?;
        config.csr_pem = Some(csr.to_owned());
        config.method = fleetprov_method::FLEETPROV_METHOD_EXTERNAL_CSR;
        Ok(())
    })
}

/// The C signing callback behind an [`ExternalKey`].
struct SignCallback {
    cb: unsafe extern "C" fn(
        *mut c_void,
        *const u8,
        usize,
        *const u8,
        usize,
        *mut u8,
        *mut usize,
    ) -> i32,
    user: UserData,
}

/// Runs a signing callback with an output buffer of `N` bytes (`call` gets the buffer and its
/// length, which the callback overwrites) and returns the signature it wrote.
fn signature_from<const N: usize>(
    call: impl FnOnce(*mut u8, *mut usize) -> i32,
) -> Result<Vec<u8>, String> {
    let mut buf = [0u8; N];
    let mut len = N;
    let r = in_callback(|| call(buf.as_mut_ptr(), &mut len));
    if r != 0 {
        return Err(format!("the signing callback returned {r}"));
    }
    buf.get(..len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| format!("the signing callback wrote a length of {len}"))
}

impl Signer for SignCallback {
    fn sign(&self, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String> {
        // A DER ECDSA P-384 signature at most.
        signature_from::<144>(|out, len| {
            // SAFETY: the callback and userdata were registered together; every pointer is
            // valid for the call and `out` has `*len` writable bytes.
            unsafe {
                (self.cb)(
                    self.user.ptr,
                    message.as_ptr(),
                    message.len(),
                    digest.as_ptr(),
                    digest.len(),
                    out,
                    len,
                )
            }
        })
    }
}

/// The C callback behind a claim signer ([`RemoteKey`]).
struct TlsSignCallback {
    cb: unsafe extern "C" fn(
        *mut c_void,
        fleetprov_signature_scheme,
        *const u8,
        usize,
        *const u8,
        usize,
        *mut u8,
        *mut usize,
    ) -> i32,
    user: UserData,
}

impl TlsSigner for TlsSignCallback {
    fn sign(&self, scheme: Scheme, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String> {
        // An RSA-4096 signature at most.
        signature_from::<512>(|out, len| {
            // SAFETY: the callback and userdata were registered together; every pointer is
            // valid for the call and `out` has `*len` writable bytes.
            unsafe {
                (self.cb)(
                    self.user.ptr,
                    scheme.into(),
                    message.as_ptr(),
                    message.len(),
                    digest.as_ptr(),
                    digest.len(),
                    out,
                    len,
                )
            }
        })
    }
}

/// Sets the claim credentials to a certificate whose private key stays in a secure element,
/// TPM or HSM: `certificate_pem` (the claim certificate, PEM, optionally followed by its
/// chain; copied) and `sign`, which signs each TLS handshake made with it (see
/// fleetprov_tls_sign_callback). The key must be P-256, P-384 or RSA with 2048 to 4096 bits
/// (FLEETPROV_INVALID_ARGUMENT otherwise, saying which it is). Replaces the claim certificate
/// and key set by fleetprov_config_set_claim_pem() or _files(), as they replace it.
/// `userdata_free` as for the log callback; it is called when the config and every operation
/// using it are done.
///
/// Rotating a device whose key is in a secure element: give its current certificate here with
/// its key's signer, the thing name as client id, the rotation template, and the new key with
/// fleetprov_config_set_signer(); fleetprov_provision() then makes and registers the new
/// certificate and connects with it (fleetprov_rotate() is for credentials in files or a
/// storage).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_claim_signer(
    config: *mut fleetprov_config,
    certificate_pem: *const c_char,
    sign: fleetprov_tls_sign_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_claim_signer", || {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointers per the header.
        let (config, cert) = unsafe {
            (
                config_mut(config)?,
                str_arg(certificate_pem, "certificate_pem")?,
            )
        };
        let cb = sign.ok_or_else(|| invalid("sign is NULL"))?;
        let key = RemoteKey::new(cert, Arc::new(TlsSignCallback { cb, user }), "claim key")
            .map_err(|e| invalid(format!("claim certificate: {e}")))?;
        config.claim_signer = Some(key);
        config.cert_pem = None;
        config.key_pem = None;
        Ok(())
    })
}

/// Selects FLEETPROV_METHOD_EXTERNAL_SIGNER: the library builds the CSR for the key whose public
/// half is `public_key` (`len` bytes: a SubjectPublicKeyInfo in DER, as OpenSSL's i2d_PUBKEY()
/// writes, or an uncompressed point; P-256 or P-384) and has it signed by `sign`, so the private
/// key never leaves the secure element. `userdata_free` as for the log callback. The built-in
/// transport makes the verification connection with it too (the new certificate's TLS
/// handshake is signed through `sign`); a host transport makes it with its own key. An output
/// directory is refused (there is no private key to write): keep the certificate next to the
/// key, in the secure element.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_signer(
    config: *mut fleetprov_config,
    public_key: *const u8,
    len: usize,
    sign: fleetprov_sign_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_signer", || {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        let cb = sign.ok_or_else(|| invalid("sign is NULL"))?;
        if public_key.is_null() {
            return Err(invalid("public_key is NULL"));
        }
        // SAFETY: `len` readable bytes, per the header.
        let public = unsafe { std::slice::from_raw_parts(public_key, len) };
        let key = ExternalKey::new(public, Arc::new(SignCallback { cb, user }))
            .map_err(|e| invalid(format!("public key: {e}")))?;
        config.signer = Some(key);
        config.method = fleetprov_method::FLEETPROV_METHOD_EXTERNAL_SIGNER;
        Ok(())
    })
}

/// Whether the one-call flow connects once with the new credentials before succeeding
/// (default true).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_verify(
    config: *mut fleetprov_config,
    verify: bool,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_verify", || {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.verify = verify;
        Ok(())
    })
}

/// Makes the one-call flow write certificate.pem, private.key (0600) and device.json into
/// `path` (created 0700; an existing directory open to group or others is refused, never
/// chmod-ed), each atomically. NULL: do not write (the default). For a store of the firmware's
/// own, see fleetprov_config_set_storage() (the two exclude each other).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_output_dir(
    config: *mut fleetprov_config,
    path: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_output_dir", || {
        // SAFETY: pointers per the header.
        let (config, path) = unsafe { (config_mut(config)?, dir_arg(path)?) };
        config.output_dir = path;
        Ok(())
    })
}

/// Keeps the resume journal in `path` (created 0700): a certificate created by the one-call
/// flow is written there (journal.json, 0600, atomically) before RegisterThing, so that a
/// call after a crash, power loss or failure resumes with it instead of creating another while
/// its ownership token is valid. The journal is removed once the credentials are committed.
/// One flow at a time may use a state directory (FLEETPROV_BUSY otherwise); the lock is taken
/// before any key is generated or signer called. NULL: no journal (the default). For a store of
/// the firmware's own, see fleetprov_config_set_storage() (the two exclude each other).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_state_dir(
    config: *mut fleetprov_config,
    path: *const c_char,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_state_dir", || {
        // SAFETY: pointers per the header.
        let (config, path) = unsafe { (config_mut(config)?, dir_arg(path)?) };
        config.state_dir = path;
        Ok(())
    })
}

/// How the one-call flow retries connection failures, timeouts and 429/5xx rejections (never
/// other rejections): at most `max_attempts` attempts in all (1 = no retries), pausing
/// `initial_backoff_ms` after the first failure, doubling up to `max_backoff_ms`, each pause
/// drawn between half and all of that (jitter), never under 25 ms, and never past the overall
/// timeout. Defaults: 5, 1000, 30000. `max_attempts` 0 or `max_backoff_ms` below
/// `initial_backoff_ms` is FLEETPROV_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_retry(
    config: *mut fleetprov_config,
    max_attempts: u32,
    initial_backoff_ms: u32,
    max_backoff_ms: u32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_retry", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        if max_attempts == 0 {
            return Err(invalid("max_attempts is 0"));
        }
        if max_backoff_ms < initial_backoff_ms {
            return Err(invalid("max_backoff_ms is below initial_backoff_ms"));
        }
        config.retry = RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(u64::from(initial_backoff_ms)),
            max_backoff: Duration::from_millis(u64::from(max_backoff_ms)),
        };
        Ok(())
    })
}

/// How long an ownership token stays valid after its certificate is created, in seconds
/// (AWS: 3600, the default). A journal older than this is not resumed: the flow starts over
/// and reports FLEETPROV_STEP_RESTARTING.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_token_lifetime(
    config: *mut fleetprov_config,
    seconds: u32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_token_lifetime", || {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.token_lifetime_s = u64::from(seconds);
        Ok(())
    })
}

/// Whether the one-call flow (fleetprov_provision(), fleetprov_provision_async(), the host API)
/// provisions again when the output directory already holds a complete credential set from an
/// earlier call. Default false: firmware that runs provisioning at every boot gets that set back
/// (fleetprov_provisioned_already_provisioned() true) without a connection or a new
/// certificate, unless a certificate is pending in the state directory's journal, which the flow
/// then finishes. true: a new certificate is made and replaces the set once it works.
/// fleetprov_rotate() always makes a new certificate.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_reprovision(
    config: *mut fleetprov_config,
    reprovision: bool,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_reprovision", || {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.reprovision = reprovision;
        Ok(())
    })
}

/// Makes fleetprov_provision() and fleetprov_rotate() with this config stop when `cancel` is
/// triggered (NULL: no switch, the default). The config holds a reference to the switch.
/// Asynchronous operations have their own (fleetprov_operation_cancel()).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_cancel(
    config: *mut fleetprov_config,
    cancel: *const fleetprov_cancel,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_cancel", || {
        // SAFETY: pointers per the header.
        let (config, cancel) = unsafe { (config_mut(config)?, cancel.as_ref()) };
        config.cancel = cancel.map(|c| c.cancel.clone());
        Ok(())
    })
}

/// Registers the log callback (NULL to remove) receiving lines up to `max_level` (a
/// fleetprov_log_level value). `userdata_free` (may be NULL) is called once on `userdata` when
/// the callback is replaced or the last config, client or operation using it is freed.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_log_callback(
    config: *mut fleetprov_config,
    callback: fleetprov_log_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
    max_level: i32,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_log_callback", || {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        let max = fleetprov_log_level::from_c(max_level)?;
        config.log = callback.map(|cb| Arc::new(LogCallback { cb, user, max }));
        Ok(())
    })
}

/// Registers the progress callback (NULL to remove); `userdata_free` as for the log callback.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_progress_callback(
    config: *mut fleetprov_config,
    callback: fleetprov_progress_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_progress_callback", || {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.progress = callback.map(|cb| Arc::new(ProgressCallback { cb, user }));
        Ok(())
    })
}
