//! Errors: the thread's last error and the `fleetprov_error` object.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::ptr;

use super::types::*;
use crate::error::Error;

/// A failure: its result code, full text and, for rejections, the service's fields.
#[derive(Clone)]
pub struct fleetprov_error {
    pub(crate) result: fleetprov_result,
    pub(crate) message: CString,
    pub(crate) status_code: u16,
    pub(crate) error_code: CString,
    pub(crate) error_message: CString,
    pub(crate) retryable: bool,
    /// The MQTT reason code (or 3.1.1 CONNACK return code) of a refusal; -1 when none.
    pub(crate) mqtt_reason_code: i32,
    pub(crate) mqtt_reason_string: CString,
}

impl fleetprov_error {
    pub(crate) fn new(e: &Error) -> fleetprov_error {
        let (status, code, msg) = match e {
            Error::Rejected { error, .. } => (
                error.status_code,
                error.error_code.as_str(),
                error.error_message.as_str(),
            ),
            _ => (0, "", ""),
        };
        let (reason_code, reason_string) = match e {
            Error::Refused(r) => (
                i32::from(r.reason_code),
                r.reason_string.as_deref().unwrap_or(""),
            ),
            _ => (-1, ""),
        };
        fleetprov_error {
            result: fleetprov_result::of(e),
            message: cstring(&e.to_string()),
            status_code: status,
            error_code: cstring(code),
            error_message: cstring(msg),
            retryable: e.is_retryable(),
            mqtt_reason_code: reason_code,
            mqtt_reason_string: cstring(reason_string),
        }
    }

    pub(crate) fn panic() -> fleetprov_error {
        fleetprov_error::new(&Error::Panicked)
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<fleetprov_error>> = const { RefCell::new(None) };
}

/// Records `e` as this thread's last error and returns its code.
pub(crate) fn fail(e: &Error) -> fleetprov_result {
    let err = fleetprov_error::new(e);
    let code = err.result;
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(err));
    code
}

pub(crate) fn set_last_error(err: fleetprov_error) {
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(err));
}

/// Copies the full text of the calling thread's last error into `buf` of `len` bytes,
/// NUL-terminated, and writes the needed size including the NUL to `needed` (may be NULL).
/// The last error is set by the last fleetprov call on this thread that returned a result code:
/// its text after a failure, "" after a success (and before any call). Returns FLEETPROV_OK when
/// the whole text fit; FLEETPROV_BUFFER_TOO_SMALL when `buf` is NULL, `len` is 0 (nothing
/// written) or the text did not fit (`buf` then holds as much as fits, cut at a character
/// boundary and NUL-terminated).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_last_error_message(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> fleetprov_result {
    guard_value(fleetprov_result::FLEETPROV_PANIC, || {
        let text = LAST_ERROR.with(|l| {
            l.borrow()
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default()
        });
        // SAFETY: forwarded caller contract.
        unsafe { copy_out(&text, buf, len, needed) }
    })
}

/// A copy of the calling thread's last error, or NULL when there is none. Free it with
/// fleetprov_error_free().
#[no_mangle]
pub extern "C" fn fleetprov_last_error() -> *mut fleetprov_error {
    guard_value(ptr::null_mut(), || {
        LAST_ERROR.with(|l| {
            l.borrow()
                .as_ref()
                .map_or(ptr::null_mut(), |e| Box::into_raw(Box::new(e.clone())))
        })
    })
}

/// The result code of an error (FLEETPROV_INVALID_ARGUMENT for NULL).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_result(error: *const fleetprov_error) -> fleetprov_result {
    guard_value(fleetprov_result::FLEETPROV_PANIC, || {
        // SAFETY: NULL or a live error, per the header.
        unsafe { error.as_ref() }.map_or(fleetprov_result::FLEETPROV_INVALID_ARGUMENT, |e| e.result)
    })
}

/// The full text of an error. Borrowed: valid until the error is freed (or, for an error
/// passed to a callback, until the callback returns). NULL for NULL.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_message(error: *const fleetprov_error) -> *const c_char {
    borrowed(error, |o| o.message.as_ptr())
}
/// For FLEETPROV_REJECTED: the service's errorCode (e.g. "InvalidCertificateOwnershipToken");
/// "" otherwise. Borrowed like fleetprov_error_message().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_code(error: *const fleetprov_error) -> *const c_char {
    borrowed(error, |o| o.error_code.as_ptr())
}
/// For FLEETPROV_REJECTED: the service's errorMessage; "" otherwise. Borrowed like
/// fleetprov_error_message().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_service_message(
    error: *const fleetprov_error,
) -> *const c_char {
    borrowed(error, |o| o.error_message.as_ptr())
}

/// For FLEETPROV_REJECTED: the service's statusCode (400, 403, 404, 429, 500...); 0 otherwise.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_status_code(error: *const fleetprov_error) -> u16 {
    guard_value(0, || {
        // SAFETY: NULL or a live error, per the header.
        unsafe { error.as_ref() }.map_or(0, |e| e.status_code)
    })
}

/// For a refusal with an MQTT reason code (a CONNACK refusing the connection, a DISCONNECT or
/// a PUBACK refusing a request, MQTT 5): the code, e.g. 0x87 (not authorized) or 0x97 (quota
/// exceeded); over MQTT 3.1.1 the CONNACK return code (1 to 5). -1 otherwise (also for NULL).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_mqtt_reason_code(error: *const fleetprov_error) -> i32 {
    guard_value(-1, || {
        // SAFETY: NULL or a live error, per the header.
        unsafe { error.as_ref() }.map_or(-1, |e| e.mqtt_reason_code)
    })
}

/// For a refusal with an MQTT 5 reason code: the server's reason string, "" when it sent none
/// (or there is no reason code). Borrowed like fleetprov_error_message().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_mqtt_reason_string(
    error: *const fleetprov_error,
) -> *const c_char {
    borrowed(error, |o| o.mqtt_reason_string.as_ptr())
}

/// Whether retrying can help: connection failures, timeouts, MQTT refusals that say the server
/// is busy, unavailable or rate-limiting, and 429 / 5xx rejections.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_is_retryable(error: *const fleetprov_error) -> bool {
    guard_value(false, || {
        // SAFETY: NULL or a live error, per the header.
        unsafe { error.as_ref() }.is_some_and(|e| e.retryable)
    })
}

/// Frees an error from fleetprov_last_error(). NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_error_free(error: *mut fleetprov_error) {
    guard_value((), || {
        if !error.is_null() {
            // SAFETY: created by Box::into_raw in this library and freed once, per the header.
            drop(unsafe { Box::from_raw(error) });
        }
    })
}

/// Clears this thread's last error (after a success).
pub(crate) fn clear_last_error() {
    LAST_ERROR.with(|l| *l.borrow_mut() = None);
}
