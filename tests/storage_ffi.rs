//! The C storage interface (`fleetprov_storage`, `fleetprov_config_set_storage`): firmware
//! keeps the journal and the credentials in its own store, through the one-call flow and the
//! host transport, with the load protocol's second call for blobs larger than the first buffer,
//! and failures that end the flow with FLEETPROV_STORAGE and lose nothing.

mod common;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::host::{drive, host_config};
use common::{last_error, ok};
use fleetprov::ffi::*;
use fleetprov_result::*;

/// The firmware's store: blobs in a map, every call recorded, failures on demand.
#[derive(Default)]
struct Flash {
    blobs: Mutex<BTreeMap<String, Vec<u8>>>,
    calls: Mutex<Vec<String>>,
    /// Stores of this blob return this code.
    fail: Mutex<Option<(String, i32)>>,
    /// The capacities load was called with.
    capacities: Mutex<Vec<usize>>,
}

fn flash<'a>(userdata: *mut c_void) -> &'a Flash {
    // SAFETY: the test's Flash, alive while the config is.
    unsafe { &*(userdata as *const Flash) }
}

fn name_of(name: *const c_char) -> String {
    // SAFETY: a NUL-terminated name valid during the call.
    unsafe { CStr::from_ptr(name) }.to_str().unwrap().to_owned()
}

unsafe extern "C" fn load(
    userdata: *mut c_void,
    name: *const c_char,
    buf: *mut u8,
    capacity: usize,
    len: *mut usize,
) -> i32 {
    let f = flash(userdata);
    let name = name_of(name);
    f.calls.lock().unwrap().push(format!("load {name}"));
    f.capacities.lock().unwrap().push(capacity);
    let blobs = f.blobs.lock().unwrap();
    let Some(blob) = blobs.get(&name) else {
        return FLEETPROV_STORAGE_NOT_FOUND;
    };
    // SAFETY: `len` is writable; `buf` has `capacity` writable bytes.
    unsafe {
        *len = blob.len();
        if blob.len() <= capacity {
            ptr::copy_nonoverlapping(blob.as_ptr(), buf, blob.len());
        }
    }
    FLEETPROV_STORAGE_OK
}

unsafe extern "C" fn store(
    userdata: *mut c_void,
    name: *const c_char,
    data: *const u8,
    len: usize,
) -> i32 {
    let f = flash(userdata);
    let name = name_of(name);
    f.calls.lock().unwrap().push(format!("store {name}"));
    let fail = f.fail.lock().unwrap().clone();
    if let Some((_, code)) = fail.filter(|(n, _)| *n == name) {
        return code;
    }
    // SAFETY: `len` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
    f.blobs.lock().unwrap().insert(name, bytes);
    FLEETPROV_STORAGE_OK
}

unsafe extern "C" fn remove(userdata: *mut c_void, name: *const c_char) -> i32 {
    let f = flash(userdata);
    let name = name_of(name);
    f.calls.lock().unwrap().push(format!("remove {name}"));
    f.blobs.lock().unwrap().remove(&name);
    FLEETPROV_STORAGE_OK
}

const TABLE: fleetprov_storage = fleetprov_storage {
    size: std::mem::size_of::<fleetprov_storage>(),
    load: Some(load),
    store: Some(store),
    remove: Some(remove),
};

static FREED: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn count_free(_userdata: *mut c_void) {
    FREED.fetch_add(1, Ordering::SeqCst);
}

/// A host-transport config with `flash` as its storage instead of directories.
fn flash_config(env: &common::Env, serial: &str, flash: &Flash) -> *mut fleetprov_config {
    let c = host_config(env, serial, fleetprov_method::FLEETPROV_METHOD_CSR, false);
    // SAFETY: a live config; `flash` outlives it.
    unsafe {
        ok(fleetprov_config_set_output_dir(c, ptr::null()));
        ok(fleetprov_config_set_state_dir(c, ptr::null()));
        ok(fleetprov_config_set_storage(
            c,
            &TABLE,
            flash as *const Flash as *mut c_void,
            None,
        ));
    }
    c
}

#[test]
fn set_storage_arguments_are_checked_and_userdata_is_released_on_failure() {
    let mut c = ptr::null_mut();
    // SAFETY: a config the test owns; tables that live for each call.
    unsafe {
        ok(fleetprov_config_new(&mut c));
        let mut short = TABLE;
        short.size = 8;
        let mut no_load = TABLE;
        no_load.load = None;
        let mut no_remove = TABLE;
        no_remove.remove = None;
        let u = ptr::dangling_mut::<c_void>();
        let rows: [(&str, *mut fleetprov_config, *const fleetprov_storage, &str); 4] = [
            ("NULL config", ptr::null_mut(), &TABLE, "config is NULL"),
            (
                "size 8",
                c,
                &short,
                "storage->size is 8: set it to sizeof(fleetprov_storage)",
            ),
            (
                "no load",
                c,
                &no_load,
                "every storage callback (load, store, remove) is required",
            ),
            (
                "no remove",
                c,
                &no_remove,
                "every storage callback (load, store, remove) is required",
            ),
        ];
        for (i, (what, cfg, table, message)) in rows.into_iter().enumerate() {
            let r = fleetprov_config_set_storage(cfg, table, u, Some(count_free));
            assert_eq!(r, FLEETPROV_INVALID_ARGUMENT, "{what}");
            let text = last_error();
            assert!(text.contains(message), "{what}: {text}");
            assert_eq!(
                FREED.load(Ordering::SeqCst),
                i + 1,
                "{what}: userdata released"
            );
        }
        // Valid, then cleared with NULL: the userdata goes once, when it is replaced.
        ok(fleetprov_config_set_storage(c, &TABLE, u, Some(count_free)));
        assert_eq!(FREED.load(Ordering::SeqCst), 4);
        ok(fleetprov_config_set_storage(
            c,
            ptr::null(),
            ptr::null_mut(),
            None,
        ));
        assert_eq!(
            FREED.load(Ordering::SeqCst),
            5,
            "released when the storage is cleared"
        );
        fleetprov_config_free(c);
    }
}

#[test]
fn a_host_flow_keeps_everything_in_the_firmware_store() {
    let env = common::env("storage-ffi", "host", &[]);
    let f = Flash::default();
    let c = flash_config(&env, "flash1", &f);
    let (r, p, seen) = drive(&env, c, None);
    assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
    // SAFETY: a live result and config, freed once.
    let id = unsafe {
        assert!(fleetprov_provisioned_output_dir(p).is_null(), "no files");
        let id = CStr::from_ptr(fleetprov_provisioned_certificate_id(p))
            .to_str()
            .unwrap()
            .to_owned();
        fleetprov_provisioned_free(p);
        fleetprov_config_free(c);
        id
    };
    let stores: Vec<String> = std::mem::take(&mut *f.calls.lock().unwrap())
        .into_iter()
        .filter(|c| !c.starts_with("load"))
        .collect();
    assert_eq!(stores, common::blobs::STORES_OF_A_PROVISIONING);
    assert!(!env.dir.join("out").exists() && !env.dir.join("state").exists());

    // A later boot, with a device configuration bigger than the library's first buffer: the
    // load protocol's second call brings it whole, and the flow ends at start.
    let big = "x".repeat(6000);
    {
        let mut blobs = f.blobs.lock().unwrap();
        let mut meta: serde_json::Value = serde_json::from_slice(&blobs["device.json"]).unwrap();
        meta["deviceConfiguration"]["big"] = big.clone().into();
        blobs.insert("device.json".into(), serde_json::to_vec(&meta).unwrap());
    }
    f.capacities.lock().unwrap().clear();
    let c = flash_config(&env, "flash1", &f);
    let (r, p, seen) = drive(&env, c, None);
    assert_eq!(r, FLEETPROV_OK);
    assert!(seen.is_empty(), "nothing asked of the host: {seen:#?}");
    let capacities = f.capacities.lock().unwrap().clone();
    assert!(
        capacities.windows(2).any(|w| w[0] < 6000 && w[1] >= 6000),
        "a second, larger buffer: {capacities:?}"
    );
    // SAFETY: a live result and config, freed once.
    unsafe {
        assert!(fleetprov_provisioned_already_provisioned(p));
        let got = CStr::from_ptr(fleetprov_provisioned_certificate_id(p))
            .to_str()
            .unwrap();
        assert_eq!(got, id);
        let found = (0..fleetprov_provisioned_config_count(p)).any(|i| {
            let (mut key, mut value) = (ptr::null(), ptr::null());
            ok(fleetprov_provisioned_config_entry(
                p, i, &mut key, &mut value,
            ));
            CStr::from_ptr(key).to_bytes() == b"big"
                && CStr::from_ptr(value).to_bytes() == big.as_bytes()
        });
        assert!(found, "the large deviceConfiguration entry came back whole");
        fleetprov_provisioned_free(p);
        fleetprov_config_free(c);
    }
    assert_eq!(common::device_certificates(&env.emu).len(), 1);
}

#[test]
fn a_store_that_fails_ends_the_flow_with_storage_and_the_rerun_finishes_it() {
    let env = common::env("storage-ffi", "fails", &[]);
    let f = Flash::default();
    *f.fail.lock().unwrap() = Some(("private.key".into(), 5));
    let c = flash_config(&env, "flash2", &f);
    let (r, _, seen) = drive(&env, c, None);
    assert_eq!(r, FLEETPROV_STORAGE, "{seen:#?}");
    let text = last_error();
    assert!(
        text.contains("\"private.key\"") && text.contains("the storage callback returned 5"),
        "{text}"
    );
    assert!(
        f.blobs.lock().unwrap().contains_key("journal"),
        "the journal keeps it"
    );
    assert!(!f.blobs.lock().unwrap().contains_key("device.json"));
    // SAFETY: a live config, freed once.
    unsafe { fleetprov_config_free(c) };

    *f.fail.lock().unwrap() = None;
    let c = flash_config(&env, "flash2", &f);
    let (r, p, _) = drive(&env, c, None);
    assert_eq!(r, FLEETPROV_OK);
    // SAFETY: a live result and config, freed once.
    unsafe {
        assert!(fleetprov_provisioned_resumed(p));
        fleetprov_provisioned_free(p);
        fleetprov_config_free(c);
    }
    assert_eq!(
        common::device_certificates(&env.emu).len(),
        1,
        "one certificate in all"
    );
    assert!(!f.blobs.lock().unwrap().contains_key("journal"));
}
