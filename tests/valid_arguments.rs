//! The C functions that other tests call only with bad values, or not at all, called with valid
//! ones against the emulator: the system trust store (with a CA the test places there through
//! SSL_CERT_FILE), claim credentials as PEM text, a P-384 device key, keep-alive, client id,
//! clearing parameters, CreateCertificateFromCsr on a worker thread, and a malformed reply.
//!
//! One test in its own process: it sets SSL_CERT_FILE before any other thread exists.

mod common;

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;
use std::sync::mpsc;
use std::time::Duration;

use common::{last_error, ok};
use fleetprov::ffi::*;
use fleetprov_result::*;

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn text(p: *const c_char) -> String {
    // SAFETY: a NUL-terminated string the library returned, alive for the caller's use.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

type Outcome = (fleetprov_result, String, String);

extern "C" fn on_certificate(
    userdata: *mut c_void,
    result: fleetprov_result,
    certificate: *mut fleetprov_certificate,
    error: *const fleetprov_error,
) {
    // SAFETY: a Sender the test boxed; the certificate is the callee's; the error is valid for
    // the call.
    unsafe {
        let tx = &*(userdata as *const mpsc::Sender<Outcome>);
        if certificate.is_null() {
            let message = text(fleetprov_error_message(error));
            tx.send((result, String::new(), message)).unwrap();
        } else {
            let id = text(fleetprov_certificate_id(certificate));
            let pem = text(fleetprov_certificate_pem(certificate));
            fleetprov_certificate_free(certificate);
            tx.send((result, id, pem)).unwrap();
        }
    }
}

extern "C" fn free_sender(userdata: *mut c_void) {
    // SAFETY: boxed by the test, released once by the library.
    drop(unsafe { Box::from_raw(userdata as *mut mpsc::Sender<Outcome>) });
}

#[test]
fn valid_values_for_every_setter_and_the_system_trust_store() {
    let dir = common::scratch("valid", "all");
    std::fs::create_dir_all(&dir).unwrap();
    // The emulator's CA in a trust store this test controls, before any thread starts.
    let ca_file = dir.join("ca-bundle.pem");
    std::fs::write(&ca_file, "").unwrap();
    // SAFETY: no other thread exists yet in this test process (one test, run first).
    unsafe {
        std::env::set_var("SSL_CERT_FILE", &ca_file);
        std::env::remove_var("SSL_CERT_DIR");
    }
    let emu = common::emulator(&dir, &[]);
    let paths = emu.paths();
    std::fs::copy(&paths.ca_cert, &ca_file).unwrap();
    let claim_cert = cs(&std::fs::read_to_string(&paths.claim_cert).unwrap());
    let claim_key = cs(&std::fs::read_to_string(&paths.claim_key).unwrap());

    let mut c = ptr::null_mut();
    let mut p = ptr::null_mut();
    // SAFETY: a config this test owns; strings that outlive the calls.
    unsafe {
        ok(fleetprov_config_new(&mut c));
        ok(fleetprov_config_set_endpoint(
            c,
            c"localhost".as_ptr(),
            emu.port(),
        ));
        // A CA file first, then back to the system's roots (the default): the trust store
        // holds the emulator's CA.
        ok(fleetprov_config_set_ca_file(
            c,
            cs(paths.ca_cert.to_str().unwrap()).as_ptr(),
        ));
        ok(fleetprov_config_use_system_roots(c));
        ok(fleetprov_config_set_claim_pem(
            c,
            claim_cert.as_ptr(),
            claim_key.as_ptr(),
        ));
        ok(fleetprov_config_set_client_id(
            c,
            c"valid-args-client".as_ptr(),
        ));
        ok(fleetprov_config_set_keep_alive(c, 30));
        ok(fleetprov_config_set_timeouts(c, 5_000, 60_000));
        ok(fleetprov_config_set_template(c, c"DemoTemplate".as_ptr()));
        ok(fleetprov_config_set_parameter(
            c,
            c"SerialNumber".as_ptr(),
            c"wrong".as_ptr(),
        ));
        ok(fleetprov_config_set_parameter(
            c,
            c"Extra".as_ptr(),
            c"x".as_ptr(),
        ));
        ok(fleetprov_config_clear_parameters(c));
        ok(fleetprov_config_set_parameter(
            c,
            c"SerialNumber".as_ptr(),
            c"valid".as_ptr(),
        ));
        ok(fleetprov_config_set_method(
            c,
            fleetprov_method::FLEETPROV_METHOD_CSR as i32,
        ));
        ok(fleetprov_config_set_key_type(
            c,
            fleetprov_key_type::FLEETPROV_KEY_P384 as i32,
        ));
        ok(fleetprov_provision(c, &mut p));
        // The parameters were cleared: the thing is named from the last SerialNumber only.
        assert_eq!(text(fleetprov_provisioned_thing_name(p)), "demo-valid");
        let cert = text(fleetprov_provisioned_certificate_pem(p));
        let key = text(fleetprov_provisioned_private_key(p));
        assert!(key.contains("PRIVATE KEY"));
        let pair = rcgen::KeyPair::from_pem(&key).unwrap();
        assert!(
            pair.is_compatible(&rcgen::PKCS_ECDSA_P384_SHA384),
            "a P-384 key"
        );
        fleetprov::keys::certificate_matches_key(&cert, &key).unwrap();
        fleetprov_provisioned_free(p);
    }
    let registry = emu.registry().unwrap();
    assert!(
        registry.to_string().contains("demo-valid"),
        "the thing is registered"
    );

    // Without the CA in the trust store, the system's roots do not trust the emulator.
    std::fs::write(&ca_file, "").unwrap();
    // SAFETY: live config, valid output pointer.
    unsafe {
        ok(fleetprov_config_set_retry(c, 1, 50, 50));
        assert_eq!(
            fleetprov_provision(c, &mut p),
            FLEETPROV_TLS,
            "{}",
            last_error()
        );
    }
    std::fs::copy(&paths.ca_cert, &ca_file).unwrap();

    // CreateCertificateFromCsr on a worker thread, with the key to check it against.
    let key = fleetprov::keys::DeviceKey::generate(fleetprov::keys::KeyType::P256).unwrap();
    let csr = cs(&key.csr_pem("valid-args").unwrap());
    let key_pem = cs(key.private_key_pem().expose());
    let (tx, rx) = mpsc::channel::<Outcome>();
    let user = Box::into_raw(Box::new(tx)) as *mut c_void;
    let mut client = ptr::null_mut();
    // SAFETY: live config and client; the strings outlive the call (they are copied).
    unsafe {
        ok(fleetprov_client_new(c, &mut client));
        ok(fleetprov_client_create_certificate_from_csr_async(
            client,
            csr.as_ptr(),
            key_pem.as_ptr(),
            Some(on_certificate),
            user,
            Some(free_sender),
        ));
    }
    let (r, id, pem) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the callback ran");
    assert_eq!(r, FLEETPROV_OK, "{pem}");
    assert_eq!(id.len(), 64);
    fleetprov::keys::certificate_matches_key(&pem, key.private_key_pem().expose()).unwrap();

    // A reply that does not match the API: FLEETPROV_MALFORMED_REPLY.
    emu.faults().add("mangle:missing@csr*1".parse().unwrap());
    let (tx, rx) = mpsc::channel::<Outcome>();
    let user = Box::into_raw(Box::new(tx)) as *mut c_void;
    // SAFETY: as above.
    unsafe {
        ok(fleetprov_client_create_certificate_from_csr_async(
            client,
            csr.as_ptr(),
            ptr::null(),
            Some(on_certificate),
            user,
            Some(free_sender),
        ));
    }
    let (r, _, message) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the callback ran");
    assert_eq!(r, FLEETPROV_MALFORMED_REPLY, "{message}");
    // SAFETY: live objects, freed once.
    unsafe {
        fleetprov_client_free(client);
        fleetprov_config_free(c);
    }
    drop(emu);
    let _ = std::fs::remove_dir_all(&dir);
}
