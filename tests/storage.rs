//! The journal and the credentials in a store of the firmware's own (named blobs) instead of
//! files: what is stored in which order, and that a failed or interrupted store loses nothing.

mod common;

use std::sync::Arc;

use common::blobs::MemBlobs;
use fleetprov::engine::retry::RetryPolicy;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::Hooks;
use fleetprov::{Error, Method, Request};
use fleetprov_emulator::Emulator;

fn request(emu: &Emulator, blobs: &Arc<MemBlobs>, serial: &str) -> Request {
    let mut r = Request::new(
        common::connection(emu, Format::Json),
        "DemoTemplate",
        Method::Csr(KeyType::P256),
    );
    r.parameters.insert("SerialNumber".into(), serial.into());
    r.storage = Some(blobs.shared());
    r.retry = RetryPolicy::none();
    r
}

#[test]
fn a_commit_stores_the_key_and_certificate_before_device_json_and_then_drops_the_journal() {
    let env = common::env("storage", "order", &[]);
    let blobs = MemBlobs::new();
    let p = fleetprov::provision(&request(&env.emu, &blobs, "order"), &Hooks::default()).unwrap();
    assert!(p.stored.is_none(), "no files");
    let stores: Vec<String> = blobs
        .take_calls()
        .into_iter()
        .filter(|c| !c.starts_with("load"))
        .collect();
    assert_eq!(
        stores,
        common::blobs::STORES_OF_A_PROVISIONING,
        "journal at the certificate, again at the registration, then the commit"
    );
    assert_eq!(
        blobs.names(),
        ["certificate.pem", "device.json", "private.key"]
    );
    assert_eq!(blobs.text("certificate.pem").unwrap(), p.certificate_pem);
    let key = blobs.text("private.key").unwrap();
    fleetprov::keys::certificate_matches_key(&p.certificate_pem, &key).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&blobs.text("device.json").unwrap()).unwrap();
    assert_eq!(meta["thingName"], "demo-order");
    assert_eq!(meta["certificateId"], p.certificate_id.as_str());
    assert!(
        !meta.to_string().contains("PRIVATE KEY"),
        "device.json holds no key"
    );

    // A second call finds the set and sends nothing.
    let again =
        fleetprov::provision(&request(&env.emu, &blobs, "order"), &Hooks::default()).unwrap();
    assert!(again.already_provisioned);
    assert_eq!(again.certificate_id, p.certificate_id);
    assert_eq!(common::device_certificates(&env.emu).len(), 1);
    assert!(
        blobs.take_calls().iter().all(|c| c.starts_with("load")),
        "nothing stored by the second call"
    );
}

#[test]
fn a_failed_commit_keeps_the_journal_and_the_next_call_finishes_it() {
    let env = common::env("storage", "commit-fails", &[]);
    let blobs = MemBlobs::new();
    blobs.fail_next_store("certificate.pem");
    let r = request(&env.emu, &blobs, "commit");
    let first = fleetprov::provision(&r, &Hooks::default());
    match &first {
        Err(Error::Storage(m)) => {
            assert!(
                m.contains("certificate.pem") && m.contains("worn out"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        blobs.text("journal").is_some(),
        "the journal keeps the credentials"
    );
    assert!(
        blobs.text("device.json").is_none(),
        "no complete set claimed"
    );
    let created = common::device_certificates(&env.emu);
    assert_eq!(created.len(), 1);

    let p = fleetprov::provision(&r, &Hooks::default()).unwrap();
    assert!(p.resumed);
    assert_eq!(
        p.certificate_id, created[0].0,
        "the same certificate, committed"
    );
    assert_eq!(
        common::device_certificates(&env.emu).len(),
        1,
        "no second one"
    );
    assert!(blobs.text("journal").is_none());
    assert!(blobs.text("device.json").is_some());
}

#[test]
fn a_failed_journal_write_stops_before_register_thing() {
    let env = common::env("storage", "journal-fails", &[]);
    let blobs = MemBlobs::new();
    blobs.fail_next_store("journal");
    let first = fleetprov::provision(&request(&env.emu, &blobs, "journal"), &Hooks::default());
    match &first {
        Err(Error::Storage(m)) => assert!(m.contains("resume journal"), "{m}"),
        other => panic!("{other:?}"),
    }
    let registry = env.emu.registry().unwrap();
    assert_eq!(
        registry["things"].as_array().unwrap().len(),
        0,
        "nothing registered with a certificate the device could lose"
    );
    assert!(blobs.names().is_empty(), "{:?}", blobs.names());
}

#[test]
fn an_interrupted_run_resumes_from_the_journal_blob() {
    let env = common::env("storage", "resume", &["close:request@register*1"]);
    let blobs = MemBlobs::new();
    let r = request(&env.emu, &blobs, "resume");
    let first = fleetprov::provision(&r, &Hooks::default());
    // Over MQTT 5 the emulator ends the connection with DISCONNECT 0x80, a retryable refusal.
    assert!(
        matches!(&first, Err(e @ Error::Refused(_)) if e.is_retryable()),
        "{first:?}"
    );
    assert!(blobs.text("journal").is_some());
    let p = fleetprov::provision(&r, &Hooks::default()).unwrap();
    assert!(p.resumed);
    assert_eq!(p.thing_name, "demo-resume");
    assert_eq!(common::device_certificates(&env.emu).len(), 1);
    assert!(blobs.text("journal").is_none());
}

#[test]
fn a_blob_store_excludes_output_and_state_directories() {
    let env = common::env("storage", "exclusive", &[]);
    let blobs = MemBlobs::new();
    let mut r = request(&env.emu, &blobs, "x");
    r.output_dir = Some(env.dir.join("out"));
    match fleetprov::provision(&r, &Hooks::default()) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("choose one"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(blobs.take_calls().is_empty(), "nothing touched");
    assert!(
        common::device_certificates(&env.emu).is_empty(),
        "nothing sent"
    );
}

#[test]
fn rotation_reads_and_replaces_the_credentials_in_the_blob_store() {
    let env = common::env("storage", "rotate", &[]);
    let blobs = MemBlobs::new();
    let first = fleetprov::provision(&request(&env.emu, &blobs, "rot"), &Hooks::default()).unwrap();
    let mut r = request(&env.emu, &blobs, "rot");
    r.template = "DemoTemplate".into();
    let unused = env.dir.join("no-such-directory");
    let rotated = fleetprov::provision::rotate(&r, &unused, &Hooks::default()).unwrap();
    assert_ne!(rotated.certificate_id, first.certificate_id);
    let meta: serde_json::Value =
        serde_json::from_str(&blobs.text("device.json").unwrap()).unwrap();
    assert_eq!(meta["certificateId"], rotated.certificate_id.as_str());
    assert_eq!(
        blobs.text("certificate.pem").unwrap(),
        rotated.certificate_pem
    );
    assert!(!unused.exists());
}
