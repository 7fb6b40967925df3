//! Result codes, enums, callbacks and the helpers every export uses (the panic boundary, the
//! callback and in-use tracking, argument conversions).

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;

use zeroize::Zeroize;

use super::error::*;
use super::results::*;
use crate::engine::Step;
use crate::error::Error;

/// Result of every fallible function. Numbers are never reused.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fleetprov_result {
    /// Success.
    FLEETPROV_OK = 0,
    /// A NULL pointer, invalid UTF-8, a bad template name, unusable PEM, an unknown enum value...
    FLEETPROV_INVALID_ARGUMENT = 1,
    /// TLS could not be set up or the handshake failed.
    FLEETPROV_TLS = 2,
    /// The connection could not be made or was lost.
    FLEETPROV_CONNECTION = 3,
    /// A step took longer than the per-step timeout.
    FLEETPROV_TIMEOUT = 4,
    /// The overall deadline passed.
    FLEETPROV_DEADLINE = 5,
    /// The service rejected a request: see the error's status code, error code and message.
    FLEETPROV_REJECTED = 6,
    /// A reply did not match the API.
    FLEETPROV_MALFORMED_REPLY = 7,
    /// The broker refused a subscription.
    FLEETPROV_SUBSCRIBE_FAILED = 8,
    /// The returned certificate does not match the device's key.
    FLEETPROV_CERTIFICATE_MISMATCH = 9,
    /// Cancelled by the caller.
    FLEETPROV_CANCELLED = 10,
    /// Writing the credentials failed.
    FLEETPROV_STORAGE = 11,
    /// Another operation is running on this client.
    FLEETPROV_BUSY = 12,
    /// The caller's buffer is too small; the needed size was written.
    FLEETPROV_BUFFER_TOO_SMALL = 13,
    /// A bug: the library panicked. The operation did not complete.
    FLEETPROV_PANIC = 14,
    /// Not finished yet (fleetprov_host_result()).
    FLEETPROV_IN_PROGRESS = 15,
    /// Something inside the library failed that no change of input can fix (a thread that could
    /// not start, a key that could not be generated, an unexpected state). Not retryable.
    FLEETPROV_INTERNAL = 16,
    /// A call that is not allowed from inside a fleetprov callback (a blocking call, or waiting
    /// for the operation whose callback is running) was made from one. Nothing was done.
    FLEETPROV_IN_CALLBACK = 17,
    /// A key behind a signing callback (the claim signer or the device key's signer) could not
    /// sign: the callback returned non-zero (a token that refuses, a wrong PIN, a session logged
    /// out) or a signature that does not verify with the key's certificate or public key. The
    /// signature was not sent and nothing was written. Not retryable.
    FLEETPROV_SIGNER = 18,
}

impl fleetprov_result {
    pub(crate) fn of(e: &Error) -> fleetprov_result {
        use fleetprov_result::*;
        match e {
            Error::InvalidArgument(_) => FLEETPROV_INVALID_ARGUMENT,
            Error::Tls(_) => FLEETPROV_TLS,
            Error::Connection(_) | Error::Refused(_) => FLEETPROV_CONNECTION,
            Error::Timeout(_) => FLEETPROV_TIMEOUT,
            Error::Deadline(_) => FLEETPROV_DEADLINE,
            Error::Rejected { .. } => FLEETPROV_REJECTED,
            Error::MalformedReply(_) => FLEETPROV_MALFORMED_REPLY,
            Error::SubscribeFailed(_) => FLEETPROV_SUBSCRIBE_FAILED,
            Error::CertificateMismatch => FLEETPROV_CERTIFICATE_MISMATCH,
            Error::Cancelled => FLEETPROV_CANCELLED,
            Error::Storage(_) => FLEETPROV_STORAGE,
            Error::Busy => FLEETPROV_BUSY,
            Error::Internal(_) => FLEETPROV_INTERNAL,
            Error::Panicked => FLEETPROV_PANIC,
            Error::InCallback(_) => FLEETPROV_IN_CALLBACK,
            Error::Signer(_) => FLEETPROV_SIGNER,
        }
    }
}

/// Payload format of requests and replies.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fleetprov_format {
    FLEETPROV_FORMAT_JSON = 0,
    FLEETPROV_FORMAT_CBOR = 1,
}

/// The MQTT version of the built-in transport's connections.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fleetprov_mqtt_version {
    /// MQTT 3.1.1.
    FLEETPROV_MQTT_3_1_1 = 4,
    /// MQTT 5 (the default): refusals come with a reason code and often a reason string.
    FLEETPROV_MQTT_5 = 5,
}

/// The signature a signing callback is asked for (see fleetprov_tls_sign_callback).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fleetprov_signature_scheme {
    /// ECDSA on P-256 over SHA-256 (PKCS#11: CKM_ECDSA over the digest). DER ECDSA-Sig-Value or
    /// raw r || s (64 bytes).
    FLEETPROV_SIGNATURE_ECDSA_P256_SHA256 = 1,
    /// ECDSA on P-384 over SHA-384 (CKM_ECDSA over the digest). DER or raw r || s (96 bytes).
    FLEETPROV_SIGNATURE_ECDSA_P384_SHA384 = 2,
    /// RSASSA-PKCS1-v1_5 with SHA-256, for TLS 1.2 (CKM_SHA256_RSA_PKCS over the message, or
    /// CKM_RSA_PKCS over the DER DigestInfo of the digest). As long as the modulus.
    FLEETPROV_SIGNATURE_RSA_PKCS1_SHA256 = 3,
    /// RSASSA-PSS with SHA-256, MGF1 with SHA-256 and a 32-byte salt, for TLS 1.3
    /// (CKM_SHA256_RSA_PKCS_PSS over the message, or CKM_RSA_PKCS_PSS over the digest). As long
    /// as the modulus.
    FLEETPROV_SIGNATURE_RSA_PSS_SHA256 = 4,
}

impl From<crate::keys::remote::Scheme> for fleetprov_signature_scheme {
    fn from(s: crate::keys::remote::Scheme) -> Self {
        use crate::keys::remote::Scheme;
        use fleetprov_signature_scheme::*;
        match s {
            Scheme::EcdsaP256Sha256 => FLEETPROV_SIGNATURE_ECDSA_P256_SHA256,
            Scheme::EcdsaP384Sha384 => FLEETPROV_SIGNATURE_ECDSA_P384_SHA384,
            Scheme::RsaPkcs1Sha256 => FLEETPROV_SIGNATURE_RSA_PKCS1_SHA256,
            Scheme::RsaPssSha256 => FLEETPROV_SIGNATURE_RSA_PSS_SHA256,
        }
    }
}

/// How the one-call flow gets the device's certificate.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fleetprov_method {
    /// CreateCertificateFromCsr with a key generated on the device (the default).
    FLEETPROV_METHOD_CSR = 0,
    /// CreateKeysAndCertificate: the service generates the key.
    FLEETPROV_METHOD_CREATE_KEYS = 1,
    /// CreateCertificateFromCsr with the CSR given by fleetprov_config_set_csr_pem().
    FLEETPROV_METHOD_EXTERNAL_CSR = 2,
    /// CreateCertificateFromCsr with a CSR the library builds and has signed through the
    /// callback given by fleetprov_config_set_signer() (the key stays in the secure element).
    FLEETPROV_METHOD_EXTERNAL_SIGNER = 3,
}

/// Key generated on the device for FLEETPROV_METHOD_CSR.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fleetprov_key_type {
    FLEETPROV_KEY_P256 = 0,
    FLEETPROV_KEY_P384 = 1,
}

/// Steps reported to the progress callback.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fleetprov_step {
    FLEETPROV_STEP_CONNECTING = 0,
    FLEETPROV_STEP_SUBSCRIBING = 1,
    FLEETPROV_STEP_SUBSCRIBED = 2,
    FLEETPROV_STEP_CREATING_CERTIFICATE = 3,
    FLEETPROV_STEP_CERTIFICATE_CREATED = 4,
    FLEETPROV_STEP_REGISTERING = 5,
    FLEETPROV_STEP_REGISTERED = 6,
    FLEETPROV_STEP_VERIFYING = 7,
    FLEETPROV_STEP_VERIFIED = 8,
    /// A certificate from the resume journal in the state directory is taken up.
    FLEETPROV_STEP_RESUMING = 9,
    /// The journal's certificate cannot be used (its token expired or was refused and the
    /// certificate is not active): a new certificate is made.
    FLEETPROV_STEP_RESTARTING = 10,
    /// An attempt failed with a retryable error; the next starts after a pause.
    FLEETPROV_STEP_RETRYING = 11,
    /// Done: the credentials are written (when there is an output directory) and the journal
    /// removed (when there is one).
    FLEETPROV_STEP_COMMITTED = 12,
}

impl From<Step> for fleetprov_step {
    fn from(s: Step) -> Self {
        use fleetprov_step::*;
        match s {
            Step::Connecting => FLEETPROV_STEP_CONNECTING,
            Step::Subscribing => FLEETPROV_STEP_SUBSCRIBING,
            Step::Subscribed => FLEETPROV_STEP_SUBSCRIBED,
            Step::CreatingCertificate => FLEETPROV_STEP_CREATING_CERTIFICATE,
            Step::CertificateCreated => FLEETPROV_STEP_CERTIFICATE_CREATED,
            Step::Registering => FLEETPROV_STEP_REGISTERING,
            Step::Registered => FLEETPROV_STEP_REGISTERED,
            Step::Verifying => FLEETPROV_STEP_VERIFYING,
            Step::Verified => FLEETPROV_STEP_VERIFIED,
            Step::Resuming => FLEETPROV_STEP_RESUMING,
            Step::Restarting => FLEETPROV_STEP_RESTARTING,
            Step::Retrying => FLEETPROV_STEP_RETRYING,
            Step::Committed => FLEETPROV_STEP_COMMITTED,
        }
    }
}

/// Severity of a log line.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum fleetprov_log_level {
    FLEETPROV_LOG_ERROR = 1,
    FLEETPROV_LOG_WARN = 2,
    FLEETPROV_LOG_INFO = 3,
    FLEETPROV_LOG_DEBUG = 4,
}

/// `int32_t` values from C into the enums above: an unknown value is an invalid argument (an
/// out-of-range value in a Rust enum would be undefined behaviour, so C passes plain integers).
macro_rules! from_c {
    ($ty:ident, $what:literal, [$($variant:ident),+ $(,)?]) => {
        impl $ty {
            pub(crate) fn from_c(value: i32) -> Result<$ty, Error> {
                $(
                    if value == $ty::$variant as i32 {
                        return Ok($ty::$variant);
                    }
                )+
                Err(invalid(format!(concat!("unknown ", $what, " {}"), value)))
            }
        }
    };
}

from_c!(
    fleetprov_format,
    "format",
    [FLEETPROV_FORMAT_JSON, FLEETPROV_FORMAT_CBOR]
);
from_c!(
    fleetprov_mqtt_version,
    "MQTT version",
    [FLEETPROV_MQTT_3_1_1, FLEETPROV_MQTT_5]
);
from_c!(
    fleetprov_method,
    "method",
    [
        FLEETPROV_METHOD_CSR,
        FLEETPROV_METHOD_CREATE_KEYS,
        FLEETPROV_METHOD_EXTERNAL_CSR,
        FLEETPROV_METHOD_EXTERNAL_SIGNER
    ]
);
from_c!(
    fleetprov_key_type,
    "key type",
    [FLEETPROV_KEY_P256, FLEETPROV_KEY_P384]
);
from_c!(
    fleetprov_log_level,
    "log level",
    [
        FLEETPROV_LOG_ERROR,
        FLEETPROV_LOG_WARN,
        FLEETPROV_LOG_INFO,
        FLEETPROV_LOG_DEBUG
    ]
);
from_c!(
    fleetprov_result,
    "result",
    [
        FLEETPROV_OK,
        FLEETPROV_INVALID_ARGUMENT,
        FLEETPROV_TLS,
        FLEETPROV_CONNECTION,
        FLEETPROV_TIMEOUT,
        FLEETPROV_DEADLINE,
        FLEETPROV_REJECTED,
        FLEETPROV_MALFORMED_REPLY,
        FLEETPROV_SUBSCRIBE_FAILED,
        FLEETPROV_CERTIFICATE_MISMATCH,
        FLEETPROV_CANCELLED,
        FLEETPROV_STORAGE,
        FLEETPROV_BUSY,
        FLEETPROV_BUFFER_TOO_SMALL,
        FLEETPROV_PANIC,
        FLEETPROV_IN_PROGRESS,
        FLEETPROV_INTERNAL,
        FLEETPROV_IN_CALLBACK,
        FLEETPROV_SIGNER,
    ]
);

/// Releases a callback's userdata when the library no longer needs it. Called exactly once, from
/// whichever thread drops the last reference (the caller's, or a worker thread) — also when the
/// function that was given it fails (FLEETPROV_BUSY, a NULL argument, ...): the caller never
/// frees userdata it handed over together with a free function. Same rules as the progress
/// callback for what it may call.
///
/// Rules for every callback of this library:
/// - It must return normally: no C++ exception, longjmp() or thread exit may leave it (the
///   library's cleanup would be skipped, and unwinding through its frames is undefined).
/// - Blocking calls from inside a progress, log, signer, host transport or userdata_free
///   callback return FLEETPROV_IN_CALLBACK without doing anything: fleetprov_provision(),
///   fleetprov_rotate(), the blocking fleetprov_client_* operations and
///   fleetprov_operation_wait(). The `_async` functions, cancels, getters and frees may be
///   called (see each callback for freeing the object it belongs to).
/// - Pointers a callback receives are valid only until it returns.
pub type fleetprov_userdata_free = Option<unsafe extern "C" fn(userdata: *mut c_void)>;

/// Signs for fleetprov_config_set_signer(): ECDSA over `message` (`message_len` bytes) with
/// SHA-256 (P-256) or SHA-384 (P-384); `digest` (`digest_len` bytes) is that hash of the
/// message, for signers that take a digest. Write the signature, DER (ECDSA-Sig-Value) or raw
/// r||s, to `signature` (room for `*signature_len` bytes, at least 104) and its length to
/// `*signature_len`; return 0, or anything else on failure. The library checks the signature
/// against the public key before using it (FLEETPROV_SIGNER when it does not verify or the
/// callback fails).
///
/// Called to sign the CSR and, with the built-in transport, once more for the TLS handshake of
/// the verification connection (the new certificate with this key).
///
/// Thread: the one running the provisioning: the caller of fleetprov_provision() or
/// fleetprov_host_new(), or the worker thread of fleetprov_provision_async(); two provisionings
/// with the same config may call it on two threads at once. All pointers are valid only during
/// the call. May not make blocking calls (FLEETPROV_IN_CALLBACK, see fleetprov_userdata_free).
pub type fleetprov_sign_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        message: *const u8,
        message_len: usize,
        digest: *const u8,
        digest_len: usize,
        signature: *mut u8,
        signature_len: *mut usize,
    ) -> i32,
>;

/// Signs a TLS handshake for fleetprov_config_set_claim_signer(): `message` (`message_len`
/// bytes) with `scheme`, which the key's type decides (ECDSA for P-256 and P-384 keys; for RSA
/// keys PSS with TLS 1.3, PKCS#1 v1.5 with TLS 1.2); `digest` (`digest_len` bytes) is the
/// scheme's hash of the message, for signers that take a digest (PKCS#11 CKM_ECDSA,
/// CKM_RSA_PKCS_PSS). Write the signature to `signature` (room for `*signature_len` bytes, at
/// least 512) and its length to `*signature_len`: for ECDSA DER (ECDSA-Sig-Value) or raw r||s,
/// for RSA as long as the modulus. Return 0, or anything else on failure. The library checks
/// the signature against the certificate's public key before it is sent: a failure or a wrong
/// signature ends the connection attempt with FLEETPROV_SIGNER.
///
/// Called once per connection made with the key. Thread: the one running the operation (the
/// caller of a blocking call, or the worker thread of an _async call); provisionings that share
/// the key may call it on several threads at once. All pointers are valid only during the call.
/// May not make blocking calls of this library (FLEETPROV_IN_CALLBACK).
pub type fleetprov_tls_sign_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        scheme: fleetprov_signature_scheme,
        message: *const u8,
        message_len: usize,
        digest: *const u8,
        digest_len: usize,
        signature: *mut u8,
        signature_len: *mut usize,
    ) -> i32,
>;

/// Receives log lines.
///
/// Thread: the thread running the operation (the caller's for blocking calls and the host API,
/// a library worker thread for `_async` calls). Operations that share a config (or clients made
/// from one) call its callbacks concurrently, each on its own thread; one operation never calls
/// two at once. `message` is NUL-terminated, `len` bytes without the NUL, valid only during the
/// call. Lines never contain private keys or ownership tokens.
///
/// What it may call: non-blocking functions, including `_async` operations, cancels and frees.
/// Blocking calls return FLEETPROV_IN_CALLBACK. fleetprov_client_free() on the client whose
/// blocking call is running on this thread is deferred until that call returns (make no further
/// call on that client); freeing other objects happens at once.
pub type fleetprov_log_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        level: fleetprov_log_level,
        message: *const c_char,
        len: usize,
    ),
>;

/// A step reached, as given to fleetprov_progress_callback. The library fills it; later versions
/// may add fields at the end: `size` says how many bytes of it are valid.
#[repr(C)]
#[derive(Debug)]
pub struct fleetprov_progress {
    /// sizeof(fleetprov_progress) of the library that filled it: a field lies within the struct
    /// only if its offset plus its size is at most this.
    pub size: usize,
    pub step: fleetprov_step,
    /// The attempt the step belongs to, from 1; it grows with each retry.
    pub attempt: u32,
    /// With FLEETPROV_STEP_RETRYING: the pause before the next attempt, in ms; otherwise 0.
    pub retry_in_ms: u64,
    /// With FLEETPROV_STEP_RETRYING: why the attempt failed (read it with the fleetprov_error_
    /// functions; do not free it); otherwise NULL. Valid only during the callback.
    pub error: *const fleetprov_error,
}

/// Receives each step reached. `progress` is valid only during the call. Same thread and
/// re-entrancy rules as fleetprov_log_callback (blocking calls give FLEETPROV_IN_CALLBACK; a free
/// of the client running it is deferred).
pub type fleetprov_progress_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, progress: *const fleetprov_progress)>;

/// Completion of fleetprov_provision_async().
///
/// Thread: a library worker thread, once per operation; two operations may complete at once on
/// two threads. On success `provisioned` is a new object owned by the callee (free it with
/// fleetprov_provisioned_free()) and `error` is NULL; on failure `provisioned` is NULL and
/// `error` describes the failure, valid only during the call.
///
/// What it may call: anything, blocking calls included, except fleetprov_operation_wait() on its
/// own operation (FLEETPROV_IN_CALLBACK). fleetprov_operation_free() on its own operation frees
/// the handle; the worker then finishes on its own (userdata_free runs after this callback).
pub type fleetprov_provision_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        result: fleetprov_result,
        provisioned: *mut fleetprov_provisioned,
        error: *const fleetprov_error,
    ),
>;

/// Completion of a certificate operation started with an `_async` client function. `certificate`
/// is owned by the callee (fleetprov_certificate_free()); `error` as in fleetprov_provision_callback.
///
/// Thread: the client's worker thread. The client is no longer busy when this runs: it may
/// start the client's next `_async` operation, make blocking calls, or free the client (which
/// then waits for the other workers, not for this one).
pub type fleetprov_certificate_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        result: fleetprov_result,
        certificate: *mut fleetprov_certificate,
        error: *const fleetprov_error,
    ),
>;

/// Completion of fleetprov_client_register_thing_async(). `registration` is owned by the callee
/// (fleetprov_registration_free()); `error` as in fleetprov_provision_callback. Thread and what
/// it may call: as fleetprov_certificate_callback.
pub type fleetprov_registration_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        result: fleetprov_result,
        registration: *mut fleetprov_registration,
        error: *const fleetprov_error,
    ),
>;

/// Userdata handed to C callbacks from any thread; freed once through its free function.
pub(crate) struct UserData {
    pub(crate) ptr: *mut c_void,
    free: fleetprov_userdata_free,
}

// SAFETY: the header requires userdata to be usable from the library's worker threads.
unsafe impl Send for UserData {}
// SAFETY: as above; the library never dereferences the pointer, it only hands it back.
unsafe impl Sync for UserData {}

impl UserData {
    pub(crate) fn new(ptr: *mut c_void, free: fleetprov_userdata_free) -> UserData {
        UserData { ptr, free }
    }
}

impl Drop for UserData {
    fn drop(&mut self) {
        if let Some(free) = self.free {
            let ptr = self.ptr;
            // SAFETY: the caller registered `free` for this pointer and it is called once.
            in_callback(|| unsafe { free(ptr) })
        }
    }
}

/// A NUL-terminated secret (private key, token) wiped on drop.
pub(crate) struct SecretCString(Vec<u8>);

impl SecretCString {
    pub(crate) fn new(s: &str) -> SecretCString {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend(s.bytes().filter(|b| *b != 0));
        v.push(0);
        SecretCString(v)
    }

    pub(crate) fn as_ptr(&self) -> *const c_char {
        self.0.as_ptr().cast()
    }
}

impl Drop for SecretCString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A C string from Rust text (interior NULs cannot occur in our texts; dropped if they do).
pub(crate) fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

pub(crate) fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

thread_local! {
    /// How many fleetprov callbacks are running on this thread (they nest: a callback may call a
    /// function that runs another callback).
    static CALLBACK_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Handles (by address) whose call is running on this thread, innermost last, each with
    /// whether its `_free` was called meanwhile (from one of its callbacks).
    static IN_USE: RefCell<Vec<(usize, bool)>> = const { RefCell::new(Vec::new()) };
}

/// Runs a user callback (progress, log, signer, host transport, userdata_free). While it runs,
/// blocking calls made on this thread return FLEETPROV_IN_CALLBACK.
pub(crate) fn in_callback<R>(callback: impl FnOnce() -> R) -> R {
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            CALLBACK_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    CALLBACK_DEPTH.with(|d| d.set(d.get().saturating_add(1)));
    let _depth = Depth;
    callback()
}

/// FLEETPROV_IN_CALLBACK for a blocking call (`what`) made from inside a callback: it would
/// block the thread that runs the flow the callback belongs to, inside its event loop.
pub(crate) fn refuse_in_callback(what: &'static str) -> Result<(), Error> {
    if CALLBACK_DEPTH.with(Cell::get) > 0 {
        Err(Error::InCallback(what))
    } else {
        Ok(())
    }
}

/// Runs `body` with `handle` marked as in use by a call on this thread. Returns the body's value
/// and whether the caller must free the handle now: its `_free` was called meanwhile (from one
/// of its callbacks, see [`defer_free`]) and no outer call on this thread still uses it.
pub(crate) fn while_in_use<T, R>(handle: *const T, body: impl FnOnce() -> R) -> (R, bool) {
    struct Entry(usize);
    impl Drop for Entry {
        fn drop(&mut self) {
            IN_USE.with(|u| {
                let mut u = u.borrow_mut();
                if let Some(i) = u.iter().rposition(|e| e.0 == self.0) {
                    u.remove(i);
                }
            });
        }
    }
    let address = handle as usize;
    IN_USE.with(|u| u.borrow_mut().push((address, false)));
    let entry = Entry(address);
    let value = body();
    let free_now = IN_USE.with(|u| {
        let u = u.borrow();
        let mine = u.iter().rposition(|e| e.0 == address);
        let requested = mine.is_some_and(|i| u[i].1);
        let outer = u[..mine.unwrap_or(0)].iter().any(|e| e.0 == address);
        requested && !outer
    });
    drop(entry);
    (value, free_now)
}

/// Called by a `_free` function: when `handle` is in use by a call on this thread (its `_free`
/// was called from one of its own callbacks), records the request and returns true; the
/// outermost call frees the handle when it returns. False otherwise: free it now.
pub(crate) fn defer_free<T>(handle: *const T) -> bool {
    let address = handle as usize;
    IN_USE.with(|u| {
        let mut found = false;
        for e in u.borrow_mut().iter_mut().filter(|e| e.0 == address) {
            e.1 = true;
            found = true;
        }
        found
    })
}

/// Runs an export's body, turning a panic into FLEETPROV_PANIC.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Error>) -> fleetprov_result {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            clear_last_error();
            fleetprov_result::FLEETPROV_OK
        }
        Ok(Err(e)) => fail(&e),
        Err(_) => {
            set_last_error(fleetprov_error::panic());
            fleetprov_result::FLEETPROV_PANIC
        }
    }
}

/// Runs a body that returns a value (getters, `_free`), with `fallback` after a panic.
/// The last error is left as it was: a getter called to inspect a failure must not clear it.
pub(crate) fn guard_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// A borrowed UTF-8 string argument; NULL or invalid UTF-8 is an invalid argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

/// Like `str_arg`, NULL meaning "none".
///
/// # Safety
/// As `str_arg`.
pub(crate) unsafe fn opt_str_arg<'a>(
    p: *const c_char,
    what: &str,
) -> Result<Option<&'a str>, Error> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { str_arg(p, what) }.map(Some)
    }
}

/// Writes `value` through an output pointer.
///
/// # Safety
/// `out` is NULL or valid for writes.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T) -> Result<(), Error> {
    if out.is_null() {
        return Err(invalid("output pointer is NULL"));
    }
    // SAFETY: non-NULL and valid for writes per the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `text` with a NUL into `buf` (`len` bytes) and writes the needed size (with NUL).
/// When `buf` is too small (but not empty) it receives as much of the text as fits, cut at a
/// UTF-8 character boundary, NUL-terminated, and FLEETPROV_BUFFER_TOO_SMALL is returned.
///
/// # Safety
/// `buf` is NULL or valid for `len` bytes; `needed` is NULL or valid for writes.
pub(crate) unsafe fn copy_out(
    text: &CStr,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> fleetprov_result {
    let bytes = text.to_bytes();
    if !needed.is_null() {
        // SAFETY: non-NULL, valid per the contract.
        unsafe { needed.write(bytes.len() + 1) };
    }
    if buf.is_null() || len == 0 {
        return fleetprov_result::FLEETPROV_BUFFER_TOO_SMALL;
    }
    let fits = bytes.len() < len;
    let mut n = bytes.len().min(len - 1);
    // Cut at a character boundary: a truncated message stays valid UTF-8.
    while n > 0 && n < bytes.len() && (bytes[n] & 0xC0) == 0x80 {
        n -= 1;
    }
    // SAFETY: `buf` holds `len` > `n` bytes and does not overlap our string.
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr().cast(), buf, n);
        buf.add(n).write(0);
    }
    if fits {
        fleetprov_result::FLEETPROV_OK
    } else {
        fleetprov_result::FLEETPROV_BUFFER_TOO_SMALL
    }
}

// ---------------------------------------------------------------------------------------------
// Exports: names, version.

/// The name of a result code ("FLEETPROV_OK", ...); "FLEETPROV_UNKNOWN" for other values.
/// The string is static. Thread-safe.
#[no_mangle]
pub extern "C" fn fleetprov_result_name(result: i32) -> *const c_char {
    use fleetprov_result::*;
    // NUL-terminated byte strings (C string literals need Rust 1.77).
    let name: &'static [u8] = match fleetprov_result::from_c(result) {
        Ok(FLEETPROV_OK) => b"FLEETPROV_OK\0",
        Ok(FLEETPROV_INVALID_ARGUMENT) => b"FLEETPROV_INVALID_ARGUMENT\0",
        Ok(FLEETPROV_TLS) => b"FLEETPROV_TLS\0",
        Ok(FLEETPROV_CONNECTION) => b"FLEETPROV_CONNECTION\0",
        Ok(FLEETPROV_TIMEOUT) => b"FLEETPROV_TIMEOUT\0",
        Ok(FLEETPROV_DEADLINE) => b"FLEETPROV_DEADLINE\0",
        Ok(FLEETPROV_REJECTED) => b"FLEETPROV_REJECTED\0",
        Ok(FLEETPROV_MALFORMED_REPLY) => b"FLEETPROV_MALFORMED_REPLY\0",
        Ok(FLEETPROV_SUBSCRIBE_FAILED) => b"FLEETPROV_SUBSCRIBE_FAILED\0",
        Ok(FLEETPROV_CERTIFICATE_MISMATCH) => b"FLEETPROV_CERTIFICATE_MISMATCH\0",
        Ok(FLEETPROV_CANCELLED) => b"FLEETPROV_CANCELLED\0",
        Ok(FLEETPROV_STORAGE) => b"FLEETPROV_STORAGE\0",
        Ok(FLEETPROV_BUSY) => b"FLEETPROV_BUSY\0",
        Ok(FLEETPROV_BUFFER_TOO_SMALL) => b"FLEETPROV_BUFFER_TOO_SMALL\0",
        Ok(FLEETPROV_PANIC) => b"FLEETPROV_PANIC\0",
        Ok(FLEETPROV_IN_PROGRESS) => b"FLEETPROV_IN_PROGRESS\0",
        Ok(FLEETPROV_INTERNAL) => b"FLEETPROV_INTERNAL\0",
        Ok(FLEETPROV_IN_CALLBACK) => b"FLEETPROV_IN_CALLBACK\0",
        Ok(FLEETPROV_SIGNER) => b"FLEETPROV_SIGNER\0",
        Err(_) => b"FLEETPROV_UNKNOWN\0",
    };
    name.as_ptr().cast()
}

/// The version of the C ABI this header describes. It changes whenever the ABI changes in a way
/// that programs built against an older header cannot use (a function's parameters, a struct's
/// layout, a type's size); additions do not change it. It is also the number in the shared
/// library's SONAME (libfleetprov.so.3). Compare it with fleetprov_abi_version() at start-up:
/// FLEETPROV_ABI_COMPATIBLE() does.
pub const FLEETPROV_ABI_VERSION: u32 = 3;

/// The ABI version of the library loaded at run time (see FLEETPROV_ABI_VERSION). Thread-safe.
#[no_mangle]
pub extern "C" fn fleetprov_abi_version() -> u32 {
    FLEETPROV_ABI_VERSION
}

/// The library's version, e.g. "0.3.0" (static string; agrees with the FLEETPROV_VERSION_*
/// macros of the header the program was compiled with when both come from one release).
#[no_mangle]
pub extern "C" fn fleetprov_version() -> *const c_char {
    // A package version never holds a NUL.
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

/// A borrowed string field of a live object, NULL for a NULL object.
pub(crate) fn borrowed<T>(
    object: *const T,
    field: impl FnOnce(&T) -> *const c_char,
) -> *const c_char {
    guard_value(ptr::null(), || {
        // SAFETY: NULL or a live object from this library, per the header.
        match unsafe { object.as_ref() } {
            Some(o) => field(o),
            None => ptr::null(),
        }
    })
}
