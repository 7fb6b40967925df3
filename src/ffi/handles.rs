//! The configuration, client and operation handles and the operations.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::types::*;
use crate::client::{Cancel, Client, Config, LogFn, LogLevel, ProgressFn, Roots};
use crate::engine::flow::Progress;
use crate::engine::retry::RetryPolicy;
use crate::error::Error;
use crate::keys::signer::{ExternalKey, Signer};
use crate::keys::{self, KeyType};
use crate::protocol::{Format, validate_template_name};
use crate::provision::{self, Hooks, Method, Provisioned, Request};
use crate::secret::Secret;

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
    cert_pem: Option<String>,
    key_pem: Option<Secret>,
    client_id: String,
    keep_alive: u16,
    alpn: Option<bool>,
    format: Format,
    step_timeout_ms: u64,
    overall_timeout_ms: u64,
    template: Option<String>,
    parameters: BTreeMap<String, String>,
    method: fleetprov_method,
    key_type: KeyType,
    csr_pem: Option<String>,
    signer: Option<ExternalKey>,
    verify: bool,
    output_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    retry: RetryPolicy,
    token_lifetime_s: u64,
    reprovision: bool,
    cancel: Option<Arc<Cancel>>,
    log: Option<Arc<LogCallback>>,
    progress: Option<Arc<ProgressCallback>>,
}

impl Default for fleetprov_config {
    fn default() -> Self {
        fleetprov_config {
            host: String::new(),
            port: 8883,
            roots: Roots::System,
            cert_pem: None,
            key_pem: None,
            client_id: String::new(),
            keep_alive: 60,
            alpn: None,
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
            retry: RetryPolicy::default(),
            token_lifetime_s: 3600,
            reprovision: false,
            cancel: None,
            log: None,
            progress: None,
        }
    }
}

impl fleetprov_config {
    fn connection(&self) -> Result<Config, Error> {
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
    fn connection_with(&self, cert: String, key: Secret) -> Config {
        let mut c = Config::new(self.host.clone(), cert, key);
        c.port = self.port;
        c.roots = self.roots.clone();
        c.client_id = self.client_id.clone();
        c.keep_alive = Duration::from_secs(u64::from(self.keep_alive));
        c.alpn = self.alpn;
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
    pub(crate) fn host_request(&self) -> Result<Request, Error> {
        let mut connection = self.connection_with(String::new(), Secret::new(String::new()));
        if connection.host.is_empty() {
            connection.host = "host-transport".into();
        }
        self.request_with(connection)
    }

    fn request(&self) -> Result<Request, Error> {
        self.request_with(self.connection()?)
    }

    fn request_with(&self, connection: Config) -> Result<Request, Error> {
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
        request.retry = self.retry;
        request.token_lifetime = Duration::from_secs(self.token_lifetime_s);
        request.reprovision = self.reprovision;
        Ok(request)
    }
}

/// # Safety
/// `config` is NULL or a live config used by this thread only.
unsafe fn config_mut<'a>(config: *mut fleetprov_config) -> Result<&'a mut fleetprov_config, Error> {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_new(out: *mut *mut fleetprov_config) -> fleetprov_result {
    guard(|| {
        let config = Box::into_raw(Box::default());
        // SAFETY: `out` is NULL or valid for writes per the header.
        unsafe { write_out(out, config) }.inspect_err(|_| {
            // SAFETY: just created above and not handed out.
            drop(unsafe { Box::from_raw(config) });
        })
    })
}

/// Frees a configuration (wiping the private key), releasing callback userdata once no client
/// or operation uses it any more. NULL is a no-op.
#[unsafe(no_mangle)]
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_endpoint(
    config: *mut fleetprov_config,
    host: *const c_char,
    port: u16,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_ca_file(
    config: *mut fleetprov_config,
    path: *const c_char,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (config, path) = unsafe { (config_mut(config)?, str_arg(path, "path")?) };
        let pem = read_file(path, "CA file")?;
        keys::parse_certificate_pem(&pem).map_err(|e| invalid(format!("CA file: {e}")))?;
        config.roots = Roots::Pem(pem);
        Ok(())
    })
}

/// Trusts the CA certificates in `pem` (copied) instead of the system's roots.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_ca_pem(
    config: *mut fleetprov_config,
    pem: *const c_char,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (config, pem) = unsafe { (config_mut(config)?, str_arg(pem, "pem")?) };
        keys::parse_certificate_pem(pem).map_err(|e| invalid(format!("CA: {e}")))?;
        config.roots = Roots::Pem(pem.to_owned());
        Ok(())
    })
}

/// Trusts the operating system's root certificates (the default).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_use_system_roots(
    config: *mut fleetprov_config,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.roots = Roots::System;
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
    Ok(())
}

/// Sets the claim certificate and key from PEM files (read now; the key is checked to match).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_claim_files(
    config: *mut fleetprov_config,
    cert_path: *const c_char,
    key_path: *const c_char,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (config, cert_path, key_path) = unsafe {
            (
                config_mut(config)?,
                str_arg(cert_path, "cert_path")?,
                str_arg(key_path, "key_path")?,
            )
        };
        let cert = read_file(cert_path, "certificate file")?;
        let key = Secret::new(read_file(key_path, "key file")?);
        set_claim(config, cert, key)
    })
}

/// Sets the claim certificate and key from PEM text (copied; the key copy is wiped on free).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_claim_pem(
    config: *mut fleetprov_config,
    cert_pem: *const c_char,
    key_pem: *const c_char,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_client_id(
    config: *mut fleetprov_config,
    client_id: *const c_char,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_keep_alive(
    config: *mut fleetprov_config,
    seconds: u16,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_alpn(
    config: *mut fleetprov_config,
    enabled: bool,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.alpn = Some(enabled);
        Ok(())
    })
}

/// Sets the payload format: a fleetprov_format value (JSON by default).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_format(
    config: *mut fleetprov_config,
    format: i32,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.format = match fleetprov_format::from_c(format)? {
            fleetprov_format::FLEETPROV_FORMAT_JSON => Format::Json,
            fleetprov_format::FLEETPROV_FORMAT_CBOR => Format::Cbor,
        };
        Ok(())
    })
}

/// Sets the timeouts in milliseconds: `step_ms` for each step (connecting, SUBACK, each
/// reply; default 10000, must be > 0) and `overall_ms` for a whole operation, the one-call flow
/// included (default 60000; 0 means none).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_timeouts(
    config: *mut fleetprov_config,
    step_ms: u32,
    overall_ms: u32,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_template(
    config: *mut fleetprov_config,
    name: *const c_char,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (config, name) = unsafe { (config_mut(config)?, str_arg(name, "name")?) };
        validate_template_name(name).map_err(|e| invalid(e.0))?;
        config.template = Some(name.to_owned());
        Ok(())
    })
}

/// Adds (or replaces) a template parameter for RegisterThing, e.g. "SerialNumber".
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_parameter(
    config: *mut fleetprov_config,
    key: *const c_char,
    value: *const c_char,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_clear_parameters(
    config: *mut fleetprov_config,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.parameters.clear();
        Ok(())
    })
}

/// Chooses how the one-call flow gets the certificate: a fleetprov_method value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_method(
    config: *mut fleetprov_config,
    method: i32,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.method = fleetprov_method::from_c(method)?;
        Ok(())
    })
}

/// Chooses the key generated for FLEETPROV_METHOD_CSR: a fleetprov_key_type value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_key_type(
    config: *mut fleetprov_config,
    key_type: i32,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_csr_pem(
    config: *mut fleetprov_config,
    csr_pem: *const c_char,
) -> fleetprov_result {
    guard(|| {
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

impl Signer for SignCallback {
    fn sign(&self, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String> {
        let mut buf = [0u8; 144];
        let mut len = buf.len();
        // SAFETY: the callback and userdata were registered together; every pointer is valid
        // for the call and `buf` has `len` writable bytes.
        let r = in_callback(|| unsafe {
            (self.cb)(
                self.user.ptr,
                message.as_ptr(),
                message.len(),
                digest.as_ptr(),
                digest.len(),
                buf.as_mut_ptr(),
                &mut len,
            )
        });
        if r != 0 {
            return Err(format!("the signing callback returned {r}"));
        }
        buf.get(..len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("the signing callback wrote a length of {len}"))
    }
}

/// Selects FLEETPROV_METHOD_EXTERNAL_SIGNER: the library builds the CSR for the key whose public
/// half is `public_key` (`len` bytes: a SubjectPublicKeyInfo in DER, as OpenSSL's i2d_PUBKEY()
/// writes, or an uncompressed point; P-256 or P-384) and has it signed by `sign`, so the private
/// key never leaves the secure element. `userdata_free` as for the log callback. The built-in
/// transport cannot connect with a key it does not hold, so it skips the verification connection
/// (a host transport makes it with its own key), and an output directory is refused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_signer(
    config: *mut fleetprov_config,
    public_key: *const u8,
    len: usize,
    sign: fleetprov_sign_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_verify(
    config: *mut fleetprov_config,
    verify: bool,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.verify = verify;
        Ok(())
    })
}

/// Makes the one-call flow write certificate.pem, private.key (0600) and device.json into
/// `path` (created 0700), each atomically. NULL: do not write (the default).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_output_dir(
    config: *mut fleetprov_config,
    path: *const c_char,
) -> fleetprov_result {
    guard(|| {
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
/// One flow at a time may use a state directory (FLEETPROV_BUSY otherwise). NULL: no journal
/// (the default).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_state_dir(
    config: *mut fleetprov_config,
    path: *const c_char,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_retry(
    config: *mut fleetprov_config,
    max_attempts: u32,
    initial_backoff_ms: u32,
    max_backoff_ms: u32,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_token_lifetime(
    config: *mut fleetprov_config,
    seconds: u32,
) -> fleetprov_result {
    guard(|| {
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
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_reprovision(
    config: *mut fleetprov_config,
    reprovision: bool,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        unsafe { config_mut(config)? }.reprovision = reprovision;
        Ok(())
    })
}

/// A cancellation switch for the blocking calls fleetprov_provision() and fleetprov_rotate()
/// (fleetprov_config_set_cancel()): triggered from another thread or a signal handler, the
/// running call stops within about 20 ms with FLEETPROV_CANCELLED. Create with
/// fleetprov_cancel_new(), free with fleetprov_cancel_free().
pub struct fleetprov_cancel {
    cancel: Arc<Cancel>,
}

/// Creates a cancellation switch, not triggered. Writes it to `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_cancel_new(out: *mut *mut fleetprov_cancel) -> fleetprov_result {
    guard(|| {
        let cancel = Box::into_raw(Box::new(fleetprov_cancel {
            cancel: Arc::new(Cancel::default()),
        }));
        // SAFETY: `out` is NULL or valid for writes per the header.
        unsafe { write_out(out, cancel) }.inspect_err(|_| {
            // SAFETY: just created above and not handed out.
            drop(unsafe { Box::from_raw(cancel) });
        })
    })
}

/// Triggers the switch: every blocking call of a config it is set on stops at its next step
/// with FLEETPROV_CANCELLED, keeping the resume journal (a later call resumes), and so does every
/// later call until fleetprov_cancel_reset(). A call whose credentials were already committed
/// reports its success. Async-signal-safe (one atomic store): it may be called from a signal
/// handler, and from any thread. NULL is a no-op.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_cancel_trigger(cancel: *const fleetprov_cancel) {
    // No guard: nothing here can panic, and catch_unwind has no business in a signal handler.
    // SAFETY: NULL or a live switch, per the header.
    if let Some(c) = unsafe { cancel.as_ref() } {
        c.cancel.cancel();
    }
}

/// Whether the switch was triggered (and not reset since); false for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_cancel_is_triggered(cancel: *const fleetprov_cancel) -> bool {
    guard_value(false, || {
        // SAFETY: NULL or a live switch, per the header.
        unsafe { cancel.as_ref() }.is_some_and(|c| c.cancel.is_cancelled())
    })
}

/// Untriggers the switch, so that later calls run.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_cancel_reset(cancel: *mut fleetprov_cancel) -> fleetprov_result {
    guard(|| {
        // SAFETY: NULL or a live switch, per the header.
        let c = unsafe { cancel.as_ref() }.ok_or_else(|| invalid("cancel is NULL"))?;
        c.cancel.reset();
        Ok(())
    })
}

/// Frees the switch. A config it was set on keeps working with it (it holds a reference); a
/// signal handler must not trigger it after this. NULL is a no-op.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_cancel_free(cancel: *mut fleetprov_cancel) {
    guard_value((), || {
        if !cancel.is_null() {
            // SAFETY: created by fleetprov_cancel_new and freed once, per the header.
            drop(unsafe { Box::from_raw(cancel) });
        }
    })
}

/// Makes fleetprov_provision() and fleetprov_rotate() with this config stop when `cancel` is
/// triggered (NULL: no switch, the default). The config holds a reference to the switch.
/// Asynchronous operations have their own (fleetprov_operation_cancel()).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_cancel(
    config: *mut fleetprov_config,
    cancel: *const fleetprov_cancel,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (config, cancel) = unsafe { (config_mut(config)?, cancel.as_ref()) };
        config.cancel = cancel.map(|c| c.cancel.clone());
        Ok(())
    })
}

/// Registers the log callback (NULL to remove) receiving lines up to `max_level` (a
/// fleetprov_log_level value). `userdata_free` (may be NULL) is called once on `userdata` when
/// the callback is replaced or the last config, client or operation using it is freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_log_callback(
    config: *mut fleetprov_config,
    callback: fleetprov_log_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
    max_level: i32,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        let max = fleetprov_log_level::from_c(max_level)?;
        config.log = callback.map(|cb| Arc::new(LogCallback { cb, user, max }));
        Ok(())
    })
}

/// Registers the progress callback (NULL to remove); `userdata_free` as for the log callback.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_config_set_progress_callback(
    config: *mut fleetprov_config,
    callback: fleetprov_progress_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        config.progress = callback.map(|cb| Arc::new(ProgressCallback { cb, user }));
        Ok(())
    })
}

pub(crate) fn provisioned_object(p: Provisioned) -> fleetprov_provisioned {
    fleetprov_provisioned {
        thing_name: cstring(&p.thing_name),
        certificate_id: cstring(&p.certificate_id),
        certificate_pem: cstring(&p.certificate_pem),
        private_key: p
            .private_key_pem
            .as_ref()
            .map(|k| SecretCString::new(k.expose())),
        config: config_entries(&p.device_configuration),
        output_dir: p.stored.map(|s| cstring(&s.dir.to_string_lossy())),
        attempts: p.attempts,
        resumed: p.resumed,
        registration_confirmed: p.registration_confirmed,
        already_provisioned: p.already_provisioned,
    }
}

/// Rotates the certificate of a provisioned device, blocking: connects with the credentials in
/// `credentials_dir` (certificate.pem, private.key and device.json, as fleetprov_provision()
/// wrote them; the thing name is the client id unless the config sets one) instead of a claim
/// certificate, which the config need not have; creates a new certificate (the config's method,
/// normally FLEETPROV_METHOD_CSR) and registers it through the config's template (a rotation
/// template); connects with it; and only then replaces the credentials in `credentials_dir`
/// (or the output directory, if one is set), atomically. Until that moment the old credentials
/// stay as they were. Unless the config sets a state directory, the resume journal lives in
/// `credentials_dir`/rotation-journal. The old certificate stays active in AWS IoT. On success
/// writes a new result to `*out` (free with fleetprov_provisioned_free()).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_rotate(
    config: *const fleetprov_config,
    credentials_dir: *const c_char,
    out: *mut *mut fleetprov_provisioned,
) -> fleetprov_result {
    guard(|| {
        refuse_in_callback("fleetprov_rotate()")?;
        // SAFETY: pointers per the header.
        let (config, dir) = unsafe {
            (
                config_ref(config)?,
                str_arg(credentials_dir, "credentials_dir")?,
            )
        };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        if dir.is_empty() {
            return Err(invalid("credentials_dir is empty"));
        }
        let connection = config.connection_with(String::new(), Secret::new(String::new()));
        let request = config.request_with(connection)?;
        let p = provision::rotate(&request, std::path::Path::new(dir), &config.hooks())?;
        // SAFETY: checked non-NULL above; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(provisioned_object(p)))) }
    })
}

/// Provisions a device in one call, blocking: connects with the claim certificate, creates the
/// certificate, registers the thing, checks the certificate against the key, connects once with
/// the new credentials (unless verification is off) and writes them to the output directory if
/// one is set. On success writes a new result to `*out` (free with fleetprov_provisioned_free()).
/// Callbacks run on the calling thread. Thread-safe with respect to other configs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_provision(
    config: *const fleetprov_config,
    out: *mut *mut fleetprov_provisioned,
) -> fleetprov_result {
    guard(|| {
        refuse_in_callback("fleetprov_provision()")?;
        // SAFETY: pointer per the header.
        let config = unsafe { config_ref(config)? };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let request = config.request()?;
        super::inject::point("provision");
        let p = provision::provision(&request, &config.hooks())?;
        // SAFETY: checked non-NULL above; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(provisioned_object(p)))) }
    })
}

/// Set once, when a worker thread is done with everything the caller gave it (its callback
/// returned and its userdata was released). Waits use pthread primitives rather than Rust's
/// (which use futexes directly), so that ThreadSanitizer, which intercepts pthread calls, sees a
/// callback's writes ordered before the return of a wait.
struct Completion {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    cond: UnsafeCell<libc::pthread_cond_t>,
    done: UnsafeCell<bool>,
}

// SAFETY: `done` is only accessed with `mutex` held; the pthread objects are made for sharing
// between threads and never move (the Completion lives in an Arc).
unsafe impl Sync for Completion {}
// SAFETY: as above.
unsafe impl Send for Completion {}

impl Completion {
    fn new() -> Arc<Completion> {
        Arc::new(Completion {
            mutex: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
            cond: UnsafeCell::new(libc::PTHREAD_COND_INITIALIZER),
            done: UnsafeCell::new(false),
        })
    }

    fn finish(&self) {
        // SAFETY: statically initialised pthread objects at a fixed address; `done` is written
        // with the mutex held.
        unsafe {
            libc::pthread_mutex_lock(self.mutex.get());
            *self.done.get() = true;
            libc::pthread_cond_broadcast(self.cond.get());
            libc::pthread_mutex_unlock(self.mutex.get());
        }
    }

    fn wait(&self) {
        // SAFETY: as in finish(); `done` is read with the mutex held.
        unsafe {
            libc::pthread_mutex_lock(self.mutex.get());
            while !*self.done.get() {
                libc::pthread_cond_wait(self.cond.get(), self.mutex.get());
            }
            libc::pthread_mutex_unlock(self.mutex.get());
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: the last reference: no thread waits on or holds these any more.
        unsafe {
            libc::pthread_cond_destroy(self.cond.get());
            libc::pthread_mutex_destroy(self.mutex.get());
        }
    }
}

/// A running asynchronous operation: cancel it, wait for it, free it.
pub struct fleetprov_operation {
    cancel: Arc<Cancel>,
    completion: Arc<Completion>,
    worker: std::thread::ThreadId,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn join_unless_self(handle: Option<JoinHandle<()>>) {
    if let Some(h) = handle
        && h.thread().id() != std::thread::current().id()
    {
        let _ = h.join();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only join handles live behind these locks; a panic cannot leave them half-changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the one-call flow on a library worker thread and returns at once, writing an
/// operation handle to `*out`. `callback` is called exactly once, on the worker thread, with
/// the outcome (see fleetprov_provision_callback); progress and log callbacks also run there.
/// `userdata_free` (may be NULL) is called on `userdata` after the callback returned. The
/// config is copied: it may be freed right away.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_provision_async(
    config: *const fleetprov_config,
    callback: fleetprov_provision_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
    out: *mut *mut fleetprov_operation,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_ref(config)? };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let request = config.request()?;
        let mut hooks = config.hooks();
        let cancel = Arc::new(Cancel::default());
        hooks.cancel = Some(cancel.clone());
        let completion = Completion::new();
        let done = completion.clone();
        let builder = std::thread::Builder::new()
            .name("fleetprov-provision".into())
            .stack_size(super::alloc::WORKER_STACK);
        let thread = super::inject::spawn_worker(builder, move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                super::inject::point("provision-async");
                provision::provision(&request, &hooks)
            }));
            complete(callback, &user, outcome.map(|r| r.map(provisioned_object)));
            drop(hooks);
            drop(user);
            super::alloc::scrub_worker_stack();
            done.finish();
        })
        .map_err(|e| Error::Internal(format!("cannot start a worker thread: {e}")))?;
        let op = Box::new(fleetprov_operation {
            cancel,
            completion,
            worker: thread.thread().id(),
            thread: Mutex::new(Some(thread)),
        });
        // SAFETY: checked non-NULL above; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(op)) }
    })
}

type CompletionFn<T> =
    unsafe extern "C" fn(*mut c_void, fleetprov_result, *mut T, *const fleetprov_error);

/// Calls a completion callback with a result or an error (a panic counts as FLEETPROV_PANIC).
fn complete<T>(
    callback: CompletionFn<T>,
    user: &UserData,
    outcome: std::thread::Result<Result<T, Error>>,
) {
    match outcome {
        Ok(Ok(value)) => {
            let object = Box::into_raw(Box::new(value));
            // SAFETY: callback and userdata registered together; ownership of `object` passes
            // to the callee, as the header says.
            unsafe {
                callback(
                    user.ptr,
                    fleetprov_result::FLEETPROV_OK,
                    object,
                    ptr::null(),
                )
            }
        }
        Ok(Err(e)) => {
            let err = fleetprov_error::new(&e);
            // SAFETY: `err` outlives the call; documented as borrowed for the call.
            unsafe { callback(user.ptr, err.result, ptr::null_mut(), &err) }
        }
        Err(_) => {
            let err = fleetprov_error::panic();
            // SAFETY: as above.
            unsafe { callback(user.ptr, err.result, ptr::null_mut(), &err) }
        }
    }
}

/// Asks the operation to stop; its callback then reports FLEETPROV_CANCELLED (unless it had
/// already finished). Thread-safe; may be called from any thread, callbacks included.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_operation_cancel(
    operation: *mut fleetprov_operation,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let op = unsafe { operation.as_ref() }.ok_or_else(|| invalid("operation is NULL"))?;
        op.cancel.cancel();
        Ok(())
    })
}

/// Blocks until the operation's callback has returned and its userdata was released. Any
/// number of threads may wait at once; each returns only then. From the operation's own
/// callback (which would wait for itself) or from any progress or log callback it returns
/// FLEETPROV_IN_CALLBACK without waiting.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_operation_wait(
    operation: *mut fleetprov_operation,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let op = unsafe { operation.as_ref() }.ok_or_else(|| invalid("operation is NULL"))?;
        if op.worker == std::thread::current().id() {
            return Err(Error::InCallback(
                "fleetprov_operation_wait() of the operation whose callback is running",
            ));
        }
        refuse_in_callback("fleetprov_operation_wait()")?;
        op.completion.clone().wait();
        Ok(())
    })
}

/// Cancels the operation if still running, waits until its callback returned and its userdata
/// was released (unless called from that callback: then the worker finishes on its own) and frees
/// the handle. NULL is a no-op. Call it once, after every other call on the operation returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_operation_free(operation: *mut fleetprov_operation) {
    guard_value((), || {
        if operation.is_null() {
            return;
        }
        // SAFETY: created by fleetprov_provision_async and freed once, per the header.
        let op = unsafe { Box::from_raw(operation) };
        op.cancel.cancel();
        if op.worker != std::thread::current().id() {
            op.completion.wait();
            join_unless_self(lock(&op.thread).take());
        }
    })
}

/// A connection for step-by-step provisioning. Create with fleetprov_client_new(), free with
/// fleetprov_client_free(). One operation at a time: a call while another (an `_async` one)
/// runs returns FLEETPROV_BUSY. fleetprov_client_cancel() may be called from any thread.
pub struct fleetprov_client {
    inner: Arc<Mutex<Client>>,
    cancel: Arc<Cancel>,
    busy: Arc<AtomicBool>,
    /// Worker threads of `_async` operations not yet joined, and whether the client is being
    /// freed (no new worker may start then).
    workers: Mutex<(Vec<JoinHandle<()>>, bool)>,
    parameters: BTreeMap<String, String>,
    template: Option<String>,
}

/// Creates a client from `config` (copied: endpoint, credentials, timeouts, format, callbacks,
/// template and parameters). Checks the credentials; does not connect yet. Writes it to `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_new(
    config: *const fleetprov_config,
    out: *mut *mut fleetprov_client,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let config = unsafe { config_ref(config)? };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let mut client = Client::new(config.connection()?)?;
        let hooks = config.hooks();
        client.set_progress(hooks.progress);
        client.set_log(hooks.log);
        let handle = Box::new(fleetprov_client {
            cancel: client.canceller(),
            inner: Arc::new(Mutex::new(client)),
            busy: Arc::new(AtomicBool::new(false)),
            // Room for the workers there can be at once (one finishing, one started from its
            // callback), so that no thread frees a buffer another grew (see spawn()).
            workers: Mutex::new((Vec::with_capacity(4), false)),
            parameters: config.parameters.clone(),
            template: config.template.clone(),
        });
        // SAFETY: checked non-NULL above; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(handle)) }
    })
}

/// Drops a client handle and with it, when no worker holds them any more, its connection and
/// runtime. Inside a progress or log callback the thread is inside another client's runtime,
/// where a runtime must not be dropped: the drop then happens on a short-lived thread.
fn drop_off_runtime(client: Box<fleetprov_client>) {
    if tokio::runtime::Handle::try_current().is_err() {
        drop(client);
        return;
    }
    std::thread::scope(|scope| {
        // Without a thread to drop it on, the client is leaked rather than dropped here.
        let _ = std::thread::Builder::new().spawn_scoped(scope, move || drop(client));
    });
}

/// Cancels the client's running `_async` operations, waits for their callbacks (except the one
/// it is called from) and their userdata_free, disconnects and frees the client. NULL is a
/// no-op. From a progress or log callback of a blocking call on this client, the free is
/// deferred until that call returns (make no further call on the client). Otherwise it must not
/// run while another thread is inside a call on the same client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_free(client: *mut fleetprov_client) {
    guard_value((), || {
        if client.is_null() || defer_free(client) {
            return;
        }
        // SAFETY: created by fleetprov_client_new and freed once, per the header.
        let c = unsafe { Box::from_raw(client) };
        c.cancel.cancel();
        // From now on no new worker starts (an `_async` call from a completion callback gets
        // FLEETPROV_CANCELLED), so the workers taken here are all there will be.
        let workers = {
            let mut w = lock(&c.workers);
            w.1 = true;
            std::mem::take(&mut w.0)
        };
        for handle in workers {
            join_unless_self(Some(handle));
        }
        drop_off_runtime(c);
    })
}

/// Asks the running operation of this client to stop with FLEETPROV_CANCELLED. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_cancel(
    client: *mut fleetprov_client,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let c = unsafe { client.as_ref() }.ok_or_else(|| invalid("client is NULL"))?;
        c.cancel.cancel();
        Ok(())
    })
}

/// # Safety
/// `client` is NULL or a live client.
unsafe fn client_ref<'a>(client: *const fleetprov_client) -> Result<&'a fleetprov_client, Error> {
    // SAFETY: per the contract.
    unsafe { client.as_ref() }.ok_or_else(|| invalid("client is NULL"))
}

/// Clears the busy flag when dropped, also when the operation panicked.
struct NotBusy(Arc<AtomicBool>);

impl Drop for NotBusy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Runs `op` with the client's connection; a lock poisoned by an earlier panic (a bug) makes
/// every later operation FLEETPROV_PANIC.
fn with_client<T>(
    inner: &Mutex<Client>,
    op: impl FnOnce(&mut Client) -> Result<T, Error>,
) -> Result<T, Error> {
    match inner.lock() {
        Ok(mut c) => op(&mut c),
        Err(_) => Err(Error::Panicked),
    }
}

/// Runs a blocking operation on `client` on this thread, exclusive with other operations. A
/// fleetprov_client_free() from one of its callbacks meanwhile frees the client afterwards.
///
/// # Safety
/// `client` is NULL or a live client.
unsafe fn blocking<T>(
    client: *mut fleetprov_client,
    what: &'static str,
    op: impl FnOnce(&fleetprov_client, &mut Client) -> Result<T, Error>,
) -> Result<T, Error> {
    refuse_in_callback(what)?;
    // SAFETY: per the contract.
    let c = unsafe { client_ref(client)? };
    if c.busy.swap(true, Ordering::SeqCst) {
        return Err(busy_error());
    }
    let not_busy = NotBusy(c.busy.clone());
    c.cancel.reset();
    let (result, free_now) = while_in_use(client, || {
        with_client(&c.inner, |inner| {
            super::inject::point("client-blocking");
            op(c, inner)
        })
    });
    drop(not_busy);
    if free_now {
        // SAFETY: fleetprov_client_free() was called on it from one of its callbacks during
        // this call, the outermost on this thread that used it; nothing refers to it now.
        drop_off_runtime(unsafe { Box::from_raw(client) });
    }
    result
}

impl fleetprov_client {
    /// Runs `op` on a worker thread, then `callback` with its outcome.
    fn spawn<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Client) -> Result<T, Error> + Send + 'static,
        callback: CompletionFn<T>,
        user: UserData,
    ) -> Result<(), Error> {
        let mut workers = lock(&self.workers);
        if workers.1 {
            return Err(Error::Cancelled);
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(busy_error());
        }
        let not_busy = NotBusy(self.busy.clone());
        self.cancel.reset();
        // Join the workers that are done (one calling this from its callback is not). In place
        // and in the order they started: the list's buffer is never freed by a thread other
        // than the one that made it (ThreadSanitizer cannot see the futex behind this lock, but
        // sees thread starts and joins), and the room for the new worker is made before it starts.
        let mut i = 0;
        while i < workers.0.len() {
            if workers.0[i].is_finished() {
                join_unless_self(Some(workers.0.remove(i)));
            } else {
                i += 1;
            }
        }
        workers.0.reserve(1);
        let inner = self.inner.clone();
        let builder = std::thread::Builder::new()
            .name("fleetprov-client".into())
            .stack_size(super::alloc::WORKER_STACK);
        let spawned = super::inject::spawn_worker(builder, move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_client(&inner, |c| {
                    super::inject::point("client-worker");
                    op(c)
                })
            }));
            // Not busy before the callback: it may start the next operation.
            drop(not_busy);
            complete(callback, &user, outcome);
            drop(user);
            super::alloc::scrub_worker_stack();
        });
        match spawned {
            Ok(h) => {
                // Stored before the lock is released: fleetprov_client_free() joins it.
                workers.0.push(h);
                Ok(())
            }
            Err(e) => Err(Error::Internal(format!(
                "cannot start a worker thread: {e}"
            ))),
        }
    }
}

fn busy_error() -> Error {
    Error::Busy
}

/// Connects now (operations also connect when needed). Blocking; callbacks on this thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_connect(
    client: *mut fleetprov_client,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        unsafe { blocking(client, "fleetprov_client_connect()", |_, c| c.connect()) }
    })
}

fn certificate_object(c: crate::protocol::CreatedCertificate) -> fleetprov_certificate {
    fleetprov_certificate {
        id: cstring(&c.certificate_id),
        pem: cstring(&c.certificate_pem),
        private_key: c
            .private_key
            .as_ref()
            .map(|k| SecretCString::new(k.expose())),
        token: SecretCString::new(c.ownership_token.expose()),
        inner: c,
    }
}

fn registration_object(r: crate::protocol::Registered) -> fleetprov_registration {
    fleetprov_registration {
        thing_name: cstring(r.thing_name.as_deref().unwrap_or("")),
        config: config_entries(&r.device_configuration),
    }
}

/// CreateKeysAndCertificate, blocking. On success writes a new certificate (with its private
/// key) to `*out`; free it with fleetprov_certificate_free().
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_create_keys_and_certificate(
    client: *mut fleetprov_client,
    out: *mut *mut fleetprov_certificate,
) -> fleetprov_result {
    guard(|| {
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        // SAFETY: pointer per the header.
        let cert = unsafe {
            blocking(
                client,
                "fleetprov_client_create_keys_and_certificate()",
                |_, c| c.create_keys_and_certificate(),
            )?
        };
        // SAFETY: checked non-NULL; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(certificate_object(cert)))) }
    })
}

/// CreateKeysAndCertificate on a worker thread; `callback` gets the outcome (see
/// fleetprov_certificate_callback), then `userdata_free` (may be NULL) is called on `userdata`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_create_keys_and_certificate_async(
    client: *mut fleetprov_client,
    callback: fleetprov_certificate_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let c = unsafe { client_ref(client)? };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        c.spawn(
            |c| c.create_keys_and_certificate().map(certificate_object),
            callback,
            user,
        )
    })
}

/// CreateCertificateFromCsr, blocking, with `csr_pem`. `key_pem` (may be NULL) is the key the
/// CSR was made from; when given, the returned certificate is checked against it
/// (FLEETPROV_CERTIFICATE_MISMATCH). On success writes a new certificate to `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_create_certificate_from_csr(
    client: *mut fleetprov_client,
    csr_pem: *const c_char,
    key_pem: *const c_char,
    out: *mut *mut fleetprov_certificate,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (_, csr, key) = unsafe {
            (
                client_ref(client)?,
                str_arg(csr_pem, "csr_pem")?,
                opt_str_arg(key_pem, "key_pem")?,
            )
        };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let key = key.map(|k| Secret::new(k.to_owned()));
        // SAFETY: pointer per the header.
        let cert = unsafe {
            blocking(
                client,
                "fleetprov_client_create_certificate_from_csr()",
                |_, c| c.create_certificate_from_csr(csr, key.as_ref()),
            )?
        };
        // SAFETY: checked non-NULL; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(certificate_object(cert)))) }
    })
}

/// CreateCertificateFromCsr on a worker thread (arguments copied); see
/// fleetprov_client_create_keys_and_certificate_async().
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_create_certificate_from_csr_async(
    client: *mut fleetprov_client,
    csr_pem: *const c_char,
    key_pem: *const c_char,
    callback: fleetprov_certificate_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointers per the header.
        let (c, csr, key) = unsafe {
            (
                client_ref(client)?,
                str_arg(csr_pem, "csr_pem")?,
                opt_str_arg(key_pem, "key_pem")?,
            )
        };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        keys::check_csr_pem(csr).map_err(|e| invalid(format!("CSR: {e}")))?;
        let csr = csr.to_owned();
        let key = key.map(|k| Secret::new(k.to_owned()));
        c.spawn(
            move |c| {
                c.create_certificate_from_csr(&csr, key.as_ref())
                    .map(certificate_object)
            },
            callback,
            user,
        )
    })
}

fn register_args(
    c: &fleetprov_client,
    template: Option<&str>,
) -> Result<(String, BTreeMap<String, String>), Error> {
    let template = template
        .map(str::to_owned)
        .or_else(|| c.template.clone())
        .ok_or_else(|| invalid("no template given and none in the config"))?;
    validate_template_name(&template).map_err(|e| invalid(e.0))?;
    Ok((template, c.parameters.clone()))
}

/// RegisterThing, blocking, for `certificate` (its ownership token) with template
/// `template_name` (NULL: the config's) and the config's parameters. On success writes a new
/// registration to `*out` (free with fleetprov_registration_free()).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_register_thing(
    client: *mut fleetprov_client,
    certificate: *const fleetprov_certificate,
    template_name: *const c_char,
    out: *mut *mut fleetprov_registration,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (_, cert, template) = unsafe {
            (
                client_ref(client)?,
                certificate
                    .as_ref()
                    .ok_or_else(|| invalid("certificate is NULL"))?,
                opt_str_arg(template_name, "template_name")?,
            )
        };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let token = cert.inner.ownership_token.clone();
        // SAFETY: pointer per the header.
        let r = unsafe {
            blocking(client, "fleetprov_client_register_thing()", |c, inner| {
                let (template, params) = register_args(c, template)?;
                inner.register_thing(&template, &token, &params)
            })?
        };
        // SAFETY: checked non-NULL; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(registration_object(r)))) }
    })
}

/// RegisterThing on a worker thread (arguments copied); `callback` gets the outcome (see
/// fleetprov_registration_callback), then `userdata_free` is called on `userdata`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fleetprov_client_register_thing_async(
    client: *mut fleetprov_client,
    certificate: *const fleetprov_certificate,
    template_name: *const c_char,
    callback: fleetprov_registration_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointers per the header.
        let (c, cert, template) = unsafe {
            (
                client_ref(client)?,
                certificate
                    .as_ref()
                    .ok_or_else(|| invalid("certificate is NULL"))?,
                opt_str_arg(template_name, "template_name")?,
            )
        };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        let (template, params) = register_args(c, template)?;
        let token = cert.inner.ownership_token.clone();
        c.spawn(
            move |c| {
                c.register_thing(&template, &token, &params)
                    .map(registration_object)
            },
            callback,
            user,
        )
    })
}
