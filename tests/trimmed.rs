//! A library built without the default features `cbor` and `system-roots`, as a firmware build
//! that needs neither makes it:
//!
//!     cargo test --locked --no-default-features --features wipe-heap --test trimmed
//!
//! (the test command runs it). What the build leaves out is refused with an error that names the
//! missing feature, before anything is sent; what it keeps provisions as usual. With the
//! default features this file holds no test.
#![cfg(not(any(feature = "cbor", feature = "system-roots")))]

mod common;

use std::ptr;

use fleetprov::client::tls::Roots;
use fleetprov::ffi::*;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::Hooks;
use fleetprov::{Error, Method, Request};
use fleetprov_format::{FLEETPROV_FORMAT_CBOR, FLEETPROV_FORMAT_JSON};
use fleetprov_result::*;

fn request(env: &common::Env, format: Format, serial: &str) -> Request {
    let mut r = Request::new(
        common::connection(&env.emu, format),
        "DemoTemplate",
        Method::Csr(KeyType::P256),
    );
    r.parameters.insert("SerialNumber".into(), serial.into());
    r.output_dir = Some(env.dir.join(serial));
    r
}

#[test]
fn what_the_build_leaves_out_is_refused_by_name_and_the_rest_provisions() {
    let env = common::env("trimmed", "refused", &[]);

    let cbor = request(&env, Format::Cbor, "cbor");
    match fleetprov::provision(&cbor, &Hooks::default()) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("cbor payloads") && m.contains("`cbor`"), "{m}")
        }
        other => panic!("CBOR in a build without it: {other:?}"),
    }

    let mut system = request(&env, Format::Json, "system");
    system.connection.roots = Roots::System;
    match fleetprov::provision(&system, &Hooks::default()) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("`system-roots`"), "{m}"),
        other => panic!("system roots in a build without them: {other:?}"),
    }
    assert!(
        common::device_certificates(&env.emu).is_empty(),
        "nothing was requested for the refused configurations"
    );
    assert!(!env.dir.join("cbor").exists() && !env.dir.join("system").exists());

    // JSON with the CA given: provisions.
    let json = request(&env, Format::Json, "json");
    let done = fleetprov::provision(&json, &Hooks::default()).expect("JSON provisions");
    assert!(!done.certificate_id.is_empty());
    assert_eq!(common::device_certificates(&env.emu).len(), 1);
    for file in ["certificate.pem", "private.key", "device.json"] {
        assert!(env.dir.join("json").join(file).is_file(), "{file}");
    }
}

#[test]
fn the_c_api_refuses_cbor_and_the_system_roots_in_this_build() {
    let mut config = ptr::null_mut();
    // SAFETY: a valid output pointer.
    assert_eq!(unsafe { fleetprov_config_new(&mut config) }, FLEETPROV_OK);
    // SAFETY: a live config, used by this thread only.
    let cbor = unsafe { fleetprov_config_set_format(config, FLEETPROV_FORMAT_CBOR as i32) };
    assert_eq!(cbor, FLEETPROV_INVALID_ARGUMENT);
    let m = common::last_error();
    assert!(m.contains("`cbor`"), "{m}");
    // SAFETY: as above.
    let json = unsafe { fleetprov_config_set_format(config, FLEETPROV_FORMAT_JSON as i32) };
    assert_eq!(json, FLEETPROV_OK);
    // SAFETY: as above.
    let roots = unsafe { fleetprov_config_use_system_roots(config) };
    assert_eq!(roots, FLEETPROV_INVALID_ARGUMENT);
    let m = common::last_error();
    assert!(m.contains("`system-roots`"), "{m}");
    // SAFETY: created above, freed once.
    unsafe { fleetprov_config_free(config) };
}
