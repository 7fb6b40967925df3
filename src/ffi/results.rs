//! The result objects: a certificate, a registration, a provisioning result, and their getters.

use std::collections::BTreeMap;
use std::ffi::{c_char, CString};
use std::ptr;

use super::types::*;
use crate::error::Error;

/// A certificate from CreateKeysAndCertificate or CreateCertificateFromCsr.
pub struct fleetprov_certificate {
    pub(crate) id: CString,
    pub(crate) pem: CString,
    pub(crate) private_key: Option<SecretCString>,
    pub(crate) token: SecretCString,
    pub(crate) inner: crate::protocol::CreatedCertificate,
}

/// The accepted reply of RegisterThing.
pub struct fleetprov_registration {
    pub(crate) thing_name: CString,
    pub(crate) config: Vec<(CString, CString)>,
}

/// The result of the one-call flow.
pub struct fleetprov_provisioned {
    pub(crate) thing_name: CString,
    pub(crate) certificate_id: CString,
    pub(crate) certificate_pem: CString,
    pub(crate) private_key: Option<SecretCString>,
    pub(crate) config: Vec<(CString, CString)>,
    pub(crate) output_dir: Option<CString>,
    pub(crate) attempts: u32,
    pub(crate) resumed: bool,
    pub(crate) registration_confirmed: bool,
    pub(crate) already_provisioned: bool,
}

pub(crate) fn config_entries(config: &BTreeMap<String, String>) -> Vec<(CString, CString)> {
    config
        .iter()
        .map(|(k, v)| (cstring(k), cstring(v)))
        .collect()
}

/// certificateId (64 hex characters). Borrowed: valid until the certificate is freed.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_certificate_id(
    certificate: *const fleetprov_certificate,
) -> *const c_char {
    borrowed(certificate, |o| o.id.as_ptr())
}
/// The certificate PEM. Borrowed like fleetprov_certificate_id().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_certificate_pem(
    certificate: *const fleetprov_certificate,
) -> *const c_char {
    borrowed(certificate, |o| o.pem.as_ptr())
}
/// The ownership token, a secret: needed for RegisterThing, valid one hour. Borrowed like
/// fleetprov_certificate_id(); wiped when the certificate is freed.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_certificate_ownership_token(
    certificate: *const fleetprov_certificate,
) -> *const c_char {
    borrowed(certificate, |o| o.token.as_ptr())
}

/// The private key PEM returned by CreateKeysAndCertificate (PKCS#1 RSA on AWS); NULL for a
/// certificate from a CSR. Borrowed like fleetprov_certificate_id(); wiped when freed.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_certificate_private_key(
    certificate: *const fleetprov_certificate,
) -> *const c_char {
    guard_value(ptr::null(), || {
        // SAFETY: NULL or a live certificate, per the header.
        unsafe { certificate.as_ref() }
            .and_then(|c| c.private_key.as_ref())
            .map_or(ptr::null(), SecretCString::as_ptr)
    })
}

/// Frees a certificate (wiping its key and token). NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_certificate_free(certificate: *mut fleetprov_certificate) {
    guard_value((), || {
        if !certificate.is_null() {
            // SAFETY: created by Box::into_raw in this library and freed once, per the header.
            drop(unsafe { Box::from_raw(certificate) });
        }
    })
}

/// The thing name ("" when the template creates no thing). Borrowed: valid until the
/// registration is freed.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_registration_thing_name(
    registration: *const fleetprov_registration,
) -> *const c_char {
    borrowed(registration, |o| o.thing_name.as_ptr())
}

/// Attempts the provisioning took (1 when nothing was retried); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_attempts(
    provisioned: *const fleetprov_provisioned,
) -> u32 {
    guard_value(0, || {
        // SAFETY: NULL or a live result, per the header.
        unsafe { provisioned.as_ref() }.map_or(0, |p| p.attempts)
    })
}

/// Whether the certificate came from the resume journal (an earlier call created it); false
/// for NULL.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_resumed(
    provisioned: *const fleetprov_provisioned,
) -> bool {
    guard_value(false, || {
        // SAFETY: NULL or a live result, per the header.
        unsafe { provisioned.as_ref() }.is_some_and(|p| p.resumed)
    })
}

/// false in one case only: RegisterThing refused the ownership token after an earlier attempt
/// sent it and lost the reply, and the certificate could not be tried because its key is not
/// the library's (FLEETPROV_METHOD_EXTERNAL_CSR or _EXTERNAL_SIGNER with fleetprov_provision()).
/// That attempt most likely registered it (it used the token); the thing name and device
/// configuration are then empty. Connect with the certificate to be sure. false for NULL.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_registration_confirmed(
    provisioned: *const fleetprov_provisioned,
) -> bool {
    guard_value(false, || {
        // SAFETY: NULL or a live result, per the header.
        unsafe { provisioned.as_ref() }.is_some_and(|p| p.registration_confirmed)
    })
}

/// true when the output directory already held the complete credentials of an earlier call (and
/// nothing was pending in the journal): they were returned as they are, nothing was sent and no
/// certificate was made; attempts is 0. See fleetprov_config_set_reprovision(). false for NULL.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_already_provisioned(
    provisioned: *const fleetprov_provisioned,
) -> bool {
    guard_value(false, || {
        // SAFETY: NULL or a live result, per the header.
        unsafe { provisioned.as_ref() }.is_some_and(|p| p.already_provisioned)
    })
}

/// Number of deviceConfiguration entries.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_registration_config_count(
    registration: *const fleetprov_registration,
) -> usize {
    guard_value(0, || {
        // SAFETY: NULL or a live registration, per the header.
        unsafe { registration.as_ref() }.map_or(0, |r| r.config.len())
    })
}

/// deviceConfiguration entry `index` (sorted by key): writes borrowed key and value pointers
/// (valid until the registration is freed). FLEETPROV_INVALID_ARGUMENT if out of range.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_registration_config_entry(
    registration: *const fleetprov_registration,
    index: usize,
    key: *mut *const c_char,
    value: *mut *const c_char,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: NULL or a live registration, per the header.
        let r = unsafe { registration.as_ref() }.ok_or_else(|| invalid("registration is NULL"))?;
        // SAFETY: forwarded caller contract for the output pointers.
        unsafe { entry_out(&r.config, index, key, value) }
    })
}

/// # Safety
/// `key` and `value` are NULL or valid for writes.
unsafe fn entry_out(
    config: &[(CString, CString)],
    index: usize,
    key: *mut *const c_char,
    value: *mut *const c_char,
) -> Result<(), Error> {
    let (k, v) = config.get(index).ok_or_else(|| {
        invalid(format!(
            "index {index} is out of range ({} entries)",
            config.len()
        ))
    })?;
    if key.is_null() || value.is_null() {
        return Err(invalid("output pointer is NULL"));
    }
    // SAFETY: both checked non-NULL; valid for writes per the contract.
    unsafe {
        key.write(k.as_ptr());
        value.write(v.as_ptr());
    }
    Ok(())
}

/// Frees a registration. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_registration_free(registration: *mut fleetprov_registration) {
    guard_value((), || {
        if !registration.is_null() {
            // SAFETY: created by Box::into_raw in this library and freed once, per the header.
            drop(unsafe { Box::from_raw(registration) });
        }
    })
}

/// The thing name. Borrowed: valid until the result is freed.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_thing_name(
    provisioned: *const fleetprov_provisioned,
) -> *const c_char {
    borrowed(provisioned, |o| o.thing_name.as_ptr())
}
/// The new certificate's id. Borrowed like fleetprov_provisioned_thing_name().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_certificate_id(
    provisioned: *const fleetprov_provisioned,
) -> *const c_char {
    borrowed(provisioned, |o| o.certificate_id.as_ptr())
}
/// The new certificate PEM. Borrowed like fleetprov_provisioned_thing_name().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_certificate_pem(
    provisioned: *const fleetprov_provisioned,
) -> *const c_char {
    borrowed(provisioned, |o| o.certificate_pem.as_ptr())
}

/// The device's private key PEM; NULL with FLEETPROV_METHOD_EXTERNAL_CSR. Borrowed like
/// fleetprov_provisioned_thing_name(); wiped when the result is freed.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_private_key(
    provisioned: *const fleetprov_provisioned,
) -> *const c_char {
    guard_value(ptr::null(), || {
        // SAFETY: NULL or a live result, per the header.
        unsafe { provisioned.as_ref() }
            .and_then(|p| p.private_key.as_ref())
            .map_or(ptr::null(), SecretCString::as_ptr)
    })
}

/// The directory the credentials were written to (certificate.pem, private.key, device.json),
/// or NULL when no output directory was configured. Borrowed like the other getters.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_output_dir(
    provisioned: *const fleetprov_provisioned,
) -> *const c_char {
    guard_value(ptr::null(), || {
        // SAFETY: NULL or a live result, per the header.
        unsafe { provisioned.as_ref() }
            .and_then(|p| p.output_dir.as_ref())
            .map_or(ptr::null(), |d| d.as_ptr())
    })
}

/// Number of deviceConfiguration entries.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_config_count(
    provisioned: *const fleetprov_provisioned,
) -> usize {
    guard_value(0, || {
        // SAFETY: NULL or a live result, per the header.
        unsafe { provisioned.as_ref() }.map_or(0, |p| p.config.len())
    })
}

/// deviceConfiguration entry `index` (sorted by key), as fleetprov_registration_config_entry().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_config_entry(
    provisioned: *const fleetprov_provisioned,
    index: usize,
    key: *mut *const c_char,
    value: *mut *const c_char,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: NULL or a live result, per the header.
        let p = unsafe { provisioned.as_ref() }.ok_or_else(|| invalid("provisioned is NULL"))?;
        // SAFETY: forwarded caller contract for the output pointers.
        unsafe { entry_out(&p.config, index, key, value) }
    })
}

/// Frees a provisioning result (wiping the key). NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provisioned_free(provisioned: *mut fleetprov_provisioned) {
    guard_value((), || {
        if !provisioned.is_null() {
            // SAFETY: created by Box::into_raw in this library and freed once, per the header.
            drop(unsafe { Box::from_raw(provisioned) });
        }
    })
}
