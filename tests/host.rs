//! The host-transport C API (`fleetprov_host_*`) driven by a host MQTT stack of its own: here a
//! separate rumqttc client, owned by the test as firmware would own coreMQTT or libmosquitto,
//! against the emulator over TLS. The library opens no socket in these tests.

use std::ffi::{c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

mod common;

use common::host::*;
use fleetprov::ffi::*;
use fleetprov_result::*;

#[test]
fn a_host_stack_provisions_with_both_methods_and_formats() {
    for (i, (method, cbor)) in [
        (fleetprov_method::FLEETPROV_METHOD_CSR, false),
        (fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS, true),
    ]
    .into_iter()
    .enumerate()
    {
        let env = common::env("host", &format!("ok-{i}"), &[]);
        let c = host_config(&env, &format!("host{i}"), method, cbor);
        let (r, p, seen) = drive(&env, c, None);
        assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
        // SAFETY: a live result, freed once.
        unsafe {
            let name = CStr::from_ptr(fleetprov_provisioned_thing_name(p))
                .to_str()
                .unwrap();
            assert_eq!(name, format!("demo-host{i}"));
            assert!(!fleetprov_provisioned_output_dir(p).is_null());
            fleetprov_provisioned_free(p);
            fleetprov_config_free(c);
        }
        assert_eq!(
            seen,
            [
                "connect claim=true",
                "subscribe 4",
                &format!(
                    "publish $aws/certificates/{}/{}",
                    if i == 0 { "create-from-csr" } else { "create" },
                    if cbor { "cbor" } else { "json" }
                ),
                &format!(
                    "publish $aws/provisioning-templates/DemoTemplate/provision/{}",
                    if cbor { "cbor" } else { "json" }
                ),
                "disconnect",
                "connect claim=false",
                "disconnect",
            ]
        );
        let certs = common::device_certificates(&env.emu);
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].1, "ACTIVE");
        assert!(env.dir.join("out/private.key").exists());
        assert!(!env.dir.join("state/journal.json").exists());

        // The next boot: the flow ends at start with the stored credentials; the host's stack
        // is asked for nothing.
        let c = host_config(&env, &format!("host{i}"), method, cbor);
        let (r, p, seen) = drive(&env, c, None);
        assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
        assert!(seen.is_empty(), "{seen:#?}");
        // SAFETY: a live result, freed once.
        unsafe {
            assert!(fleetprov_provisioned_already_provisioned(p));
            assert_eq!(
                CStr::from_ptr(fleetprov_provisioned_certificate_id(p))
                    .to_str()
                    .unwrap(),
                certs[0].0
            );
            fleetprov_provisioned_free(p);
            fleetprov_config_free(c);
        }
        assert_eq!(common::device_certificates(&env.emu).len(), 1);
    }
}

#[test]
fn a_host_stack_gets_retries_and_the_lost_reply_probe() {
    let env = common::env(
        "host",
        "faults",
        // One rule per request: a rejection and a close on the same request would both fire
        // (the close wins), and the token would never be used up.
        &["close:request@register*1", "close:processed@register*1"],
    );
    let c = host_config(&env, "hostf", fleetprov_method::FLEETPROV_METHOD_CSR, false);
    let (r, p, seen) = drive(&env, c, None);
    assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
    // SAFETY: a live result and config, freed once.
    let (name, confirmed) = unsafe {
        assert!(fleetprov_provisioned_attempts(p) >= 3, "{seen:#?}");
        let name = CStr::from_ptr(fleetprov_provisioned_thing_name(p))
            .to_string_lossy()
            .into_owned();
        let confirmed = fleetprov_provisioned_registration_confirmed(p);
        fleetprov_provisioned_free(p);
        fleetprov_config_free(c);
        (name, confirmed)
    };
    let certs = common::device_certificates(&env.emu);
    assert_eq!(
        certs,
        vec![(certs[0].0.clone(), "ACTIVE".to_string())],
        "one certificate: {seen:#?}"
    );
    // The probe: the last RegisterThing was refused (its token had been used by the attempt
    // whose reply was lost), and the flow connected with the new certificate to learn that it
    // was registered. An accepted RegisterThing would have given the thing name; the probe
    // cannot, so the name is empty and the registration confirmed.
    let last_register = seen
        .iter()
        .rposition(|s| s.starts_with("publish $aws/provisioning-templates/"))
        .expect("RegisterThing was sent");
    assert!(
        seen[last_register + 1..]
            .iter()
            .any(|s| s.starts_with("connect claim=false")),
        "{seen:#?}"
    );
    assert!(
        name.is_empty(),
        "the name came with the lost reply: {name:?}"
    );
    assert!(confirmed, "confirmed by connecting");
}

#[test]
fn host_api_arguments_are_checked() {
    let env = common::env("host", "args", &[]);
    let c = host_config(&env, "args", fleetprov_method::FLEETPROV_METHOD_CSR, false);
    let mut h = ptr::null_mut();
    let missing = fleetprov_host_callbacks {
        publish: None,
        ..CALLBACKS
    };
    // SAFETY: each call passes NULL or live pointers owned by this test.
    unsafe {
        assert_eq!(
            fleetprov_host_new(c, &missing, ptr::null_mut(), None, &mut h),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_new(c, ptr::null(), ptr::null_mut(), None, &mut h),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_new(ptr::null(), &CALLBACKS, ptr::null_mut(), None, &mut h),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_new(c, &CALLBACKS, ptr::null_mut(), None, ptr::null_mut()),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_start(ptr::null_mut(), 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_tick(ptr::null_mut(), 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        let mut wake = 7;
        assert_eq!(
            fleetprov_host_wake_at(ptr::null(), &mut wake),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(wake, 7, "nothing written on failure");
        let host = Host::default();
        ok(fleetprov_host_new(
            c,
            &CALLBACKS,
            &host as *const Host as *mut c_void,
            None,
            &mut h,
        ));
        let mut out = ptr::null_mut();
        assert_eq!(fleetprov_host_result(h, &mut out), FLEETPROV_IN_PROGRESS);
        assert_eq!(
            fleetprov_host_wake_at(h, ptr::null_mut()),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(wake_at(h), u64::MAX, "not started: no timer");
        // NULL with a length is refused; NULL with 0 is empty (a topic of no interest, and
        // an event before the start at that).
        assert_eq!(
            fleetprov_host_message(h, ptr::null(), 3, ptr::null(), 0, 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_message(h, b"t".as_ptr(), 1, ptr::null(), 5, 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        ok(fleetprov_host_message(h, ptr::null(), 0, ptr::null(), 0, 0));
        // A topic that is not UTF-8 is not an error: it is no topic of the flow's.
        ok(fleetprov_host_message(
            h,
            b"\xfft".as_ptr(),
            2,
            b"{}".as_ptr(),
            2,
            0,
        ));
        assert_eq!(
            fleetprov_host_suback(h, ptr::null(), 2, 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        ok(fleetprov_host_start(h, 0));
        assert_eq!(host.cmds.lock().unwrap().len(), 1, "asked to connect");
        assert!(wake_at(h) <= 2_000, "the connect step timeout is armed");
        // The connection never comes: the step times out and is retried after a pause.
        ok(fleetprov_host_tick(h, 2_000));
        assert_eq!(fleetprov_host_result(h, &mut out), FLEETPROV_IN_PROGRESS);
        fleetprov_host_free(h);
        fleetprov_host_free(ptr::null_mut());
        fleetprov_config_free(c);
    }
}

unsafe extern "C" fn count_free(userdata: *mut c_void) {
    // SAFETY: the userdata of these calls is the test's counter.
    unsafe { &*(userdata as *const AtomicUsize) }.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn host_new_checks_the_callbacks_size_and_releases_the_userdata_on_failure() {
    let env = common::env("host", "size", &[]);
    let c = host_config(&env, "size", fleetprov_method::FLEETPROV_METHOD_CSR, false);
    let full = std::mem::size_of::<fleetprov_host_callbacks>();
    let sized = |size| fleetprov_host_callbacks { size, ..CALLBACKS };
    let (zero, eight, one_short) = (sized(0), sized(8), sized(full - 1));
    let no_publish = fleetprov_host_callbacks {
        publish: None,
        ..CALLBACKS
    };
    let freed = AtomicUsize::new(0);
    let u = &freed as *const AtomicUsize as *mut c_void;
    let mut h = ptr::null_mut();
    let rows: [(&str, *const fleetprov_host_callbacks, String); 5] = [
        ("NULL", ptr::null(), "callbacks is NULL".into()),
        (
            "size 0",
            &zero,
            format!("callbacks->size is 0: set it to sizeof(fleetprov_host_callbacks) ({full})"),
        ),
        (
            "size 8",
            &eight,
            format!("callbacks->size is 8: set it to sizeof(fleetprov_host_callbacks) ({full})"),
        ),
        (
            "one byte short",
            &one_short,
            format!(
                "callbacks->size is {}: set it to sizeof(fleetprov_host_callbacks) ({full})",
                full - 1
            ),
        ),
        (
            "no publish",
            &no_publish,
            "every host callback is required".into(),
        ),
    ];
    for (i, (what, callbacks, message)) in rows.into_iter().enumerate() {
        // SAFETY: a live config; each table lives for the call; the counter outlives it.
        let r = unsafe { fleetprov_host_new(c, callbacks, u, Some(count_free), &mut h) };
        assert_eq!(r, FLEETPROV_INVALID_ARGUMENT, "{what}");
        assert!(h.is_null(), "{what}: nothing written");
        let text = common::last_error();
        assert!(text.contains(&message), "{what}: {text}");
        assert_eq!(
            freed.load(Ordering::SeqCst),
            i + 1,
            "{what}: userdata released"
        );
    }

    // A larger struct, from a later header with more callbacks: accepted, the known prefix read.
    #[repr(C)]
    struct Later {
        known: fleetprov_host_callbacks,
        added: [usize; 3],
    }
    let later = Later {
        known: sized(std::mem::size_of::<Later>()),
        added: [usize::MAX; 3],
    };
    let host = Host::default();
    // SAFETY: a live config; `later` and `host` outlive the calls; the host object is freed once.
    unsafe {
        ok(fleetprov_host_new(
            c,
            &later.known,
            &host as *const Host as *mut c_void,
            None,
            &mut h,
        ));
        ok(fleetprov_host_start(h, 0));
        assert!(
            matches!(
                host.cmds.lock().unwrap().pop_front(),
                Some(Cmd::Connect { claim: true, .. })
            ),
            "the known callbacks are used"
        );
        fleetprov_host_free(h);
        // The sized one, with the counter: released once, when the host object is freed.
        ok(fleetprov_host_new(
            c,
            &CALLBACKS,
            u,
            Some(count_free),
            &mut h,
        ));
        fleetprov_host_free(h);
        assert_eq!(freed.load(Ordering::SeqCst), 6);
        fleetprov_config_free(c);
    }
}

#[test]
fn a_host_stack_topics_are_bytes_of_a_given_length() {
    // Every incoming PUBLISH comes after two look-alikes whose topics are the real one with a
    // byte that is not UTF-8 after it, and with a NUL and more after it: both are ignored (OK),
    // not taken for the reply (their body would fail the step). The real one comes from a
    // buffer with "#garbage" after the topic and a length without it: read as the real topic.
    for (i, (method, cbor)) in [
        (fleetprov_method::FLEETPROV_METHOD_CSR, false),
        (fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS, true),
    ]
    .into_iter()
    .enumerate()
    {
        let env = common::env("host", &format!("topics-{i}"), &[]);
        let c = host_config(&env, &format!("topics{i}"), method, cbor);
        let (r, p, seen) = drive_with(&env, c, None, true);
        assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
        // SAFETY: a live result and config, freed once.
        unsafe {
            assert_eq!(fleetprov_provisioned_attempts(p), 1, "{seen:#?}");
            assert_eq!(
                CStr::from_ptr(fleetprov_provisioned_thing_name(p)).to_str(),
                Ok(format!("demo-topics{i}").as_str())
            );
            fleetprov_provisioned_free(p);
            fleetprov_config_free(c);
        }
        assert_eq!(
            seen.iter().filter(|s| s.starts_with("publish ")).count(),
            2,
            "one request per API, each answered once: {seen:#?}"
        );
        assert!(!seen.iter().any(|s| s.starts_with("connection error")));
        assert_eq!(common::device_certificates(&env.emu).len(), 1);
    }
}

#[test]
fn an_external_signer_with_a_host_stack_keeps_the_key_in_the_element() {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let env = common::env("host", "signer", &[]);
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let own_pem = pem_of(pkcs8.as_ref());
    let el = Element {
        pair,
        signed: Mutex::new(0),
    };
    let c = host_config(
        &env,
        "signer",
        fleetprov_method::FLEETPROV_METHOD_CSR,
        false,
    );
    // SAFETY: live config; `el` outlives the flow; the output directory must go (no key).
    unsafe {
        ok(fleetprov_config_set_output_dir(c, ptr::null()));
        ok(fleetprov_config_set_signer(
            c,
            point.as_ptr(),
            point.len(),
            Some(element_sign),
            &el as *const Element as *mut c_void,
            None,
        ));
        // A public key that is not one.
        assert_eq!(
            fleetprov_config_set_signer(
                c,
                point.as_ptr(),
                10,
                Some(element_sign),
                ptr::null_mut(),
                None
            ),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_config_set_signer(
                c,
                point.as_ptr(),
                point.len(),
                None,
                ptr::null_mut(),
                None
            ),
            FLEETPROV_INVALID_ARGUMENT
        );
        // The config remembers the failed setter until it succeeds: used now, it would report
        // the last bad call. Set the signer again (the valid call above stays in force).
        let mut p = ptr::null_mut();
        assert_eq!(
            fleetprov_host_new(c, &CALLBACKS, ptr::null_mut(), None, &mut p),
            FLEETPROV_INVALID_ARGUMENT
        );
        let message = common::last_error();
        assert!(
            message.contains("fleetprov_config_set_signer() failed earlier"),
            "{message}"
        );
        ok(fleetprov_config_set_signer(
            c,
            point.as_ptr(),
            point.len(),
            Some(element_sign),
            &el as *const Element as *mut c_void,
            None,
        ));
    }
    let (r, p, seen) = drive(&env, c, Some(own_pem));
    assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
    assert_eq!(*el.signed.lock().unwrap(), 1, "one CSR signature");
    // The new certificate connected with the element's key (the library had none to give).
    assert!(
        seen.contains(&"connect claim=false".to_string()),
        "{seen:#?}"
    );
    // SAFETY: live result and config, freed once.
    unsafe {
        assert!(fleetprov_provisioned_private_key(p).is_null());
        let cert = CStr::from_ptr(fleetprov_provisioned_certificate_pem(p))
            .to_str()
            .unwrap();
        // The certificate holds the element's public key.
        let der: Vec<u8> = rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert!(der.windows(point.len()).any(|w| w == point.as_slice()));
        fleetprov_provisioned_free(p);
        fleetprov_config_free(c);
    }
}
