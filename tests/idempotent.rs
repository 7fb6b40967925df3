//! Provisioning that firmware can run at every boot and interrupt at any moment: a device whose
//! output directory holds committed credentials is not provisioned again, and a cancelled call
//! (at any step, while the emulator makes each step last) keeps its journal, so the same call
//! made again finishes the job with exactly one certificate minted in all, whose key is on disk.

mod common;

use std::sync::{Arc, Mutex};

use fleetprov::engine::flow::Progress;
use fleetprov::engine::Step;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::{self, Hooks};
use fleetprov::{Cancel, Client, Error, Method, Request, Secret};

fn request(env: &common::Env, method: Method) -> Request {
    let mut r = Request::new(
        common::connection(&env.emu, Format::Json),
        "DemoTemplate",
        method,
    );
    r.parameters.insert("SerialNumber".into(), "idem-1".into());
    r.output_dir = Some(env.dir.join("device"));
    r.state_dir = Some(env.dir.join("state"));
    r
}

/// The stored credentials match each other and connect (the emulator admits only the key of
/// an ACTIVE certificate).
fn check_stored(env: &common::Env, certificate_id: &str) {
    let dir = env.dir.join("device");
    let cert = std::fs::read_to_string(dir.join("certificate.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("private.key")).unwrap();
    assert_eq!(
        fleetprov::keys::certificate_id(&cert).unwrap(),
        certificate_id
    );
    fleetprov::keys::certificate_matches_key(&cert, &key).expect("the key on disk matches");
    let mut c = common::connection(&env.emu, Format::Json);
    c.cert_pem = cert;
    c.key_pem = Secret::new(key);
    let mut client = Client::new(c).unwrap();
    client.connect().expect("the stored credentials connect");
    client.disconnect();
}

#[test]
fn committed_credentials_are_returned_without_a_new_certificate() {
    for method in [Method::Csr(KeyType::P256), Method::CreateKeys] {
        let name = format!("{method:?}").replace(['(', ')'], "");
        let env = common::env("idempotent", &name, &[]);
        let r = request(&env, method);
        let first = provision::provision(&r, &Hooks::default()).expect("first run");
        assert!(!first.already_provisioned);
        let files = std::fs::read(env.dir.join("device/private.key")).unwrap();

        // The second run (a reboot) finds them: nothing is sent, nothing minted.
        let steps = Arc::new(Mutex::new(Vec::new()));
        let seen = steps.clone();
        let hooks = Hooks {
            progress: Some(Arc::new(move |p: &Progress| {
                seen.lock().unwrap().push(p.step)
            })),
            ..Hooks::default()
        };
        let again = provision::provision(&r, &hooks).expect("second run");
        assert!(again.already_provisioned, "{name}");
        assert_eq!(again.certificate_id, first.certificate_id);
        assert_eq!(again.thing_name, first.thing_name);
        assert_eq!(again.device_configuration, first.device_configuration);
        assert_eq!(again.attempts, 0);
        assert_eq!(
            again.private_key_pem.as_ref().map(Secret::expose),
            first.private_key_pem.as_ref().map(Secret::expose)
        );
        assert!(steps.lock().unwrap().is_empty(), "no step: no connection");
        assert_eq!(common::device_certificates(&env.emu).len(), 1, "{name}");
        assert_eq!(
            std::fs::read(env.dir.join("device/private.key")).unwrap(),
            files
        );

        // Asked for explicitly, a new certificate replaces the set.
        let mut renew = r.clone();
        renew.reprovision = true;
        let second = provision::provision(&renew, &Hooks::default()).expect("reprovision");
        assert!(!second.already_provisioned);
        assert_ne!(second.certificate_id, first.certificate_id);
        assert_eq!(common::device_certificates(&env.emu).len(), 2, "{name}");
        check_stored(&env, &second.certificate_id);
        let _ = std::fs::remove_dir_all(&env.dir);
    }
}

#[test]
fn a_damaged_credential_set_is_not_taken_for_a_provisioned_device() {
    let env = common::env("idempotent", "damaged", &[]);
    let r = request(&env, Method::Csr(KeyType::P256));
    let first = provision::provision(&r, &Hooks::default()).expect("first run");
    // Another key in place of the device's: the set does not hold together.
    let other = fleetprov::keys::DeviceKey::generate(KeyType::P256).unwrap();
    std::fs::write(
        env.dir.join("device/private.key"),
        other.private_key_pem().expose(),
    )
    .unwrap();
    let again = provision::provision(&r, &Hooks::default()).expect("second run");
    assert!(!again.already_provisioned);
    assert_ne!(again.certificate_id, first.certificate_id);
    check_stored(&env, &again.certificate_id);
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// The steps a first run goes through, in order.
const STEPS: [Step; 9] = [
    Step::Connecting,
    Step::Subscribing,
    Step::Subscribed,
    Step::CreatingCertificate,
    Step::CertificateCreated,
    Step::Registering,
    Step::Registered,
    Step::Verifying,
    Step::Verified,
];

#[test]
fn a_call_cancelled_at_any_step_is_finished_by_the_next_with_one_certificate() {
    for method in [Method::Csr(KeyType::P256), Method::CreateKeys] {
        for step in STEPS {
            let name = format!("{method:?}-{step:?}").replace(['(', ')'], "");
            // Each reply takes a while, so that the cancel lands inside the step.
            let env = common::env(
                "idempotent",
                &name,
                &["delay:150@create", "delay:150@register"],
            );
            let r = request(&env, method.clone());
            let cancel = Arc::new(Cancel::default());
            let trigger = cancel.clone();
            let steps = Arc::new(Mutex::new(Vec::new()));
            let seen = steps.clone();
            let hooks = Hooks {
                progress: Some(Arc::new(move |p: &Progress| {
                    seen.lock().unwrap().push(p.step);
                    if p.step == step {
                        trigger.cancel();
                    }
                })),
                cancel: Some(cancel.clone()),
                ..Hooks::default()
            };
            let first = provision::provision(&r, &hooks);
            match &first {
                Err(Error::Cancelled) => {}
                // Verified and committed in one go: a finished result is never thrown away.
                Ok(p) if step == Step::Verified => assert!(!p.already_provisioned),
                Ok(p) => panic!("{name}: cancelled, yet finished: {}", p.certificate_id),
                Err(e) => panic!("{name}: {e}"),
            }
            // A certificate request on the wire is waited for: at most one certificate so far.
            assert!(common::device_certificates(&env.emu).len() <= 1, "{name}");

            // The same call again, not cancelled.
            let p = provision::provision(&r, &Hooks::default())
                .unwrap_or_else(|e| panic!("{name}: the rerun failed: {e}"));
            let device = common::device_certificates(&env.emu);
            assert_eq!(
                device.len(),
                1,
                "{name}: one certificate in all: {device:?}"
            );
            assert_eq!(
                device[0],
                (p.certificate_id.clone(), "ACTIVE".into()),
                "{name}"
            );
            if first.is_ok() {
                assert!(p.already_provisioned, "{name}");
            } else {
                // The journal holds the certificate when the first run got it (a request out
                // when the cancel came is waited for).
                let created = steps.lock().unwrap().contains(&Step::CertificateCreated);
                assert_eq!(p.resumed, created, "{name}: resumed from the journal");
                let at = STEPS.iter().position(|s| *s == step).unwrap();
                if at >= 3 {
                    assert!(created, "{name}: a request out is waited for");
                }
            }
            // A RegisterThing out when the cancel came was waited for: the name is known.
            assert_eq!(p.thing_name, "demo-idem-1", "{name}");
            check_stored(&env, &p.certificate_id);
            assert!(!env.dir.join("state/journal.json").exists(), "{name}");
            let _ = std::fs::remove_dir_all(&env.dir);
        }
    }
}

#[test]
fn a_cancel_after_the_commit_still_reports_the_success() {
    let env = common::env("idempotent", "after-commit", &[]);
    let r = request(&env, Method::Csr(KeyType::P256));
    let cancel = Arc::new(Cancel::default());
    let trigger = cancel.clone();
    let hooks = Hooks {
        progress: Some(Arc::new(move |p: &Progress| {
            if p.step == Step::Committed {
                trigger.cancel();
            }
        })),
        cancel: Some(cancel.clone()),
        ..Hooks::default()
    };
    let p = provision::provision(&r, &hooks).expect("committed before the cancel");
    assert!(cancel.is_cancelled());
    check_stored(&env, &p.certificate_id);
    // Cancelled from the start, a provisioned device still gets its credentials back.
    let again = provision::provision(&r, &hooks).expect("already provisioned");
    assert!(again.already_provisioned);
    let _ = std::fs::remove_dir_all(&env.dir);
}
