//! Builds of the library without its optional features, as firmware builds make them; each is
//! run by the test command:
//!
//!     cargo test --locked --no-default-features --features wipe-heap,transport --test trimmed
//!     cargo test --locked --no-default-features --features wipe-heap --test trimmed
//!
//! The first leaves out `cbor` and `system-roots`, the second also the built-in transport (the
//! firmware's MQTT and TLS drive the flow through the host API). What a build leaves out is
//! refused with an error that names the missing feature, before anything is sent; what it keeps
//! provisions as usual. With the default features this file holds no test.
#![cfg(not(any(feature = "cbor", feature = "system-roots")))]

mod common;

#[cfg(feature = "transport")]
mod without_cbor_and_system_roots {
    use super::common;
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
}

#[cfg(not(feature = "transport"))]
mod without_the_transport {
    use std::ffi::CStr;
    use std::ptr;

    use super::common;
    use super::common::host::*;
    use fleetprov::ffi::*;
    use fleetprov::keys::KeyType;
    use fleetprov::protocol::Format;
    use fleetprov::provision::Hooks;
    use fleetprov::{Error, Method, Request};
    use fleetprov_result::*;

    #[test]
    fn the_built_in_transport_is_refused_by_name_and_nothing_is_sent() {
        let env = common::env("trimmed", "no-transport", &[]);
        let mut r = Request::new(
            common::connection(&env.emu, Format::Json),
            "DemoTemplate",
            Method::Csr(KeyType::P256),
        );
        r.parameters.insert("SerialNumber".into(), "none".into());
        r.output_dir = Some(env.dir.join("out"));
        match fleetprov::provision(&r, &Hooks::default()) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("`transport`"), "{m}"),
            other => panic!("the one-call flow in a build without a transport: {other:?}"),
        }
        match fleetprov::Client::new(r.connection.clone()) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("host API"), "{m}"),
            other => panic!("a client in a build without a transport: {other:?}"),
        }
        let many = fleetprov::provision::provision_many(&[r.clone(), r], &Hooks::default());
        assert_eq!(many.len(), 2);
        assert!(many
            .iter()
            .all(|m| matches!(m, Err(Error::InvalidArgument(e)) if e.contains("`transport`"))));
        assert!(common::device_certificates(&env.emu).is_empty());
        assert!(!env.dir.join("out").exists());

        // The same through the C API: fleetprov_provision refuses, naming the feature.
        let c = host_config(&env, "c-api", fleetprov_method::FLEETPROV_METHOD_CSR, false);
        let mut out = ptr::null_mut();
        // SAFETY: a live config and a valid output pointer.
        let result = unsafe { fleetprov_provision(c, &mut out) };
        assert_eq!(result, FLEETPROV_INVALID_ARGUMENT);
        let m = common::last_error();
        assert!(m.contains("`transport`"), "{m}");
        assert!(out.is_null());
        // SAFETY: created by host_config, freed once.
        unsafe { fleetprov_config_free(c) };
    }

    #[test]
    fn the_host_api_provisions_over_the_firmware_s_own_mqtt_and_tls() {
        for (i, method) in [
            fleetprov_method::FLEETPROV_METHOD_CSR,
            fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS,
        ]
        .into_iter()
        .enumerate()
        {
            let env = common::env("trimmed", &format!("host-{i}"), &[]);
            let c = host_config(&env, &format!("trim{i}"), method, false);
            let (r, p, seen) = drive(&env, c, None);
            assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
            // SAFETY: a live result and config, each freed once.
            unsafe {
                let name = CStr::from_ptr(fleetprov_provisioned_thing_name(p));
                assert_eq!(name.to_str().unwrap(), format!("demo-trim{i}"));
                fleetprov_provisioned_free(p);
                fleetprov_config_free(c);
            }
            assert_eq!(common::device_certificates(&env.emu).len(), 1);
            for file in ["certificate.pem", "private.key", "device.json"] {
                assert!(env.dir.join("out").join(file).is_file(), "{file}");
            }
        }
    }
}
