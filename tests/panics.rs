//! What a panic inside the library turns into, at each of its catch sites: the export boundary,
//! a blocking client call, a client worker thread, the asynchronous provisioning thread and the
//! host API. The library is built with the cargo feature `test-panics`, where
//! `FLEETPROV_TEST_PANIC=<site>` makes that site panic:
//!
//!     cargo test --features test-panics --test panics
//!
//! One test (the environment variable is process-wide), run in its own process; no server: the
//! connections go to a loopback port that refuses them.

mod common;

use std::ffi::{c_char, c_void, CStr, CString};
use std::net::TcpListener;
use std::ptr;
use std::sync::mpsc;

use common::{last_error, ok};
use fleetprov::ffi::*;
use fleetprov_result::*;

const PANIC_TEXT: &str = "internal error: the library panicked";

/// Runs `body` with `site` armed.
fn panicking<R>(site: &str, body: impl FnOnce() -> R) -> R {
    // SAFETY: this test binary runs one test; no other thread reads the environment while
    // it changes (the library's threads read it only inside `body`).
    unsafe { std::env::set_var("FLEETPROV_TEST_PANIC", site) };
    let r = body();
    // SAFETY: as above.
    unsafe { std::env::remove_var("FLEETPROV_TEST_PANIC") };
    r
}

/// A config for a loopback port that refuses connections (bound, never listening).
fn refused_config(port: u16) -> *mut fleetprov_config {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert, key) = (
        CString::new(cert.pem()).unwrap(),
        CString::new(key.serialize_pem()).unwrap(),
    );
    let mut c = ptr::null_mut();
    // SAFETY: valid pointers owned by this test.
    unsafe {
        ok(fleetprov_config_new(&mut c));
        ok(fleetprov_config_set_endpoint(
            c,
            c"127.0.0.1".as_ptr(),
            port,
        ));
        ok(fleetprov_config_set_ca_pem(c, cert.as_ptr()));
        ok(fleetprov_config_set_claim_pem(
            c,
            cert.as_ptr(),
            key.as_ptr(),
        ));
        ok(fleetprov_config_set_template(c, c"DemoTemplate".as_ptr()));
        ok(fleetprov_config_set_retry(c, 1, 50, 50));
    }
    c
}

type Outcome = (fleetprov_result, String);

extern "C" fn on_provisioned(
    userdata: *mut c_void,
    result: fleetprov_result,
    provisioned: *mut fleetprov_provisioned,
    error: *const fleetprov_error,
) {
    assert!(provisioned.is_null());
    // SAFETY: a Sender boxed by the test; the error is valid during the call.
    let (tx, text) = unsafe {
        (
            &*(userdata as *const mpsc::Sender<Outcome>),
            CStr::from_ptr(fleetprov_error_message(error)),
        )
    };
    tx.send((result, text.to_string_lossy().into_owned()))
        .unwrap();
}

extern "C" fn on_certificate(
    userdata: *mut c_void,
    result: fleetprov_result,
    certificate: *mut fleetprov_certificate,
    error: *const fleetprov_error,
) {
    assert!(certificate.is_null());
    // SAFETY: as in on_provisioned.
    let (tx, text) = unsafe {
        (
            &*(userdata as *const mpsc::Sender<Outcome>),
            CStr::from_ptr(fleetprov_error_message(error)),
        )
    };
    tx.send((result, text.to_string_lossy().into_owned()))
        .unwrap();
}

extern "C" fn free_sender(userdata: *mut c_void) {
    // SAFETY: boxed by the test, released once by the library.
    drop(unsafe { Box::from_raw(userdata as *mut mpsc::Sender<Outcome>) });
}

fn sender() -> (*mut c_void, mpsc::Receiver<Outcome>) {
    let (tx, rx) = mpsc::channel();
    (Box::into_raw(Box::new(tx)) as *mut c_void, rx)
}

const STEP: std::time::Duration = std::time::Duration::from_secs(30);

unsafe extern "C" fn host_connect(_: *mut c_void, _: *const fleetprov_identity) -> i32 {
    0
}
unsafe extern "C" fn host_disconnect(_: *mut c_void) {}
unsafe extern "C" fn host_subscribe(_: *mut c_void, _: *const *const c_char, _: usize) -> i32 {
    0
}
unsafe extern "C" fn host_publish(_: *mut c_void, _: *const c_char, _: *const u8, _: usize) -> i32 {
    0
}

#[test]
fn every_catch_site_turns_a_panic_into_fleetprov_panic() {
    // A port nobody listens on: connections are refused at once.
    let refusing = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = refusing.local_addr().unwrap().port();
    drop(refusing);
    let config = refused_config(port);

    // SAFETY: every pointer below is owned by this test and live where used.
    unsafe {
        // 1. The export boundary (fleetprov_provision).
        let mut p = ptr::null_mut();
        let r = panicking("provision", || fleetprov_provision(config, &mut p));
        assert_eq!(r, FLEETPROV_PANIC);
        assert_eq!(last_error(), PANIC_TEXT);
        assert!(p.is_null());
        // Later calls work: the refused port gives an ordinary connection failure.
        assert_eq!(fleetprov_provision(config, &mut p), FLEETPROV_CONNECTION);

        // 2. The asynchronous provisioning thread.
        let (user, rx) = sender();
        let mut op = ptr::null_mut();
        panicking("provision-async", || {
            ok(fleetprov_provision_async(
                config,
                Some(on_provisioned),
                user,
                Some(free_sender),
                &mut op,
            ));
            // The worker reads the variable as it starts: wait for its outcome before disarming.
            ok(fleetprov_operation_wait(op));
        });
        let (code, text) = rx.recv_timeout(STEP).expect("the callback ran");
        assert_eq!((code, text.as_str()), (FLEETPROV_PANIC, PANIC_TEXT));
        fleetprov_operation_free(op);

        // A worker thread that cannot start: FLEETPROV_INTERNAL, not retryable (it was
        // FLEETPROV_CONNECTION), and the userdata is released.
        let (user, rx) = sender();
        let mut op = ptr::null_mut();
        // SAFETY: as above (set_var/remove_var: no other thread reads the environment).
        std::env::set_var("FLEETPROV_TEST_FAIL", "thread-spawn");
        let r = fleetprov_provision_async(
            config,
            Some(on_provisioned),
            user,
            Some(free_sender),
            &mut op,
        );
        std::env::remove_var("FLEETPROV_TEST_FAIL");
        assert_eq!(r, FLEETPROV_INTERNAL, "{}", last_error());
        assert!(op.is_null());
        assert!(last_error().starts_with("internal error: cannot start a worker thread"));
        let e = fleetprov_last_error();
        assert!(!fleetprov_error_is_retryable(e));
        fleetprov_error_free(e);
        assert!(
            rx.recv_timeout(STEP).is_err(),
            "no callback; the sender was released"
        );

        // 3. A blocking client call: that call and every later one on the client give
        // FLEETPROV_PANIC (its state is unknown), the client can still be freed.
        let mut client = ptr::null_mut();
        ok(fleetprov_client_new(config, &mut client));
        let r = panicking("client-blocking", || fleetprov_client_connect(client));
        assert_eq!((r, last_error().as_str()), (FLEETPROV_PANIC, PANIC_TEXT));
        assert_eq!(fleetprov_client_connect(client), FLEETPROV_PANIC);
        assert_eq!(last_error(), PANIC_TEXT);
        fleetprov_client_free(client);

        // 4. A client worker thread: the completion callback gets FLEETPROV_PANIC, and the
        // client is not left busy.
        let mut client = ptr::null_mut();
        ok(fleetprov_client_new(config, &mut client));
        let (user, rx) = sender();
        panicking("client-worker", || {
            ok(fleetprov_client_create_keys_and_certificate_async(
                client,
                Some(on_certificate),
                user,
                Some(free_sender),
            ));
            rx.recv_timeout(STEP).expect("the callback ran")
        });
        let (user, rx2) = sender();
        ok(fleetprov_client_create_keys_and_certificate_async(
            client,
            Some(on_certificate),
            user,
            Some(free_sender),
        ));
        let (code, text) = rx2.recv_timeout(STEP).expect("the second callback ran");
        assert_eq!((code, text.as_str()), (FLEETPROV_PANIC, PANIC_TEXT));
        fleetprov_client_free(client);
        drop(rx);

        // 5. The host API: the flow ends with FLEETPROV_PANIC instead of hanging.
        let callbacks = fleetprov_host_callbacks {
            size: std::mem::size_of::<fleetprov_host_callbacks>(),
            connect: Some(host_connect),
            disconnect: Some(host_disconnect),
            subscribe: Some(host_subscribe),
            publish: Some(host_publish),
        };
        let mut host = ptr::null_mut();
        ok(fleetprov_host_new(
            config,
            &callbacks,
            ptr::null_mut(),
            None,
            &mut host,
        ));
        ok(fleetprov_host_start(host, 0));
        let r = panicking("host-event", || fleetprov_host_tick(host, 5));
        assert_eq!(r, FLEETPROV_PANIC);
        let mut out = ptr::null_mut();
        assert_eq!(fleetprov_host_result(host, &mut out), FLEETPROV_PANIC);
        assert_eq!(last_error(), PANIC_TEXT);
        let mut wake = 0;
        ok(fleetprov_host_wake_at(host, &mut wake));
        assert_eq!(wake, u64::MAX, "no timer: the flow is over");
        ok(fleetprov_host_tick(host, 10));
        assert_eq!(fleetprov_host_result(host, &mut out), FLEETPROV_PANIC);
        fleetprov_host_free(host);

        fleetprov_config_free(config);
    }
}
