//! The blocking one-call flow and rotation, and the result object they return.

use std::ffi::c_char;

use super::config::*;
use super::results::*;
use super::types::*;
use crate::provision::{self, Provisioned};
use crate::secret::Secret;

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
#[no_mangle]
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
#[no_mangle]
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
